//! Outcomes exchanged between ranks, so that every rank of a collective call returns the same
//! status and the message names the rank that failed.

use crate::comm::Communicator;
use crate::error::{Error, ErrorKind, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub enum Wire<T> {
    Ok(T),
    /// An error: its kind, message, and where known its key, file and offset (the source, a
    /// value of this process, stays behind).
    Err {
        code: i32,
        message: String,
        key: Option<String>,
        file: Option<String>,
        offset: Option<u64>,
    },
}

impl<T: Serialize + DeserializeOwned> Wire<T> {
    pub fn from_result(r: Result<T>) -> Self {
        match r {
            Ok(v) => Wire::Ok(v),
            Err(e) => Wire::Err {
                code: e.kind().code(),
                message: e.message().to_string(),
                key: e.key().map(str::to_string),
                file: e.file().map(str::to_string),
                offset: e.offset(),
            },
        }
    }
    pub fn into_result(self, rank: usize) -> Result<T> {
        match self {
            Wire::Ok(v) => Ok(v),
            Wire::Err {
                code,
                message,
                key,
                file,
                offset,
            } => {
                let message = if rank == usize::MAX {
                    message
                } else {
                    format!("rank {rank}: {message}")
                };
                let mut e = Error::new(ErrorKind::from_code(code), message);
                if let Some(k) = key {
                    e = e.with_key(k);
                }
                if let Some(f) = file {
                    e = e.with_file(f);
                }
                if let Some(o) = offset {
                    e = e.with_offset(o);
                }
                Err(e)
            }
        }
    }
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("wire value serialises")
    }
    pub fn decode(bytes: &[u8], rank: usize) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|e| Error::comm(format!("rank {rank} sent an unreadable message: {e}")))
    }
}

/// Broadcasts `root`'s outcome; every rank returns it (a failure on root fails everyone; root
/// returns its own error, with its source).
pub fn broadcast_result<T: Serialize + DeserializeOwned>(comm: &dyn Communicator, root: usize, local: Result<T>) -> Result<T> {
    let mut own = None;
    let bytes = if comm.rank() == root {
        own = local.as_ref().err().cloned();
        Wire::from_result(local).encode()
    } else {
        Vec::new()
    };
    let got = comm.broadcast(&bytes, root)?;
    if let Some(e) = own {
        return Err(e);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_their_details_across_ranks() {
        let e = Error::corrupt("bad item").with_key("w").with_file("__1_0.distcp").with_offset(4096);
        let bytes = Wire::<()>::from_result(Err(e)).encode();
        let back = Wire::<()>::decode(&bytes, 1).unwrap().into_result(1).unwrap_err();
        assert_eq!(back.kind(), ErrorKind::Corrupt);
        assert_eq!(back.message(), "rank 1: bad item");
        assert_eq!((back.key(), back.file(), back.offset()), (Some("w"), Some("__1_0.distcp"), Some(4096)));
    }
}
