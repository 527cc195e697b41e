//! One `torch.save` archive: the unit DCP stores per tensor chunk and per object. Writing follows
//! torch's own layout (records `data.pkl`, `.format_version`, `.storage_alignment`, `byteorder`,
//! `data/0`, `version`, `.data/serialization_id`; STORED; data descriptors; zip64 end records)
//! except that the tensor payload `data/0` starts on a chosen absolute file alignment (4096, for
//! O_DIRECT). Reading takes any zip torch writes: zip64, padding, records in any order.

use super::pickle::{self, PickleWriter};
use super::pyobj::ObjectValue;
use crate::error::{ensure, Error, Result};
use crate::tensor::{contiguous_strides, DType};

pub const ARCHIVE: &str = "archive";
/// torch aligns every record's data to 64 bytes within the archive.
pub const RECORD_ALIGN: u64 = 64;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const FLAGS: u16 = 0x0808; // data descriptor + UTF-8 names, as torch writes
const U32_MAX: u64 = 0xffff_ffff;
const LOCAL_HEADER_LEN: u64 = 30;

struct CdEntry {
    name: String,
    header_offset: u64,
    size: u64,
    crc: u32,
}

/// Writes zip records at known positions; bytes not materialised (the payload) are skipped.
struct ZipBuilder {
    base: u64,
    pos: u64,
    out: Vec<u8>,
    entries: Vec<CdEntry>,
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

impl ZipBuilder {
    fn new(base: u64) -> Self {
        ZipBuilder {
            base,
            pos: 0,
            out: Vec::new(),
            entries: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
        self.pos += bytes.len() as u64;
    }

    /// A local header whose data starts at an offset aligned to `align`, measured in the file
    /// (`absolute`) or in the archive. Returns the data offset within the archive.
    fn local_header(&mut self, name: &str, align: u64, absolute: bool) -> u64 {
        let unpadded = self.pos + LOCAL_HEADER_LEN + name.len() as u64 + 4;
        let origin = if absolute { self.base } else { 0 };
        let pad = (align - (origin + unpadded) % align) % align;
        let mut h = Vec::with_capacity(34 + name.len() + pad as usize);
        put32(&mut h, LOCAL_SIG);
        put16(&mut h, 0); // version needed (torch writes 0)
        put16(&mut h, FLAGS);
        put16(&mut h, 0); // stored
        put16(&mut h, 0); // time
        put16(&mut h, 0); // date
        put32(&mut h, 0); // crc: in the data descriptor
        put32(&mut h, 0);
        put32(&mut h, 0);
        put16(&mut h, name.len() as u16);
        put16(&mut h, (4 + pad) as u16);
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(b"FB");
        put16(&mut h, pad as u16);
        h.resize(h.len() + pad as usize, b'Z');
        self.emit(&h);
        self.pos
    }

    fn descriptor(&mut self, crc: u32, size: u64) -> usize {
        let mut d = Vec::with_capacity(24);
        put32(&mut d, DESCRIPTOR_SIG);
        let crc_at = self.out.len() + 4;
        put32(&mut d, crc);
        if size >= U32_MAX {
            put64(&mut d, size);
            put64(&mut d, size);
        } else {
            put32(&mut d, size as u32);
            put32(&mut d, size as u32);
        }
        self.emit(&d);
        crc_at
    }

    fn small_record(&mut self, name: &str, data: &[u8]) {
        let header_offset = self.pos;
        self.local_header(name, RECORD_ALIGN, false);
        self.emit(data);
        let crc = crc32fast::hash(data);
        self.descriptor(crc, data.len() as u64);
        self.entries.push(CdEntry {
            name: name.to_string(),
            header_offset,
            size: data.len() as u64,
            crc,
        });
    }

    /// Central directory and end records; returns where the named entry's CRC was written.
    fn finish(&mut self, crc_of: Option<&str>) -> Option<usize> {
        let cd_offset = self.pos;
        let mut crc_at = None;
        let mut cd = Vec::new();
        for e in &self.entries {
            let big_size = e.size >= U32_MAX;
            let big_offset = e.header_offset >= U32_MAX;
            let mut extra = Vec::new();
            if big_size || big_offset {
                put16(&mut extra, 0x0001);
                let n = if big_size { 16 } else { 0 } + if big_offset { 8 } else { 0 };
                put16(&mut extra, n);
                if big_size {
                    put64(&mut extra, e.size);
                    put64(&mut extra, e.size);
                }
                if big_offset {
                    put64(&mut extra, e.header_offset);
                }
            }
            put32(&mut cd, CENTRAL_SIG);
            put16(&mut cd, 0); // version made by
            put16(&mut cd, 0); // version needed
            put16(&mut cd, FLAGS);
            put16(&mut cd, 0);
            put16(&mut cd, 0);
            put16(&mut cd, 0);
            if crc_of == Some(e.name.as_str()) {
                crc_at = Some(self.out.len() + cd.len());
            }
            put32(&mut cd, e.crc);
            let sz = if big_size { U32_MAX as u32 } else { e.size as u32 };
            put32(&mut cd, sz);
            put32(&mut cd, sz);
            put16(&mut cd, e.name.len() as u16);
            put16(&mut cd, extra.len() as u16);
            put16(&mut cd, 0); // comment
            put16(&mut cd, 0); // disk
            put16(&mut cd, 0); // internal attributes
            put32(&mut cd, 0); // external attributes
            put32(&mut cd, if big_offset { U32_MAX as u32 } else { e.header_offset as u32 });
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        let cd_size = cd.len() as u64;
        self.emit(&cd);
        let n = self.entries.len() as u64;
        let eocd64_offset = self.pos;
        let mut end = Vec::with_capacity(98);
        put32(&mut end, EOCD64_SIG);
        put64(&mut end, 44);
        put16(&mut end, 0x031e);
        put16(&mut end, 0x002d);
        put32(&mut end, 0);
        put32(&mut end, 0);
        put64(&mut end, n);
        put64(&mut end, n);
        put64(&mut end, cd_size);
        put64(&mut end, cd_offset);
        put32(&mut end, EOCD64_LOCATOR_SIG);
        put32(&mut end, 0);
        put64(&mut end, eocd64_offset);
        put32(&mut end, 1);
        put32(&mut end, EOCD_SIG);
        put16(&mut end, 0);
        put16(&mut end, 0);
        put16(&mut end, n.min(0xffff) as u16);
        put16(&mut end, n.min(0xffff) as u16);
        put32(&mut end, cd_size.min(U32_MAX) as u32);
        put32(&mut end, cd_offset.min(U32_MAX) as u32);
        put16(&mut end, 0);
        self.emit(&end);
        crc_at
    }
}

fn rec(name: &str) -> String {
    format!("{ARCHIVE}/{name}")
}

/// Forty decimal digits, as torch writes in `.data/serialization_id`, derived from a seed.
pub fn serialization_id(seed: u64) -> String {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut s = String::with_capacity(40);
    while s.len() < 40 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        s.push_str(&format!("{:019}", z % 10u64.pow(19)));
    }
    s.truncate(40);
    s
}

/// The `data.pkl` torch.save writes for a contiguous CPU tensor.
pub fn tensor_pickle(dtype: DType, sizes: &[u64]) -> Vec<u8> {
    let numel: u64 = sizes.iter().product();
    let strides = contiguous_strides(sizes);
    let mut w = PickleWriter::new(2);
    let v3 = dtype.storage_name().is_none();
    w.global("torch._utils", if v3 { "_rebuild_tensor_v3" } else { "_rebuild_tensor_v2" });
    w.mark();
    w.mark();
    w.str("storage");
    w.memoize();
    match dtype.storage_name() {
        Some(s) => w.global("torch", s),
        None => w.global("torch.storage", "UntypedStorage"),
    };
    w.str("0");
    w.memoize();
    w.str("cpu");
    w.memoize();
    w.int(if v3 { (numel * dtype.size() as u64) as i64 } else { numel as i64 });
    w.tuple(5); // ('storage', type, key, location, numel)
    w.memoize();
    w.binpersid();
    w.int(0);
    w.int_tuple(sizes);
    w.memoize();
    w.int_tuple(&strides);
    w.memoize();
    w.bool(false);
    w.global("collections", "OrderedDict");
    w.empty_tuple().reduce();
    w.memoize();
    if v3 {
        w.global("torch", dtype.torch_name());
    }
    w.tuple(if v3 { 7 } else { 6 }); // the rebuild arguments, to the MARK
    w.memoize();
    w.reduce();
    w.memoize();
    w.finish()
}

/// Where everything of a tensor item goes, decided before any payload byte is produced.
#[derive(Clone, Debug)]
pub struct TensorItemLayout {
    /// Bytes from the item's start to the payload's start.
    pub prefix: Vec<u8>,
    pub payload_len: u64,
    trailer: Vec<u8>,
    crc_at: [usize; 2],
}

impl TensorItemLayout {
    /// `item_start` is the item's offset in its file; the payload starts on a multiple of
    /// `payload_align` in the file.
    pub fn new(dtype: DType, sizes: &[u64], item_start: u64, payload_align: u64, seed: u64) -> Self {
        let payload_len = dtype.nbytes(sizes).expect("a planned tensor's byte count fits in 64 bits");
        let mut z = ZipBuilder::new(item_start);
        head_records(&mut z, &tensor_pickle(dtype, sizes));
        let header_offset = z.pos;
        z.local_header(&rec("data/0"), payload_align.max(RECORD_ALIGN), true);
        let prefix = std::mem::take(&mut z.out);
        z.pos += payload_len;
        let crc_desc = z.descriptor(0, payload_len);
        z.entries.push(CdEntry {
            name: rec("data/0"),
            header_offset,
            size: payload_len,
            crc: 0,
        });
        tail_records(&mut z, seed);
        let crc_cd = z.finish(Some(&rec("data/0"))).expect("data/0 is in the directory");
        TensorItemLayout {
            prefix,
            payload_len,
            trailer: z.out,
            crc_at: [crc_desc, crc_cd],
        }
    }

