//! The state a rank registers: its local tensors (with where they sit in the global tensor) and
//! its non-tensor values, keyed by torch-style flattened fqns.

use crate::error::{ensure, Error, Result};
use crate::format::metadata::PathPart;
use crate::format::pyobj::{ObjectValue, PyValue};
use crate::mesh::{region_of, DeviceMesh, Placement};
use crate::region::Region;
use crate::tensor::TensorView;
use std::collections::HashMap;

/// A registered tensor: the caller's local piece and its box in the global tensor.
#[derive(Debug)]
pub struct TensorEntry<'a> {
    pub view: TensorView<'a>,
    pub global_shape: Vec<u64>,
    pub region: Region,
    /// The mesh and placements the region was computed from, when registered that way (every
    /// rank can then compute every other rank's box, which lets a save skip the plan exchange).
    pub sharding: Option<Sharding>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sharding {
    pub mesh: DeviceMesh,
    pub placements: Vec<Placement>,
}

// Entries live in one Vec per state, a few thousand at most: boxing the tensor would add an
// allocation per key to save memory nobody misses.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum EntryValue<'a> {
    Tensor(TensorEntry<'a>),
    Object(ObjectValue),
}

#[derive(Debug)]
pub struct Entry<'a> {
    pub fqn: String,
    /// The key's path in the nested state dict (torch's `planner_data`); `None` derives it from
    /// the fqn.
    pub path: Option<Vec<PathPart>>,
    pub value: EntryValue<'a>,
    /// Set by a load that filled this entry.
    pub loaded: bool,
}

/// Registered state of one rank. Tensors are borrowed from the caller for `'a`; objects are
/// owned (a load replaces them with the stored values).
#[derive(Debug, Default)]
pub struct State<'a> {
    entries: Vec<Entry<'a>>,
    index: HashMap<String, usize>,
    missing: Vec<String>,
}

fn check_fqn(fqn: &str) -> Result<()> {
    ensure!(!fqn.is_empty(), Error::invalid("key is empty"));
    ensure!(!fqn.contains('\0'), Error::invalid(format!("key {fqn:?} contains a NUL byte")));
    Ok(())
}

