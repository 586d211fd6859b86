//! The data-parallel half of an iteration: gradient reduction (bucketed all-reduce, or
//! reduce-scatter for the distributed optimizer), the global gradient norm and clipping, the
//! optimizer update, and the replica weight check.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::clip::{clip_coeff, local_sq_norm, GradNorm};
use super::pipeline::all_reduce_embedding_grads;
use super::run_optimizer::RunOptimizer;
use super::trainer::Trainer;
use crate::model::params::Param;
use crate::parallel::data::model_parallel_grad_sq_norm;
use crate::parallel::ddp::replica_check::check_replicas;
use crate::parallel::ddp::ReduceScaling;
use crate::parallel::tensor::counts_in_grad_norm;
use crate::parallel::{GroupKind, ReduceOp};

/// Gradients after the data-parallel reduction.
pub(super) enum Reduced {
    /// Full gradients in the accumulator (one rank, or all-reduced).
    Full,
    /// This rank's shard of every bucket (distributed optimizer).
    Shards(Vec<Tensor>),
}

impl Trainer {
    /// Reduces the accumulated gradients over DP (× CP: megatron-core's
    /// `data_parallel_group(with_context_parallel=True)`). `per_token_tokens` is the global batch's
    /// loss-token count with `calculate_per_token_loss` (gradients are then summed and divided
    /// by it), None for the mean-of-means loss (gradients are averaged over DP).
    pub(super) fn reduce_grads(&mut self, per_token_tokens: Option<f64>) -> Result<Reduced> {
        let post = match per_token_tokens {
            Some(t) if t > 0.0 => 1.0 / t,
            _ => 1.0,
        };
        let scaling = ReduceScaling {
            average_in_collective: self.cfg.ddp.average_in_collective,
            average: per_token_tokens.is_none(),
            post,
        };
        // Tied embeddings under PP: first and last stage sum their copies' gradients. Done
        // before the DP reduction (both are sums, so the order does not change the result)
        // so the distributed optimizer's shards already hold the tied sum.
        if let Some(g) = &self.groups {
            all_reduce_embedding_grads(&self.chunks, &mut self.acc, g.embedding.as_deref())?;
        }
        let (Some(g), Some(reducer)) = (&self.groups, &self.reducer) else {
            if post != 1.0 {
                self.acc.scale(post)?;
            }
            return Ok(Reduced::Full);
        };
        let reduced = match &self.optimizer {
            RunOptimizer::Distributed(_) => {
                Reduced::Shards(reducer.reduce_scatter(&mut self.acc, &*g.dp_cp, scaling)?)
            }
            RunOptimizer::Replicated(_) => {
                reducer.all_reduce(&mut self.acc, &*g.dp_cp, scaling)?;
                Reduced::Full
            }
        };
        if let Some(r) = reducer.overlap().and_then(|o| o.take_report()) {
            if g.rank == 0 {
                println!(
                    " > ddp.overlap_grad_reduce: {} of {} gradient bucket(s) start reducing during \
                     backward from the next step on (the others wait for gradients from autograd \
                     or the embedding group)",
                    r.eligible, r.buckets
                );
            }
        }
        Ok(reduced)
    }

    /// Global gradient norm (over DP shards and model-parallel ranks, equal to one rank's) of
    /// the gradients divided by `loss_scale` (fp16; 1 otherwise), and the coefficient that
    /// clips it to `optimizer.clip_grad`. The gradients are not scaled here:
    /// [`Self::apply_update`] hands the factor to the optimizer, whose step multiplies each
    /// gradient as it reads it.
    pub(super) fn clip_grads(&mut self, reduced: &Reduced, loss_scale: f64) -> Result<GradNorm> {
        let clip_grad = self.cfg.optimizer.clip_grad;
        let grad_norm = |scaled: f64| {
            let norm = scaled / loss_scale;
            let coeff = if clip_grad > 0.0 { clip_coeff(norm, clip_grad) } else { None };
            GradNorm { norm, coeff }
        };
        let vars = self.optimizer.vars();
        let Some(g) = &self.groups else {
            return Ok(grad_norm(local_sq_norm(&self.acc, vars.iter())?.sqrt()));
        };
        let all = self.all_params();
        // Same order as the optimizer's parameters (trainable ones of every chunk).
        let params: Vec<&Param> = all.iter().filter(|p| p.trainable).collect();
        let tp_rank = g.coords.tp;
        match reduced {
            Reduced::Full => {
                let total = model_parallel_grad_sq_norm(&self.acc, &all, tp_rank, &*g.mp)?.sqrt();
                Ok(grad_norm(total))
            }
            Reduced::Shards(shards) => {
                let RunOptimizer::Distributed(d) = &self.optimizer else {
                    unreachable!("shards come from the distributed optimizer's reduction")
                };
                let local = d.shard_sq_norm(shards, |i| counts_in_grad_norm(params[i], tp_rank))?;
                // Σ over the DP shards, then over the model-parallel ranks.
                let t = Tensor::new(&[local], &Device::Cpu)?;
                let t = g.dp_cp.all_reduce(&t, ReduceOp::Sum)?;
                let total = g.mp.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?[0].sqrt();
                Ok(grad_norm(total))
            }
        }
    }

