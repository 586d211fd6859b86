//! This rank's communicators for every process group of a [`Topology`], built once at start-up
//! over any backend (in-process threads, TCP; NCCL later).

use super::comm::{Communicator, LocalWorld, TcpOptions, TcpWorld};
use super::launch::DistEnv;
use super::topology::{GroupKind, RankCoords, Topology};
use crate::model::ParallelLayout;
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::Duration;

/// The communicators of one rank.
#[derive(Debug, Clone)]
pub struct ProcessGroups {
    /// The grid.
    pub topology: Topology,
    /// Global rank.
    pub rank: usize,
    /// This rank's coordinates.
    pub coords: RankCoords,
    /// All ranks.
    pub world: Arc<dyn Communicator>,
    /// Tensor-parallel group (pass to `GptModel::new_parallel`).
    pub tp: Arc<dyn Communicator>,
    /// Context-parallel group.
    pub cp: Arc<dyn Communicator>,
    /// Data-parallel group.
    pub dp: Arc<dyn Communicator>,
    /// Data × context parallel group (gradient reduction when cp > 1).
    pub dp_cp: Arc<dyn Communicator>,
    /// The data × context parallel ranks again, as a communicator of their own for bucket
    /// collectives in flight while the training thread goes on: gradients reduced during
    /// backward (`ddp.overlap_grad_reduce`), parameters gathered during the distributed
    /// optimizer's step (`ddp.overlap_param_gather`). Over NCCL it runs on a stream of its
    /// own. None when the run overlaps neither.
    pub dp_cp_grads: Option<Arc<dyn Communicator>>,
    /// Pipeline group (stage-to-stage activations and their gradients; group rank = stage).
    pub pp: Arc<dyn Communicator>,
    /// Model-parallel group (tp × pp): gradient norm and NaN checks.
    pub mp: Arc<dyn Communicator>,
    /// First + last stage (tied-embedding gradients); None on middle stages.
    pub embedding: Option<Arc<dyn Communicator>>,
    /// All ranks again, as a message stream of its own for checkpoint saves: an
    /// asynchronous save's writer thread exchanges file lists on it while the training
    /// thread runs collectives on the other groups. Always over the CPU transport.
    pub ckpt: Arc<dyn Communicator>,
    /// The TCP world under the groups when ranks are processes (None for thread ranks): it
    /// tells when a peer process ended and whether it finished its run.
    pub tcp_world: Option<Arc<TcpWorld>>,
}

/// The name of [`ProcessGroups::ckpt`].
pub const CKPT_GROUP: &str = "ckpt";

/// The name of [`ProcessGroups::dp_cp_grads`].
pub const GRADS_GROUP: &str = "dp_cp_grads";

impl ProcessGroups {
    /// Builds every group containing `rank`; `make(name, members)` creates one communicator.
    /// Every rank must call this (group creation order is the same everywhere), with the same
    /// `grads_group` (whether to build [`Self::dp_cp_grads`]).
    pub fn new(
        topology: Topology,
        rank: usize,
        grads_group: bool,
        make: impl Fn(&str, &[usize]) -> Result<Arc<dyn Communicator>>,
    ) -> Result<Self> {
        let coords = topology.coords(rank)?;
        let world: Vec<usize> = (0..topology.world_size()).collect();
        let group = |kind: GroupKind| -> Result<Arc<dyn Communicator>> {
            let members = topology.group_of(kind, rank).expect("every rank is in one group");
            make(kind.name(), &members)
        };
        let embedding = match topology.group_of(GroupKind::Embedding, rank) {
            Some(m) => Some(make(GroupKind::Embedding.name(), &m)?),
            None => None,
        };
        Ok(Self {
            world: make("world", &world)?,
            tp: group(GroupKind::Tp)?,
            cp: group(GroupKind::Cp)?,
            dp: group(GroupKind::Dp)?,
            dp_cp: group(GroupKind::DpCp)?,
            dp_cp_grads: if grads_group {
                let members = topology.group_of(GroupKind::DpCp, rank).expect("every rank has one");
                Some(make(GRADS_GROUP, &members)?)
            } else {
                None
            },
            pp: group(GroupKind::Pp)?,
            mp: group(GroupKind::Mp)?,
            embedding,
            ckpt: make(CKPT_GROUP, &world)?,
            tcp_world: None,
            topology,
            rank,
            coords,
        })
    }

