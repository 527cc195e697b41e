//! The checkpoint layout (torch's FileSystemWriter/Reader role): the names of a checkpoint's
//! files, how a committed checkpoint is found and opened, and the commit protocol.
//!
//! Every save writes under names no other save uses: data files `__{rank}_{n}_{token}.distcp`
//! and the sidecar `.libdcp_{token}`, where the token comes from the save's random id. The
//! only shared name is `.metadata`, and publishing it is the commit: create-only (a hard link,
//! or a conditional put) when the save must not replace a checkpoint, an atomic rename
//! otherwise. So racing writers never touch each other's files, the first committer wins, and an
//! overwrite leaves the previous checkpoint loadable until the new `.metadata` replaces it; the
//! files of the replaced checkpoint are removed only after that.

use crate::error::{Error, ErrorKind, Result};
use crate::format::metadata::{Metadata, MetadataLookup};
use crate::format::sidecar::{self, Sidecar};
use crate::storage::Storage;
use std::collections::HashSet;

/// torch's commit marker: without it a directory is not a checkpoint.
pub const METADATA_FILE: &str = ".metadata";
/// The sidecar name of checkpoints written by libdcp 0.1 (one per directory).
pub const LEGACY_SIDECAR: &str = sidecar::FILE_NAME;
/// Hex digits of the per-save token in file names.
const TOKEN_LEN: usize = 12;

/// The per-save token of a save id: its first hex digits.
pub fn token_of(save_id: &str) -> String {
    let hex: String = save_id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    format!("{hex:0<TOKEN_LEN$}")[..TOKEN_LEN].to_string()
}

/// `__{rank}_{n}_{token}.distcp`.
pub fn data_file_name(rank: usize, n: usize, token: &str) -> String {
    format!("__{rank}_{n}_{token}.distcp")
}

/// `.libdcp_{token}`.
pub fn sidecar_name(token: &str) -> String {
    format!("{}_{token}", sidecar::FILE_NAME)
}

fn is_token(s: &str) -> bool {
    s.len() == TOKEN_LEN && s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

/// The parts of a data-file name: torch's `__{rank}_{n}.distcp` (token `None`) or libdcp's
/// `__{rank}_{n}_{token}.distcp`.
pub fn parse_data_file(name: &str) -> Option<(u64, u64, Option<&str>)> {
    let body = name.strip_prefix("__")?.strip_suffix(".distcp")?;
    let mut parts = body.split('_');
    let (rank, n, token) = (parts.next()?, parts.next()?, parts.next());
    if parts.next().is_some() || !is_number(rank) || !is_number(n) || token.is_some_and(|t| !is_token(t)) {
        return None;
    }
    Some((rank.parse().ok()?, n.parse().ok()?, token))
}

/// Whether `name` is a data file torch or libdcp writes.
pub fn is_data_file(name: &str) -> bool {
    parse_data_file(name).is_some()
}

/// Whether `name` is a libdcp sidecar (the legacy `.libdcp` or a per-save `.libdcp_{token}`).
pub fn is_sidecar(name: &str) -> bool {
    name == LEGACY_SIDECAR
        || name
            .strip_prefix(sidecar::FILE_NAME)
            .and_then(|r| r.strip_prefix('_'))
            .is_some_and(is_token)
}

/// The token shared by every data file `md` references, when they all carry the same one.
fn token_of_files(md: &Metadata) -> Option<&str> {
    let mut token = None;
    for (_, info) in &md.storage {
        let t = parse_data_file(&info.relative_path)?.2?;
        match token {
            None => token = Some(t),
            Some(seen) if seen == t => {}
            Some(_) => return None,
        }
    }
    token
}

/// The sidecar names that may belong to `md`, in order: the per-save one named by its data
/// files' token (only that one), or, for a checkpoint without such files, the one named by its
/// save id and the legacy single sidecar.
pub fn sidecar_candidates(md: &Metadata) -> Vec<String> {
    if let Some(t) = token_of_files(md) {
        return vec![sidecar_name(t)];
    }
    let mut out = Vec::new();
    if md.storage.is_empty() {
        if let Some(id) = &md.save_id {
            out.push(sidecar_name(&token_of(id)));
        }
    }
    out.push(LEGACY_SIDECAR.to_string());
    out
}

/// A checkpoint's metadata, checked against its sidecar.
pub struct Opened {
    pub metadata: Metadata,
    pub lookup: MetadataLookup,
    pub sidecar: Option<Sidecar>,
}

/// A checkpoint's `.metadata` and sidecar as read by one process (the bytes other ranks
/// receive), with the sidecar's name.
pub struct RawCheckpoint {
    pub metadata: Vec<u8>,
    pub sidecar: Option<(String, Vec<u8>)>,
}

/// Reads `.metadata`; a missing one means "not a committed checkpoint", said precisely.
pub fn read_metadata(storage: &dyn Storage) -> Result<Vec<u8>> {
    match storage.read_all(METADATA_FILE) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // A missing bucket or bad credentials say so, rather than "no checkpoint".
            storage.check_reachable()?;
            let has_data = storage.list().map(|l| l.iter().any(|n| is_data_file(n))).unwrap_or(false);
            Err(Error::not_found(if has_data {
                format!(
                    "{} is not a committed checkpoint: it has data files but no .metadata (the save did not finish)",
                    storage.describe("")
                )
            } else {
                format!(
                    "no checkpoint at {}: {} does not exist",
                    storage.describe(""),
                    storage.describe(METADATA_FILE)
                )
            })
            .with_file(METADATA_FILE))
        }
        Err(e) => Err(e.with_file(METADATA_FILE)),
    }
}

