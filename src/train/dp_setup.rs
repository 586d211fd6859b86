//! Choosing and building the data-parallel machinery of a run from `ddp.*`: the gradient
//! buffer layout, the bucketed reducer, and the replicated or distributed optimizer.

use anyhow::Result;
use candle_core::{DType, Var};

use super::dist_optimizer::DistributedOptimizer;
use super::optimizer::{default_groups, Algorithm, MasterStorage, Optimizer, StateStorage};
use super::run_optimizer::RunOptimizer;
use crate::config::ConfigContainer;
use std::sync::Arc;

use crate::parallel::ddp::reducer::factors;
use crate::parallel::ddp::{
    BackwardOverlap, BufferLayout, Collective, GradReducer, LayoutOptions, ReduceScaling,
};
use crate::parallel::ProcessGroups;

/// megatron-core's default bucket size: `max(40M, 1M · DP)` elements, and a single bucket
/// (no size limit) when gradients are not reduced with overlap.
pub fn effective_bucket_size(cfg: &ConfigContainer, dp: usize) -> Option<usize> {
    if !cfg.ddp.overlap_grad_reduce {
        return None;
    }
    Some(cfg.ddp.bucket_size.unwrap_or_else(|| 40_000_000usize.max(1_000_000 * dp)))
}

/// Whether the run shards optimizer state over DP: `ddp.use_distributed_optimizer` (which
/// `finalize` keeps equal to `optimizer.use_distributed_optimizer`).
pub fn uses_distributed_optimizer(cfg: &ConfigContainer) -> bool {
    cfg.ddp.use_distributed_optimizer || cfg.optimizer.use_distributed_optimizer
}

/// How the optimizer keeps its state. Under `optimizer.use_precision_aware_optimizer` (as in
/// megatron-core, where Transformer Engine's FusedAdam then stores them so): bf16 parameters'
/// fp32 masters as remainders with `optimizer.store_param_remainders`, the moments in
/// `optimizer.exp_avg_dtype` / `exp_avg_sq_dtype` (fp32 or bf16, see
/// `config::optimizer_rules`). Otherwise f32 master copies and moments.
pub fn state_storage(cfg: &ConfigContainer) -> StateStorage {
    let o = &cfg.optimizer;
    if !o.use_precision_aware_optimizer {
        return StateStorage::default();
    }
    let dtype = super::setup::candle_dtype;
    StateStorage {
        masters: if o.store_param_remainders {
            MasterStorage::Remainders
        } else {
            MasterStorage::Copy
        },
        exp_avg: dtype(o.exp_avg_dtype),
        exp_avg_sq: dtype(o.exp_avg_sq_dtype),
    }
}

/// The optimizer and (with process groups) the gradient reducer for `named` parameters.
/// `late[i]`: parameter `i` is summed over the pipeline's embedding group after backward (a
/// tied embedding copy), so its bucket never starts reducing during backward.
pub fn build(
    cfg: &ConfigContainer,
    groups: Option<&ProcessGroups>,
    algorithm: Algorithm,
    named: Vec<(String, Var)>,
    late: Vec<bool>,
) -> Result<(RunOptimizer, Option<GradReducer>)> {
    let distributed = uses_distributed_optimizer(cfg);
    let storage = state_storage(cfg);
    let replicated = |named| Optimizer::with_storage(algorithm, default_groups(named), storage);
    let Some(g) = groups else {
        if distributed {
            tracing::info!(
                "ddp.use_distributed_optimizer: one rank, nothing to shard; the optimizer keeps \
                 the full state (same arithmetic)"
            );
        }
        return Ok((RunOptimizer::Replicated(replicated(named)?), None));
    };
    // Gradients are reduced (and the distributed optimizer sharded) over data × context
    // parallel ranks: CP ranks hold the same weights and see other parts of the same samples.
    let grads_group = &g.dp_cp;
    let dp = grads_group.size();
    let shapes: Vec<(Vec<usize>, DType)> =
        named.iter().map(|(_, v)| (v.dims().to_vec(), v.dtype())).collect();
    let opts = LayoutOptions {
        dp,
        bucket_size: effective_bucket_size(cfg, dp),
        distributed_optimizer: distributed,
        pad_for_high_nccl_busbw: cfg.ddp.pad_buckets_for_high_nccl_busbw,
        grad_reduce_in_fp32: cfg.ddp.grad_reduce_in_fp32,
    };
    let layout = BufferLayout::new(&shapes, &opts);
    let buckets = layout.buckets().len();
    let on_cuda = named.first().is_some_and(|(_, v)| v.device().is_cuda());
    let overlap_comm = g.dp_cp_grads.clone().filter(|_| cfg.ddp.overlap_grad_reduce && dp > 1);
    let reducer = match &overlap_comm {
        Some(comm) => {
            let scaling = ReduceScaling {
                average_in_collective: cfg.ddp.average_in_collective,
                average: !cfg.model.calculate_per_token_loss,
                post: 1.0,
            };
            let kind = if distributed { Collective::ReduceScatter } else { Collective::AllReduce };
            let (pre, _) = factors(dp, scaling);
            let overlap =
                BackwardOverlap::new(layout.clone(), &named, late, comm.clone(), kind, pre);
            GradReducer::overlapped(layout.clone(), Arc::new(overlap))
        }
        None => GradReducer::new(layout.clone()),
    };
    let overlap_gather = (cfg.ddp.overlap_param_gather || cfg.optimizer.overlap_param_gather)
        .then(|| g.dp_cp_grads.clone())
        .flatten()
        .filter(|_| dp > 1);
    let optimizer = if distributed {
        let d = DistributedOptimizer::new(
            algorithm,
            named,
            layout.clone(),
            grads_group.rank(),
            overlap_gather.clone(),
            storage,
        )?;
        if grads_group.rank() == 0 && g.coords.tp == 0 {
            println!(
                " > distributed optimizer: DP {dp}, this rank holds master weights and moments for \
                 {} of {} buffer elements",
                d.shard_numel(),
                layout.total_len()
            );
        }
        RunOptimizer::Distributed(d)
    } else {
        RunOptimizer::Replicated(replicated(named)?)
    };
    if g.rank == 0 {
        let where_ =
            if on_cuda { "NCCL on a stream of its own" } else { "on a communication thread" };
        println!(
            " > data parallel: DP {dp}, {buckets} gradient bucket(s) of {} elements, {} after \
             backward; {}{}",
            opts.bucket_size.map_or("unlimited".to_string(), |b| b.to_string()),
            if distributed { "reduce-scatter" } else { "all-reduce" },
            if overlap_comm.is_some() {
                format!(
                    "buckets start reducing during backward once their last gradient arrives \
                     (from the second step on), {where_}"
                )
            } else {
                "buckets are reduced one after the other".to_string()
            },
            if distributed && overlap_gather.is_some() {
                format!(
                    "; each bucket's parameter all-gather starts as soon as its shard is updated, \
                     during the optimizer step, {where_} (not overlapped with the next forward)"
                )
            } else {
                String::new()
            }
        );
    }
    Ok((optimizer, Some(reducer)))
}
