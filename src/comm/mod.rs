//! Collectives libdcp needs between the ranks of a job: all-gather, broadcast and barrier of
//! byte strings. Every implementation bounds every call by a timeout, so a rank that never
//! arrives turns into an error on the others, not a hang.

pub(crate) mod callbacks;
pub mod local;
pub mod tcp;

pub use local::LocalComm;
pub use tcp::TcpComm;

use crate::error::Result;

/// The collectives of one job's ranks. Every rank of a [`Context`](crate::Context) calls each
/// collective in the same order; implement it to run libdcp over a job's own transport.
pub trait Communicator: Send + Sync {
    /// This process's rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the job.
    fn world_size(&self) -> usize;
    /// Every rank contributes `data`; every rank receives all contributions in rank order.
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `root`'s `data` reaches every rank (other ranks' `data` is ignored).
    fn broadcast(&self, data: &[u8], root: usize) -> Result<Vec<u8>>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Contributions of all ranks on `root` (`None` elsewhere). Backends with a real gather
    /// override this; the default all-gathers.
    fn gather(&self, data: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let all = self.all_gather(data)?;
        Ok((self.rank() == root).then_some(all))
    }
}
