//! Which forward and backward pass a pipeline rank runs next, as megatron-core's schedules
//! order them (`megatron/core/pipeline_parallel/schedules.py`):
//!
//! - non-interleaved 1F1B (`forward_backward_pipelining_without_interleaving`): rank r runs
//!   `min(pp − r − 1, M)` warm-up forwards, then alternates one forward and one backward, then
//!   runs the remaining backwards (PP=1 degenerates to forward/backward per micro-batch, as
//!   `forward_backward_no_pipelining` does);
//! - interleaved (`forward_backward_pipelining_with_interleaving`, `vp` model chunks per rank):
//!   virtual micro-batch k maps to (micro-batch, chunk) through `get_schedule_table`, groups of
//!   `microbatch_group_size_per_vp_stage` micro-batches run through every chunk in turn; the
//!   warm-up is `2·(pp − r − 1) + (vp − 1)·group` forwards (`get_pp_rank_microbatches`), and
//!   backward k runs chunk `vp − 1 − chunk(k)`;
//! - forward-only (evaluation): every forward in the same order, no backward.
//!
//! Only the compute order is prescribed: activations and gradients are sent as soon as they
//! exist and received right before the pass that needs them, which cannot deadlock when the
//! sends do not block (the CPU transports queue them).

use anyhow::{bail, Result};

/// One pass of a model chunk on one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Forward of model chunk `chunk` on micro-batch `microbatch`.
    Forward { chunk: usize, microbatch: usize },
    /// Backward of model chunk `chunk` on micro-batch `microbatch`.
    Backward { chunk: usize, microbatch: usize },
}

/// What the schedule of one rank depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleSpec {
    /// Pipeline-parallel size.
    pub pp_size: usize,
    /// This rank's pipeline stage.
    pub pp_rank: usize,
    /// Micro-batches per global batch on this data-parallel rank.
    pub num_microbatches: usize,
    /// Model chunks per rank (`virtual_pipeline_model_parallel_size`, 1 without it).
    pub num_chunks: usize,
    /// `microbatch_group_size_per_vp_stage` (megatron-core defaults it to `pp_size`); used by
    /// the interleaved schedule only.
    pub microbatch_group_size: usize,
    /// Evaluation: forwards only.
    pub forward_only: bool,
}

/// The passes rank `spec.pp_rank` runs for one global batch, in order.
pub fn schedule(spec: &ScheduleSpec) -> Result<Vec<Op>> {
    let ScheduleSpec { pp_size, pp_rank, num_microbatches: m, num_chunks: vp, .. } = *spec;
    if pp_size == 0 || pp_rank >= pp_size {
        bail!("pipeline rank {pp_rank} out of range for pipeline size {pp_size}");
    }
    if vp == 0 || m == 0 {
        bail!("a pipeline schedule needs at least one model chunk and one micro-batch");
    }
    if vp > 1 {
        interleaved(spec)
    } else {
        let warmup = if spec.forward_only { m } else { (pp_size - pp_rank - 1).min(m) };
        let fwd = |k: usize| Op::Forward { chunk: 0, microbatch: k };
        let bwd = |k: usize| Op::Backward { chunk: 0, microbatch: k };
        Ok(one_f_one_b(m, warmup, spec.forward_only, fwd, bwd))
    }
}

/// Warm-up forwards, steady 1F1B, cool-down backwards over `total` virtual micro-batches.
fn one_f_one_b(
    total: usize,
    warmup: usize,
    forward_only: bool,
    fwd: impl Fn(usize) -> Op,
    bwd: impl Fn(usize) -> Op,
) -> Vec<Op> {
    if forward_only {
        return (0..total).map(fwd).collect();
    }
    let remaining = total - warmup;
    let mut ops: Vec<Op> = (0..warmup).map(&fwd).collect();
    for k in 0..remaining {
        ops.push(fwd(k + warmup));
        ops.push(bwd(k));
    }
    ops.extend((remaining..total).map(bwd));
    ops
}

fn interleaved(spec: &ScheduleSpec) -> Result<Vec<Op>> {
    let vp = spec.num_chunks;
    let (table, warmup) = interleaved_table(spec)?;
    let fwd = |k: usize| {
        let (microbatch, chunk) = table[k];
        Op::Forward { chunk, microbatch }
    };
    let bwd = |k: usize| {
        let (microbatch, chunk) = table[k];
        Op::Backward { chunk: vp - 1 - chunk, microbatch }
    };
    Ok(one_f_one_b(table.len(), warmup, spec.forward_only, fwd, bwd))
}

/// The interleaved schedule's table (virtual micro-batch → (micro-batch, forward chunk)) and
/// this rank's number of warm-up forwards, after checking the layout as megatron-core does.
pub(crate) fn interleaved_table(spec: &ScheduleSpec) -> Result<(Vec<(usize, usize)>, usize)> {
    let ScheduleSpec { pp_size, pp_rank, num_microbatches: m, num_chunks: vp, .. } = *spec;
    // Evaluation only needs every rank to walk the same table; a short evaluation batch
    // need not fill a micro-batch group.
    let group = if spec.forward_only {
        spec.microbatch_group_size.clamp(1, m)
    } else {
        spec.microbatch_group_size
    };
    if pp_size == 1 {
        bail!("the interleaved schedule needs pipeline_model_parallel_size > 1");
    }
    if !spec.forward_only && (group > m || group < pp_size) {
        bail!(
            "model.microbatch_group_size_per_vp_stage ({group}) must lie in [PP = {pp_size}, \
             number of micro-batches = {m}] for the interleaved schedule"
        );
    }
    let last_group = m % group;
    if !spec.forward_only && last_group > 0 && last_group < pp_size {
        bail!(
            "the number of micro-batches ({m}) modulo model.microbatch_group_size_per_vp_stage \
             ({group}) is {last_group}: it must be 0 or at least PP = {pp_size} (megatron-core \
             refuses the pipeline bubbles otherwise)"
        );
    }
    let table = schedule_table(m, vp, group);
    let total = m * vp;
    let warmup = if spec.forward_only {
        total
    } else {
        ((pp_size - pp_rank - 1) * 2 + (vp - 1) * group).min(total)
    };
    Ok((table, warmup))
}

/// megatron-core's `get_schedule_table`: virtual micro-batch → (micro-batch, model chunk).
/// Groups of `group` micro-batches (the last one takes the rest) run through every chunk.
pub fn schedule_table(m: usize, vp: usize, group: usize) -> Vec<(usize, usize)> {
    let mut table = Vec::with_capacity(m * vp);
    let mut start = 0;
    while start < m {
        let end = if start + group >= m { m } else { start + group };
        for chunk in 0..vp {
            table.extend((start..end).map(|mb| (mb, chunk)));
        }
        start = end;
    }
    table
}