    /// Every parameter of this rank's chunks, in the chunks' order; the trainable ones in
    /// that order are the optimizer's parameters.
    fn all_params(&self) -> Vec<Param> {
        self.chunks.iter().flat_map(|m| m.params().params()).cloned().collect()
    }

    /// The L2 norm of the trainable parameters' master values over the whole model
    /// (`logger.log_params_norm`, megatron-core's `calc_params_l2_norm`), each element
    /// counted once as in the gradient norm: the distributed optimizer's shards summed over
    /// DP, TP-replicated parameters on TP rank 0 only, the last stage's tied embedding copy
    /// not at all. A collective: every rank calls it.
    pub fn params_norm(&self) -> Result<f64> {
        let Some(g) = &self.groups else {
            return Ok(self.optimizer.master_sq_norm(|_| true)?.sqrt());
        };
        let all = self.all_params();
        let params: Vec<&Param> = all.iter().filter(|p| p.trainable).collect();
        let local =
            self.optimizer.master_sq_norm(|i| counts_in_grad_norm(params[i], g.coords.tp))?;
        let mut t = Tensor::new(&[local], &Device::Cpu)?;
        if let RunOptimizer::Distributed(_) = &self.optimizer {
            t = g.dp_cp.all_reduce(&t, ReduceOp::Sum)?;
        }
        Ok(g.mp.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?[0].sqrt())
    }

    /// `optimizer.decoupled_lr` as the scheduler shapes it now: the embedding's and output
    /// layer's learning rate, warmed up from `lr_warmup_init` and decayed to
    /// `decoupled_min_lr` (default `min_lr`), megatron-core's parameter-group override.
    pub(super) fn decoupled_lr(&self) -> Option<f64> {
        let o = &self.cfg.optimizer;
        let min = o.decoupled_min_lr.unwrap_or(self.scheduler.params().min_lr);
        o.decoupled_lr.map(|max| self.scheduler.get_lr_with(max, min))
    }

    /// The optimizer update with the scheduler's lr and weight decay, the gradients multiplied
    /// by `grad_scale` (clipping coefficient / loss scale) as they are read; the distributed
    /// optimizer then all-gathers the updated parameters.
    pub(super) fn apply_update(&mut self, reduced: Reduced, grad_scale: Option<f64>) -> Result<()> {
        let (lr, wd) = (self.scheduler.get_lr(), self.scheduler.get_wd());
        let decoupled = self.decoupled_lr();
        match (&mut self.optimizer, reduced) {
            (RunOptimizer::Replicated(o), Reduced::Full) => {
                o.set_decoupled_lr(decoupled);
                o.step_scaled(&self.acc, lr, wd, grad_scale)?
            }
            (RunOptimizer::Distributed(d), Reduced::Shards(shards)) => {
                let g = self.groups.as_ref().context("the distributed optimizer needs groups")?;
                d.set_decoupled_lr(decoupled);
                d.step(&shards, lr, wd, grad_scale, &*g.dp_cp)?;
            }
            _ => unreachable!("the reduction matches the optimizer"),
        }
        Ok(())
    }

    /// `train.check_weight_hash_across_dp_replicas_interval`: stop when DP replicas differ.
    pub(super) fn check_weight_replicas(&self, iteration: u64) -> Result<()> {
        let Some(every) = self.cfg.train.check_weight_hash_across_dp_replicas_interval else {
            return Ok(());
        };
        let Some(g) = &self.groups else { return Ok(()) };
        if !iteration.is_multiple_of(every as u64) {
            return Ok(());
        }
        // Context-parallel ranks are replicas too.
        let members = g.topology.group_of(GroupKind::DpCp, g.rank).unwrap_or_default();
        let params: Vec<(String, candle_core::Var)> = self
            .chunks
            .iter()
            .flat_map(|m| m.params().params())
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect();
        check_replicas(&params, &*g.dp_cp, &members, iteration)
    }

    /// The optimizer state to save (gathered over DP for the distributed optimizer).
    pub(super) fn optimizer_state_for_save(&self) -> Result<super::optimizer::OptimizerState> {
        self.optimizer.export_state(self.groups.as_ref().map(|g| &*g.dp_cp))
    }
}
