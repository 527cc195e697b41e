//! torch DCP's `.metadata`: a pickle of `torch.distributed.checkpoint.metadata.Metadata`.
//! [`Metadata::encode`] emits it with the same classes and shapes torch 2.11 writes
//! (`../shared/reference/torch-dcp-format.txt`); [`Metadata::decode`] reads what torch writes.

use super::pickle::{self, Budget, Graph, NodeId, PickleWriter};
use crate::error::{Error, Result};
use crate::region::Region;
use crate::tensor::DType;
use std::collections::HashMap;

const MD_MODULE: &str = "torch.distributed.checkpoint.metadata";
const FS_MODULE: &str = "torch.distributed.checkpoint.filesystem";

/// One element of a key's path in the nested state dict: a dict key or a list index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PathPart {
    Key(String),
    Index(u64),
}

/// Splits an fqn on '.', taking all-digit parts as list indices (`optimizer.param_groups.0.lr`).
pub fn default_path(fqn: &str) -> Vec<PathPart> {
    fqn.split('.')
        .map(|p| {
            if !p.is_empty() && p.len() < 19 && p.bytes().all(|b| b.is_ascii_digit()) {
                PathPart::Index(p.parse().unwrap())
            } else {
                PathPart::Key(p.to_string())
            }
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    /// `None` when torch wrote a dtype libdcp does not know; `dtype_name` says which.
    pub dtype: Option<DType>,
    pub dtype_name: String,
    pub size: Vec<u64>,
    pub chunks: Vec<Region>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EntryMeta {
    Tensor(TensorMeta),
    /// A `torch.save`d Python object (bytes, int, float, anything picklable).
    Bytes,
}

/// `MetadataIndex`: a key and, for tensors, the chunk's offsets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StorageIndex {
    pub fqn: String,
    pub offset: Option<Vec<u64>>,
    pub index: Option<u64>,
}

/// `_StorageInfo`: where an item's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageInfo {
    pub relative_path: String,
    pub offset: u64,
    pub length: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    /// Keys in the order they were written.
    pub entries: Vec<(String, EntryMeta)>,
    pub planner_data: Vec<(String, Vec<PathPart>)>,
    pub storage: Vec<(StorageIndex, StorageInfo)>,
    pub checkpoint_id: Option<String>,
    pub save_id: Option<String>,
    pub version: Option<String>,
}

impl Metadata {
    pub fn encode(&self) -> Vec<u8> {
        Encoder::new().metadata(self)
    }

    /// Reads a `.metadata` pickle. What it materialises (strings, sizes, chunks: one copy per
    /// reference, where the pickle shares them through its memo) is charged against
    /// [`Metadata::decode_budget`], so a hostile file is refused instead of exhausting memory.
    pub fn decode(data: &[u8], what: &str) -> Result<Metadata> {
        let g = pickle::parse(data, what)?;
        let budget = Self::decode_budget(data.len(), what);
        Decoder {
            g: &g,
            what,
            budget: &budget,
        }
        .metadata()
    }

    /// What decoding a `.metadata` of `input` bytes may materialise: 32 bytes per input byte
    /// plus 4 MiB. torch's files (and libdcp's) decode to about 5 bytes per input byte (a chunk
    /// of about 40 pickle bytes becomes a `Region` of about 100, a storage entry of 95 a
    /// `StorageIndex` and `StorageInfo` with their strings), millions of chunks included; only
    /// keys longer than about a kilobyte, each in many chunks, would come near the limit.
    pub fn decode_budget(input: usize, what: &str) -> Budget {
        Budget::new(what, input, 32, 4 << 20)
    }

    /// Lookup tables for loading: key -> entry, (key, chunk offsets) -> storage.
    pub fn index(&self) -> MetadataLookup {
        let mut entries = HashMap::with_capacity(self.entries.len());
        for (i, (k, _)) in self.entries.iter().enumerate() {
            entries.insert(k.clone(), i);
        }
        let mut storage: HashMap<String, KeyStorage> = HashMap::new();
        for (i, (idx, _)) in self.storage.iter().enumerate() {
            let key = storage.entry(idx.fqn.clone()).or_default();
            match &idx.offset {
                None => key.object = Some(i),
                Some(o) => {
                    key.chunks.insert(o.clone(), i);
                }
            }
        }
        MetadataLookup { entries, storage }
    }
}

pub struct MetadataLookup {
    entries: HashMap<String, usize>,
    /// Key -> its storage entries; nested so that lookups need no owned key.
    storage: HashMap<String, KeyStorage>,
}

/// Positions in `Metadata::storage` of one key's entries.
#[derive(Default)]
struct KeyStorage {
    /// The entry without chunk offsets (an object).
    object: Option<usize>,
    /// Chunk offsets -> entry.
    chunks: HashMap<Vec<u64>, usize>,
}

impl MetadataLookup {
    /// Position of `fqn` in `Metadata::entries`.
    pub fn entry_index(&self, fqn: &str) -> Option<usize> {
        self.entries.get(fqn).copied()
    }
    pub fn entry<'m>(&self, md: &'m Metadata, fqn: &str) -> Option<&'m EntryMeta> {
        self.entries.get(fqn).map(|&i| &md.entries[i].1)
    }
    pub fn storage<'m>(&self, md: &'m Metadata, fqn: &str, offset: Option<&[u64]>) -> Option<&'m StorageInfo> {
        let key = self.storage.get(fqn)?;
        let i = match offset {
            None => key.object?,
            Some(o) => *key.chunks.get(o)?,
        };
        Some(&md.storage[i].1)
    }
}