/// Finds and reads the sidecar of `md` (`None` when the checkpoint has none, as torch writes
/// them).
pub fn read_sidecar(storage: &dyn Storage, md: &Metadata) -> Result<Option<(String, Vec<u8>)>> {
    for name in sidecar_candidates(md) {
        match storage.read_all(&name) {
            Ok(b) => return Ok(Some((name, b))),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e.with_file(name)),
        }
    }
    Ok(None)
}

/// Reads and opens a checkpoint on one process; also returns the raw bytes (for a broadcast).
pub fn read_and_open(storage: &dyn Storage) -> Result<(RawCheckpoint, Opened)> {
    let md_bytes = read_metadata(storage)?;
    let metadata = decode_metadata(storage, &md_bytes).map_err(|e| damaged_metadata(storage, &md_bytes).unwrap_or(e))?;
    let sidecar = read_sidecar(storage, &metadata)?;
    let raw = RawCheckpoint {
        metadata: md_bytes,
        sidecar,
    };
    let opened = finish_open(storage, &raw, metadata)?;
    Ok((raw, opened))
}

/// Opens a checkpoint on one process (no collective).
pub fn open(storage: &dyn Storage) -> Result<Opened> {
    read_and_open(storage).map(|(_, o)| o)
}

/// Decodes raw bytes read by another rank.
pub fn decode(storage: &dyn Storage, raw: &RawCheckpoint) -> Result<Opened> {
    let metadata = decode_metadata(storage, &raw.metadata)?;
    finish_open(storage, raw, metadata)
}

/// Most sidecars looked at when `.metadata` does not parse.
const MAX_SIDECAR_CANDIDATES: usize = 16;

/// When `.metadata` does not parse, the sidecar cannot be found through it: a sidecar in the
/// location recorded for another `.metadata` says the metadata is damaged (a checksum error
/// rather than a parse error).
pub fn damaged_metadata(storage: &dyn Storage, md: &[u8]) -> Option<Error> {
    let names = storage.list().ok()?;
    for name in names.iter().filter(|n| is_sidecar(n)).take(MAX_SIDECAR_CANDIDATES) {
        let Ok(bytes) = storage.read_all(name) else { continue };
        let Ok(sc) = Sidecar::decode(&bytes, name) else { continue };
        if let Some(crc) = sc.metadata_mismatch(md) {
            return Some(Error::new(
                ErrorKind::Checksum,
                format!(
                    "{} does not parse and does not match sidecar {name} ({} bytes, CRC-32 {crc:08x}; expected {} bytes, {:08x}): the metadata is damaged",
                    storage.describe(METADATA_FILE),
                    md.len(),
                    sc.metadata_len,
                    sc.metadata_crc32
                ),
            )
            .with_file(METADATA_FILE));
        }
    }
    None
}

