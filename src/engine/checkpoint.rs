//! A checkpoint opened read-only, by one process: list keys, dtypes, shapes and chunks; read a
//! key (or a box of it) into a caller buffer without registering anything — the counterpart of
//! torch's `_load_state_dict_from_keys`.

use super::load::read::{read_object, Files};
use super::load::{execute, open_local, LoadOptions, Opened};
use crate::error::{Error, Result};
use crate::format::metadata::{EntryMeta, Metadata, StorageInfo};
use crate::format::pyobj::ObjectValue;
use crate::format::sidecar::Sidecar;
use crate::region::Region;
use crate::state::State;
use crate::storage::{self, Storage};
use crate::tensor::{DType, TensorView};
use std::sync::Arc;

/// What a key of a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A tensor (possibly saved in chunks).
    Tensor,
    /// A torch.save'd Python object (bytes, int, float, anything picklable).
    Object,
}

/// One key of a [`Checkpoint`], as `.metadata` describes it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct KeyInfo<'c> {
    /// The fully qualified name (`model.layers.0.weight`).
    pub fqn: &'c str,
    /// Tensor or object.
    pub kind: KeyKind,
    /// `None` for objects and for dtypes libdcp does not know (see `dtype_name`).
    pub dtype: Option<DType>,
    /// The dtype as torch names it (`float32`); empty for objects.
    pub dtype_name: &'c str,
    /// The global shape of a tensor; empty for objects.
    pub shape: &'c [u64],
    /// The chunks the tensor was saved in (each a box of the global tensor).
    pub chunks: &'c [Region],
}

impl KeyInfo<'_> {
    /// Element bytes of a tensor; `None` for objects, unknown dtypes and shapes whose size
    /// overflows.
    pub fn nbytes(&self) -> Option<u64> {
        crate::tensor::numel(self.shape).ok()?.checked_mul(self.dtype?.size() as u64)
    }
}

/// A checkpoint opened read-only on one process (no collective): its keys, and reads of single
/// tensors and objects.
///
/// ```
/// # use dcp::{save, Checkpoint, Context, KeyKind, SaveOptions, State, TensorView};
/// # let dir = std::env::temp_dir().join(format!("libdcp-doc-ck-{}", std::process::id()));
/// # let location = dir.to_str().unwrap();
/// # let mut state = State::new();
/// # state.add_tensor("w", TensorView::from_slice(&[1u16, 2, 3, 4], &[2, 2])?)?;
/// # save(&Context::local(), &state, location, &SaveOptions::default())?;
/// let ck = Checkpoint::open(location)?;
/// let w = ck.find("w").unwrap();
/// assert_eq!((w.kind, w.shape), (KeyKind::Tensor, &[2u64, 2][..]));
/// let (_dtype, _shape, bytes) = ck.read_tensor("w")?;
/// assert_eq!(bytes, [1, 0, 2, 0, 3, 0, 4, 0]);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), dcp::Error>(())
/// ```
pub struct Checkpoint {
    storage: Arc<dyn Storage>,
    opened: Opened,
    location: String,
    pool: std::sync::Mutex<super::staging::StagingPool>,
    /// Data files stay open between reads.
    files: Files,
}

impl Checkpoint {
    /// Opens the checkpoint at `location` (a directory, or an `s3://` URL) with storage settings from the environment only (for S3 the AWS
    /// variables); [`open_with`](Self::open_with) also applies a context's storage options.
    pub fn open(location: &str) -> Result<Checkpoint> {
        let storage = storage::open(location)?;
        Self::open_storage(storage, location)
    }

    /// Opens `location` with `ctx`'s storage options (an S3 endpoint or credentials set with
    /// [`Context::set_storage_option`](super::Context::set_storage_option)), as its saves and
    /// loads do. Not collective: only this process reads.
    pub fn open_with(ctx: &super::Context, location: &str) -> Result<Checkpoint> {
        Self::open_storage(ctx.open_storage(location)?, location)
    }

    /// Opens the checkpoint in `storage`; `location` names it in messages.
    pub fn open_storage(storage: Arc<dyn Storage>, location: &str) -> Result<Checkpoint> {
        let opened = open_local(storage.as_ref())?;
        let files = Files::new(storage.clone(), opened.sidecar.as_ref());
        Ok(Checkpoint {
            storage,
            opened,
            location: location.to_string(),
            pool: Default::default(),
            files,
        })
    }