struct Encoder {
    w: PickleWriter,
    sizes: HashMap<Vec<u64>, u32>,
    layout: Option<u32>,
    mem_format: Option<u32>,
}

impl Encoder {
    fn new() -> Self {
        Encoder {
            w: PickleWriter::new(4),
            sizes: HashMap::new(),
            layout: None,
            mem_format: None,
        }
    }

    /// `torch.Size(values)`, shared through the memo when the same value repeats.
    fn size(&mut self, values: &[u64]) {
        if let Some(&idx) = self.sizes.get(values) {
            self.w.get(idx);
            return;
        }
        self.w.global("torch", "Size");
        self.w.int_tuple(values);
        self.w.tuple(1).reduce();
        let idx = self.w.memoize();
        self.sizes.insert(values.to_vec(), idx);
    }

    fn new_object(&mut self, module: &str, class: &str) {
        self.w.global(module, class);
        self.w.empty_tuple().newobj();
    }

    fn metadata(mut self, md: &Metadata) -> Vec<u8> {
        self.new_object(MD_MODULE, "Metadata");
        self.w.empty_dict().mark();

        self.w.str_memo("state_dict_metadata");
        self.w.empty_dict().mark();
        for (fqn, entry) in &md.entries {
            self.w.str_memo(fqn);
            match entry {
                EntryMeta::Bytes => self.new_object(MD_MODULE, "BytesStorageMetadata"),
                EntryMeta::Tensor(t) => self.tensor_meta(t),
            }
        }
        self.w.setitems();

        self.w.str_memo("planner_data");
        self.w.empty_dict().mark();
        for (fqn, path) in &md.planner_data {
            self.w.str_memo(fqn);
            if path.len() > 3 {
                self.w.mark();
            }
            for part in path {
                match part {
                    PathPart::Key(k) => self.w.str_memo(k),
                    PathPart::Index(i) => self.w.int(*i as i64),
                };
            }
            self.w.tuple(path.len());
        }
        self.w.setitems();

        self.w.str_memo("storage_data");
        self.w.empty_dict().mark();
        for (idx, info) in &md.storage {
            self.new_object(MD_MODULE, "MetadataIndex");
            self.w.empty_dict().mark();
            self.w.str_memo("fqn").str_memo(&idx.fqn);
            self.w.str_memo("index");
            match idx.index {
                Some(i) => self.w.int(i as i64),
                None => self.w.none(),
            };
            if let Some(off) = &idx.offset {
                self.w.str_memo("offset");
                self.size(off);
            }
            self.w.setitems().build();
            self.new_object(FS_MODULE, "_StorageInfo");
            self.w.empty_dict().mark();
            self.w.str_memo("relative_path").str_memo(&info.relative_path);
            self.w.str_memo("offset").int(info.offset as i64);
            self.w.str_memo("length").int(info.length as i64);
            self.w.setitems().build();
        }
        self.w.setitems();

        self.w.str_memo("storage_meta");
        self.new_object(MD_MODULE, "StorageMeta");
        self.w.empty_dict().mark();
        self.w.str_memo("checkpoint_id");
        match &md.checkpoint_id {
            Some(s) => self.w.str(s),
            None => self.w.none(),
        };
        self.w.str_memo("save_id");
        match &md.save_id {
            Some(s) => self.w.str(s),
            None => self.w.none(),
        };
        self.w.str_memo("load_id").none();
        self.w.str_memo("modules").empty_list();
        self.w.setitems().build();

        self.w.str_memo("version");
        self.w.str(md.version.as_deref().unwrap_or("1.0.0"));
        self.w.setitems().build();
        self.w.finish()
    }