fn decode_metadata(storage: &dyn Storage, md: &[u8]) -> Result<Metadata> {
    Metadata::decode(md, &storage.describe(METADATA_FILE)).map_err(|e| e.with_file(METADATA_FILE))
}

/// Decodes the sidecar and checks it against the metadata: same bytes (CRC), and every file it
/// records is one the metadata references.
fn finish_open(storage: &dyn Storage, raw: &RawCheckpoint, metadata: Metadata) -> Result<Opened> {
    let md_what = storage.describe(METADATA_FILE);
    let sidecar = match &raw.sidecar {
        None => None,
        Some((name, b)) => match Sidecar::decode(b, &storage.describe(name)) {
            Ok(s) => Some(s),
            // Written by a newer libdcp: fall back to the zip CRCs.
            Err(e) if e.kind() == ErrorKind::Unsupported => None,
            Err(e) => return Err(e.with_file(name.as_str())),
        },
    };
    if let (Some(s), Some((name, _))) = (&sidecar, &raw.sidecar) {
        if let Some(crc) = s.metadata_mismatch(&raw.metadata) {
            return Err(Error::new(
                ErrorKind::Checksum,
                format!(
                    "{md_what} does not match the checksum in its sidecar {name} ({} bytes, CRC-32 {crc:08x}; expected {} bytes, {:08x}): the metadata is damaged",
                    raw.metadata.len(),
                    s.metadata_len,
                    s.metadata_crc32
                ),
            )
            .with_file(METADATA_FILE));
        }
        let referenced: HashSet<&str> = metadata.storage.iter().map(|(_, i)| i.relative_path.as_str()).collect();
        if let Some(f) = s.files.iter().find(|f| !referenced.contains(f.name.as_str())) {
            return Err(Error::corrupt(format!(
                "{}: records data file {:?}, which {md_what} does not reference (a forged or mismatched sidecar)",
                storage.describe(name),
                f.name
            ))
            .with_file(name.as_str()));
        }
    }
    let lookup = metadata.index();
    Ok(Opened { metadata, lookup, sidecar })
}

/// What rank 0 found when readying the location of a save.
pub struct PreparedLocation {
    pub save_id: String,
    pub token: String,
    /// Files of the checkpoint this save replaces (removed after the commit).
    pub replaced: Vec<String>,
}

/// Readies the location of a save (rank 0): creates it, refuses a committed checkpoint unless
/// overwriting, and notes the files of the one being replaced. Nothing is removed here: the
/// previous checkpoint stays loadable until the commit, and other saves' files are theirs.
pub fn prepare(storage: &dyn Storage, overwrite: bool) -> Result<PreparedLocation> {
    storage.prepare()?;
    let mut replaced = Vec::new();
    if storage.exists(METADATA_FILE)? {
        if !overwrite {
            return Err(already_exists(storage));
        }
        replaced = files_of_committed(storage);
    }
    let save_id = new_save_id();
    Ok(PreparedLocation {
        token: token_of(&save_id),
        save_id,
        replaced,
    })
}

fn already_exists(storage: &dyn Storage) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!(
            "checkpoint already exists at {} (it has a committed .metadata; save with overwrite to replace it)",
            storage.describe("")
        ),
    )
}

/// The data files and sidecar of the checkpoint committed at `storage`, as far as its metadata
/// can be read (a damaged one names nothing: its files stay).
fn files_of_committed(storage: &dyn Storage) -> Vec<String> {
    let Ok(bytes) = storage.read_all(METADATA_FILE) else {
        return Vec::new();
    };
    let Ok(md) = decode_metadata(storage, &bytes) else {
        return Vec::new();
    };
    let mut names: Vec<String> = md
        .storage
        .iter()
        .map(|(_, i)| i.relative_path.clone())
        .filter(|n| is_data_file(n))
        .collect();
    names.sort();
    names.dedup();
    if let Ok(Some((name, _))) = read_sidecar(storage, &md) {
        names.push(name);
    }
    names
}

/// A data file a rank reports having written, as the commit checks it.
pub struct WrittenFile<'a> {
    pub name: &'a str,
    pub len: u64,
}

