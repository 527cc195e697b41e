//! Offline integrity check of a whole checkpoint (`dcp verify`): commit, sidecar, data files,
//! storage bounds, chunk tiling, and the CRC-32 of every zip record of every item (plus the
//! sidecar's per-block CRCs), read in bounded pieces. Problems are collected, not returned as the
//! first error, so one run lists everything that is wrong.

use super::layout::{self, is_data_file, METADATA_FILE};
use crate::error::{ErrorKind, Result};
use crate::format::metadata::{EntryMeta, Metadata, StorageIndex, StorageInfo};
use crate::format::pickle_scan;
use crate::format::sidecar::{BlockHasher, BlockIndex, BlockRecord, Sidecar};
use crate::format::zipitem::{self, ItemContent, ItemSource, ZipEntry};
use crate::region::{tiling_defect, Region, TilingDefect};
use crate::storage::{self, ReadHandle, Storage};
use crate::tensor::DType;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

/// Records are streamed through a buffer of this size.
pub const PIECE: usize = 8 << 20;
/// The zip end records of an item lie within its last bytes: EOCD (22 + a comment of up to
/// 65535), zip64 locator (20) and zip64 EOCD (56).
const TAIL: u64 = 22 + 0xffff + 20 + 56;
const MAX_CENTRAL_DIRECTORY: u64 = 64 << 20;
/// Largest data.pkl whose globals are checked (what load accepts).
const MAX_PICKLE: u64 = 1 << 30;
/// Items up to this size are read whole, once.
const SMALL_ITEM: u64 = 1 << 20;

/// One thing wrong with a checkpoint, located as precisely as known.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The key the problem concerns.
    pub key: Option<String>,
    /// The file's name in the checkpoint directory.
    pub file: Option<String>,
    /// Absolute byte offset in `file`.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(k) = &self.key {
            write!(f, "key {k:?}: ")?;
        }
        match (&self.file, self.offset) {
            (Some(file), Some(off)) => write!(f, "{file} at offset {off}: ")?,
            (Some(file), None) => write!(f, "{file}: ")?,
            (None, Some(off)) => write!(f, "offset {off}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The checkpoint checked.
    pub location: String,
    /// Everything wrong with it; empty for a good checkpoint.
    pub problems: Vec<Problem>,
    /// Remarks that do not make the checkpoint bad (a sidecar from a newer libdcp, stray files).
    pub notes: Vec<String>,
    /// `.metadata` is present and parses.
    pub committed: bool,
    /// A sidecar was present and decoded.
    pub sidecar: bool,
    /// Keys in `.metadata`.
    pub keys: usize,
    /// Data files checked.
    pub files: usize,
    /// Zip items (tensors and objects) checked.
    pub items: usize,
    /// Zip records whose CRC-32 was checked.
    pub records: usize,
    /// Sidecar blocks whose CRC-32 was checked.
    pub blocks: usize,
    /// Bytes read to check CRCs.
    pub bytes_checked: u64,
    /// Pickles (`.metadata`, every item's data.pkl) whose globals were checked.
    pub pickles: usize,
}

/// What [`verify_with_options`] treats as a failure beyond the defaults. Made with [`Default`]
/// and the setters:
///
/// ```
/// let opts = dcp::VerifyOptions::default().strict_pickles(true);
/// assert!(opts.strict_pickles);
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// A pickle naming a callable outside torch's own checkpoint classes (what `pickle.load`
    /// would import and may run when torch opens the checkpoint) is a problem, not a note.
    pub strict_pickles: bool,
}

impl VerifyOptions {
    /// Sets [`strict_pickles`](Self::strict_pickles).
    pub fn strict_pickles(mut self, strict_pickles: bool) -> Self {
        self.strict_pickles = strict_pickles;
        self
    }
}

impl VerifyReport {
    /// Whether the checkpoint is committed and has no problems.
    pub fn is_ok(&self) -> bool {
        self.committed && self.problems.is_empty()
    }
}

/// Checks the checkpoint at `location` without loading it: every item's zip structure and
/// CRC-32s, the sidecar's block CRCs, the metadata against the items, the pickles' globals. A
/// damaged checkpoint is a report with problems, not an error; an error means it could not be
/// looked at (no such location, no permission).
///
/// ```
/// # use dcp::{save, verify, Context, SaveOptions, State, TensorView};
/// # let dir = std::env::temp_dir().join(format!("libdcp-doc-verify-{}", std::process::id()));
/// # let location = dir.to_str().unwrap();
/// # let mut state = State::new();
/// # state.add_tensor("w", TensorView::from_slice(&[0.5f32; 8], &[8])?)?;
/// # save(&Context::local(), &state, location, &SaveOptions::default())?;
/// let report = verify(location)?;
/// assert!(report.is_ok(), "{:?}", report.problems);
/// assert_eq!(report.keys, 1);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), dcp::Error>(())
/// ```
pub fn verify(location: &str) -> Result<VerifyReport> {
    verify_with_progress(location, &mut |_, _| {})
}

/// [`verify`], calling `progress(bytes_done, bytes_total)` as items are read.
pub fn verify_with_progress(location: &str, progress: &mut dyn FnMut(u64, u64)) -> Result<VerifyReport> {
    verify_with_options(location, &VerifyOptions::default(), progress)
}

