//! Communicators: collectives and point-to-point transfers of candle tensors within a group
//! of ranks.
//!
//! [`Communicator`] is the one interface the engine uses (NCCL will implement it on GPUs).
//! The CPU backends share one implementation of the collective semantics, [`CpuGroup`], over
//! a byte transport: [`local`] (ranks as threads of one process, for tests) and [`tcp`]
//! (ranks as processes, rendezvous at `MASTER_ADDR:MASTER_PORT`). Reductions add the
//! members' tensors in group-rank order on every rank, so results are bit-identical across
//! ranks and across runs.

mod codec;
pub mod local;
mod mailbox;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

use candle_core::{DType, Device, Result, Shape, Tensor};
use std::fmt::Debug;
use std::sync::Arc;

pub use local::LocalWorld;
pub use tcp::{TcpOptions, TcpWorld};

/// Element-wise reduction of [`Communicator::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Maximum over ranks.
    Max,
}

/// Collectives and point-to-point transfers among the ranks of one group.
///
/// Ranks passed to and returned by these methods are *group* ranks (`0..size()`). Every
/// member must call the same collectives in the same order with tensors of the same shape
/// and dtype (as with NCCL); a mismatch is an error naming the ranks and shapes. Results
/// live on the device of the input tensor.
pub trait Communicator: Send + Sync + Debug {
    /// This rank's index in the group.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// A short description for error messages, e.g. `tp group [2, 3]`.
    fn describe(&self) -> String;
    /// Element-wise reduction over all members; every member gets the result.
    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor>;
    /// Concatenation of the members' tensors along `dim`, in group-rank order.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// Sum over members, then this rank's `1/size` chunk along `dim`.
    fn reduce_scatter(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// Group rank `root`'s tensor on every member (others pass a tensor of the same shape).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Sends `t` to group rank `dst` (returns once handed to the transport).
    fn send(&self, t: &Tensor, dst: usize) -> Result<()>;
    /// Receives a tensor of `shape` and `dtype` from group rank `src` onto `device`.
    fn recv(&self, src: usize, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
    /// Returns once every member has entered the barrier.
    fn barrier(&self) -> Result<()>;
    /// Sends each `(tensor, dst)` and receives each `(src, shape, dtype)` onto `device` as one
    /// group: all of them progress at once (NCCL's `ncclGroupStart/End`), so two ranks that
    /// send to each other and receive from each other never wait on one another. Received
    /// tensors come back in the order of `recvs`; sends and receives on one channel (src →
    /// dst) match in issue order. The default sends first, then receives: right for
    /// transports whose sends never wait for the receiver.
    fn exchange(
        &self,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, Shape, DType)],
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        send_then_recv(self, sends, recvs, device)
    }
    /// Whether this group's collectives only enqueue work on a GPU stream of their own and
    /// return at once (NCCL on a side stream), so the training thread can issue them between
    /// its own kernels without waiting. Collectives of the other backends compute before they
    /// return: a caller that must not wait runs them on a thread.
    fn enqueues_only(&self) -> bool {
        false
    }
    /// Makes the compute stream wait for every collective this group enqueued on its own
    /// stream ([`Self::enqueues_only`]): only then may their outputs be read and their inputs
    /// freed. Nothing to wait for where collectives run in compute order.
    fn join_compute(&self) -> Result<()> {
        Ok(())
    }
}

/// [`Communicator::exchange`] for transports whose sends return without waiting.
pub(crate) fn send_then_recv<C: Communicator + ?Sized>(
    comm: &C,
    sends: &[(&Tensor, usize)],
    recvs: &[(usize, Shape, DType)],
    device: &Device,
) -> Result<Vec<Tensor>> {
    for (t, dst) in sends {
        comm.send(t, *dst)?;
    }
    recvs.iter().map(|(src, shape, dtype)| comm.recv(*src, shape, *dtype, device)).collect()
}

/// A byte transport between the ranks of a world (global ranks).
pub(crate) trait Wire: Send + Sync + Debug {
    /// This process's (or thread's) global rank.
    fn world_rank(&self) -> usize;
    /// Delivers `bytes` to global rank `dst` under `tag`.
    fn send(&self, dst: usize, tag: u64, bytes: Vec<u8>) -> Result<()>;
    /// The oldest message from global rank `src` under `tag`, waiting up to the timeout.
    fn recv(&self, src: usize, tag: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>>;
}

/// FNV-1a over the group name and members: the same tag on every rank, different per group.
fn group_tag(name: &str, members: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    name.bytes().for_each(&mut eat);
    eat(0xff);
    for m in members {
        (*m as u64).to_le_bytes().into_iter().for_each(&mut eat);
    }
    h & !1
}

/// A group of ranks over a CPU transport; implements [`Communicator`].
#[derive(Debug, Clone)]
pub struct CpuGroup {
    wire: Arc<dyn Wire>,
    name: String,
    members: Vec<usize>,
    index: usize,
    tag: u64,
}

impl CpuGroup {
    pub(crate) fn new(wire: Arc<dyn Wire>, name: &str, members: &[usize]) -> Result<Self> {
        let me = wire.world_rank();
        let Some(index) = members.iter().position(|&m| m == me) else {
            candle_core::bail!("rank {me} is not a member of {name} group {members:?}");
        };
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != members.len() {
            candle_core::bail!("{name} group {members:?} lists a rank twice");
        }
        Ok(Self {
            wire,
            name: name.to_string(),
            members: members.to_vec(),
            index,
            tag: group_tag(name, members),
        })
    }

