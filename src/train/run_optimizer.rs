//! The optimizer a run steps: replicated on every data-parallel rank, or sharded over DP
//! (`ddp.use_distributed_optimizer`). Both read and write checkpoints in one format.

use anyhow::Result;
use candle_core::{Tensor, Var};

use super::dist_optimizer::DistributedOptimizer;
use super::optimizer::{OptimError, Optimizer, ParamState};
use super::optimizer_state::OptimizerState;
use crate::parallel::comm::Communicator;

/// Elements of master values reduced per batch by [`RunOptimizer::master_sq_norm`] (1 GiB of
/// f32).
const MASTER_BATCH_ELEMS: usize = 1 << 28;

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
    /// optimizer's order), f32 per tensor and f64 across them, as the gradient norm. Masters
    /// kept as remainders are merged a batch at a time, so the f32 copies never all exist at
    /// once.
    pub fn master_sq_norm(&self, counts: impl Fn(usize) -> bool) -> candle_core::Result<f64> {
        let states: Vec<&ParamState> = match self {
            Self::Replicated(o) => {
                o.params().iter().enumerate().filter(|(i, _)| counts(*i)).map(|(_, p)| p).collect()
            }
            Self::Distributed(o) => o.shard_states_where(counts),
        };
        let mut total = 0.0;
        let mut batch: Vec<Tensor> = Vec::new();
        let mut batch_elems = 0;
        for (i, p) in states.iter().enumerate() {
            let master = p.master_value()?;
            batch_elems += master.elem_count();
            batch.push(master);
            if batch_elems >= MASTER_BATCH_ELEMS || i + 1 == states.len() {
                total += super::clip::sum_of_squares(&batch.iter().collect::<Vec<_>>())?;
                batch.clear();
                batch_elems = 0;
            }
        }
        Ok(total)
    }

    /// Re-reads master weights from the model (after weights were loaded without state).
    pub fn sync_master_from_model(&mut self) -> Result<(), OptimError> {
        match self {
            Self::Replicated(o) => o.sync_master_from_model(),
            Self::Distributed(o) => o.sync_master_from_model(),
        }
    }
}