/// [`verify_with_progress`] with options.
pub fn verify_with_options(location: &str, opts: &VerifyOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<VerifyReport> {
    let storage = storage::open(location)?;
    Ok(verify_storage_with(storage.as_ref(), location, opts, progress))
}

/// The checks of [`verify`] for the items of one key only: zip structure, every record's CRC-32,
/// the sidecar's block CRCs, and what each item holds. Run before reading a key without the
/// reader's own CRC checks (a large tensor read in pieces), so its bytes are checked once.
pub fn verify_key(storage: &dyn Storage, md: &Metadata, sidecar: Option<&Sidecar>, fqn: &str) -> Vec<Problem> {
    let sub = Metadata {
        entries: md.entries.iter().filter(|(k, _)| k == fqn).cloned().collect(),
        storage: md.storage.iter().filter(|(i, _)| i.fqn == fqn).cloned().collect(),
        ..Default::default()
    };
    let sub_sidecar = sidecar.map(|s| Sidecar {
        blocks: s.blocks.iter().filter(|b| b.fqn == fqn).cloned().collect(),
        ..s.clone()
    });
    let mut progress = |_: u64, _: u64| {};
    let mut v = Verifier {
        opts: VerifyOptions::default(),
        storage,
        report: VerifyReport::default(),
        progress: &mut progress,
        done: 0,
        total: 0,
    };
    let files = v.open_files(&sub, None);
    v.check_items(&sub, sub_sidecar.as_ref(), &files);
    v.report.problems
}

pub fn verify_storage_with(
    storage: &dyn Storage,
    location: &str,
    opts: &VerifyOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> VerifyReport {
    let mut v = Verifier {
        opts: opts.clone(),
        storage,
        report: VerifyReport {
            location: location.to_string(),
            ..Default::default()
        },
        progress,
        done: 0,
        total: 0,
    };
    v.run();
    v.report
}

/// What the metadata says an item holds.
enum Expect<'m> {
    Tensor {
        dtype: Option<DType>,
        dtype_name: &'m str,
        chunk: &'m Region,
    },
    Object,
}

struct Verifier<'a> {
    opts: VerifyOptions,
    storage: &'a dyn Storage,
    report: VerifyReport,
    progress: &'a mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
}

fn problem(key: Option<&str>, file: Option<&str>, offset: Option<u64>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.map(str::to_string),
        file: file.map(str::to_string),
        offset,
        message: message.into(),
    }
}

fn chunk_label(offsets: &Option<Vec<u64>>) -> String {
    match offsets {
        Some(o) => format!(" (chunk at {o:?})"),
        None => String::new(),
    }
}

/// One item of `.metadata`'s storage list: what it stores, and where.
type StoredItem = (StorageIndex, StorageInfo);

/// What `.metadata` and the sidecar say about each item: the entry and chunk it stores, and
/// the block checksums of its payload.
struct ItemIndex<'m> {
    entries: HashMap<&'m str, &'m EntryMeta>,
    chunk_of: HashMap<(&'m str, &'m [u64]), &'m Region>,
    blocks: BlockIndex<'m>,
}

impl<'m> ItemIndex<'m> {
    fn new(md: &'m Metadata, sc: Option<&'m Sidecar>) -> Self {
        let mut chunk_of: HashMap<(&str, &[u64]), &Region> = HashMap::new();
        for (fqn, e) in &md.entries {
            if let EntryMeta::Tensor(t) = e {
                for c in &t.chunks {
                    chunk_of.entry((fqn.as_str(), c.offsets.as_slice())).or_insert(c);
                }
            }
        }
        ItemIndex {
            entries: md.entries.iter().map(|(k, e)| (k.as_str(), e)).collect(),
            chunk_of,
            blocks: BlockIndex::new(sc),
        }
    }

    /// What item `idx` should hold; `None` when `.metadata` has no entry or chunk for it.
    fn expect(&self, idx: &StorageIndex) -> Option<Expect<'m>> {
        match (self.entries.get(idx.fqn.as_str()), &idx.offset) {
            (Some(EntryMeta::Tensor(t)), Some(off)) => self.chunk_of.get(&(idx.fqn.as_str(), off.as_slice())).map(|&chunk| Expect::Tensor {
                dtype: t.dtype,
                dtype_name: &t.dtype_name,
                chunk,
            }),
            (Some(EntryMeta::Bytes), None) => Some(Expect::Object),
            _ => None,
        }
    }

    /// The sidecar's block checksums of item `idx`, with the block size.
    fn block(&self, idx: &StorageIndex) -> Option<(&'m BlockRecord, u64)> {
        self.blocks.get(&idx.fqn, idx.offset.as_ref()?)
    }
}

/// Why a data file cannot be read, and which keys have items in it (`keys`: the key of each
/// item stored in the file, in `.metadata` order).
fn unopened_file_message(e: &crate::Error, keys: &[&str]) -> String {
    let mut uniq: Vec<&str> = Vec::new();
    for k in keys {
        if !uniq.contains(k) {
            uniq.push(k);
        }
    }
    let what = if e.kind() == ErrorKind::NotFound {
        "data file is missing".to_string()
    } else {
        format!("data file cannot be opened: {e}")
    };
    let held = match uniq.len() {
        0 => String::new(),
        n => {
            let shown: Vec<String> = uniq.iter().take(3).map(|k| format!("{k:?}")).collect();
            let more = if n > 3 { format!(" and {} more", n - 3) } else { String::new() };
            format!(" ({} items of {}{more} are stored in it)", keys.len(), shown.join(", "))
        }
    };
    format!("{what}{held}")
}

/// Where an item ends: its file, and the offset after its last byte.
fn item_end(i: &(StorageIndex, StorageInfo)) -> (&str, u64) {
    (&i.1.relative_path, i.1.offset.saturating_add(i.1.length))
}

/// The problem of an item that runs past the end of its `file_len`-byte file.
fn past_end_problem(idx: &StorageIndex, info: &StorageInfo, file_len: u64) -> Option<Problem> {
    if info.offset.checked_add(info.length).is_some_and(|e| e <= file_len) {
        return None;
    }
    Some(problem(
        Some(&idx.fqn),
        Some(&info.relative_path),
        Some(info.offset),
        format!(
            "item{} of {} bytes runs past the end of the {}-byte file (truncated?)",
            chunk_label(&idx.offset),
            info.length,
            file_len
        ),
    ))
}