    /// Global ranks of the members, in group-rank order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    fn what(&self, op: &str) -> String {
        format!("rank {} ({}) in {op}", self.wire.world_rank(), self.describe())
    }

    /// All-gather of byte buffers: every member's payload, in group-rank order.
    fn exchange(&self, op: &str, payload: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        for (i, &m) in self.members.iter().enumerate() {
            if i != self.index {
                self.wire.send(m, self.tag, payload.clone())?;
            }
        }
        let what = || self.what(op);
        let mut out = Vec::with_capacity(self.members.len());
        for (i, &m) in self.members.iter().enumerate() {
            if i == self.index {
                out.push(payload.clone());
            } else {
                out.push(self.wire.recv(m, self.tag, &what)?);
            }
        }
        Ok(out)
    }

    /// Every member's tensor, checked to have the shape and dtype of `t`.
    fn gather_same(&self, op: &str, t: &Tensor) -> Result<Vec<Tensor>> {
        let parts = self.exchange(op, codec::encode(t)?)?;
        parts
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let (dtype, dims) = codec::header(bytes)?;
                if dtype != t.dtype() || dims != t.dims() {
                    candle_core::bail!(
                        "{}: group rank {i} (global {}) sent {dtype:?} {dims:?}, this rank has {:?} {:?}",
                        self.what(op),
                        self.members[i],
                        t.dtype(),
                        t.dims()
                    );
                }
                codec::decode(bytes, t.device())
            })
            .collect()
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<usize> {
        if peer >= self.members.len() || peer == self.index {
            candle_core::bail!(
                "{}: invalid peer group rank {peer} (group size {})",
                self.what(op),
                self.members.len()
            );
        }
        Ok(self.members[peer])
    }
}

impl Communicator for CpuGroup {
    fn rank(&self) -> usize {
        self.index
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn describe(&self) -> String {
        format!("{} group {:?}", self.name, self.members)
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if self.members.len() == 1 {
            return Ok(t.clone());
        }
        let parts = self.gather_same("all_reduce", t)?;
        let mut acc = parts[0].clone();
        for p in &parts[1..] {
            acc = match op {
                ReduceOp::Sum => (acc + p)?,
                ReduceOp::Max => acc.maximum(p)?,
            };
        }
        Ok(acc)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if dim >= t.rank() {
            candle_core::bail!(
                "{}: dim {dim} out of range for {:?}",
                self.what("all_gather"),
                t.dims()
            );
        }
        if self.members.len() == 1 {
            return Ok(t.clone());
        }
        let parts = self.gather_same("all_gather", t)?;
        Tensor::cat(&parts, dim)
    }

    fn reduce_scatter(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let n = self.members.len();
        if dim >= t.rank() || !t.dim(dim)?.is_multiple_of(n) {
            candle_core::bail!(
                "{}: dim {dim} of {:?} does not split into {n} equal chunks",
                self.what("reduce_scatter"),
                t.dims()
            );
        }
        let sum = self.all_reduce(t, ReduceOp::Sum)?;
        let c = t.dim(dim)? / n;
        sum.narrow(dim, self.index * c, c)?.contiguous()
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.members.len() {
            candle_core::bail!("{}: root {root} out of range", self.what("broadcast"));
        }
        if self.members.len() == 1 {
            return Ok(t.clone());
        }
        let what = || self.what("broadcast");
        if self.index == root {
            let bytes = codec::encode(t)?;
            for (i, &m) in self.members.iter().enumerate() {
                if i != root {
                    self.wire.send(m, self.tag, bytes.clone())?;
                }
            }
            return Ok(t.clone());
        }
        let bytes = self.wire.recv(self.members[root], self.tag, &what)?;
        let (dtype, dims) = codec::header(&bytes)?;
        if dtype != t.dtype() || dims != t.dims() {
            candle_core::bail!(
                "{}: root sent {dtype:?} {dims:?}, this rank has {:?} {:?}",
                what(),
                t.dtype(),
                t.dims()
            );
        }
        codec::decode(&bytes, t.device())
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        let global = self.check_peer("send", dst)?;
        self.wire.send(global, self.tag | 1, codec::encode(t)?)
    }

    fn recv(&self, src: usize, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let global = self.check_peer("recv", src)?;
        let what = || self.what("recv");
        let bytes = self.wire.recv(global, self.tag | 1, &what)?;
        let (got_dtype, dims) = codec::header(&bytes)?;
        if got_dtype != dtype || dims != shape.dims() {
            candle_core::bail!(
                "{}: rank {global} sent {got_dtype:?} {dims:?}, expected {dtype:?} {:?}",
                what(),
                shape.dims()
            );
        }
        codec::decode(&bytes, device)
    }

    fn barrier(&self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}