    #[cfg(test)]
    pub fn payload_offset(&self) -> u64 {
        self.prefix.len() as u64
    }
    // An item always has a header, so there is no `is_empty` to go with `len`.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.payload_len + self.trailer.len() as u64
    }
    /// The bytes after the payload, once the payload's CRC-32 is known.
    pub fn trailer(&self, payload_crc: u32) -> Vec<u8> {
        let mut t = self.trailer.clone();
        for &at in &self.crc_at {
            t[at..at + 4].copy_from_slice(&payload_crc.to_le_bytes());
        }
        t
    }
}

/// A complete item holding a pickled object (torch.save of bytes, an int, a float...).
pub fn object_item(value: &ObjectValue, seed: u64) -> Vec<u8> {
    let mut z = ZipBuilder::new(0);
    head_records(&mut z, &value.to_pickle());
    tail_records(&mut z, seed);
    z.finish(None);
    z.out
}

/// The records torch.save writes before the storages: the pickle and the format facts.
fn head_records(z: &mut ZipBuilder, pickle: &[u8]) {
    z.small_record(&rec("data.pkl"), pickle);
    z.small_record(&rec(".format_version"), b"1");
    z.small_record(&rec(".storage_alignment"), b"64");
    z.small_record(&rec("byteorder"), b"little");
}

/// The records torch.save writes after the storages.
fn tail_records(z: &mut ZipBuilder, seed: u64) {
    z.small_record(&rec("version"), b"3\n");
    z.small_record(&rec(".data/serialization_id"), serialization_id(seed).as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// A record of an archive, from its central directory.
#[derive(Clone, Debug, PartialEq)]
pub struct ZipEntry {
    pub name: String,
    pub header_offset: u64,
    pub size: u64,
    pub compressed_size: u64,
    pub method: u16,
    pub crc: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where the central directory is: (offset, size, entry count), all within the archive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CdLocation {
    pub offset: u64,
    pub size: u64,
    pub count: u64,
}

/// Finds the end records in `tail` (the last bytes of an archive of `len` bytes).
pub fn locate_central_directory(tail: &[u8], len: u64, what: &str) -> Result<CdLocation> {
    let bad = |m: &str| Error::corrupt(format!("{what}: not a valid torch.save archive: {m}"));
    ensure!(tail.len() >= 22 && tail.len() as u64 <= len, bad("too short for a zip end record"));
    let tail_start = len - tail.len() as u64;
    // The end record is 22 bytes plus a comment of at most 65535 bytes.
    let lowest = tail.len().saturating_sub(22 + 0xffff);
    let mut at = None;
    let mut i = tail.len() - 22;
    loop {
        if le32(tail, i) == EOCD_SIG && i + 22 + le16(tail, i + 20) as usize == tail.len() {
            at = Some(i);
            break;
        }
        if i == lowest {
            break;
        }
        i -= 1;
    }
    let e = at.ok_or_else(|| bad("no end-of-central-directory record"))?;
    let mut loc = CdLocation {
        offset: le32(tail, e + 16) as u64,
        size: le32(tail, e + 12) as u64,
        count: le16(tail, e + 10) as u64,
    };
    if e >= 20 && le32(tail, e - 20) == EOCD64_LOCATOR_SIG {
        let eocd64 = le64(tail, e - 20 + 8);
        ensure!(
            eocd64 >= tail_start && eocd64.checked_add(56).is_some_and(|e| e <= len),
            bad("zip64 end record outside the archive tail")
        );
        let r = (eocd64 - tail_start) as usize;
        ensure!(r + 56 <= tail.len() && le32(tail, r) == EOCD64_SIG, bad("bad zip64 end record"));
        loc = CdLocation {
            count: le64(tail, r + 32),
            size: le64(tail, r + 40),
            offset: le64(tail, r + 48),
        };
    }
    ensure!(
        loc.offset.checked_add(loc.size).is_some_and(|end| end <= len),
        bad(&format!(
            "central directory at {} (+{}) lies outside the {len}-byte archive",
            loc.offset, loc.size
        ))
    );
    ensure!(loc.count <= loc.size / 46, bad("central directory entry count exceeds its size"));
    Ok(loc)
}

/// Parses the central directory bytes.
pub fn parse_central_directory(cd: &[u8], loc: CdLocation, len: u64, what: &str) -> Result<Vec<ZipEntry>> {
    let bad = |m: String| Error::corrupt(format!("{what}: bad zip central directory: {m}"));
    // Every entry takes at least 46 bytes of the directory read: the count claimed cannot size
    // an allocation beyond that.
    let mut entries = Vec::with_capacity(loc.count.min(cd.len() as u64 / 46) as usize);
    let mut p = 0usize;
    for i in 0..loc.count {
        if p + 46 > cd.len() || le32(cd, p) != CENTRAL_SIG {
            return Err(bad(format!("entry {i} at {} has no signature", loc.offset + p as u64)));
        }
        let method = le16(cd, p + 10);
        let crc = le32(cd, p + 16);
        let mut csize = le32(cd, p + 20) as u64;
        let mut usize_ = le32(cd, p + 24) as u64;
        let nlen = le16(cd, p + 28) as usize;
        let elen = le16(cd, p + 30) as usize;
        let clen = le16(cd, p + 32) as usize;
        let mut hoff = le32(cd, p + 42) as u64;
        let end = p + 46 + nlen + elen + clen;
        if end > cd.len() {
            return Err(bad(format!("entry {i} overruns the directory")));
        }
        let name = String::from_utf8(cd[p + 46..p + 46 + nlen].to_vec()).map_err(|_| bad(format!("entry {i} name is not UTF-8")))?;
        // zip64 extended information replaces fields that are 0xffffffff, in this order.
        let mut x = p + 46 + nlen;
        let xend = x + elen;
        while x + 4 <= xend {
            let id = le16(cd, x);
            let n = le16(cd, x + 2) as usize;
            if x + 4 + n > xend {
                return Err(bad(format!("entry {name}: extra field overruns")));
            }
            if id == 0x0001 {
                let mut q = x + 4;
                let qend = q + n;
                for field in [&mut usize_, &mut csize, &mut hoff] {
                    if *field == U32_MAX {
                        if q + 8 > qend {
                            return Err(bad(format!("entry {name}: short zip64 field")));
                        }
                        *field = le64(cd, q);
                        q += 8;
                    }
                }
            }
            x += 4 + n;
        }
        if hoff.checked_add(LOCAL_HEADER_LEN).is_none_or(|e| e > len) || csize > len {
            return Err(bad(format!("entry {name} points outside the archive")));
        }
        entries.push(ZipEntry {
            name,
            header_offset: hoff,
            size: usize_,
            compressed_size: csize,
            method,
            crc,
        });
        p = end;
    }
    Ok(entries)
}

/// Offset of an entry's data, from its local header (`header` holds at least its first 30
/// bytes).
pub fn local_data_offset(header: &[u8], entry: &ZipEntry, len: u64, what: &str) -> Result<u64> {
    let bad = |m: &str| Error::corrupt(format!("{what}: record {}: {m}", entry.name));
    ensure!(header.len() >= 30 && le32(header, 0) == LOCAL_SIG, bad("no local header signature"));
    let off = entry.header_offset + LOCAL_HEADER_LEN + le16(header, 26) as u64 + le16(header, 28) as u64;
    ensure!(
        off.checked_add(entry.compressed_size).is_some_and(|e| e <= len),
        bad("data runs past the end of the item")
    );
    Ok(off)
}

/// Random access to one item's bytes (offsets relative to the item's start).
pub trait ItemSource {
    /// `len` bytes at `offset` of the item.
    fn read_item_range(&self, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Where the item starts in its file: errors name file offsets.
    fn item_start(&self) -> u64 {
        0
    }
}

/// What a tensor item holds, decoded from its `data.pkl`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRecord {
    pub dtype: DType,
    pub sizes: Vec<u64>,
    /// Element strides of the stored view.
    pub strides: Vec<u64>,
    /// Element offset of the view within its storage.
    pub storage_offset: u64,
    /// Where the storage's bytes start, relative to the item.
    pub data_offset: u64,
    pub data_len: u64,
    /// CRC-32 of the whole storage record.
    pub crc: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ItemContent {
    Tensor(TensorRecord),
    Object(ObjectValue),
}

/// Reads the structure of an item: central directory, `data.pkl` (CRC-checked), and where the
/// tensor storage is. Small items are read in one request; large ones as head and tail.
pub fn read_item(src: &dyn ItemSource, len: u64, what: &str) -> Result<ItemContent> {
    const WHOLE: u64 = 256 * 1024;
    const EDGE: u64 = 64 * 1024;
    let base = src.item_start();
    // An error about the item's bytes at `off` names their offset in the file.
    let at = |off: u64| move |e: Error| e.with_offset(base.saturating_add(off));
    let head = src.read_item_range(0, len.min(if len <= WHOLE { WHOLE } else { EDGE }) as usize)?;
    let tail_len = if len <= WHOLE { len } else { EDGE };
    let tail_owned;
    let tail: &[u8] = if len <= WHOLE {
        &head
    } else {
        tail_owned = src.read_item_range(len - tail_len, tail_len as usize)?;
        &tail_owned
    };
    let tail_start = len - tail.len() as u64;
    // Serves a range from the cached head or tail, else from the source.
    let fetch = |off: u64, n: u64| -> Result<Vec<u8>> {
        ensure!(
            off.checked_add(n).is_some_and(|e| e <= len),
            Error::corrupt(format!("{what}: range {off}+{n} outside the {len}-byte item")).with_offset(base.saturating_add(off))
        );
        if off + n <= head.len() as u64 {
            return Ok(head[off as usize..(off + n) as usize].to_vec());
        }
        if off >= tail_start {
            let s = (off - tail_start) as usize;
            return Ok(tail[s..s + n as usize].to_vec());
        }
        src.read_item_range(off, n as usize)
    };
    let loc = locate_central_directory(tail, len, what).map_err(|e| {
        // torch's FileSystemWriter can also store items as safetensors files.
        let header = head.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        if header.is_some_and(|n| n > 1 && n < len) && head.get(8) == Some(&b'{') {
            Error::unsupported(format!(
                "{what}: the item is a safetensors file (torch saved with serialization_format=SAFETENSORS), which libdcp does not read"
            ))
        } else {
            e
        }
    })?;
    let cd = fetch(loc.offset, loc.size)?;
    let entries = parse_central_directory(&cd, loc, len, what).map_err(at(loc.offset))?;
    let pkl = entries
        .iter()
        .find(|e| e.name.ends_with("/data.pkl") || e.name == "data.pkl")
        .ok_or_else(|| Error::corrupt(format!("{what}: archive has no data.pkl")))?;
    let archive = pkl.name.strip_suffix("data.pkl").unwrap_or("").to_string();
    ensure!(
        pkl.method == 0,
        Error::unsupported(format!("{what}: compressed records are not supported"))
    );
    ensure!(
        pkl.size <= 1 << 30,
        Error::corrupt(format!("{what}: data.pkl of {} bytes", pkl.size))
    );
    let lh = fetch(pkl.header_offset, LOCAL_HEADER_LEN.min(len - pkl.header_offset))?;
    let pkl_off = local_data_offset(&lh, pkl, len, what).map_err(at(pkl.header_offset))?;
    let pkl_bytes = fetch(pkl_off, pkl.size)?;
    let crc = crc32fast::hash(&pkl_bytes);
    ensure!(
        crc == pkl.crc,
        Error::new(
            crate::error::ErrorKind::Checksum,
            format!(
                "{what}: data.pkl at item offset {pkl_off}: CRC-32 {crc:08x} does not match the recorded {:08x}",
                pkl.crc
            )
        )
        .with_offset(base.saturating_add(pkl_off))
    );
    let graph = pickle::parse(&pkl_bytes, what).map_err(|e| e.rebased(base.saturating_add(pkl_off)))?;
    let (func, args) = match graph.as_call(graph.root) {
        Some(((module, func), args, _)) if module == "torch._utils" && func.starts_with("_rebuild_tensor") => (func, args),
        _ => return Ok(ItemContent::Object(ObjectValue::from_graph(&graph, &pkl_bytes))),
    };
    let bad = |m: &str| Error::corrupt(format!("{what}: tensor pickle: {m}")).with_offset(base.saturating_add(pkl_off));
    let args = graph.as_seq(args).ok_or_else(|| bad("arguments are not a tuple"))?;
    ensure!(args.len() >= 4, bad("too few arguments"));
    let pid = match graph.node(args[0]) {
        pickle::Node::PersId(p) => *p,
        _ => return Err(bad("first argument is not a storage reference")),
    };
    let pid = graph.as_seq(pid).ok_or_else(|| bad("storage reference is not a tuple"))?;
    ensure!(pid.len() >= 5, bad("short storage reference"));
    let (_, storage_class) = graph.as_global(pid[1]).ok_or_else(|| bad("storage type is not a global"))?;
    let key = graph.as_str(pid[2]).ok_or_else(|| bad("storage key is not a str"))?;
    let uint = |id: usize, m: &str| graph.as_int(id).and_then(|v| u64::try_from(v).ok()).ok_or_else(|| bad(m));
    let seq = |id: usize, m: &str| -> Result<Vec<u64>> { graph.as_seq(id).ok_or_else(|| bad(m))?.iter().map(|&i| uint(i, m)).collect() };
    let storage_offset = uint(args[1], "storage offset")?;
    let sizes = seq(args[2], "sizes")?;
    let strides = seq(args[3], "strides")?;
    ensure!(sizes.len() == strides.len(), bad("sizes and strides differ in rank"));
    let dtype = if func == "_rebuild_tensor_v3" {
        let d = args.get(6).ok_or_else(|| bad("_rebuild_tensor_v3 without a dtype"))?;
        let (_, name) = graph.as_global(*d).ok_or_else(|| bad("dtype is not a global"))?;
        DType::from_torch_name(name)
            .ok_or_else(|| Error::unsupported(format!("{what}: dtype torch.{name} is not supported")).with_offset(base.saturating_add(pkl_off)))?
    } else {
        DType::from_storage_name(storage_class)
            .ok_or_else(|| Error::unsupported(format!("{what}: storage type torch.{storage_class} is not supported")))?
    };
    let storage_name = format!("{archive}data/{key}");
    let st = entries
        .iter()
        .find(|e| e.name == storage_name)
        .ok_or_else(|| bad(&format!("no record {storage_name}")))?;
    ensure!(
        st.method == 0,
        Error::unsupported(format!("{what}: compressed tensor storage is not supported"))
    );
    // A stored record's data is its compressed bytes: the size read must be the one bounded.
    ensure!(
        st.size == st.compressed_size,
        bad(&format!(
            "record {storage_name} is stored uncompressed but lists {} bytes and {} compressed",
            st.size, st.compressed_size
        ))
    );
    let lh = fetch(st.header_offset, LOCAL_HEADER_LEN.min(len - st.header_offset))?;
    let data_offset = local_data_offset(&lh, st, len, what).map_err(at(st.header_offset))?;
    let extent = crate::tensor::strided_extent_bytes(&sizes, &strides, dtype.size())?;
    let offset_bytes = storage_offset
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| bad("storage offset overflows"))?;
    ensure!(
        extent == 0 || offset_bytes.checked_add(extent).is_some_and(|e| e <= st.size),
        bad(&format!(
            "view of {extent} bytes at offset {offset_bytes} exceeds the {}-byte storage",
            st.size
        ))
    );
    Ok(ItemContent::Tensor(TensorRecord {
        dtype,
        sizes,
        strides,
        storage_offset,
        data_offset,
        data_len: st.size,
        crc: st.crc,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u8>);
    impl ItemSource for Mem {
        fn read_item_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
            Ok(self.0[offset as usize..offset as usize + len].to_vec())
        }
    }

    fn build_tensor(dtype: DType, sizes: &[u64], start: u64, payload: &[u8]) -> Vec<u8> {
        let l = TensorItemLayout::new(dtype, sizes, start, 4096, 7);
        assert_eq!((start + l.payload_offset()) % 4096, 0);
        let mut item = l.prefix.clone();
        item.extend_from_slice(payload);
        item.extend_from_slice(&l.trailer(crc32fast::hash(payload)));
        assert_eq!(item.len() as u64, l.len());
        item
    }

    #[test]
    fn tensor_item_roundtrip() {
        for (dtype, sizes) in [
            (DType::F32, vec![2u64, 3]),
            (DType::F8E4M3FN, vec![5]),
            (DType::I64, vec![]),
            (DType::BF16, vec![0, 4]),
            (DType::U16, vec![1, 1, 2, 2, 1]),
        ] {
            let n = sizes.iter().product::<u64>() as usize * dtype.size();
            let payload: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let item = build_tensor(dtype, &sizes, 1234 * 64, &payload);
            match read_item(&Mem(item.clone()), item.len() as u64, "t").unwrap() {
                ItemContent::Tensor(t) => {
                    assert_eq!(t.dtype, dtype);
                    assert_eq!(t.sizes, sizes);
                    assert_eq!(t.data_len as usize, n);
                    assert_eq!(&item[t.data_offset as usize..t.data_offset as usize + n], &payload[..]);
                    assert_eq!(t.crc, crc32fast::hash(&payload));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn object_item_roundtrip() {
        for v in [
            ObjectValue::Bytes(vec![1, 2, 0, 255]),
            ObjectValue::Int(-5),
            ObjectValue::Float(0.25),
            ObjectValue::Bytes(vec![]),
        ] {
            let item = object_item(&v, 1);
            assert_eq!(
                read_item(&Mem(item.clone()), item.len() as u64, "t").unwrap(),
                ItemContent::Object(v)
            );
        }
    }

    #[test]
    fn corrupt_items_are_errors() {
        let item = build_tensor(DType::F32, &[4], 0, &[0u8; 16]);
        for cut in [0usize, 10, 100, item.len() - 1] {
            assert!(read_item(&Mem(item[..cut].to_vec()), cut as u64, "t").is_err());
        }
        // Flip every byte of the structure (not the payload) in turn: never a panic.
        for i in 0..item.len() {
            let mut m = item.clone();
            m[i] ^= 0xff;
            let _ = read_item(&Mem(m), item.len() as u64, "t");
        }
    }

    /// An item 1000 bytes into its file.
    struct At1000(Vec<u8>);
    impl ItemSource for At1000 {
        fn read_item_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
            Ok(self.0[offset as usize..offset as usize + len].to_vec())
        }
        fn item_start(&self) -> u64 {
            1000
        }
    }

    #[test]
    fn a_damaged_pickle_error_names_its_file_offset() {
        let item = build_tensor(DType::F32, &[4], 0, &[0u8; 16]);
        let src = Mem(item.clone());
        let ItemContent::Tensor(_) = read_item(&src, item.len() as u64, "t").unwrap() else {
            panic!("not a tensor item")
        };
        // A byte inside the pickle: after the data.pkl record's name, past its PROTO opcode.
        let name = rec("data.pkl");
        let after = item.windows(name.len()).position(|w| w == name.as_bytes()).expect("the data.pkl header") + name.len();
        let proto = after + item[after..].windows(2).position(|w| w == [0x80, 0x02]).expect("the pickle's PROTO opcode");
        let mut m = item.clone();
        m[proto + 3] ^= 0xff;
        let e = read_item(&At1000(m), item.len() as u64, "t").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Checksum, "{e}");
        let off = e.offset().expect("a data.pkl checksum error names its offset");
        assert!((1000..1000 + item.len() as u64).contains(&off), "{e}: offset {off}");
    }

    #[test]
    fn zip64_sizes_in_directory() {
        // A layout for a >4 GiB payload: check the directory parses with zip64 sizes.
        let l = TensorItemLayout::new(DType::U8, &[5 << 30], 0, 4096, 1);
        let trailer = l.trailer(0xdeadbeef);
        let len = l.len();
        let tail_start = len - trailer.len() as u64;
        let loc = locate_central_directory(&trailer, len, "t").unwrap();
        let cd = &trailer[(loc.offset - tail_start) as usize..(loc.offset - tail_start + loc.size) as usize];
        let entries = parse_central_directory(cd, loc, len, "t").unwrap();
        let data = entries.iter().find(|e| e.name == "archive/data/0").unwrap();
        assert_eq!(data.size, 5 << 30);
        assert_eq!(data.crc, 0xdeadbeef);
        let version = entries.iter().find(|e| e.name == "archive/version").unwrap();
        assert!(version.header_offset > 5 << 30);
    }
}
