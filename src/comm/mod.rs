//! Collectives libdcp needs between the ranks of a job: all-gather, broadcast and barrier of
//! byte strings. Every implementation bounds every call by a timeout, so a rank that never
//! arrives turns into an error on the others, not a hang.

pub mod callbacks;
pub mod local;
pub mod tcp;

use crate::error::Result;

pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank contributes `data`; every rank receives all contributions in rank order.
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `root`'s `data` reaches every rank (other ranks' `data` is ignored).
    fn broadcast(&self, data: &[u8], root: usize) -> Result<Vec<u8>>;
    fn barrier(&self) -> Result<()>;
    /// Contributions of all ranks on `root` (`None` elsewhere). Backends with a real gather
    /// override this; the default all-gathers.
    fn gather(&self, data: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let all = self.all_gather(data)?;
        Ok((self.rank() == root).then_some(all))
    }
}