/// The problem of `item` overlapping `prev`, the item before it in file order reaching furthest.
fn overlap_problem(prev: &(StorageIndex, StorageInfo), item: &(StorageIndex, StorageInfo)) -> Option<Problem> {
    let ((pidx, pinfo), (idx, info)) = (prev, item);
    if pinfo.relative_path != info.relative_path || pinfo.offset.saturating_add(pinfo.length) <= info.offset {
        return None;
    }
    Some(problem(
        Some(&idx.fqn),
        Some(&info.relative_path),
        Some(info.offset),
        format!(
            "item{} overlaps the item of key {:?}{} at offset {} (+{})",
            chunk_label(&idx.offset),
            pidx.fqn,
            chunk_label(&pidx.offset),
            pinfo.offset,
            pinfo.length
        ),
    ))
}

/// Where an item is, for its problems: key, file, offset and length in the file, and its name
/// in messages ("item (chunk at [0, 0])").
struct ItemAt<'i> {
    key: &'i str,
    file: &'i str,
    base: u64,
    len: u64,
    what: String,
}

impl ItemAt<'_> {
    /// A problem of this item at file offset `offset`.
    fn problem(&self, offset: u64, message: String) -> Problem {
        problem(Some(self.key), Some(self.file), Some(offset), message)
    }
}

/// What checking one record of an item found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct RecordCheck {
    /// A problem was added (unreadable header, CRC mismatch, bad block).
    bad: bool,
    /// The sidecar's block checksums were checked against this record.
    used_block: bool,
}

impl RecordCheck {
    const BAD: RecordCheck = RecordCheck {
        bad: true,
        used_block: false,
    };
}

/// Why an item's content is not what load accepts for what `.metadata` says it is; `None` when it is.
fn content_mismatch(content: Result<ItemContent>, expect: Option<Expect>, what: &str) -> Option<String> {
    match (content, expect) {
        (Err(e), _) if e.kind() == ErrorKind::Unsupported => Some(format!("load refuses it: {e}")),
        (Err(e), _) => Some(e.to_string()),
        (Ok(_), None) => None,
        (Ok(ItemContent::Object(_)), Some(Expect::Object)) => None,
        (Ok(ItemContent::Tensor(_)), Some(Expect::Object)) => Some(format!("{what} holds a tensor, but .metadata says an object")),
        (Ok(ItemContent::Object(_)), Some(Expect::Tensor { .. })) => Some(format!("{what} holds an object, but .metadata says a tensor chunk")),
        (Ok(ItemContent::Tensor(t)), Some(Expect::Tensor { dtype, dtype_name, chunk })) => {
            if dtype.is_some_and(|d| d != t.dtype) || t.sizes != chunk.sizes {
                Some(format!(
                    "{what} holds a {} tensor of shape {:?}, but .metadata describes a {dtype_name} chunk of shape {:?}",
                    t.dtype, t.sizes, chunk.sizes
                ))
            } else {
                None
            }
        }
    }
}

