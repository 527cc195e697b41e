//! Outcomes exchanged between ranks, so that every rank of a collective call returns the same
//! status and the message names the rank that failed.

use crate::comm::Communicator;
use crate::error::{Error, ErrorKind, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub enum Wire<T> {
    Ok(T),
    Err { code: i32, message: String },
}

impl<T: Serialize + DeserializeOwned> Wire<T> {
    pub fn from_result(r: Result<T>) -> Self {
        match r {
            Ok(v) => Wire::Ok(v),
            Err(e) => Wire::Err {
                code: e.kind().code(),
                message: e.message().to_string(),
            },
        }
    }
    pub fn into_result(self, rank: usize) -> Result<T> {
        match self {
            Wire::Ok(v) => Ok(v),
            Wire::Err { code, message } => Err(Error::new(
                ErrorKind::from_code(code),
                if rank == usize::MAX {
                    message
                } else {
                    format!("rank {rank}: {message}")
                },
            )),
        }
    }
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("wire value serialises")
    }
    pub fn decode(bytes: &[u8], rank: usize) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|e| Error::comm(format!("rank {rank} sent an unreadable message: {e}")))
    }
}

/// Broadcasts `root`'s outcome; every rank returns it (a failure on root fails everyone).
pub fn broadcast_result<T: Serialize + DeserializeOwned>(comm: &dyn Communicator, root: usize, local: Result<T>) -> Result<T> {
    let bytes = if comm.rank() == root {
        Wire::from_result(local).encode()
    } else {
        Vec::new()
    };
    let got = comm.broadcast(&bytes, root)?;
    Wire::<T>::decode(&got, root)?.into_result(usize::MAX)
}

/// All-gathers every rank's outcome; if any failed, every rank returns an error (its own if it
/// failed, else the lowest failing rank's).
pub fn agree(comm: &dyn Communicator, local: Result<()>) -> Result<()> {
    let own = local.as_ref().err().cloned();
    let all = comm.all_gather(&Wire::from_result(local).encode())?;
    if let Some(e) = own {
        return Err(e);
    }
    for (rank, bytes) in all.iter().enumerate() {
        Wire::<()>::decode(bytes, rank)?.into_result(rank)?;
    }
    Ok(())
}
