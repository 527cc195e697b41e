//! The sidecar (`.libdcp_{token}`, one per save; `.libdcp` before 0.2): what libdcp knows about a checkpoint it wrote that torch's format does
//! not carry. torch ignores the file; a checkpoint without one (written by torch) still loads.
//!
//! Envelope: magic (8 bytes) | envelope version (u32 LE) | payload length (u64 LE) | payload
//! (postcard) | CRC-32 of the payload (u32 LE).

use crate::error::{ensure, Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = ".libdcp";
pub const MAGIC: &[u8; 8] = b"LIBDCP\0\x1a";
pub const ENVELOPE_VERSION: u32 = 1;
pub const FORMAT_VERSION: u32 = 1;
/// Payload checksums of large tensor items are kept per block of this many bytes, so a load that
/// needs part of an item verifies only the blocks it reads.
pub const BLOCK_SIZE: u64 = 4 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    pub format_version: u32,
    /// "libdcp <version>".
    pub writer: String,
    pub save_id: String,
    pub world_size: u32,
    /// Length and CRC-32 of the `.metadata` committed with this sidecar.
    pub metadata_len: u64,
    pub metadata_crc32: u32,
    /// Hash of the global save plan (equal hashes: same layout).
    pub plan_hash: u64,
    pub block_size: u64,
    pub files: Vec<FileRecord>,
    /// Tensor items whose payload is larger than one block.
    pub blocks: Vec<BlockRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub len: u64,
    pub rank: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub fqn: String,
    pub chunk_offsets: Vec<u64>,
    /// Index into `files`.
    pub file: u32,
    /// Absolute offset of the payload (`data/0`) in the file.
    pub payload_offset: u64,
    pub payload_len: u64,
    /// CRC-32 of each `block_size` piece of the payload, in order.
    pub crcs: Vec<u32>,
}

impl Sidecar {
    /// The CRC-32 of `md` when it is not the `.metadata` this sidecar was committed with
    /// (another length or checksum); `None` when it matches.
    pub fn metadata_mismatch(&self, md: &[u8]) -> Option<u32> {
        let crc = crc32fast::hash(md);
        (md.len() as u64 != self.metadata_len || crc != self.metadata_crc32).then_some(crc)
    }

    pub fn encode(&self) -> Vec<u8> {
        let payload = postcard::to_allocvec(self).expect("sidecar serialises");
        let mut out = Vec::with_capacity(payload.len() + 24);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out
    }

    /// Parses a sidecar. A damaged one is [`ErrorKind::Corrupt`]; one from a newer libdcp is
    /// [`ErrorKind::Unsupported`] (callers then fall back to the zip CRCs).
    pub fn decode(data: &[u8], what: &str) -> Result<Sidecar> {
        let bad = |m: &str| Error::corrupt(format!("{what}: damaged libdcp sidecar: {m}"));
        ensure!(data.len() >= 24, bad("too short"));
        ensure!(&data[..8] == MAGIC, bad("wrong magic"));
        let env = u32::from_le_bytes(data[8..12].try_into().unwrap());
        ensure!(
            env == ENVELOPE_VERSION,
            Error::new(
                ErrorKind::Unsupported,
                format!("{what}: sidecar envelope version {env} is not supported")
            )
        );
        let n = u64::from_le_bytes(data[12..20].try_into().unwrap());
        ensure!(
            n == data.len() as u64 - 24,
            bad(&format!("payload length {n} does not match the file ({} bytes)", data.len()))
        );
        let payload = &data[20..data.len() - 4];
        let crc = u32::from_le_bytes(data[data.len() - 4..].try_into().unwrap());
        ensure!(
            crc32fast::hash(payload) == crc,
            Error::new(ErrorKind::Checksum, format!("{what}: sidecar CRC-32 mismatch"))
        );
        let s: Sidecar = postcard::from_bytes(payload).map_err(|e| bad(&e.to_string()))?;
        ensure!(
            s.format_version == FORMAT_VERSION,
            Error::new(
                ErrorKind::Unsupported,
                format!("{what}: sidecar format version {} is not supported", s.format_version)
            )
        );
        ensure!(s.block_size > 0, bad("zero block size"));
        for f in &s.files {
            ensure!(
                super::is_plain_file_name(&f.name),
                bad(&format!("file name {:?} is not a plain file name", f.name))
            );
        }
        for b in &s.blocks {
            ensure!((b.file as usize) < s.files.len(), bad("block record names a missing file"));
            ensure!(
                b.crcs.len() as u64 == b.payload_len.div_ceil(s.block_size),
                bad("block count does not match payload length")
            );
        }
        Ok(s)
    }
}

/// Hashes a byte stream, fed in slices of any size, block by block: each completed block's
/// hasher goes to a callback with the block's index and length.
pub struct BlockHasher {
    block_size: u64,
    cur: crc32fast::Hasher,
    filled: u64,
    index: usize,
}

impl BlockHasher {
    pub fn new(block_size: u64) -> Self {
        BlockHasher {
            block_size,
            cur: crc32fast::Hasher::new(),
            filled: 0,
            index: 0,
        }
    }

    /// Hashes `data`; calls `block(index, hasher, len)` for every block it completes.
    pub fn update(&mut self, mut data: &[u8], mut block: impl FnMut(usize, crc32fast::Hasher, u64)) {
        while !data.is_empty() {
            let k = ((self.block_size - self.filled) as usize).min(data.len());
            self.cur.update(&data[..k]);
            self.filled += k as u64;
            data = &data[k..];
            if self.filled == self.block_size {
                self.emit(&mut block);
            }
        }
    }