impl Verifier<'_> {
    fn add(&mut self, p: Problem) {
        self.report.problems.push(p);
    }

    fn run(&mut self) {
        let Some(md_bytes) = self.read_metadata() else { return };
        let md = match Metadata::decode(&md_bytes, METADATA_FILE) {
            Ok(md) => md,
            Err(e) => {
                self.add(problem(None, Some(METADATA_FILE), None, format!("cannot be parsed: {e}")));
                if let Some(damaged) = layout::damaged_metadata(self.storage, &md_bytes) {
                    self.add(problem(None, Some(METADATA_FILE), None, damaged.message().to_string()));
                }
                return;
            }
        };
        let sc = self.read_sidecar(&md_bytes, &md);
        self.report.committed = true;
        self.report.keys = md.entries.len();
        self.check_pickle(None, METADATA_FILE, None, "the metadata pickle", &md_bytes);
        let files = self.open_files(&md, sc.as_ref());
        self.check_structure(&md);
        self.check_items(&md, sc.as_ref(), &files);
    }

    fn read_metadata(&mut self) -> Option<Vec<u8>> {
        match self.storage.read_all(METADATA_FILE) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let msg = match self.storage.list() {
                    Err(_) => format!("no checkpoint here: {} does not exist", self.storage.describe("")),
                    Ok(names) if names.iter().any(|n| is_data_file(n)) => {
                        "missing: the checkpoint is not committed (data files but no .metadata; the save did not finish)".to_string()
                    }
                    Ok(_) => "missing: this directory is not a checkpoint".to_string(),
                };
                self.add(problem(None, Some(METADATA_FILE), None, msg));
                None
            }
            Err(e) => {
                self.add(problem(None, Some(METADATA_FILE), None, format!("cannot be read: {e}")));
                None
            }
        }
    }

    /// The checkpoint's own sidecar (named by its data files' token, or the 0.1 `.libdcp`).
    fn read_sidecar(&mut self, md: &[u8], metadata: &Metadata) -> Option<Sidecar> {
        let (name, bytes) = match layout::read_sidecar(self.storage, metadata) {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(e) => {
                let name = layout::sidecar_candidates(metadata).swap_remove(0);
                self.add(problem(None, Some(&name), None, format!("cannot be read: {e}")));
                return None;
            }
        };
        let name = name.as_str();
        let sc = match Sidecar::decode(&bytes, name) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                self.report.notes.push(format!("{e}; its checks are skipped"));
                return None;
            }
            Err(e) => {
                self.add(problem(None, Some(name), None, e.to_string()));
                return None;
            }
        };
        self.report.sidecar = true;
        let referenced: HashSet<&str> = metadata.storage.iter().map(|(_, i)| i.relative_path.as_str()).collect();
        for f in sc.files.iter().filter(|f| !referenced.contains(f.name.as_str())) {
            self.add(problem(
                None,
                Some(name),
                None,
                format!(
                    "records data file {:?}, which .metadata does not reference (a forged or mismatched sidecar)",
                    f.name
                ),
            ));
        }
        if let Some(crc) = sc.metadata_mismatch(md) {
            self.add(problem(
                None,
                Some(METADATA_FILE),
                None,
                format!(
                    "{} bytes with CRC-32 {crc:08x}, but the sidecar records {} bytes with CRC-32 {:08x} (damaged or replaced)",
                    md.len(),
                    sc.metadata_len,
                    sc.metadata_crc32
                ),
            ));
        }
        Some(sc)
    }

    /// Opens every data file the metadata or the sidecar names; checks lengths.
    fn open_files(&mut self, md: &Metadata, sc: Option<&Sidecar>) -> BTreeMap<String, Arc<dyn ReadHandle>> {
        let mut users: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (idx, info) in &md.storage {
            users.entry(&info.relative_path).or_default().push(&idx.fqn);
        }
        let expected: HashMap<&str, u64> = sc.iter().flat_map(|s| s.files.iter()).map(|f| (f.name.as_str(), f.len)).collect();
        for name in expected.keys() {
            users.entry(name).or_default();
        }
        let mut open = BTreeMap::new();
        for (name, keys) in users {
            let h = match self.storage.open_read(name) {
                Ok(h) => h,
                Err(e) => {
                    self.add(problem(None, Some(name), None, unopened_file_message(&e, &keys)));
                    continue;
                }
            };
            if let Some(&want) = expected.get(name) {
                if h.len() != want {
                    self.add(problem(
                        None,
                        Some(name),
                        None,
                        format!(
                            "has {} bytes but the sidecar records {want} ({})",
                            h.len(),
                            if h.len() < want { "truncated" } else { "grown or replaced" }
                        ),
                    ));
                }
            }
            open.insert(name.to_string(), h);
        }
        self.report.files = open.len();
        if let Ok(names) = self.storage.list() {
            for n in names {
                if is_data_file(&n) && !open.contains_key(&n) && !expected.contains_key(n.as_str()) {
                    self.report.notes.push(format!("{n} is not referenced by .metadata"));
                } else if (layout::is_sidecar(&n) && !layout::sidecar_candidates(md).contains(&n)) || storage::is_tmp_name(&n) {
                    self.report
                        .notes
                        .push(format!("{n} belongs to another save (an interrupted or losing one)"));
                }
            }
        }
        open
    }

    /// Entries against storage entries, and the tiling of every tensor's chunks.
    fn check_structure(&mut self, md: &Metadata) {
        let storage = self.storage_entries(md);
        let mut known: HashSet<(&str, Option<&[u64]>)> = HashSet::new();
        let mut seen_keys = HashSet::new();
        for (fqn, entry) in &md.entries {
            if !seen_keys.insert(fqn.as_str()) {
                self.add(problem(Some(fqn), Some(METADATA_FILE), None, "key is listed twice"));
            }
            match entry {
                EntryMeta::Bytes => {
                    known.insert((fqn, None));
                    if !storage.contains_key(&(fqn.as_str(), None)) {
                        self.add(problem(Some(fqn), None, None, "object has no storage entry"));
                    }
                }
                EntryMeta::Tensor(t) => {
                    if t.dtype.is_none() {
                        self.add(problem(
                            Some(fqn),
                            Some(METADATA_FILE),
                            None,
                            format!("dtype torch.{} is not supported: load refuses the key", t.dtype_name),
                        ));
                    }
                    for c in &t.chunks {
                        known.insert((fqn, Some(&c.offsets)));
                        if !storage.contains_key(&(fqn.as_str(), Some(c.offsets.as_slice()))) {
                            self.add(problem(
                                Some(fqn),
                                None,
                                None,
                                format!("chunk at {:?} (sizes {:?}) has no storage entry", c.offsets, c.sizes),
                            ));
                        }
                    }
                    for p in tiling_problems(&t.size, &t.chunks) {
                        self.add(problem(Some(fqn), None, None, p));
                    }
                }
            }
        }
        self.check_unmatched_storage(md, &known);
    }

    /// Storage entries by key and chunk offsets; a problem for each listed twice.
    fn storage_entries<'m>(&mut self, md: &'m Metadata) -> HashMap<(&'m str, Option<&'m [u64]>), usize> {
        let mut storage = HashMap::new();
        for (i, (idx, _)) in md.storage.iter().enumerate() {
            if storage.insert((idx.fqn.as_str(), idx.offset.as_deref()), i).is_some() {
                self.add(problem(
                    Some(&idx.fqn),
                    None,
                    None,
                    format!("storage entry{} is listed twice", chunk_label(&idx.offset)),
                ));
            }
        }
        storage
    }

    /// A problem for each storage entry that matches no object or chunk of `.metadata`'s
    /// entries (`known`).
    fn check_unmatched_storage(&mut self, md: &Metadata, known: &HashSet<(&str, Option<&[u64]>)>) {
        for (idx, info) in &md.storage {
            if !known.contains(&(idx.fqn.as_str(), idx.offset.as_deref())) {
                self.add(problem(
                    Some(&idx.fqn),
                    Some(&info.relative_path),
                    Some(info.offset),
                    format!(
                        "storage entry{} matches no {} of the key in .metadata",
                        chunk_label(&idx.offset),
                        if idx.offset.is_some() { "chunk" } else { "object" }
                    ),
                ));
            }
        }
    }

    fn check_items(&mut self, md: &Metadata, sc: Option<&Sidecar>, files: &BTreeMap<String, Arc<dyn ReadHandle>>) {
        let index = ItemIndex::new(md, sc);
        let todo = self.items_in_file_order(md, files);
        self.total = todo.iter().map(|((_, info), _)| info.length).sum();
        (self.progress)(0, self.total);
        let mut used_blocks = HashSet::new();
        for ((idx, info), h) in todo {
            let block = index.block(idx);
            if block.is_some() {
                used_blocks.insert((idx.fqn.as_str(), idx.offset.as_deref().unwrap_or(&[])));
            }
            let start = self.done;
            self.check_item(h.as_ref(), idx, info, index.expect(idx), block);
            self.report.items += 1;
            self.done = start + info.length;
            (self.progress)(self.done, self.total);
        }
        self.check_unused_blocks(sc, files, &used_blocks);
    }

    /// The items whose file is there, in file order (so reads are sequential). Adds a problem
    /// for each item that runs past the end of its file (and leaves it out), and for each that
    /// overlaps an earlier one.
    fn items_in_file_order<'m>(
        &mut self,
        md: &'m Metadata,
        files: &BTreeMap<String, Arc<dyn ReadHandle>>,
    ) -> Vec<(&'m StoredItem, Arc<dyn ReadHandle>)> {
        let mut order: Vec<&(StorageIndex, StorageInfo)> = md.storage.iter().collect();
        order.sort_by(|a, b| (&a.1.relative_path, a.1.offset).cmp(&(&b.1.relative_path, b.1.offset)));
        let mut todo = Vec::new();
        let mut prev: Option<&(StorageIndex, StorageInfo)> = None;
        for item in order {
            let (idx, info) = item;
            let Some(h) = files.get(&info.relative_path) else { continue };
            if let Some(p) = past_end_problem(idx, info, h.len()) {
                self.add(p);
                continue;
            }
            if let Some(p) = prev.and_then(|p| overlap_problem(p, item)) {
                self.add(p);
            }
            // The item reaching furthest in the file is the one a later item can overlap.
            if prev.is_none_or(|p| item_end(p) < item_end(item)) {
                prev = Some(item);
            }
            todo.push((item, h.clone()));
        }
        todo
    }

    /// A problem for each of the sidecar's block checksums that no item used. Blocks in a
    /// missing file are covered by that file's problem.
    fn check_unused_blocks(
        &mut self,
        sc: Option<&Sidecar>,
        files: &BTreeMap<String, Arc<dyn ReadHandle>>,
        used_blocks: &HashSet<(&str, &[u64])>,
    ) {
        for b in sc.iter().flat_map(|s| s.blocks.iter()) {
            let file = sc.and_then(|s| s.files.get(b.file as usize)).map(|f| f.name.as_str());
            if !used_blocks.contains(&(b.fqn.as_str(), b.chunk_offsets.as_slice())) && file.is_some_and(|f| files.contains_key(f)) {
                self.add(problem(
                    Some(&b.fqn),
                    file,
                    Some(b.payload_offset),
                    format!(
                        "the sidecar has block checksums for a chunk at {:?} that .metadata does not store",
                        b.chunk_offsets
                    ),
                ));
            }
        }
    }

    /// One item: its zip structure, every record's CRC, then what it holds.
    fn check_item(
        &mut self,
        h: &dyn ReadHandle,
        idx: &StorageIndex,
        info: &StorageInfo,
        expect: Option<Expect>,
        block: Option<(&BlockRecord, u64)>,
    ) {
        let at = ItemAt {
            key: idx.fqn.as_str(),
            file: info.relative_path.as_str(),
            base: info.offset,
            len: info.length,
            what: format!("item{}", chunk_label(&idx.offset)),
        };
        let Some((item, entries)) = self.open_item(h, &at) else { return };
        if !self.check_records(&item, &at, &entries, block) {
            return;
        }
        self.check_item_pickle(&item, &at, &entries);
        // What load refuses, unsupported things included (compressed records, unknown dtypes,
        // safetensors items): each is a problem.
        let content = zipitem::read_item(&item, at.len, &at.what);
        if let Some(m) = content_mismatch(content, expect, &at.what) {
            self.add(at.problem(at.base, m));
        }
    }

    /// The item and its central directory; `None` (after adding the problem) when either
    /// cannot be read.
    fn open_item<'h>(&mut self, h: &'h dyn ReadHandle, at: &ItemAt) -> Option<(Item<'h>, Vec<ZipEntry>)> {
        let item = match Item::new(h, at.base, at.len) {
            Ok(i) => i,
            Err(e) => {
                self.add(at.problem(at.base, e.to_string()));
                return None;
            }
        };
        match self.central_directory(&item, at.len, &at.what) {
            Ok(entries) => Some((item, entries)),
            Err(m) => {
                self.add(at.problem(at.base, m));
                None
            }
        }
    }

    /// Every record's CRC-32 (checking the sidecar's block checksums on the way), and that those
    /// block checksums cover a record of the item. False when a record is bad.
    fn check_records(&mut self, item: &Item, at: &ItemAt, entries: &[ZipEntry], block: Option<(&BlockRecord, u64)>) -> bool {
        let mut bad = false;
        let mut block_used = false;
        for e in entries {
            let checked = self.check_record(item, at, e, block);
            bad |= checked.bad;
            block_used |= checked.used_block;
        }
        if let (Some((b, _)), false) = (block, block_used) {
            self.add(at.problem(
                b.payload_offset,
                format!(
                    "{} at offset {}: the sidecar's block checksums cover {} bytes at offset {}, which is not a record of the item",
                    at.what, at.base, b.payload_len, b.payload_offset
                ),
            ));
        }
        !bad
    }

    /// One record's CRC-32 against the zip directory's; compressed records are noted, not checked.
    fn check_record(&mut self, item: &Item, at: &ItemAt, e: &ZipEntry, block: Option<(&BlockRecord, u64)>) -> RecordCheck {
        let (key, file, base, what) = (at.key, at.file, at.base, at.what.as_str());
        let data_off = match self.record_data_offset(item, at.len, e, what) {
            Ok(o) => o,
            Err(m) => {
                self.add(at.problem(base + e.header_offset, m));
                return RecordCheck::BAD;
            }
        };
        if e.method != 0 {
            self.report.notes.push(format!(
                "key {key:?}: {file} at offset {}: {what}: record {} is compressed (method {}); its CRC-32 is not checked",
                base + data_off,
                e.name,
                e.method
            ));
            return RecordCheck::default();
        }
        let abs = base + data_off;
        let blk = block.filter(|(b, _)| b.payload_offset == abs && b.payload_len == e.size);
        let mut checked = RecordCheck {
            bad: false,
            used_block: blk.is_some(),
        };
        match self.stream_record(item, data_off, e.size, blk, key, file) {
            Ok(crc) if crc == e.crc => {}
            Ok(crc) => {
                checked.bad = true;
                self.add(at.problem(
                    abs,
                    format!(
                        "{what} at offset {base}: record {} (bytes {abs}..{}): CRC-32 is {crc:08x} but the zip directory records {:08x}",
                        e.name,
                        abs + e.size,
                        e.crc
                    ),
                ));
            }
            Err(m) => {
                checked.bad = true;
                self.add(at.problem(abs, m));
            }
        }
        self.report.records += 1;
        checked
    }

    /// The item's `data.pkl`, when stored uncompressed and not too large, through the pickle scan.
    fn check_item_pickle(&mut self, item: &Item, at: &ItemAt, entries: &[ZipEntry]) {
        let Some(pkl) = entries.iter().find(|e| e.name.ends_with("/data.pkl") || e.name == "data.pkl") else {
            return;
        };
        if pkl.method != 0 || pkl.size > MAX_PICKLE {
            return;
        }
        let bytes = self
            .record_data_offset(item, at.len, pkl, &at.what)
            .and_then(|off| Ok((off, item.read_item_range(off, pkl.size as usize).map_err(|e| e.to_string())?)));
        if let Ok((off, bytes)) = bytes {
            self.check_pickle(Some(at.key), at.file, Some(at.base + off), &format!("{}: data.pkl", at.what), &bytes);
        }
    }

    /// Notes (or, with `strict_pickles`, problems) for every global of the pickle outside the
    /// allowlist of torch's own checkpoint classes.
    fn check_pickle(&mut self, key: Option<&str>, file: &str, offset: Option<u64>, what: &str, data: &[u8]) {
        self.report.pickles += 1;
        let scan = pickle_scan::scan(data);
        let mut found: Vec<String> = scan
            .disallowed()
            .map(|g| {
                format!(
                    "{what} names {} (pickle byte {}): Python's pickle.load imports it and may call it when torch opens this checkpoint without weights_only=True",
                    g.dotted(),
                    g.offset
                )
            })
            .collect();
        if scan.more > 0 {
            found.push(format!("{what} names {} more globals than were checked", scan.more));
        }
        if let Some(m) = &scan.malformed {
            found.push(format!("{what}: its globals could not all be checked: {m}"));
        }
        for m in found {
            let p = problem(key, Some(file), offset, m);
            if self.opts.strict_pickles {
                self.add(p);
            } else {
                self.report.notes.push(p.to_string());
            }
        }
    }

    fn central_directory(&mut self, item: &Item, len: u64, what: &str) -> std::result::Result<Vec<ZipEntry>, String> {
        let tail_len = len.min(TAIL);
        let tail = item.read_item_range(len - tail_len, tail_len as usize).map_err(|e| e.to_string())?;
        let loc = zipitem::locate_central_directory(&tail, len, what).map_err(|e| e.to_string())?;
        if loc.size > MAX_CENTRAL_DIRECTORY {
            return Err(format!("{what}: zip central directory of {} bytes is implausibly large", loc.size));
        }
        let cd = item.read_item_range(loc.offset, loc.size as usize).map_err(|e| e.to_string())?;
        zipitem::parse_central_directory(&cd, loc, len, what).map_err(|e| e.to_string())
    }

    fn record_data_offset(&mut self, item: &Item, len: u64, e: &ZipEntry, what: &str) -> std::result::Result<u64, String> {
        if e.header_offset + 30 > len {
            return Err(format!("{what}: record {}: local header outside the item", e.name));
        }
        let lh = item.read_item_range(e.header_offset, 30).map_err(|e| e.to_string())?;
        zipitem::local_data_offset(&lh, e, len, what).map_err(|e| e.to_string())
    }

    /// CRC-32 of `len` bytes at `off` in the item, checking the sidecar's blocks on the way when
    /// given.
    fn stream_record(
        &mut self,
        item: &Item,
        off: u64,
        len: u64,
        block: Option<(&BlockRecord, u64)>,
        key: &str,
        file: &str,
    ) -> std::result::Result<u32, String> {
        let mut whole = crc32fast::Hasher::new();
        let mut buf = vec![0u8; (len as usize).min(PIECE)];
        let mut blocks = block.map(|(b, bs)| (b, bs, BlockHasher::new(bs)));
        let mut pos = 0u64;
        let start_done = self.done;
        while pos < len {
            let n = ((len - pos) as usize).min(PIECE);
            item.read_into(off + pos, &mut buf[..n]).map_err(|e| e.to_string())?;
            whole.update(&buf[..n]);
            if let Some((b, bs, mut hasher)) = blocks.take() {
                let mut check = |i: usize, h: crc32fast::Hasher, filled: u64| self.check_block(b, bs, i, filled, h.finalize(), key, file);
                hasher.update(&buf[..n], &mut check);
                if pos + n as u64 == len {
                    hasher.finish(check);
                } else {
                    blocks = Some((b, bs, hasher));
                }
            }
            pos += n as u64;
            self.report.bytes_checked += n as u64;
            self.done = start_done + pos;
            (self.progress)(self.done, self.total);
        }
        Ok(whole.finalize())
    }

    #[allow(clippy::too_many_arguments)]
    fn check_block(&mut self, b: &BlockRecord, bs: u64, i: usize, n: u64, got: u32, key: &str, file: &str) {
        self.report.blocks += 1;
        let at = b.payload_offset + i as u64 * bs;
        let m = match b.crcs.get(i) {
            Some(&want) if want == got => return,
            Some(&want) => format!(
                "sidecar block {i} of the chunk at {:?} (bytes {at}..{}): CRC-32 is {got:08x} but the sidecar records {want:08x}",
                b.chunk_offsets,
                at + n
            ),
            None => format!("sidecar has no checksum for block {i} of the chunk at {:?}", b.chunk_offsets),
        };
        self.add(problem(Some(key), Some(file), Some(at), m));
    }
}

