//! A built-in TCP rendezvous: rank 0 listens, the other ranks connect to it (a star). Collectives
//! go through rank 0. Every receive is bounded by the timeout; a rank that fails or never
//! arrives makes rank 0 send an error to the others, so all ranks return an error that names it.
//! The communicator is for control messages (plans, write results); tensor bytes never cross it.

use super::Communicator;
use crate::error::{Error, ErrorKind, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x4443_5031; // "DCP1"
const KIND_DATA: u8 = 1;
const KIND_ERROR: u8 = 2;
/// Longest message accepted (a save plan of a very large job is a few MB).
const MAX_FRAME: u64 = 1 << 34;

enum Links {
    /// Rank 0: one stream per other rank, index = rank - 1.
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
}

struct Inner {
    links: Links,
    seq: u64,
    broken: Option<Error>,
}

/// Collectives over TCP between the ranks of a job: every rank connects to rank 0 at
/// `addr:port`, and every call is bounded by the timeout given to [`TcpComm::connect`].
pub struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    inner: Mutex<Inner>,
}

/// Connection settings from torchrun-style environment variables: `RANK`, `WORLD_SIZE`,
/// `MASTER_ADDR`, and the port `DCP_MASTER_PORT`, else `MASTER_PORT` + 1 (torchrun's own store
/// listens on `MASTER_PORT` itself). `Ok(None)` when neither RANK nor WORLD_SIZE is set.
pub fn env_settings() -> Result<Option<(usize, usize, String, u16)>> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (rank, world) = (var("RANK"), var("WORLD_SIZE"));
    if rank.is_none() && world.is_none() {
        return Ok(None);
    }
    let parse = |k: &str, v: Option<String>| -> Result<u64> {
        let v = v.ok_or_else(|| Error::invalid(format!("environment variable {k} is not set")))?;
        v.parse()
            .map_err(|_| Error::invalid(format!("environment variable {k}={v:?} is not a number")))
    };
    let rank = parse("RANK", rank)? as usize;
    let world = parse("WORLD_SIZE", world)? as usize;
    let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string());
    let port = match var("DCP_MASTER_PORT") {
        Some(p) => parse("DCP_MASTER_PORT", Some(p))?,
        None => parse("MASTER_PORT", var("MASTER_PORT"))? + 1,
    };
    let port = u16::try_from(port).map_err(|_| Error::invalid(format!("port {port} is out of range")))?;
    Ok(Some((rank, world, addr, port)))
}

fn io_err(what: String, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Comm,
    };
    Error::new(kind, format!("{what}: {e}")).with_source(e)
}

impl TcpComm {
    /// Joins the job: rank 0 listens on `port` (all interfaces) and waits for the others, which
    /// connect to `addr:port`. Returns once every rank is connected, or errors after `timeout`.
    pub fn connect(rank: usize, world: usize, addr: &str, port: u16, timeout: Duration) -> Result<TcpComm> {
        if world == 0 || rank >= world {
            return Err(Error::invalid(format!("rank {rank} is not in a world of size {world}")));
        }
        if timeout.is_zero() {
            return Err(Error::invalid("timeout must be positive"));
        }
        let deadline = Instant::now() + timeout;
        let links = if rank == 0 {
            Links::Root(Self::accept_all(world, port, deadline, timeout)?)
        } else {
            Links::Leaf(Self::join(rank, world, addr, port, deadline, timeout)?)
        };
        Ok(TcpComm {
            rank,
            world,
            timeout,
            inner: Mutex::new(Inner {
                links,
                seq: 0,
                broken: None,
            }),
        })
    }

