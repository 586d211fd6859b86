//! The trainer's side of `profiling.*` ([`crate::profiling`]): what the memory report lists
//! as the run's live tensors, and the end-of-step / end-of-run calls.

use std::collections::HashMap;

use anyhow::Result;

use super::grads::GradAccumulator;
use super::run_optimizer::RunOptimizer;
use super::trainer::Trainer;
use crate::model::GptModel;
use crate::profiling::memory::TensorEntry;

impl Trainer {
    /// After a training step (see [`crate::profiling::Profiler::step_end`]).
    pub(super) fn profile_step_end(&mut self) -> Result<()> {
        // Disjoint borrows: the closure reads the model and optimizer while the profiler is
        // borrowed mutably.
        let (chunks, optimizer, acc) = (&self.chunks, &self.optimizer, &self.acc);
        self.profiler.step_end(|| live_tensors(chunks, optimizer, acc))
    }

    /// When training ends (see [`crate::profiling::Profiler::finish`]).
    pub(super) fn profile_finish(&mut self) -> Result<()> {
        let (chunks, optimizer, acc) = (&self.chunks, &self.optimizer, &self.acc);
        self.profiler.finish(|| live_tensors(chunks, optimizer, acc))
    }
}

/// Every tensor of this rank's parameters, optimizer state and accumulated gradients, by
/// Megatron name. A master copy is listed only where it is a tensor of its own (bf16/fp16
/// parameters, or the distributed optimizer's fp32 shards), so nothing is counted twice.
pub(super) fn live_tensors(
    chunks: &[GptModel],
    optimizer: &RunOptimizer,
    acc: &GradAccumulator,
) -> Vec<TensorEntry> {
    let mut out = Vec::new();
    let mut names = HashMap::new();
    for m in chunks {
        for p in m.params().params() {
            names.insert(p.var.id(), p.name.as_str());
            out.push(TensorEntry::of(&p.name, "param", p.var.as_tensor()));
        }
    }
    let (states, shards) = match optimizer {
        RunOptimizer::Replicated(o) => (o.params(), false),
        RunOptimizer::Distributed(o) => (o.shard_states(), true),
    };
    for s in states {
        if shards {
            out.push(TensorEntry::of(&s.name, "main_param", s.var.as_tensor()));
        }
        if let Some(m) = s.master.stored() {
            out.push(TensorEntry::of(&s.name, "main_param", m));
        }
        out.push(TensorEntry::of(&s.name, "exp_avg", &s.exp_avg));
        if let Some(v) = &s.exp_avg_sq {
            out.push(TensorEntry::of(&s.name, "exp_avg_sq", v));
        }
    }
    for (var, g) in acc.iter() {
        if let Some(g) = g {
            let name = names.get(&var.id()).copied().unwrap_or("(unnamed)");
            out.push(TensorEntry::of(name, "grad", g));
        }
    }
    out
}