/// An item's bytes: read in one request when small (most items are a few KiB, and each is
/// visited a dozen times), else read range by range from the file.
struct Item<'h> {
    h: &'h dyn ReadHandle,
    base: u64,
    cached: Option<Vec<u8>>,
}

impl<'h> Item<'h> {
    fn new(h: &'h dyn ReadHandle, base: u64, len: u64) -> Result<Self> {
        let cached = if len <= SMALL_ITEM {
            Some(h.read_vec(base, len as usize)?)
        } else {
            None
        };
        Ok(Item { h, base, cached })
    }

    fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.cached {
            None => self.h.read_at(self.base + offset, buf),
            Some(c) => {
                let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= c.len() as u64);
                let end = end.ok_or_else(|| {
                    crate::error::Error::corrupt(format!("range {offset}+{} outside the {}-byte item", buf.len(), c.len()))
                })?;
                buf.copy_from_slice(&c[offset as usize..end as usize]);
                Ok(())
            }
        }
    }
}

impl ItemSource for Item<'_> {
    fn read_item_range(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_into(offset, &mut v)?;
        Ok(v)
    }
}

/// Whether `chunks` tile a tensor of `shape` exactly: each inside the shape, no two overlapping,
/// no element uncovered. One message per problem found.
pub fn tiling_problems(shape: &[u64], chunks: &[Region]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if let Err(e) = c.check_within(shape) {
            out.push(format!("chunk {i} {}", e.message()));
        }
    }
    if !out.is_empty() {
        return out;
    }
    let boxes: Vec<&Region> = chunks.iter().collect();
    let covered: u128 = chunks.iter().map(|c| c.sizes.iter().map(|&s| s as u128).product::<u128>()).sum();
    let total: u128 = shape.iter().map(|&s| s as u128).product();
    match tiling_defect(&Region::full(shape), &boxes) {
        Ok(None) => {}
        Ok(Some(TilingDefect::Overlap { a: x, b: y, at })) => {
            let o = chunks[x].intersect(&chunks[y]).expect("the pair overlaps");
            out.push(format!(
                "chunks {x} (offsets {:?}, sizes {:?}) and {y} (offsets {:?}, sizes {:?}) overlap in the box at {:?} of sizes {:?} (both hold index {at:?}; the chunks' sizes add up to {covered} elements of the {total} of shape {shape:?})",
                chunks[x].offsets, chunks[x].sizes, chunks[y].offsets, chunks[y].sizes, o.offsets, o.sizes
            ));
        }
        Ok(Some(TilingDefect::Gap { at })) => out.push(format!(
            "chunks cover {covered} of the {total} elements of shape {shape:?}: a gap, e.g. at index {at:?}"
        )),
        Err(e) => out.push(format!("the tiling of its chunks cannot be checked: {}", e.message())),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dtype: DType, sizes: &[u64]) -> crate::error::Result<ItemContent> {
        Ok(ItemContent::Tensor(zipitem::TensorRecord {
            dtype,
            sizes: sizes.to_vec(),
            strides: vec![1; sizes.len()],
            storage_offset: 0,
            data_offset: 0,
            data_len: 0,
            crc: 0,
        }))
    }

    #[test]
    fn content_against_metadata() {
        let object = || Ok(ItemContent::Object(crate::ObjectValue::Int(1)));
        let chunk = r(&[0, 0], &[2, 3]);
        let f32_chunk = || {
            Some(Expect::Tensor {
                dtype: Some(DType::F32),
                dtype_name: "torch.float32",
                chunk: &chunk,
            })
        };
        let what = "item (chunk at [0, 0])";
        assert_eq!(content_mismatch(tensor(DType::F32, &[2, 3]), f32_chunk(), what), None);
        assert_eq!(content_mismatch(object(), Some(Expect::Object), what), None);
        assert_eq!(content_mismatch(object(), None, what), None);
        assert_eq!(
            content_mismatch(tensor(DType::F32, &[3, 2]), f32_chunk(), what).unwrap(),
            format!(
                "item (chunk at [0, 0]) holds a {} tensor of shape [3, 2], but .metadata describes a torch.float32 chunk of shape [2, 3]",
                DType::F32
            )
        );
        assert!(content_mismatch(tensor(DType::I64, &[2, 3]), f32_chunk(), what).is_some());
        // An unknown dtype in .metadata compares shapes only.
        let unknown = Expect::Tensor {
            dtype: None,
            dtype_name: "torch.float8_e4m3fn",
            chunk: &chunk,
        };
        assert_eq!(content_mismatch(tensor(DType::U8, &[2, 3]), Some(unknown), what), None);
        assert_eq!(
            content_mismatch(tensor(DType::F32, &[2, 3]), Some(Expect::Object), "item").unwrap(),
            "item holds a tensor, but .metadata says an object"
        );
        assert_eq!(
            content_mismatch(object(), f32_chunk(), "item").unwrap(),
            "item holds an object, but .metadata says a tensor chunk"
        );
        assert_eq!(
            content_mismatch(Err(crate::Error::unsupported("compressed record")), None, "item").unwrap(),
            "load refuses it: compressed record"
        );
        assert_eq!(
            content_mismatch(Err(crate::Error::corrupt("bad zip")), Some(Expect::Object), "item").unwrap(),
            "bad zip"
        );
    }

    fn stored(fqn: &str, offsets: Option<&[u64]>, file: &str, offset: u64, length: u64) -> (StorageIndex, StorageInfo) {
        (
            StorageIndex {
                fqn: fqn.into(),
                offset: offsets.map(<[u64]>::to_vec),
                index: None,
            },
            StorageInfo {
                relative_path: file.into(),
                offset,
                length,
            },
        )
    }

    #[test]
    fn unopened_file_messages_name_its_keys() {
        let missing = crate::Error::not_found("no such file");
        assert_eq!(unopened_file_message(&missing, &[]), "data file is missing");
        assert_eq!(
            unopened_file_message(&missing, &["a", "a", "b"]),
            "data file is missing (3 items of \"a\", \"b\" are stored in it)"
        );
        assert_eq!(
            unopened_file_message(&crate::Error::invalid("denied"), &["a", "b", "c", "d", "e", "b"]),
            "data file cannot be opened: denied (6 items of \"a\", \"b\", \"c\" and 2 more are stored in it)"
        );
    }

    #[test]
    fn items_past_the_end_of_their_file() {
        let (idx, info) = stored("w", Some(&[2, 0]), "__0_0.distcp", 100, 50);
        assert!(past_end_problem(&idx, &info, 150).is_none());
        let p = past_end_problem(&idx, &info, 149).unwrap();
        assert_eq!(
            p.message,
            "item (chunk at [2, 0]) of 50 bytes runs past the end of the 149-byte file (truncated?)"
        );
        assert_eq!((p.key.as_deref(), p.file.as_deref(), p.offset), (Some("w"), Some("__0_0.distcp"), Some(100)));
        // An end past u64::MAX is past any file's end.
        let (idx, info) = stored("o", None, "__0_0.distcp", u64::MAX, 1);
        let p = past_end_problem(&idx, &info, u64::MAX).unwrap();
        assert!(p.message.starts_with("item of 1 bytes runs past"), "{}", p.message);
    }

    #[test]
    fn overlapping_items() {
        let a = stored("a", Some(&[0]), "f", 0, 100);
        let touching = stored("b", Some(&[4]), "f", 100, 10);
        let inside = stored("b", Some(&[4]), "f", 99, 10);
        let other_file = stored("b", Some(&[4]), "g", 50, 10);
        assert!(overlap_problem(&a, &touching).is_none());
        assert!(overlap_problem(&a, &other_file).is_none());
        let p = overlap_problem(&a, &inside).unwrap();
        assert_eq!(
            p.message,
            "item (chunk at [4]) overlaps the item of key \"a\" (chunk at [0]) at offset 0 (+100)"
        );
        assert_eq!((p.key.as_deref(), p.offset), (Some("b"), Some(99)));
        assert!(item_end(&a) < item_end(&inside) && item_end(&inside) < item_end(&other_file));
    }

    #[test]
    fn item_index_expectations_and_blocks() {
        let md = Metadata {
            entries: vec![
                (
                    "w".into(),
                    EntryMeta::Tensor(crate::format::metadata::TensorMeta {
                        dtype: Some(DType::F32),
                        dtype_name: "torch.float32".into(),
                        size: vec![4],
                        chunks: vec![r(&[0], &[2]), r(&[2], &[2])],
                    }),
                ),
                ("o".into(), EntryMeta::Bytes),
            ],
            ..Default::default()
        };
        let block = BlockRecord {
            fqn: "w".into(),
            chunk_offsets: vec![2],
            file: 0,
            payload_offset: 64,
            payload_len: 8,
            crcs: vec![0],
        };
        let sc = Sidecar {
            format_version: 1,
            writer: "libdcp test".into(),
            save_id: "s".into(),
            world_size: 1,
            metadata_len: 0,
            metadata_crc32: 0,
            plan_hash: 0,
            block_size: 4,
            files: vec![],
            blocks: vec![block],
        };
        let index = ItemIndex::new(&md, Some(&sc));
        match index.expect(&stored("w", Some(&[2]), "f", 0, 1).0) {
            Some(Expect::Tensor { dtype, dtype_name, chunk }) => {
                assert_eq!((dtype, dtype_name, chunk), (Some(DType::F32), "torch.float32", &r(&[2], &[2])));
            }
            _ => panic!("chunk [2] of w not found"),
        }
        assert!(matches!(index.expect(&stored("o", None, "f", 0, 1).0), Some(Expect::Object)));
        assert!(index.expect(&stored("w", Some(&[1]), "f", 0, 1).0).is_none());
        assert!(index.expect(&stored("w", None, "f", 0, 1).0).is_none());
        assert!(index.expect(&stored("o", Some(&[0]), "f", 0, 1).0).is_none());
        assert!(index.expect(&stored("x", None, "f", 0, 1).0).is_none());
        let (b, size) = index.block(&stored("w", Some(&[2]), "f", 0, 1).0).unwrap();
        assert_eq!((b, size), (&sc.blocks[0], 4));
        assert!(index.block(&stored("w", Some(&[0]), "f", 0, 1).0).is_none());
        assert!(index.block(&stored("o", None, "f", 0, 1).0).is_none());
        assert_eq!(ItemIndex::new(&md, None).blocks.block_size(), crate::format::sidecar::BLOCK_SIZE);
    }

    #[test]
    fn item_problems_name_key_file_and_offset() {
        let at = ItemAt {
            key: "w",
            file: "__0_0.distcp",
            base: 128,
            len: 64,
            what: "item".into(),
        };
        let p = at.problem(160, "broken".into());
        assert_eq!(p.key.as_deref(), Some("w"));
        assert_eq!(p.file.as_deref(), Some("__0_0.distcp"));
        assert_eq!(p.offset, Some(160));
        assert_eq!(p.message, "broken");
    }

    fn r(o: &[u64], s: &[u64]) -> Region {
        Region::new(o.to_vec(), s.to_vec()).unwrap()
    }

    #[test]
    fn tiling() {
        assert!(tiling_problems(&[4, 3], &[r(&[0, 0], &[2, 3]), r(&[2, 0], &[2, 3])]).is_empty());
        assert!(tiling_problems(&[], &[r(&[], &[])]).is_empty());
        assert!(tiling_problems(&[0, 3], &[r(&[0, 0], &[0, 3])]).is_empty());
        let p = tiling_problems(&[4, 3], &[r(&[0, 0], &[3, 3]), r(&[2, 0], &[2, 3])]);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("chunks 0") && p[0].contains("and 1") && p[0].contains("overlap"),
            "{p:?}"
        );
        let p = tiling_problems(&[4, 3], &[r(&[0, 0], &[2, 3]), r(&[2, 0], &[2, 2])]);
        assert!(p[0].contains("gap") && p[0].contains("[2, 2]"), "{p:?}");
        let p = tiling_problems(&[4], &[r(&[0], &[5])]);
        assert!(p[0].contains("exceeds"), "{p:?}");
        // Identical chunks overlap too.
        let p = tiling_problems(&[2], &[r(&[0], &[2]), r(&[0], &[2])]);
        assert!(p[0].contains("overlap"), "{p:?}");
    }
}