    fn tensor_meta(&mut self, t: &TensorMeta) {
        self.new_object(MD_MODULE, "TensorStorageMetadata");
        self.w.empty_dict().mark();
        self.w.str_memo("properties");
        self.new_object(MD_MODULE, "TensorProperties");
        self.w.mark();
        self.w.global("torch", &t.dtype_name);
        match self.layout {
            Some(i) => {
                self.w.get(i);
            }
            None => {
                self.w.global("torch.serialization", "_get_layout");
                self.w.str("torch.strided");
                self.w.tuple(1).reduce();
                self.layout = Some(self.w.memoize());
            }
        }
        self.w.bool(false);
        match self.mem_format {
            Some(i) => {
                self.w.get(i);
            }
            None => {
                self.w.global(MD_MODULE, "_MEM_FORMAT_ENCODING");
                self.w.int(0);
                self.w.tuple(1).reduce();
                self.mem_format = Some(self.w.memoize());
            }
        }
        self.w.bool(false);
        self.w.tuple(5).build();
        self.w.str_memo("size");
        self.size(&t.size);
        self.w.str_memo("chunks");
        self.w.empty_list();
        if !t.chunks.is_empty() {
            self.w.mark();
            for c in &t.chunks {
                self.new_object(MD_MODULE, "ChunkStorageMetadata");
                self.w.empty_dict().mark();
                self.w.str_memo("offsets");
                self.size(&c.offsets);
                self.w.str_memo("sizes");
                self.size(&c.sizes);
                self.w.setitems().build();
            }
            self.w.appends();
        }
        self.w.setitems().build();
    }
}

struct Decoder<'g> {
    g: &'g Graph,
    what: &'g str,
    budget: &'g Budget,
}

/// Budget units for an owned string of `len` bytes.
fn string_cost(len: usize) -> u64 {
    (std::mem::size_of::<String>() + len) as u64
}