    /// Ends the stream: the last, partial block (if any) goes to `block`.
    pub fn finish(mut self, mut block: impl FnMut(usize, crc32fast::Hasher, u64)) {
        if self.filled > 0 {
            self.emit(&mut block);
        }
    }

    fn emit(&mut self, block: &mut impl FnMut(usize, crc32fast::Hasher, u64)) {
        let done = std::mem::replace(&mut self.cur, crc32fast::Hasher::new());
        block(self.index, done, self.filled);
        self.index += 1;
        self.filled = 0;
    }
}

/// A sidecar's block checksums by chunk (key and chunk offsets), with the block size they were
/// taken at: what a reader of one item looks up. Without a sidecar (torch's checkpoints) it is
/// empty.
pub struct BlockIndex<'s> {
    by_chunk: std::collections::HashMap<(&'s str, &'s [u64]), &'s BlockRecord>,
    block_size: u64,
}

impl<'s> BlockIndex<'s> {
    /// The index of `sidecar`'s blocks; the last record of a chunk listed twice wins.
    pub fn new(sidecar: Option<&'s Sidecar>) -> Self {
        BlockIndex {
            by_chunk: sidecar
                .iter()
                .flat_map(|s| s.blocks.iter())
                .map(|b| ((b.fqn.as_str(), b.chunk_offsets.as_slice()), b))
                .collect(),
            block_size: sidecar.map_or(BLOCK_SIZE, |s| s.block_size),
        }
    }

    /// The block checksums of chunk `offsets` of `fqn`, with the block size, if the sidecar
    /// has them.
    pub fn get(&self, fqn: &str, offsets: &[u64]) -> Option<(&'s BlockRecord, u64)> {
        self.by_chunk.get(&(fqn, offsets)).map(|b| (*b, self.block_size))
    }

    /// The block size of the checksums (the default when there is no sidecar).
    #[cfg(test)]
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sidecar {
        Sidecar {
            format_version: FORMAT_VERSION,
            writer: "libdcp 0.1.0".into(),
            save_id: "id".into(),
            world_size: 2,
            metadata_len: 100,
            metadata_crc32: 7,
            plan_hash: 99,
            block_size: BLOCK_SIZE,
            files: vec![FileRecord {
                name: "__0_0.distcp".into(),
                len: 1 << 30,
                rank: 0,
            }],
            blocks: vec![BlockRecord {
                fqn: "w".into(),
                chunk_offsets: vec![0, 0],
                file: 0,
                payload_offset: 4096,
                payload_len: BLOCK_SIZE + 1,
                crcs: vec![1, 2],
            }],
        }
    }

    #[test]
    fn roundtrip() {
        let s = sample();
        assert_eq!(Sidecar::decode(&s.encode(), "t").unwrap(), s);
    }

    #[test]
    fn damage_is_detected() {
        let enc = sample().encode();
        for i in 0..enc.len() {
            let mut m = enc.clone();
            m[i] ^= 0x01;
            assert!(Sidecar::decode(&m, "t").is_err(), "flip at {i} not detected");
        }
        for cut in 0..enc.len() {
            assert!(Sidecar::decode(&enc[..cut], "t").is_err());
        }
    }

    #[test]
    fn block_hasher_matches_whole_blocks() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for piece in [1, 3, 64, 100, 1000] {
            let mut h = BlockHasher::new(100);
            let mut got = Vec::new();
            for p in data[..950].chunks(piece) {
                h.update(p, |i, c, n| got.push((i, c.finalize(), n)));
            }
            h.finish(|i, c, n| got.push((i, c.finalize(), n)));
            let want: Vec<_> = data[..950]
                .chunks(100)
                .enumerate()
                .map(|(i, b)| (i, crc32fast::hash(b), b.len() as u64))
                .collect();
            assert_eq!(got, want, "pieces of {piece}");
        }
    }

    #[test]
    fn newer_version_is_unsupported() {
        let mut s = sample();
        s.format_version = 99;
        assert_eq!(Sidecar::decode(&s.encode(), "t").unwrap_err().kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn block_index_finds_a_chunk_by_key_and_offsets() {
        let none = BlockIndex::new(None);
        assert!(none.get("a", &[0]).is_none());
        assert_eq!(none.block_size(), BLOCK_SIZE);
        let block = |fqn: &str, offsets: Vec<u64>| BlockRecord {
            fqn: fqn.into(),
            chunk_offsets: offsets,
            file: 0,
            payload_offset: 64,
            payload_len: 1 << 20,
            crcs: vec![1, 2],
        };
        let sc = Sidecar {
            format_version: FORMAT_VERSION,
            writer: "libdcp test".into(),
            save_id: "s".into(),
            world_size: 1,
            metadata_len: 0,
            metadata_crc32: 0,
            plan_hash: 0,
            block_size: 4096,
            files: vec![],
            blocks: vec![block("a", vec![0, 0]), block("a", vec![4, 0]), block("b", vec![0, 0])],
        };
        let index = BlockIndex::new(Some(&sc));
        let (b, size) = index.get("a", &[4, 0]).unwrap();
        assert_eq!((b, size), (&sc.blocks[1], 4096));
        assert_eq!(index.get("b", &[0, 0]).unwrap().0, &sc.blocks[2]);
        assert!(index.get("a", &[0, 4]).is_none());
        assert!(index.get("c", &[0, 0]).is_none());
    }
}
