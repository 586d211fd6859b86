//! In-process backend: every rank is a thread of one process and messages are handed over
//! through shared inboxes. For tests and CPU equivalence runs (TP=2 vs TP=1 on one machine).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use mbridge::parallel::comm::{Communicator, LocalWorld, ReduceOp};
//! use std::time::Duration;
//!
//! let world = LocalWorld::new(2, Duration::from_secs(30));
//! let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = (0..2)
//!         .map(|rank| {
//!             let world = world.clone();
//!             s.spawn(move || {
//!                 let g = world.group(rank, "world", &[0, 1]).unwrap();
//!                 let t = Tensor::new(&[rank as f32 + 1.0], &Device::Cpu).unwrap();
//!                 g.all_reduce(&t, ReduceOp::Sum).unwrap().to_vec1::<f32>().unwrap()
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(sums, vec![vec![3.0], vec![3.0]]);
//! ```

use super::mailbox::Mailbox;
use super::{CpuGroup, Wire};
use candle_core::Result;
use std::sync::Arc;
use std::time::Duration;

/// The shared state of `size` in-process ranks.
#[derive(Debug)]
pub struct LocalWorld {
    inboxes: Vec<Mailbox>,
    timeout: Duration,
}

/// One rank's end of a [`LocalWorld`].
#[derive(Debug)]
struct LocalRank {
    world: Arc<LocalWorld>,
    rank: usize,
}

impl LocalWorld {
    /// A world of `size` ranks whose receives fail after `timeout` without a message.
    pub fn new(size: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self { inboxes: (0..size).map(|_| Mailbox::default()).collect(), timeout })
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.inboxes.len()
    }

    /// The communicator of global rank `rank` for the group `members` (global ranks in
    /// group-rank order). Every member must use the same `name` and `members`.
    pub fn group(self: &Arc<Self>, rank: usize, name: &str, members: &[usize]) -> Result<CpuGroup> {
        let size = self.size();
        if rank >= size || members.iter().any(|&m| m >= size) {
            candle_core::bail!("{name} group {members:?} / rank {rank}: world has {size} ranks");
        }
        CpuGroup::new(Arc::new(LocalRank { world: self.clone(), rank }), name, members)
    }

    /// The communicator of `rank` over all ranks.
    pub fn world_group(self: &Arc<Self>, rank: usize) -> Result<CpuGroup> {
        let all: Vec<usize> = (0..self.size()).collect();
        self.group(rank, "world", &all)
    }

    /// Runs `f(rank, world)` for every rank on its own thread and returns the results in
    /// rank order. A rank that fails (error or panic) is marked gone at once, so its peers'
    /// pending receives fail instead of waiting for the timeout; the error of the lowest
    /// failing rank is returned, naming it.
    pub fn run<T, F>(size: usize, timeout: Duration, f: F) -> anyhow::Result<Vec<T>>
    where
        T: Send,
        F: Fn(usize, &Arc<LocalWorld>) -> anyhow::Result<T> + Sync,
    {
        let world = Self::new(size, timeout);
        let outcomes: Vec<std::result::Result<T, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let (world, f) = (&world, &f);
                    s.spawn(move || {
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            f(rank, world)
                        }));
                        let out = match out {
                            Ok(Ok(v)) => Ok(v),
                            Ok(Err(e)) => Err(format!("{e:#}")),
                            Err(p) => Err(p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|m| m.to_string()))
                                .unwrap_or_else(|| "panicked".to_string())),
                        };
                        if let Err(e) = &out {
                            world.abort_rank(rank, e);
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        });
        let mut results = Vec::with_capacity(size);
        for (rank, out) in outcomes.into_iter().enumerate() {
            match out {
                Ok(v) => results.push(v),
                Err(e) => anyhow::bail!("rank {rank} of {size} failed: {e}"),
            }
        }
        Ok(results)
    }

    /// Marks `rank` as gone, so that receives from it fail at once instead of timing out
    /// (call when a rank's thread exits with an error).
    pub fn abort_rank(&self, rank: usize, reason: &str) {
        for inbox in &self.inboxes {
            inbox.mark_dead(rank, reason.to_string());
        }
    }
}

impl Wire for LocalRank {
    fn world_rank(&self) -> usize {
        self.rank
    }

    fn send(&self, dst: usize, tag: u64, bytes: Vec<u8>) -> Result<()> {
        let Some(inbox) = self.world.inboxes.get(dst) else {
            candle_core::bail!("rank {}: send to rank {dst} outside the world", self.rank);
        };
        inbox.push(self.rank, tag, bytes);
        Ok(())
    }

    fn recv(&self, src: usize, tag: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        self.world.inboxes[self.rank].pop(src, tag, self.world.timeout, what)
    }
}