/// The commit (rank 0), after every rank's data files are durable: checks they are all there
/// with their lengths, writes the sidecar, publishes `.metadata` (create-only unless
/// `overwrite`), makes the directory durable, then removes the replaced checkpoint's files.
/// On an error, this save's own files are removed and the location keeps what it had.
pub fn commit(
    storage: &dyn Storage,
    prepared: &PreparedLocation,
    files: &[WrittenFile],
    sidecar_bytes: &[u8],
    metadata_bytes: &[u8],
    overwrite: bool,
) -> Result<()> {
    let sc_name = sidecar_name(&prepared.token);
    let published = (|| {
        for f in files {
            let h = storage
                .open_read(f.name)
                .map_err(|e| e.context(format!("data file {} vanished before the commit", storage.describe(f.name))).with_file(f.name))?;
            if h.len() != f.len {
                return Err(Error::corrupt(format!(
                    "data file {} has {} bytes at the commit, but {} were written (another process changed it)",
                    storage.describe(f.name),
                    h.len(),
                    f.len
                ))
                .with_file(f.name));
            }
        }
        storage.put_atomic(&sc_name, sidecar_bytes)?;
        if overwrite {
            storage.put_atomic(METADATA_FILE, metadata_bytes)
        } else {
            // Create-only: another save committing here first wins, and this one says so.
            storage.put_new(METADATA_FILE, metadata_bytes).map_err(|e| {
                if e.kind() == ErrorKind::AlreadyExists {
                    Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "checkpoint already exists at {}: another save committed there while this one was writing (this save's files were removed)",
                            storage.describe("")
                        ),
                    )
                } else {
                    e
                }
            })
        }
    })();
    if let Err(e) = published {
        let mut own: Vec<&str> = files.iter().map(|f| f.name).collect();
        own.push(&sc_name);
        discard(storage, own);
        return Err(e);
    }
    storage.sync_dir()?;
    let keep: HashSet<&str> = files.iter().map(|f| f.name).chain([sc_name.as_str()]).collect();
    let old: Vec<&str> = prepared.replaced.iter().map(String::as_str).filter(|n| !keep.contains(n)).collect();
    if !old.is_empty() {
        // The new checkpoint is committed: a failure here leaves unreferenced files, not a
        // broken checkpoint.
        discard(storage, old);
        let _ = storage.sync_dir();
    }
    Ok(())
}

/// Removes files this process owns, best effort (used on error paths and after a commit).
pub fn discard<'n>(storage: &dyn Storage, names: impl IntoIterator<Item = &'n str>) {
    for n in names {
        let _ = storage.remove(n);
    }
}

/// A random version-4 UUID (torch's save ids look the same).
fn new_save_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let salt = t ^ ((std::process::id() as u128) << 64) ^ (std::ptr::addr_of!(bytes) as u128).rotate_left(32);
    for (i, b) in salt.to_le_bytes().iter().enumerate() {
        bytes[i] ^= b;
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_file_names() {
        assert!(is_data_file("__0_0.distcp"));
        assert!(is_data_file("__12_3.distcp"));
        assert!(is_data_file("__12_3_0123456789ab.distcp"));
        assert!(!is_data_file("__12_3_0123456789a.distcp"));
        assert!(!is_data_file("__12_3_0123456789AB.distcp"));
        assert!(!is_data_file("__a_0.distcp"));
        assert!(!is_data_file("__0_.distcp"));
        assert!(!is_data_file("x.distcp"));
        assert_eq!(
            parse_data_file(&data_file_name(4, 2, "00ff00ff00ff")),
            Some((4, 2, Some("00ff00ff00ff")))
        );
        assert_eq!(parse_data_file("__7_1.distcp").map(|(rank, _, _)| rank), Some(7));
    }

    #[test]
    fn tokens_and_sidecars() {
        let id = new_save_id();
        let t = token_of(&id);
        assert!(is_token(&t), "{t}");
        assert_ne!(t, token_of(&new_save_id()));
        assert!(is_sidecar(&sidecar_name(&t)));
        assert!(is_sidecar(".libdcp"));
        assert!(!is_sidecar(".libdcp_x"));
        assert!(!is_sidecar(".libdcp.tmp"));
    }
}