impl<'a> State<'a> {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, fqn: &str, value: EntryValue<'a>) -> Result<()> {
        check_fqn(fqn)?;
        ensure!(
            !self.index.contains_key(fqn),
            Error::invalid(format!("key {fqn:?} is already registered"))
        );
        self.index.insert(fqn.to_string(), self.entries.len());
        self.entries.push(Entry {
            fqn: fqn.to_string(),
            path: None,
            value,
            loaded: false,
        });
        Ok(())
    }

    /// Registers a whole (unsharded) tensor.
    pub fn add_tensor(&mut self, fqn: &str, view: TensorView<'a>) -> Result<()> {
        let shape = view.sizes().to_vec();
        self.add_tensor_chunk(fqn, view, &shape, &vec![0; shape.len()])
    }

    /// Registers a local piece of a larger tensor: the piece is `view`, it sits at `offsets` of
    /// a global tensor of `global_shape`.
    pub fn add_tensor_chunk(&mut self, fqn: &str, view: TensorView<'a>, global_shape: &[u64], offsets: &[u64]) -> Result<()> {
        self.add_chunk(fqn, view, global_shape, offsets, None)
    }

    fn add_chunk(
        &mut self,
        fqn: &str,
        view: TensorView<'a>,
        global_shape: &[u64],
        offsets: &[u64],
        sharding: Option<Sharding>,
    ) -> Result<()> {
        let region = Region::new(offsets.to_vec(), view.sizes().to_vec()).map_err(|e| e.context(format!("key {fqn:?}")))?;
        ensure!(
            region.ndim() == global_shape.len(),
            Error::invalid(format!(
                "key {fqn:?}: local tensor has {} dims but the global shape {global_shape:?} has {}",
                region.ndim(),
                global_shape.len()
            ))
        );
        region.check_within(global_shape).map_err(|e| e.context(format!("key {fqn:?}")))?;
        self.insert(
            fqn,
            EntryValue::Tensor(TensorEntry {
                view,
                global_shape: global_shape.to_vec(),
                region,
                sharding,
            }),
        )
    }

    /// Registers this rank's shard of a tensor laid out over `mesh` by `placements` (one per mesh
    /// dimension). The library computes the shard's box for `rank`; a view of another shape is
    /// rejected with both shapes in the message.
    pub fn add_tensor_sharded(
        &mut self,
        fqn: &str,
        view: TensorView<'a>,
        global_shape: &[u64],
        mesh: &DeviceMesh,
        rank: u32,
        placements: &[Placement],
    ) -> Result<()> {
        let region = region_of(global_shape, mesh, rank, placements).map_err(|e| e.context(format!("key {fqn:?}")))?;
        let sharding = Sharding {
            mesh: mesh.clone(),
            placements: placements.to_vec(),
        };
        self.add_tensor_region_sharded(fqn, view, global_shape, region, Some(sharding))
    }

    /// Registers a tensor whose local piece must have the box `region` (computed from a mesh and
    /// placements); a view of another shape is rejected with both shapes in the message.
    pub fn add_tensor_region(&mut self, fqn: &str, view: TensorView<'a>, global_shape: &[u64], region: Region) -> Result<()> {
        self.add_tensor_region_sharded(fqn, view, global_shape, region, None)
    }

    fn add_tensor_region_sharded(
        &mut self,
        fqn: &str,
        view: TensorView<'a>,
        global_shape: &[u64],
        region: Region,
        sharding: Option<Sharding>,
    ) -> Result<()> {
        ensure!(
            view.sizes() == region.sizes.as_slice(),
            Error::invalid(format!(
                "key {fqn:?}: local tensor has shape {:?} but its placement gives this rank a shard of shape {:?} (at offsets {:?} of the global shape {global_shape:?})",
                view.sizes(),
                region.sizes,
                region.offsets
            ))
        );
        self.add_chunk(fqn, view, global_shape, &region.offsets, sharding)
    }

    /// Registers a Python object (saved like torch.save does; a load replaces it).
    pub fn add_object(&mut self, fqn: &str, value: ObjectValue) -> Result<()> {
        self.insert(fqn, EntryValue::Object(value))
    }
    /// Registers a `bytes` object.
    pub fn add_bytes(&mut self, fqn: &str, data: &[u8]) -> Result<()> {
        self.add_object(fqn, ObjectValue::Bytes(data.to_vec()))
    }
    /// Registers an `int` object.
    pub fn add_int(&mut self, fqn: &str, v: i64) -> Result<()> {
        self.add_object(fqn, ObjectValue::Int(v))
    }
    /// Registers a `float` object.
    pub fn add_float(&mut self, fqn: &str, v: f64) -> Result<()> {
        self.add_object(fqn, ObjectValue::Float(v))
    }
    /// Registers a plain Python value given in literal syntax, e.g. `(0.9, 0.999)`.
    pub fn add_literal(&mut self, fqn: &str, literal: &str) -> Result<()> {
        let v = PyValue::parse_literal(literal).map_err(|e| e.context(format!("key {fqn:?}")))?;
        self.add_object(fqn, v.into())
    }
    /// Registers an opaque pickle, stored byte for byte as the item's `data.pkl`.
    pub fn add_pickle(&mut self, fqn: &str, pickle: &[u8]) -> Result<()> {
        ensure!(
            pickle.len() >= 2 && pickle.last() == Some(&b'.'),
            Error::invalid(format!("key {fqn:?}: not a pickle (must end with the STOP opcode '.')"))
        );
        self.add_object(fqn, ObjectValue::Pickle(pickle.to_vec()))
    }

    /// Marks a registered tensor as CUDA memory of device `ordinal` (its pointer is a device
    /// pointer), with the caller's stream (0: none). On failure the entry keeps its CPU view.
    pub fn set_cuda(&mut self, fqn: &str, ordinal: i32, stream: usize) -> Result<()> {
        let i = self.position(fqn)?;
        let EntryValue::Tensor(t) = &mut self.entries[i].value else {
            return Err(Error::mismatch(format!("key {fqn:?} is not a tensor")));
        };
        t.view.set_cuda(ordinal, stream).map_err(|e| e.context(format!("key {fqn:?}")))
    }

    /// Sets the key's path in the nested state dict, for torch's `planner_data`.
    pub(crate) fn set_path(&mut self, fqn: &str, path: Vec<PathPart>) -> Result<()> {
        ensure!(!path.is_empty(), Error::invalid(format!("key {fqn:?}: empty path")));
        let i = self.position(fqn)?;
        self.entries[i].path = Some(path);
        Ok(())
    }

    /// The index of a registered key.
    fn position(&self, fqn: &str) -> Result<usize> {
        self.index
            .get(fqn)
            .copied()
            .ok_or_else(|| Error::not_found(format!("key {fqn:?} is not registered")))
    }

    /// Number of registered keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether no key is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub(crate) fn entries(&self) -> &[Entry<'a>] {
        &self.entries
    }
    pub(crate) fn entries_mut(&mut self) -> &mut [Entry<'a>] {
        &mut self.entries
    }
    pub(crate) fn get(&self, fqn: &str) -> Option<&Entry<'a>> {
        self.index.get(fqn).map(|&i| &self.entries[i])
    }
    /// The object registered (or loaded) as `fqn`.
    pub fn object(&self, fqn: &str) -> Result<&ObjectValue> {
        match self.get(fqn).map(|e| &e.value) {
            Some(EntryValue::Object(v)) => Ok(v),
            Some(EntryValue::Tensor(_)) => Err(Error::mismatch(format!("key {fqn:?} is a tensor, not an object"))),
            None => Err(Error::not_found(format!("key {fqn:?} is not registered"))),
        }
    }
    /// Keys the last partial load did not find in the checkpoint.
    pub fn missing(&self) -> &[String] {
        &self.missing
    }
    /// Forgets what the last load filled (done first by every load, so a failed load leaves
    /// nothing reported as loaded).
    pub(crate) fn reset_load_status(&mut self) {
        for e in &mut self.entries {
            e.loaded = false;
        }
        self.missing.clear();
    }
    pub(crate) fn mark_loaded(&mut self, entries: Vec<usize>) {
        for i in entries {
            if let Some(e) = self.entries.get_mut(i) {
                e.loaded = true;
            }
        }
    }
    pub(crate) fn add_missing(&mut self, m: Vec<String>) {
        self.missing.extend(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_and_bad_keys() {
        let mut s = State::new();
        s.add_int("a", 1).unwrap();
        assert!(s.add_int("a", 2).unwrap_err().message().contains("already registered"));
        assert!(s.add_int("", 2).is_err());
        assert!(s.add_pickle("p", b"xx").is_err());
    }

    #[test]
    fn cuda_tensors_are_refused_cleanly_without_a_driver() {
        if crate::cuda::available() {
            return; // covered by tests/gpu on machines with a GPU
        }
        let mut buf = vec![0u8; 16];
        let mut st = State::new();
        st.add_tensor("g", TensorView::from_bytes(&mut buf, crate::DType::F32, &[4]).unwrap())
            .unwrap();
        let e = st.set_cuda("g", 0, 0).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported, "{e}");
        assert!(e.message().contains("CUDA"), "{e}");
    }

    #[test]
    fn chunk_must_fit() {
        let buf = vec![0f32; 4];
        let mut s = State::new();
        let v = TensorView::from_slice(&buf, &[2, 2]).unwrap();
        let e = s.add_tensor_chunk("w", v, &[3, 2], &[2, 0]).unwrap_err();
        assert!(e.message().contains("exceeds"), "{e}");
    }

    #[test]
    fn region_shape_mismatch_names_both_shapes() {
        let buf = vec![0f32; 4];
        let mut s = State::new();
        let v = TensorView::from_slice(&buf, &[2, 2]).unwrap();
        let e = s
            .add_tensor_region(
                "w",
                v,
                &[4, 4],
                Region {
                    offsets: vec![0, 0],
                    sizes: vec![2, 4],
                },
            )
            .unwrap_err();
        assert!(e.message().contains("[2, 2]") && e.message().contains("[2, 4]"), "{e}");
    }
}
