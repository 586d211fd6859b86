//! The optimizer a run steps: replicated on every data-parallel rank, or sharded over DP
//! (`ddp.use_distributed_optimizer`). Both read and write checkpoints in one format.

use anyhow::Result;
use candle_core::Var;

use super::dist_optimizer::DistributedOptimizer;
use super::optimizer::{OptimError, Optimizer};
use super::optimizer_state::OptimizerState;
use crate::parallel::comm::Communicator;

/// Replicated or distributed optimizer.
#[derive(Debug)]
pub enum RunOptimizer {
    /// Full master weights and moments on every rank.
    Replicated(Optimizer),
    /// This rank's shard only (ZeRO-1).
    Distributed(DistributedOptimizer),
}

impl RunOptimizer {
    /// The model variables it updates, in its order.
    pub fn vars(&self) -> Vec<Var> {
        match self {
            Self::Replicated(o) => o.vars(),
            Self::Distributed(o) => o.vars(),
        }
    }

    /// The full state for a checkpoint; the distributed optimizer gathers it over `dp`
    /// (every DP rank must call this then).
    pub fn export_state(&self, dp: Option<&dyn Communicator>) -> Result<OptimizerState> {
        match (self, dp) {
            (Self::Replicated(o), _) => Ok(o.export_state()?),
            (Self::Distributed(o), Some(dp)) => o.export_state(dp),
            (Self::Distributed(_), None) => {
                anyhow::bail!("the distributed optimizer needs the data-parallel group to save")
            }
        }
    }

    /// Restores a full state (from either optimizer, any DP size).
    pub fn import_state(&mut self, s: &OptimizerState) -> Result<(), OptimError> {
        match self {
            Self::Replicated(o) => o.import_state(s),
            Self::Distributed(o) => o.import_state(s),
        }
    }

    /// `Σ v²` over the master values this rank holds (its shards with the distributed
    /// optimizer) of the parameters for which `counts(i)` (`i`: the parameter's index in the
    /// optimizer's order), f32 per tensor and f64 across them, as the gradient norm.
    pub fn master_sq_norm(&self, counts: impl Fn(usize) -> bool) -> candle_core::Result<f64> {
        let masters = match self {
            Self::Replicated(o) => o
                .params()
                .iter()
                .enumerate()
                .filter(|(i, _)| counts(*i))
                .map(|(_, p)| p.master_value())
                .collect::<candle_core::Result<Vec<_>>>()?,
            Self::Distributed(o) => o.shard_masters(counts)?,
        };
        super::clip::sum_of_squares(&masters.iter().collect::<Vec<_>>())
    }

    /// Re-reads master weights from the model (after weights were loaded without state).
    pub fn sync_master_from_model(&mut self) -> Result<(), OptimError> {
        match self {
            Self::Replicated(o) => o.sync_master_from_model(),
            Self::Distributed(o) => o.sync_master_from_model(),
        }
    }
}