impl Decoder<'_> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::corrupt(format!("{}: not a torch DCP Metadata pickle: {msg}", self.what))
    }

    /// An object built by NEWOBJ (or REDUCE) of a class named `class`, returning its state.
    fn object_state(&self, id: NodeId, class: &str) -> Result<Option<NodeId>> {
        let ((_, name), _, state) = self.g.as_call(id).ok_or_else(|| self.err(format!("expected a {class} object")))?;
        if name != class {
            return Err(self.err(format!("expected a {class} object, found {name}")));
        }
        Ok(state)
    }

    /// A field of an object's state dict; looking costs the items looked at.
    fn field(&self, state: Option<NodeId>, name: &str) -> Result<Option<NodeId>> {
        match state {
            Some(s) => self.g.dict_get_charged(s, name, self.budget),
            None => Ok(None),
        }
    }

    /// An owned copy of a str node (charged), `None` when the node is not a str.
    fn string(&self, id: NodeId) -> Result<Option<String>> {
        match self.g.as_str(id) {
            Some(s) => {
                self.budget.charge(string_cost(s.len()))?;
                Ok(Some(s.to_string()))
            }
            None => Ok(None),
        }
    }

    /// An optional str field, copied.
    fn string_field(&self, state: Option<NodeId>, name: &str) -> Result<Option<String>> {
        match self.field(state, name)? {
            Some(i) => self.string(i),
            None => Ok(None),
        }
    }

    fn uint(&self, id: NodeId, what: &str) -> Result<u64> {
        self.g
            .as_int(id)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| self.err(format!("{what} is not a non-negative int")))
    }

    fn size(&self, id: NodeId, what: &str) -> Result<Vec<u64>> {
        let seq = match self.g.as_call(id) {
            Some(((_, "Size"), args, _)) => {
                let a = self.g.as_seq(args).ok_or_else(|| self.err(format!("{what}: bad torch.Size")))?;
                match a.first() {
                    Some(&inner) => inner,
                    None => return Ok(vec![]),
                }
            }
            _ => id,
        };
        let items = self.g.as_seq(seq).ok_or_else(|| self.err(format!("{what} is not a size")))?;
        self.budget.charge(std::mem::size_of::<Vec<u64>>() as u64)?;
        self.budget.charge_items(items.len(), std::mem::size_of::<u64>())?;
        items.iter().map(|&i| self.uint(i, what)).collect()
    }

    fn metadata(&self) -> Result<Metadata> {
        let state = self.object_state(self.g.root, "Metadata")?;
        let mut md = Metadata::default();
        let sdm = self
            .field(state, "state_dict_metadata")?
            .ok_or_else(|| self.err("no state_dict_metadata"))?;
        for &(k, v) in self.g.as_dict(sdm).ok_or_else(|| self.err("state_dict_metadata is not a dict"))? {
            let fqn = self
                .string(k)?
                .ok_or_else(|| self.err("a key of state_dict_metadata is not a str"))?;
            let entry = self.entry(v, &fqn)?;
            md.entries.push((fqn, entry));
        }
        if let Some(pd) = self.field(state, "planner_data")? {
            if let Some(items) = self.g.as_dict(pd) {
                for &(k, v) in items {
                    let (Some(fqn), Some(parts)) = (self.g.as_str(k), self.g.as_seq(v)) else {
                        continue;
                    };
                    self.budget.charge(string_cost(fqn.len()))?;
                    self.budget.charge_items(parts.len(), std::mem::size_of::<PathPart>())?;
                    let mut path = Vec::with_capacity(parts.len());
                    for &p in parts {
                        if let Some(s) = self.string(p)? {
                            path.push(PathPart::Key(s));
                        } else if let Some(i) = self.g.as_int(p) {
                            path.push(PathPart::Index(i.max(0) as u64));
                        }
                    }
                    md.planner_data.push((fqn.to_string(), path));
                }
            }
        }
        if let Some(sd) = self.field(state, "storage_data")? {
            if !self.g.is_none(sd) {
                for &(k, v) in self.g.as_dict(sd).ok_or_else(|| self.err("storage_data is not a dict"))? {
                    md.storage.push((self.storage_index(k)?, self.storage_info(v)?));
                }
            }
        }
        if let Some(sm) = self.field(state, "storage_meta")? {
            if !self.g.is_none(sm) {
                let st = self.object_state(sm, "StorageMeta")?;
                md.checkpoint_id = self.string_field(st, "checkpoint_id")?;
                md.save_id = self.string_field(st, "save_id")?;
            }
        }
        md.version = self.string_field(state, "version")?;
        Ok(md)
    }

    fn entry(&self, id: NodeId, fqn: &str) -> Result<EntryMeta> {
        let ((_, class), _, state) = self
            .g
            .as_call(id)
            .ok_or_else(|| self.err(format!("entry {fqn:?} is not an object")))?;
        self.budget.charge(std::mem::size_of::<EntryMeta>() as u64)?;
        match class {
            "BytesStorageMetadata" => Ok(EntryMeta::Bytes),
            "TensorStorageMetadata" => {
                let props = self
                    .field(state, "properties")?
                    .ok_or_else(|| self.err(format!("{fqn}: no properties")))?;
                let dtype_node = self.dtype_node(props, fqn)?;
                let (module, name) = self
                    .g
                    .as_global(dtype_node)
                    .ok_or_else(|| self.err(format!("{fqn}: dtype is not a torch global")))?;
                if module != "torch" {
                    return Err(self.err(format!("{fqn}: dtype {module}.{name} is not a torch dtype")));
                }
                self.budget.charge(string_cost(name.len()))?;
                let size = self.size(
                    self.field(state, "size")?.ok_or_else(|| self.err(format!("{fqn}: no size")))?,
                    "size",
                )?;
                let chunks_node = self.field(state, "chunks")?.ok_or_else(|| self.err(format!("{fqn}: no chunks")))?;
                let chunk_nodes = self
                    .g
                    .as_seq(chunks_node)
                    .ok_or_else(|| self.err(format!("{fqn}: chunks is not a list")))?;
                self.budget.charge_items(chunk_nodes.len(), std::mem::size_of::<Region>())?;
                let mut chunks = Vec::with_capacity(chunk_nodes.len());
                for &c in chunk_nodes {
                    let cs = self.object_state(c, "ChunkStorageMetadata")?;
                    let offsets = self.size(
                        self.field(cs, "offsets")?
                            .ok_or_else(|| self.err(format!("{fqn}: chunk without offsets")))?,
                        "offsets",
                    )?;
                    let sizes = self.size(
                        self.field(cs, "sizes")?
                            .ok_or_else(|| self.err(format!("{fqn}: chunk without sizes")))?,
                        "sizes",
                    )?;
                    if offsets.len() != size.len() || sizes.len() != size.len() {
                        return Err(self.err(format!("{fqn}: chunk rank differs from tensor rank")));
                    }
                    chunks.push(Region { offsets, sizes });
                }
                Ok(EntryMeta::Tensor(TensorMeta {
                    dtype: DType::from_torch_name(name),
                    dtype_name: name.to_string(),
                    size,
                    chunks,
                }))
            }
            other => Err(self.err(format!("entry {fqn:?} has unknown storage class {other}"))),
        }
    }

    /// TensorProperties' state is a tuple (dtype, layout, requires_grad, memory_format,
    /// pin_memory) in torch >= 2.1 and a dict in older versions.
    fn dtype_node(&self, props: NodeId, fqn: &str) -> Result<NodeId> {
        let state = self
            .object_state(props, "TensorProperties")?
            .ok_or_else(|| self.err(format!("{fqn}: TensorProperties without state")))?;
        if let Some(items) = self.g.as_seq(state) {
            return items
                .first()
                .copied()
                .ok_or_else(|| self.err(format!("{fqn}: empty TensorProperties")));
        }
        self.g
            .dict_get_charged(state, "dtype", self.budget)?
            .ok_or_else(|| self.err(format!("{fqn}: TensorProperties without dtype")))
    }

    fn storage_index(&self, id: NodeId) -> Result<StorageIndex> {
        let st = self.object_state(id, "MetadataIndex")?;
        self.budget.charge(std::mem::size_of::<StorageIndex>() as u64)?;
        let fqn = self.string_field(st, "fqn")?.ok_or_else(|| self.err("MetadataIndex without fqn"))?;
        let offset = match self.field(st, "offset")? {
            Some(o) if !self.g.is_none(o) => Some(self.size(o, "MetadataIndex.offset")?),
            _ => None,
        };
        let index = self
            .field(st, "index")?
            .and_then(|i| self.g.as_int(i))
            .and_then(|v| u64::try_from(v).ok());
        Ok(StorageIndex { fqn, offset, index })
    }

    fn storage_info(&self, id: NodeId) -> Result<StorageInfo> {
        let st = self.object_state(id, "_StorageInfo")?;
        self.budget.charge(std::mem::size_of::<StorageInfo>() as u64)?;
        let relative_path = self
            .string_field(st, "relative_path")?
            .ok_or_else(|| self.err("_StorageInfo without relative_path"))?;
        if relative_path.is_empty() || relative_path.contains(['/', '\\', '\0']) || relative_path == "." || relative_path == ".." {
            return Err(self.err(format!("storage path {relative_path:?} is not a plain file name")));
        }
        let offset = self.uint(
            self.field(st, "offset")?.ok_or_else(|| self.err("_StorageInfo without offset"))?,
            "offset",
        )?;
        let length = self.uint(
            self.field(st, "length")?.ok_or_else(|| self.err("_StorageInfo without length"))?,
            "length",
        )?;
        Ok(StorageInfo {
            relative_path,
            offset,
            length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        let mut md = Metadata::default();
        md.entries.push((
            "model.w".into(),
            EntryMeta::Tensor(TensorMeta {
                dtype: Some(DType::F32),
                dtype_name: "float32".into(),
                size: vec![4, 3],
                chunks: vec![
                    Region {
                        offsets: vec![0, 0],
                        sizes: vec![2, 3],
                    },
                    Region {
                        offsets: vec![2, 0],
                        sizes: vec![2, 3],
                    },
                ],
            }),
        ));
        md.entries.push((
            "step".into(),
            EntryMeta::Tensor(TensorMeta {
                dtype: Some(DType::I64),
                dtype_name: "int64".into(),
                size: vec![],
                chunks: vec![Region::full(&[])],
            }),
        ));
        md.entries.push(("lr".into(), EntryMeta::Bytes));
        md.planner_data = vec![
            ("model.w".into(), default_path("model.w")),
            ("step".into(), default_path("step")),
            (
                "lr".into(),
                vec![
                    PathPart::Key("optimizer".into()),
                    PathPart::Key("param_groups".into()),
                    PathPart::Index(0),
                    PathPart::Key("lr".into()),
                ],
            ),
        ];
        md.storage = vec![
            (
                StorageIndex {
                    fqn: "model.w".into(),
                    offset: Some(vec![0, 0]),
                    index: Some(0),
                },
                StorageInfo {
                    relative_path: "__0_0.distcp".into(),
                    offset: 0,
                    length: 100,
                },
            ),
            (
                StorageIndex {
                    fqn: "model.w".into(),
                    offset: Some(vec![2, 0]),
                    index: Some(1),
                },
                StorageInfo {
                    relative_path: "__1_0.distcp".into(),
                    offset: 0,
                    length: 100,
                },
            ),
            (
                StorageIndex {
                    fqn: "step".into(),
                    offset: Some(vec![]),
                    index: Some(0),
                },
                StorageInfo {
                    relative_path: "__0_0.distcp".into(),
                    offset: 128,
                    length: 1 << 33,
                },
            ),
            (
                StorageIndex {
                    fqn: "lr".into(),
                    offset: None,
                    index: None,
                },
                StorageInfo {
                    relative_path: "__0_0.distcp".into(),
                    offset: 4096,
                    length: 10,
                },
            ),
        ];
        md.checkpoint_id = Some("/tmp/x".into());
        md.save_id = Some("abc".into());
        md.version = Some("1.0.0".into());
        md
    }

    #[test]
    fn roundtrip() {
        let md = sample();
        let bytes = md.encode();
        let back = Metadata::decode(&bytes, ".metadata").unwrap();
        assert_eq!(back, md);
        let lk = back.index();
        assert_eq!(lk.storage(&back, "model.w", Some(&[2, 0])).unwrap().relative_path, "__1_0.distcp");
        assert!(lk.storage(&back, "lr", None).is_some());
        assert!(lk.entry(&back, "nope").is_none());
    }

    #[test]
    fn truncated_and_garbled_fail_cleanly() {
        let bytes = sample().encode();
        for cut in [0, 1, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(Metadata::decode(&bytes[..cut], "m").is_err());
        }
        let mut g = bytes.clone();
        for i in (0..g.len()).step_by(7) {
            g[i] ^= 0x5a;
            let _ = Metadata::decode(&g, "m");
            g[i] ^= 0x5a;
        }
    }

    /// A `.metadata` as torch or libdcp writes it for one tensor of `chunks` one-element chunks,
    /// except that the key is `fqn_len` bytes long: written once, it is fetched from the memo by
    /// every storage entry (5 bytes each), so decoding copies it `chunks` times.
    pub(crate) fn memo_repeat_metadata(fqn_len: usize, chunks: u64) -> Vec<u8> {
        let mut w = PickleWriter::new(4);
        let obj = |w: &mut PickleWriter, module: &str, class: &str| {
            w.global(module, class);
            w.empty_tuple().newobj();
        };
        let size = |w: &mut PickleWriter, v: u64| {
            w.global("torch", "Size");
            w.int_tuple(&[v]).tuple(1).reduce();
        };
        obj(&mut w, MD_MODULE, "Metadata");
        w.empty_dict().mark();
        w.str_memo("state_dict_metadata").empty_dict().mark();
        w.str(&"k".repeat(fqn_len));
        let key = w.memoize();
        obj(&mut w, MD_MODULE, "TensorStorageMetadata");
        w.empty_dict().mark();
        w.str_memo("properties");
        obj(&mut w, MD_MODULE, "TensorProperties");
        w.mark()
            .global("torch", "float32")
            .none()
            .bool(false)
            .none()
            .bool(false)
            .tuple(5)
            .build();
        w.str_memo("size");
        size(&mut w, chunks);
        w.str_memo("chunks").empty_list().mark();
        for i in 0..chunks {
            obj(&mut w, MD_MODULE, "ChunkStorageMetadata");
            w.empty_dict().mark().str_memo("offsets");
            size(&mut w, i);
            w.str_memo("sizes");
            size(&mut w, 1);
            w.setitems().build();
        }
        w.appends().setitems().build();
        w.setitems();
        w.str_memo("storage_data").empty_dict().mark();
        for i in 0..chunks {
            obj(&mut w, MD_MODULE, "MetadataIndex");
            w.empty_dict().mark();
            w.str_memo("fqn").get(key).str_memo("index").int(0).str_memo("offset");
            size(&mut w, i);
            w.setitems().build();
            obj(&mut w, FS_MODULE, "_StorageInfo");
            w.empty_dict().mark();
            w.str_memo("relative_path").str_memo("__0_0.distcp");
            w.str_memo("offset").int(i as i64 * 1024).str_memo("length").int(1000);
            w.setitems().build();
        }
        w.setitems();
        w.setitems().build();
        w.finish()
    }

    /// A hand-written `.metadata`: one tensor of rank `rank` whose `chunks` chunks are all the
    /// same memoized object, with offsets and sizes the same memoized `torch.Size`.
    pub(crate) fn shared_chunks_metadata(rank: usize, chunks: usize) -> Vec<u8> {
        let mut w = PickleWriter::new(4);
        let obj = |w: &mut PickleWriter, class: &str| {
            w.global(MD_MODULE, class);
            w.empty_tuple().newobj();
        };
        obj(&mut w, "Metadata");
        w.empty_dict().mark();
        w.str_memo("state_dict_metadata");
        w.empty_dict().mark();
        w.str("w");
        obj(&mut w, "TensorStorageMetadata");
        w.empty_dict().mark();
        w.str_memo("properties");
        obj(&mut w, "TensorProperties");
        w.mark()
            .global("torch", "float32")
            .none()
            .bool(false)
            .none()
            .bool(false)
            .tuple(5)
            .build();
        w.str_memo("size");
        w.global("torch", "Size");
        w.int_tuple(&vec![1; rank]).tuple(1).reduce();
        let size = w.memoize();
        w.str_memo("chunks");
        w.empty_list().mark();
        obj(&mut w, "ChunkStorageMetadata");
        w.empty_dict().mark();
        w.str_memo("offsets").get(size).str_memo("sizes").get(size).setitems().build();
        let chunk = w.memoize();
        for _ in 1..chunks {
            w.get(chunk);
        }
        w.appends().setitems().build();
        w.setitems();
        w.setitems().build();
        w.finish()
    }

    #[test]
    fn memo_repeated_key_is_refused() {
        // 512 KB key, 4000 storage entries: about 1 MB that decoded to 2 GB of copies.
        let data = memo_repeat_metadata(512 << 10, 4000);
        assert!(data.len() < 1 << 20, "{} bytes", data.len());
        let t = std::time::Instant::now();
        let e = Metadata::decode(&data, "/ckpt/.metadata").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
        assert!(e.to_string().starts_with("/ckpt/.metadata: pickle expands past"), "{e}");
        assert!(t.elapsed().as_secs() < 5);
        // The same shape with a short key decodes.
        let ok = Metadata::decode(&memo_repeat_metadata(20, 4000), "m").unwrap();
        assert_eq!(ok.storage.len(), 4000);
    }

    #[test]
    fn shared_chunks_are_refused() {
        // Rank 4096 (64 KB a chunk decoded) times 20000 references of 5 bytes: 1.3 GB from 110 KB.
        let data = shared_chunks_metadata(4096, 20_000);
        assert!(data.len() < 120_000, "{} bytes", data.len());
        let e = Metadata::decode(&data, "m").unwrap_err();
        assert!(e.to_string().contains("pickle expands past"), "{e}");
        let md = Metadata::decode(&shared_chunks_metadata(4, 1000), "m").unwrap();
        let EntryMeta::Tensor(t) = &md.entries[0].1 else { panic!() };
        assert_eq!(t.chunks.len(), 1000);
        assert_eq!(t.chunks[999].sizes, vec![1; 4]);
    }

    #[test]
    fn a_shared_state_dict_does_not_make_lookups_quadratic() {
        // One MetadataIndex whose state has 100000 items before `fqn`, and storage_data naming
        // it 100000 times: 3 * 10^10 items scanned unbudgeted.
        let mut w = PickleWriter::new(4);
        w.global(MD_MODULE, "Metadata");
        w.empty_tuple().newobj().empty_dict().mark();
        w.str_memo("state_dict_metadata").empty_dict();
        w.str_memo("storage_data").empty_dict().mark();
        w.global(MD_MODULE, "MetadataIndex");
        w.empty_tuple().newobj().empty_dict().mark();
        for i in 0..100_000 {
            w.int(i).none();
        }
        w.str("fqn").str("w").setitems().build();
        let index = w.memoize();
        w.global(FS_MODULE, "_StorageInfo");
        w.empty_tuple().newobj().empty_dict().mark();
        w.str("relative_path").str("f").str("offset").int(0).str("length").int(0);
        w.setitems().build();
        let info = w.memoize();
        for _ in 1..100_000 {
            w.get(index).get(info);
        }
        w.setitems();
        w.setitems().build();
        let data = w.finish();
        let t = std::time::Instant::now();
        let e = Metadata::decode(&data, "m").unwrap_err();
        assert!(e.to_string().contains("pickle expands past"), "{e}");
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }

    #[test]
    fn real_metadata_decodes_well_inside_its_budget() {
        // Many keys with long names, sharded in many chunks, as torch and libdcp write them.
        let mut md = Metadata::default();
        for k in 0..200u64 {
            let fqn = format!("model.layers.{k}.self_attention.linear_qkv.layer_norm_weight_and_some_more_words");
            let chunks: Vec<Region> = (0..64u64)
                .map(|i| Region {
                    offsets: vec![i * 8, 0],
                    sizes: vec![8, 16],
                })
                .collect();
            for (i, c) in chunks.iter().enumerate() {
                md.storage.push((
                    StorageIndex {
                        fqn: fqn.clone(),
                        offset: Some(c.offsets.clone()),
                        index: Some(i as u64),
                    },
                    StorageInfo {
                        relative_path: format!("__{i}_0.distcp"),
                        offset: k * 4096,
                        length: 512,
                    },
                ));
            }
            md.planner_data.push((fqn.clone(), default_path(&fqn)));
            md.entries.push((
                fqn,
                EntryMeta::Tensor(TensorMeta {
                    dtype: Some(DType::F32),
                    dtype_name: "float32".into(),
                    size: vec![512, 16],
                    chunks,
                }),
            ));
        }
        let data = md.encode();
        let g = pickle::parse(&data, "m").unwrap();
        let budget = Budget::new("m", data.len(), 32, 0);
        let back = Decoder {
            g: &g,
            what: "m",
            budget: &budget,
        }
        .metadata()
        .unwrap();
        assert!(back.entries == md.entries && back.storage == md.storage && back.planner_data == md.planner_data);
        let ratio = budget.used() as f64 / data.len() as f64;
        println!(
            "{} bytes of .metadata decode to {} budget units: {ratio:.2} per byte",
            data.len(),
            budget.used()
        );
        assert!(ratio < 8.0, "{ratio}");
    }

    #[test]
    fn default_paths() {
        assert_eq!(
            default_path("optimizer.param_groups.0.lr"),
            vec![
                PathPart::Key("optimizer".into()),
                PathPart::Key("param_groups".into()),
                PathPart::Index(0),
                PathPart::Key("lr".into())
            ]
        );
    }
}
