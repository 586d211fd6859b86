//! TCP backend: ranks as processes (or threads) that meet at `MASTER_ADDR:MASTER_PORT`.
//!
//! Rendezvous: global rank 0 listens on the master port; every other rank connects (retrying
//! until the deadline, since the master may start later), says who it is and where its own
//! peer listener is, and receives the table of all peer addresses. Then every pair of ranks
//! opens one connection (the higher rank dials the lower), and a reader thread per
//! connection files incoming frames `[tag u64][len u64][bytes]` into this rank's inbox. A
//! rank that does not arrive, or a connection that drops, is an error naming the rank.

use super::mailbox::Mailbox;
use super::{CpuGroup, Wire};
use candle_core::Result;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x4d42_5244; // "MBRD"

/// Tag of the empty frame a rank sends every peer when its run finished cleanly
/// ([`TcpWorld::farewell`]); group tags never take it (FNV-1a of a name, ±1).
const GOODBYE_TAG: u64 = u64::MAX;

/// Where and how to meet the other ranks.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// This process's global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Host of global rank 0 (`MASTER_ADDR`).
    pub master_addr: String,
    /// Rendezvous port on the master (`MASTER_PORT`).
    pub master_port: u16,
    /// Limit for the rendezvous and for every later receive
    /// (`dist.distributed_timeout_minutes`).
    pub timeout: Duration,
}

/// This rank's connections to all other ranks.
#[derive(Debug)]
pub struct TcpWorld {
    rank: usize,
    size: usize,
    writers: Vec<Option<Mutex<TcpStream>>>,
    inbox: Arc<Mailbox>,
    timeout: Duration,
}

/// One rank's transport handle (what [`CpuGroup`] talks through).
#[derive(Debug)]
struct TcpRank(Arc<TcpWorld>);

fn io_err(ctx: impl std::fmt::Display, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{ctx}: {e}"))
}

fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_bytes(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let n = read_u32(s)? as usize;
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn write_bytes(s: &mut TcpStream, b: &[u8]) -> std::io::Result<()> {
    s.write_all(&(b.len() as u32).to_le_bytes())?;
    s.write_all(b)
}

/// Accepts one connection before `deadline` (the listener is non-blocking).
fn accept_until(l: &TcpListener, deadline: Instant) -> std::io::Result<Option<TcpStream>> {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn missing(arrived: &[bool]) -> Vec<usize> {
    arrived.iter().enumerate().filter(|(_, a)| !**a).map(|(i, _)| i).collect()
}

impl TcpWorld {
    /// Joins the world described by `opts`; returns once every rank is connected to every
    /// other, or fails with the ranks that did not arrive within `opts.timeout`.
    pub fn connect(opts: &TcpOptions) -> Result<Arc<Self>> {
        let (rank, size) = (opts.rank, opts.world_size);
        if size == 0 || rank >= size {
            candle_core::bail!("rank {rank} out of range for world size {size}");
        }
        let deadline = Instant::now() + opts.timeout;
        let master = format!("{}:{}", opts.master_addr, opts.master_port);
        let peer_listener =
            TcpListener::bind("0.0.0.0:0").map_err(|e| io_err("binding a peer port", e))?;
        let peer_port = peer_listener.local_addr().map_err(|e| io_err("peer port", e))?.port();
        let table = if rank == 0 {
            Self::serve_rendezvous(opts, &master, peer_port, deadline)?
        } else {
            Self::join_rendezvous(opts, &master, peer_port, deadline)?
        };
        let streams = Self::mesh(rank, &table, &peer_listener, deadline)?;
        let inbox = Arc::new(Mailbox::default());
        let mut writers = Vec::with_capacity(size);
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                writers.push(None);
                continue;
            };
            s.set_nodelay(true).map_err(|e| io_err("set_nodelay", e))?;
            s.set_read_timeout(None).map_err(|e| io_err("set_read_timeout", e))?;
            let mut reader = s.try_clone().map_err(|e| io_err("cloning a socket", e))?;
            let inbox = inbox.clone();
            std::thread::Builder::new()
                .name(format!("mbridge-tcp-{rank}<-{peer}"))
                .spawn(move || loop {
                    let mut head = [0u8; 16];
                    if let Err(e) = reader.read_exact(&mut head) {
                        inbox.mark_dead(peer, format!("connection closed: {e}"));
                        return;
                    }
                    let tag = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
                    let len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes")) as usize;
                    if tag == GOODBYE_TAG && len == 0 {
                        inbox.mark_finished(peer);
                        continue;
                    }
                    let mut body = vec![0u8; len];
                    if let Err(e) = reader.read_exact(&mut body) {
                        inbox.mark_dead(peer, format!("connection closed mid-message: {e}"));
                        return;
                    }
                    inbox.push(peer, tag, body);
                })
                .map_err(|e| io_err("spawning a reader thread", e))?;
            writers.push(Some(Mutex::new(s)));
        }
        Ok(Arc::new(Self { rank, size, writers, inbox, timeout: opts.timeout }))
    }

    /// Rank 0: collect every rank's peer address, then send the table to all.
    fn serve_rendezvous(
        opts: &TcpOptions,
        master: &str,
        peer_port: u16,
        deadline: Instant,
    ) -> Result<Vec<String>> {
        let size = opts.world_size;
        let listener = TcpListener::bind(("0.0.0.0", opts.master_port))
            .map_err(|e| io_err(format!("rank 0: binding the rendezvous port {master}"), e))?;
        listener.set_nonblocking(true).map_err(|e| io_err("set_nonblocking", e))?;
        let mut table = vec![String::new(); size];
        table[0] = format!("{}:{peer_port}", opts.master_addr);
        let mut arrived = vec![false; size];
        arrived[0] = true;
        let mut conns: Vec<TcpStream> = Vec::new();
        while arrived.iter().any(|a| !a) {
            let Some(mut s) = accept_until(&listener, deadline)
                .map_err(|e| io_err("rank 0: accepting at the rendezvous", e))?
            else {
                let msg = format!(
                    "rendezvous at {master}: rank(s) {:?} of {size} did not arrive within {:.1}s",
                    missing(&arrived),
                    opts.timeout.as_secs_f64()
                );
                for c in &mut conns {
                    let _ = write_bytes(c, format!("ERR {msg}").as_bytes());
                }
                candle_core::bail!("{msg}");
            };
            s.set_read_timeout(Some(remaining(deadline))).map_err(|e| io_err("timeout", e))?;
            let hello = (|| -> std::io::Result<(u32, u32, u32, Vec<u8>)> {
                Ok((read_u32(&mut s)?, read_u32(&mut s)?, read_u32(&mut s)?, read_bytes(&mut s)?))
            })();
            let Ok((magic, r, w, addr)) = hello else { continue };
            let (r, w) = (r as usize, w as usize);
            let problem = if magic != MAGIC {
                Some("not an mbridge rank".to_string())
            } else if w != size {
                Some(format!("rank {r} has WORLD_SIZE={w}, rank 0 has {size}"))
            } else if r == 0 || r >= size || arrived[r] {
                Some(format!("rank {r} is out of range or arrived twice"))
            } else {
                None
            };
            if let Some(p) = problem {
                let msg = format!("rendezvous at {master}: {p}");
                let _ = write_bytes(&mut s, format!("ERR {msg}").as_bytes());
                for c in &mut conns {
                    let _ = write_bytes(c, format!("ERR {msg}").as_bytes());
                }
                candle_core::bail!("{msg}");
            }
            arrived[r] = true;
            table[r] = String::from_utf8_lossy(&addr).into_owned();
            conns.push(s);
        }
        let reply = format!("OK {}", table.join(" "));
        for c in &mut conns {
            write_bytes(c, reply.as_bytes()).map_err(|e| io_err("rank 0: sending the table", e))?;
        }
        Ok(table)
    }

    /// Ranks > 0: reach the master (retrying), register, receive the peer table.
    fn join_rendezvous(
        opts: &TcpOptions,
        master: &str,
        peer_port: u16,
        deadline: Instant,
    ) -> Result<Vec<String>> {
        let rank = opts.rank;
        let mut s = loop {
            let err = match master.to_socket_addrs() {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => match TcpStream::connect_timeout(&a, remaining(deadline)) {
                        Ok(s) => break s,
                        Err(e) => e.to_string(),
                    },
                    None => "no address".to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                candle_core::bail!(
                    "rank {rank}: could not reach the rendezvous master (rank 0) at {master} within {:.1}s: {err}",
                    opts.timeout.as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Peers reach us at the address we reach the master from.
        let my_ip = s.local_addr().map_err(|e| io_err("local address", e))?.ip();
        let my_addr = std::net::SocketAddr::new(my_ip, peer_port).to_string();
        let ctx = format!("rank {rank}: rendezvous with rank 0 at {master}");
        (|| -> std::io::Result<()> {
            s.write_all(&MAGIC.to_le_bytes())?;
            s.write_all(&(rank as u32).to_le_bytes())?;
            s.write_all(&(opts.world_size as u32).to_le_bytes())?;
            write_bytes(&mut s, my_addr.as_bytes())
        })()
        .map_err(|e| io_err(&ctx, e))?;
        s.set_read_timeout(Some(remaining(deadline) + Duration::from_secs(1)))
            .map_err(|e| io_err(&ctx, e))?;
        let reply = read_bytes(&mut s).map_err(|e| io_err(format!("{ctx} (no reply)"), e))?;
        let reply = String::from_utf8_lossy(&reply).into_owned();
        if let Some(msg) = reply.strip_prefix("ERR ") {
            candle_core::bail!("rank {rank}: {msg}");
        }
        let Some(list) = reply.strip_prefix("OK ") else {
            candle_core::bail!("{ctx}: unexpected reply {reply:?}");
        };
        let table: Vec<String> = list.split(' ').map(str::to_string).collect();
        if table.len() != opts.world_size {
            candle_core::bail!("{ctx}: table has {} entries", table.len());
        }
        Ok(table)
    }

    /// Opens one connection per pair: dial every lower rank, accept every higher one.
    fn mesh(
        rank: usize,
        table: &[String],
        listener: &TcpListener,
        deadline: Instant,
    ) -> Result<Vec<Option<TcpStream>>> {
        let size = table.len();
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        for (peer, addr) in table.iter().enumerate().take(rank) {
            let ctx = format!("rank {rank}: connecting to rank {peer} at {addr}");
            let a = addr
                .to_socket_addrs()
                .map_err(|e| io_err(&ctx, e))?
                .next()
                .ok_or_else(|| candle_core::Error::Msg(format!("{ctx}: no address")))?;
            let mut s =
                TcpStream::connect_timeout(&a, remaining(deadline)).map_err(|e| io_err(&ctx, e))?;
            s.write_all(&MAGIC.to_le_bytes()).map_err(|e| io_err(&ctx, e))?;
            s.write_all(&(rank as u32).to_le_bytes()).map_err(|e| io_err(&ctx, e))?;
            streams[peer] = Some(s);
        }
        listener.set_nonblocking(true).map_err(|e| io_err("set_nonblocking", e))?;
        let mut arrived: Vec<bool> = (0..size).map(|p| p <= rank).collect();
        while arrived.iter().any(|a| !a) {
            let Some(mut s) = accept_until(listener, deadline)
                .map_err(|e| io_err(format!("rank {rank}: accepting peers"), e))?
            else {
                candle_core::bail!(
                    "rank {rank}: rank(s) {:?} did not connect within the timeout",
                    missing(&arrived)
                );
            };
            s.set_read_timeout(Some(remaining(deadline))).map_err(|e| io_err("timeout", e))?;
            let (Ok(magic), Ok(peer)) = (read_u32(&mut s), read_u32(&mut s)) else { continue };
            let peer = peer as usize;
            if magic != MAGIC || peer <= rank || peer >= size || arrived[peer] {
                continue;
            }
            arrived[peer] = true;
            streams[peer] = Some(s);
        }
        Ok(streams)
    }

    /// This process's global rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Tells every peer this rank finished its run, so its connection closing next is not
    /// taken for a failure ([`Self::failed_peers`]). Call only after a successful run: a rank
    /// that fails leaves without it, and the others stop at once.
    pub fn farewell(&self) {
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&GOODBYE_TAG.to_le_bytes());
        for w in self.writers.iter().flatten() {
            let mut s = w.lock().unwrap_or_else(|e| e.into_inner());
            // A peer already gone cannot be told; nothing else to do about it.
            let _ = s.write_all(&head);
        }
    }

    /// Peers whose connection ended without a goodbye, with the reason.
    pub fn failed_peers(&self) -> Vec<(usize, String)> {
        self.inbox.failed()
    }

    /// This rank's communicator for the group `members` (global ranks in group-rank order).
    pub fn group(self: &Arc<Self>, name: &str, members: &[usize]) -> Result<CpuGroup> {
        if members.iter().any(|&m| m >= self.size) {
            candle_core::bail!("{name} group {members:?}: world has {} ranks", self.size);
        }
        CpuGroup::new(Arc::new(TcpRank(self.clone())), name, members)
    }

    /// This rank's communicator over all ranks.
    pub fn world_group(self: &Arc<Self>) -> Result<CpuGroup> {
        let all: Vec<usize> = (0..self.size).collect();
        self.group("world", &all)
    }
}

impl Drop for TcpWorld {
    fn drop(&mut self) {
        for w in self.writers.iter().flatten() {
            if let Ok(s) = w.lock() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Wire for TcpRank {
    fn world_rank(&self) -> usize {
        self.0.rank
    }

    fn send(&self, dst: usize, tag: u64, bytes: Vec<u8>) -> Result<()> {
        let w = &self.0;
        if dst == w.rank {
            w.inbox.push(dst, tag, bytes);
            return Ok(());
        }
        let Some(Some(stream)) = w.writers.get(dst) else {
            candle_core::bail!("rank {}: no connection to rank {dst}", w.rank);
        };
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&tag.to_le_bytes());
        head[8..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        s.write_all(&head).and_then(|_| s.write_all(&bytes)).map_err(|e| {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            // Worded like a receive from a dead peer, so either side of a lost rank reads
            // the same.
            if matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted) {
                io_err(format!("rank {}: sending to rank {dst}: rank {dst} is gone", w.rank), e)
            } else {
                io_err(format!("rank {}: sending to rank {dst}", w.rank), e)
            }
        })
    }

    fn recv(&self, src: usize, tag: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        self.0.inbox.pop(src, tag, self.0.timeout, what)
    }
}