    fn accept_all(world: usize, port: u16, deadline: Instant, timeout: Duration) -> Result<Vec<TcpStream>> {
        let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                " (is another job or torchrun's store using it? set DCP_MASTER_PORT)"
            } else {
                ""
            };
            io_err(format!("rank 0 cannot listen on port {port}{hint}"), e)
        })?;
        listener.set_nonblocking(true).map_err(|e| io_err("listener".into(), e))?;
        let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let mut joined = 0;
        while joined < world - 1 {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).map_err(|e| io_err("accept".into(), e))?;
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let mut hello = [0u8; 12];
                    if (&s).read_exact(&mut hello).is_err() {
                        continue;
                    }
                    let magic = u32::from_le_bytes(hello[0..4].try_into().unwrap());
                    let r = u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize;
                    let w = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
                    if magic != MAGIC {
                        continue;
                    }
                    if w != world || r == 0 || r >= world {
                        return Err(Error::comm(format!(
                            "a process joined as rank {r} of {w}, but this job has world size {world}"
                        )));
                    }
                    if slots[r - 1].is_some() {
                        return Err(Error::comm(format!("two processes joined as rank {r}")));
                    }
                    slots[r - 1] = Some(s);
                    joined += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i + 1).collect();
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!("ranks {missing:?} did not join within {:.0} s", timeout.as_secs_f64()),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io_err("accepting a rank".into(), e)),
            }
        }
        let mut streams: Vec<TcpStream> = slots.into_iter().map(|s| s.expect("every slot joined")).collect();
        for s in &mut streams {
            s.write_all(&MAGIC.to_le_bytes()).map_err(|e| io_err("greeting a rank".into(), e))?;
        }
        Ok(streams)
    }

    fn join(rank: usize, world: usize, addr: &str, port: u16, deadline: Instant, timeout: Duration) -> Result<TcpStream> {
        let target: Vec<SocketAddr> = (addr, port)
            .to_socket_addrs()
            .map_err(|e| io_err(format!("resolving {addr}:{port}"), e))?
            .collect();
        loop {
            for a in &target {
                if let Ok(mut s) = TcpStream::connect_timeout(a, Duration::from_millis(500)) {
                    s.set_nodelay(true).ok();
                    let mut hello = Vec::with_capacity(12);
                    hello.extend_from_slice(&MAGIC.to_le_bytes());
                    hello.extend_from_slice(&(rank as u32).to_le_bytes());
                    hello.extend_from_slice(&(world as u32).to_le_bytes());
                    if s.write_all(&hello).is_err() {
                        continue;
                    }
                    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                    s.set_read_timeout(Some(left)).ok();
                    let mut ack = [0u8; 4];
                    match s.read_exact(&mut ack) {
                        Ok(()) if u32::from_le_bytes(ack) == MAGIC => return Ok(s),
                        Ok(()) => return Err(Error::comm(format!("{addr}:{port} is not a libdcp rendezvous"))),
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
                            return Err(Error::comm(format!(
                                "rank {rank} waiting for the other ranks to join at {addr}:{port}: rank 0 closed the connection (did its process exit?)"
                            )))
                        }
                        Err(e) => {
                            return Err(io_err(
                                format!("rank {rank} waiting for the other ranks to join at {addr}:{port}"),
                                e,
                            ))
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "rank {rank} could not reach rank 0 at {addr}:{port} within {:.0} s",
                        timeout.as_secs_f64()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(s: &mut TcpStream, seq: u64, kind: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut h = Vec::with_capacity(21 + payload.len().min(1 << 16));
        h.extend_from_slice(&MAGIC.to_le_bytes());
        h.extend_from_slice(&seq.to_le_bytes());
        h.push(kind);
        h.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        s.write_all(&h)?;
        s.write_all(payload)
    }

    /// Receives one frame of collective `seq` before `deadline`.
    fn recv(s: &mut TcpStream, seq: u64, deadline: Instant, who: &str) -> Result<Vec<u8>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(ErrorKind::Timeout, format!("{who} did not respond in time")));
        }
        s.set_read_timeout(Some(left)).ok();
        let mut h = [0u8; 21];
        s.read_exact(&mut h).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                Error::comm(format!("{who} closed its connection (did the process exit?)"))
            }
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                Error::new(ErrorKind::Timeout, format!("{who} did not respond in time"))
            }
            _ => io_err(format!("receiving from {who}"), e),
        })?;
        let magic = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let got = u64::from_le_bytes(h[4..12].try_into().unwrap());
        let len = u64::from_le_bytes(h[13..21].try_into().unwrap());
        if magic != MAGIC || len > MAX_FRAME {
            return Err(Error::comm(format!("garbled message from {who}")));
        }
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).map_err(|e| io_err(format!("receiving from {who}"), e))?;
        if h[12] == KIND_ERROR {
            let code = payload.first().copied().unwrap_or(0) as i32;
            return Err(Error::new(
                ErrorKind::from_code(code),
                String::from_utf8_lossy(payload.get(1..).unwrap_or_default()).into_owned(),
            ));
        }
        if got != seq {
            return Err(Error::comm(format!(
                "{who} is in collective #{got} but this rank is in #{seq}: the ranks called save/load in different orders"
            )));
        }
        Ok(payload)
    }

    /// Rank 0 collects every rank's contribution, runs `reply` over them, and sends each rank
    /// its answer. Leaves send theirs and wait for the answer. One exchange per collective.
    fn exchange(&self, data: &[u8], reply: impl FnOnce(Vec<Vec<u8>>) -> Vec<u8>) -> Result<Vec<u8>> {
        let mut inner = crate::error::lock(&self.inner);
        if let Some(e) = &inner.broken {
            return Err(Error::new(
                e.kind(),
                format!("the communicator failed earlier and cannot be used again: {}", e.message()),
            ));
        }
        inner.seq += 1;
        let seq = inner.seq;
        let timeout = self.timeout;
        let result = match &mut inner.links {
            Links::Root(peers) => {
                let deadline = Instant::now() + timeout;
                let mut all = Vec::with_capacity(self.world);
                all.push(data.to_vec());
                let mut failure = None;
                for (i, s) in peers.iter_mut().enumerate() {
                    match Self::recv(s, seq, deadline, &format!("rank {}", i + 1)) {
                        Ok(p) => all.push(p),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                match failure {
                    None => {
                        let out = reply(all);
                        let mut send_err = None;
                        for (i, s) in peers.iter_mut().enumerate() {
                            if let Err(e) = Self::send(s, seq, KIND_DATA, &out) {
                                send_err.get_or_insert(io_err(format!("sending to rank {}", i + 1), e));
                            }
                        }
                        match send_err {
                            Some(e) => Err(e),
                            None => Ok(out),
                        }
                    }
                    Some(e) => {
                        // Tell everyone still listening why the collective failed.
                        let mut msg = vec![e.kind().code() as u8];
                        msg.extend_from_slice(format!("collective #{seq} failed on rank 0: {}", e.message()).as_bytes());
                        for s in peers.iter_mut() {
                            let _ = Self::send(s, seq, KIND_ERROR, &msg);
                        }
                        Err(e)
                    }
                }
            }
            Links::Leaf(s) => {
                // Wait longer than rank 0 does, so its explanation arrives before our own timeout.
                let deadline = Instant::now() + timeout + timeout / 10 + Duration::from_secs(2);
                match Self::send(s, seq, KIND_DATA, data) {
                    Ok(()) => Self::recv(s, seq, deadline, "rank 0"),
                    // Rank 0 may have given up on this collective already (another rank
                    // failed), sent its reason and closed: the reason names the rank at fault.
                    // Else, if rank 0's connection is gone, say so rather than "Broken pipe".
                    Err(e) => match Self::recv(s, seq, Instant::now() + Duration::from_secs(1), "rank 0") {
                        Err(why) if why.kind() == ErrorKind::Comm || why.message().starts_with(&format!("collective #{seq} failed")) => {
                            Err(why)
                        }
                        _ => Err(io_err("sending to rank 0".into(), e)),
                    },
                }
            }
        };
        if let Err(e) = &result {
            inner.broken = Some(e.clone());
        }
        result
    }
}

fn pack(all: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(all.iter().map(|a| a.len() + 8).sum());
    for a in all {
        out.extend_from_slice(&(a.len() as u64).to_le_bytes());
        out.extend_from_slice(a);
    }
    out
}

fn unpack(b: &[u8], world: usize) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(world);
    let mut p = 0usize;
    for _ in 0..world {
        let n = b
            .get(p..p + 8)
            .map(|x| u64::from_le_bytes(x.try_into().unwrap()) as usize)
            .ok_or_else(|| Error::comm("short all-gather reply"))?;
        p += 8;
        out.push(b.get(p..p + n).ok_or_else(|| Error::comm("short all-gather reply"))?.to_vec());
        p += n;
    }
    Ok(out)
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let packed = self.exchange(data, |all| pack(&all))?;
        unpack(&packed, self.world)
    }
    fn broadcast(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        if root >= self.world {
            return Err(Error::invalid(format!("broadcast root {root} is not a rank of {}", self.world)));
        }
        let mine = if self.rank == root { data } else { &[] };
        self.exchange(mine, |mut all| all.swap_remove(root))
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(&[], |_| Vec::new()).map(|_| ())
    }
    fn gather(&self, data: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        if root != 0 {
            let all = self.all_gather(data)?;
            return Ok((self.rank == root).then_some(all));
        }
        // Only rank 0 needs the contributions: the others get an empty acknowledgement.
        let mut kept = None;
        self.exchange(data, |all| {
            kept = Some(all);
            Vec::new()
        })?;
        Ok(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn collectives_across_threads() {
        let port = free_port();
        let world = 4;
        let handles: Vec<_> = (0..world)
            .map(|r| {
                std::thread::spawn(move || {
                    let c = TcpComm::connect(r, world, "127.0.0.1", port, Duration::from_secs(20)).unwrap();
                    let all = c.all_gather(&vec![r as u8; r]).unwrap();
                    for (i, a) in all.iter().enumerate() {
                        assert_eq!(a, &vec![i as u8; i]);
                    }
                    assert_eq!(c.broadcast(if r == 2 { b"hello" } else { b"" }, 2).unwrap(), b"hello");
                    c.barrier().unwrap();
                    let g = c.gather(&[r as u8], 0).unwrap();
                    assert_eq!(g.is_some(), r == 0);
                    if let Some(g) = g {
                        assert_eq!(g, vec![vec![0], vec![1], vec![2], vec![3]]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn missing_rank_times_out_with_a_message() {
        let port = free_port();
        let t = std::thread::spawn(move || TcpComm::connect(1, 3, "127.0.0.1", port, Duration::from_secs(2)).map(|_| ()));
        let e = TcpComm::connect(0, 3, "127.0.0.1", port, Duration::from_secs(2)).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.message().contains("[2]"), "{e}");
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn dead_rank_fails_everyone() {
        let port = free_port();
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|r| {
                std::thread::spawn(move || {
                    let c = TcpComm::connect(r, world, "127.0.0.1", port, Duration::from_secs(3)).unwrap();
                    c.barrier().unwrap();
                    if r == 2 {
                        return None; // leaves without joining the next collective
                    }
                    Some(c.all_gather(b"x").unwrap_err())
                })
            })
            .collect();
        let errs: Vec<_> = handles.into_iter().filter_map(|h| h.join().unwrap()).collect();
        assert_eq!(errs.len(), 2);
        for e in errs {
            assert!(e.message().contains("rank 2"), "{e}");
        }
    }

    #[test]
    fn late_rank_learns_which_rank_failed_even_when_rank_0_is_gone() {
        // Rank 1 dies; rank 0 fails the collective, tells rank 2 why and exits; rank 2 arrives
        // late with a large contribution, whose send fails: its error still names rank 1.
        let port = free_port();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let r0 = std::thread::spawn(move || {
            let c = TcpComm::connect(0, 3, "127.0.0.1", port, Duration::from_secs(5)).unwrap();
            let e = c.all_gather(b"x").unwrap_err();
            drop(c);
            tx.send(()).unwrap();
            e
        });
        let r1 = std::thread::spawn(move || drop(TcpComm::connect(1, 3, "127.0.0.1", port, Duration::from_secs(5)).unwrap()));
        let c2 = TcpComm::connect(2, 3, "127.0.0.1", port, Duration::from_secs(5)).unwrap();
        r1.join().unwrap();
        rx.recv().unwrap();
        let e = c2.all_gather(&vec![7u8; 32 << 20]).unwrap_err();
        assert!(e.message().contains("rank 1"), "{e}");
        assert!(r0.join().unwrap().message().contains("rank 1"));
    }
}