    /// Groups of `rank` in an in-process world (ranks as threads). The CPU groups cost
    /// nothing until used, so [`Self::dp_cp_grads`] is always there.
    pub fn local(world: &Arc<LocalWorld>, topology: Topology, rank: usize) -> Result<Self> {
        Self::new(topology, rank, true, |name, members| {
            Ok(Arc::new(world.group(rank, name, members)?) as Arc<dyn Communicator>)
        })
    }

    /// Groups of this process over TCP.
    pub fn tcp(world: &Arc<TcpWorld>, topology: Topology) -> Result<Self> {
        let rank = world.rank();
        let groups = Self::new(topology, rank, true, |name, members| {
            Ok(Arc::new(world.group(name, members)?) as Arc<dyn Communicator>)
        })?;
        Ok(Self { tcp_world: Some(world.clone()), ..groups })
    }

    /// Joins the TCP world described by the launcher environment and builds the groups.
    pub fn connect_tcp(env: &DistEnv, topology: Topology, timeout: Duration) -> Result<Self> {
        let world = Self::join_tcp(env, &topology, timeout)?;
        Self::tcp(&world, topology)
    }

    /// Like [`Self::connect_tcp`], with NCCL communicators for CUDA tensors when `device` is
    /// CUDA and `nccl` (`dist.distributed_backend = "nccl"`, `cuda` builds): the TCP world then
    /// carries the NCCL ids and CPU-side values. With `gloo`, CUDA tensors travel through the
    /// TCP backend via host memory. `overlap_buckets`: build [`Self::dp_cp_grads`] (over NCCL
    /// a communicator on a side stream, which costs its buffers' GPU memory).
    pub fn connect(
        env: &DistEnv,
        topology: Topology,
        timeout: Duration,
        device: &candle_core::Device,
        nccl: bool,
        overlap_buckets: bool,
    ) -> Result<Self> {
        let world = Self::join_tcp(env, &topology, timeout)?;
        if !device.is_cuda() || !nccl {
            return Self::tcp(&world, topology);
        }
        #[cfg(feature = "cuda")]
        {
            let rank = world.rank();
            let grads_group = overlap_buckets && topology.dp() * topology.cp() > 1;
            let groups = Self::new(topology, rank, grads_group, |name, members| {
                let cpu = world.group(name, members)?;
                if name == CKPT_GROUP {
                    // Checkpoint saves move small CPU tensors, from a second thread: an NCCL
                    // communicator would cost GPU memory and must not run concurrently.
                    return Ok(Arc::new(cpu) as Arc<dyn Communicator>);
                }
                let g = if name == GRADS_GROUP {
                    super::comm::nccl::NcclGroup::on_side_stream(cpu, device)
                } else {
                    super::comm::nccl::NcclGroup::new(cpu, device)
                };
                let g = g.with_context(|| {
                    format!(
                        "rank {rank}: creating the NCCL communicator of {name} group {members:?}"
                    )
                })?;
                Ok(Arc::new(g) as Arc<dyn Communicator>)
            })?;
            Ok(Self { tcp_world: Some(world), ..groups })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = overlap_buckets;
            anyhow::bail!("a CUDA device needs an mbridge built with --features cuda")
        }
    }

    fn join_tcp(env: &DistEnv, topology: &Topology, timeout: Duration) -> Result<Arc<TcpWorld>> {
        if env.world_size != topology.world_size() {
            anyhow::bail!(
                "launcher world size {} differs from the topology's {}",
                env.world_size,
                topology.world_size()
            );
        }
        let opts = TcpOptions {
            rank: env.rank,
            world_size: env.world_size,
            master_addr: env.master_addr.clone(),
            master_port: env.master_port,
            timeout,
        };
        TcpWorld::connect(&opts)
            .with_context(|| format!("rank {}: joining the CPU process group", env.rank))
    }

    /// The model layout of this rank (tp and pp coordinates).
    pub fn layout(&self) -> ParallelLayout {
        ParallelLayout {
            tp_rank: self.coords.tp,
            tp_size: self.topology.tp(),
            pp_rank: self.coords.pp,
            pp_size: self.topology.pp(),
        }
    }
}