    /// Where the checkpoint is, as given to [`open`](Self::open).
    pub fn location(&self) -> &str {
        &self.location
    }
    /// The storage the checkpoint is read from.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }
    /// The decoded `.metadata` (for the `dcp` tool; not part of the API).
    #[doc(hidden)]
    pub fn metadata(&self) -> &Metadata {
        &self.opened.metadata
    }
    /// The decoded sidecar, if any (for the `dcp` tool; not part of the API).
    #[doc(hidden)]
    pub fn sidecar(&self) -> Option<&Sidecar> {
        self.opened.sidecar.as_ref()
    }
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.opened.metadata.entries.len()
    }
    /// Whether the checkpoint has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`th key, in `.metadata` order.
    pub fn key(&self, i: usize) -> Option<KeyInfo<'_>> {
        let (fqn, e) = self.opened.metadata.entries.get(i)?;
        Some(match e {
            EntryMeta::Tensor(t) => KeyInfo {
                fqn,
                kind: KeyKind::Tensor,
                dtype: t.dtype,
                dtype_name: &t.dtype_name,
                shape: &t.size,
                chunks: &t.chunks,
            },
            EntryMeta::Bytes => KeyInfo {
                fqn,
                kind: KeyKind::Object,
                dtype: None,
                dtype_name: "",
                shape: &[],
                chunks: &[],
            },
        })
    }

    /// Every key, in `.metadata` order.
    pub fn keys(&self) -> impl Iterator<Item = KeyInfo<'_>> {
        (0..self.len()).filter_map(|i| self.key(i))
    }

    /// Position of `fqn` among the keys.
    pub fn index_of(&self, fqn: &str) -> Option<usize> {
        self.opened.lookup.entry_index(fqn)
    }

    /// The key `fqn`.
    pub fn find(&self, fqn: &str) -> Option<KeyInfo<'_>> {
        self.key(self.index_of(fqn)?)
    }

    /// Where the item of `fqn` (a tensor chunk at `offsets`, or an object with `None`) is stored
    /// (for the `dcp` tool; not part of the API).
    #[doc(hidden)]
    pub fn storage_info(&self, fqn: &str, offsets: Option<&[u64]>) -> Option<&StorageInfo> {
        self.opened.lookup.storage(&self.opened.metadata, fqn, offsets)
    }

    /// The key `fqn`, which must be of kind `kind`.
    fn key_of(&self, fqn: &str, kind: KeyKind) -> Result<KeyInfo<'_>> {
        let k = self
            .find(fqn)
            .ok_or_else(|| Error::not_found(format!("key {fqn:?} is not in the checkpoint at {}", self.location)))?;
        if k.kind != kind {
            return Err(Error::mismatch(match kind {
                KeyKind::Tensor => format!("key {fqn:?} is an object, not a tensor"),
                KeyKind::Object => format!("key {fqn:?} is a tensor, not an object"),
            }));
        }
        Ok(k)
    }

    /// Reads the box of `fqn` at `offsets` with the view's sizes into `view` (any strides).
    pub fn read_tensor_into(&self, fqn: &str, offsets: &[u64], view: TensorView<'_>, verify: bool) -> Result<()> {
        let k = self.key_of(fqn, KeyKind::Tensor)?;
        self.read_box(k, offsets, view, verify)
    }

    fn read_box(&self, k: KeyInfo<'_>, offsets: &[u64], view: TensorView<'_>, verify: bool) -> Result<()> {
        let fqn = k.fqn;
        let shape = k.shape.to_vec();
        let mut state = State::new();
        state.add_tensor_chunk(fqn, view, &shape, offsets)?;
        execute(
            &self.files,
            &self.opened,
            &mut state,
            &LoadOptions {
                verify,
                ..Default::default()
            },
            &self.pool,
        )?;
        Ok(())
    }

    /// Reads a whole tensor into a new buffer of its dtype's bytes.
    pub fn read_tensor(&self, fqn: &str) -> Result<(DType, Vec<u64>, Vec<u8>)> {
        let k = self.key_of(fqn, KeyKind::Tensor)?;
        let dtype = k
            .dtype
            .ok_or_else(|| Error::unsupported(format!("key {fqn:?}: dtype torch.{} is not supported", k.dtype_name)))?;
        let shape = k.shape.to_vec();
        let n = crate::tensor::numel(&shape)? as usize * dtype.size();
        let mut buf = vec![0u8; n];
        let view = TensorView::from_bytes(&mut buf, dtype, &shape)?;
        self.read_box(k, &vec![0; shape.len()], view, true)?;
        Ok((dtype, shape, buf))
    }

    /// Reads the object `fqn`.
    pub fn read_object(&self, fqn: &str) -> Result<ObjectValue> {
        self.key_of(fqn, KeyKind::Object)?;
        let info = self
            .storage_info(fqn, None)
            .ok_or_else(|| Error::corrupt(format!("key {fqn:?} has no storage entry")))?;
        read_object(&self.files, fqn, info)
    }

    /// The checks of [`verify`](crate::verify) for the items of key `fqn` only: zip structure,
    /// every record's CRC-32, the sidecar's block CRCs, and what each item holds. Empty when all
    /// hold. For reading a key without the reader's own CRC checks (a large tensor read in
    /// pieces, each of which would otherwise check its whole chunk): its bytes are checked once.
    pub fn verify_key(&self, fqn: &str) -> Vec<super::verify::Problem> {
        super::verify::verify_key(self.storage(), self.metadata(), self.sidecar(), fqn)
    }
}
