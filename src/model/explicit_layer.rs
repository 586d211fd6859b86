//! A transformer layer whose backward pass is written out, as Megatron's Transformer Engine
//! layers are, instead of recorded op by op by candle's autograd.
//!
//! candle's backward starts every gradient as a zeros tensor and adds into it, turns each
//! view (narrow, transpose, reshape) back into a full copy, and the graph keeps every
//! intermediate activation until the whole backward is over. This layer runs the GEMMs and
//! fused kernels of its backward directly, saves only what they need (the fused QKV, the
//! attention output and logsumexp, `linear_fc1`'s output and the activation; the norms are
//! recomputed, they are cheap), and frees them as soon as the layer's backward is done. A run
//! of consecutive such layers is one node of candle's graph ([`forward_run`], through
//! [`super::recompute::with_backward_anchored`]): the gradient goes from one layer's backward
//! straight into the next. Parameter gradients go to the step's side sink
//! ([`RecomputeGrads`]), like those of recomputed segments.
//!
//! It covers the layers of the shipped recipes in training without dropout: with tensor
//! (and sequence) parallelism, whose gathers and partial sums it writes out
//! ([`super::explicit_linear::TpBoundary`]), with context parallelism, and with LoRA adapters
//! (without adapter dropout; [`super::explicit_linear`]: frozen base weights get no
//! gradient); anything else runs through autograd. `MBRIDGE_EXPLICIT_LAYERS` (`1`/`0`) turns
//! it on or off; unset, it is on for CUDA and off on the CPU, where the
//! recorded path stays the reference (the tests compare both).

use super::attention::SelfAttention;
use super::mlp::Mlp;
use super::recompute::LayerGrads;
use super::recompute::{with_backward_anchored, BackwardFn, RecomputeGrads, SelectiveRecompute};
use crate::ops::attention::OwnedAttnMask;
use crate::ops::timing::section;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::sync::{Arc, OnceLock};

/// Per-forward inputs shared by all explicit layers of a stage.
#[derive(Debug, Clone)]
pub struct ExplicitInputs {
    /// RoPE `(cos, sin, -sin)` `[b, 1, s, rot]`; `-sin` rotates gradients back.
    pub rope: Option<(Tensor, Tensor, Tensor)>,
    pub mask: OwnedAttnMask,
    /// What the layers recompute in the backward instead of keeping (selective recompute).
    pub selective: SelectiveRecompute,
    /// Whether a backward follows the layers' forward (false in evaluation, see
    /// [`forward_only_run`]).
    pub backward_follows: bool,
}

impl ExplicitInputs {
    pub fn new(
        rope: Option<&(Tensor, Tensor)>,
        mask: OwnedAttnMask,
        selective: SelectiveRecompute,
    ) -> Result<Self> {
        let rope = match rope {
            Some((c, s)) => Some((c.detach(), s.detach(), s.neg()?.detach())),
            None => None,
        };
        Ok(Self { rope, mask, selective, backward_follows: true })
    }

    /// The same inputs for a forward that no backward follows.
    pub fn forward_only(self) -> Self {
        Self { backward_follows: false, ..self }
    }
}

/// Whether layers on `device` use the written-out backward by default (see the module
/// docs); [`super::gpt::GptModel::set_explicit_layers`] overrides it per model.
pub fn enabled_by_default(device: &Device) -> bool {
    static ENV: OnceLock<Option<bool>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        std::env::var("MBRIDGE_EXPLICIT_LAYERS")
            .ok()
            .map(|v| crate::ops::fused::env_allows(Some(&v)))
    });
    env.unwrap_or(device.is_cuda())
}

/// One layer's written-out backward: output gradient → input gradient. It owns what the
/// layer's forward saved and frees it when it returns.
type LayerBackward = Box<dyn FnOnce(&Tensor) -> Result<Tensor> + Send>;

/// `x + attn(x)`, then `+ mlp(·)`, outside candle's graph: the output and its backward, whose
/// parameter gradients go to `sink`. The caller checks [`SelfAttention::explicit_ok`] /
/// [`Mlp::explicit_ok`]. `index` (the stage's layer index) names the backward's profiler
/// range; None opens none.
fn forward_untracked(
    attn: &SelfAttention,
    mlp: &Mlp,
    index: Option<usize>,
    x: &Tensor,
    inputs: &Arc<ExplicitInputs>,
    sink: &RecomputeGrads,
) -> Result<(Tensor, LayerBackward)> {
    let dev = x.device().clone();
    let x = x.detach();
    // Each block returns its output with the skip connection added.
    let (x2, attn_saved) = section("layer.fwd.attn", &dev, || attn.forward_saving(&x, inputs))?;
    let (y, mlp_saved) = section("layer.fwd.mlp", &dev, || mlp.forward_saving(&x2, inputs))?;
    let (attn, mlp, inputs, sink) = (attn.clone(), mlp.clone(), inputs.clone(), sink.clone());
    let backward: LayerBackward = Box::new(move |dy: &Tensor| {
        let _range = index.map(crate::profiling::Range::layer_backward);
        let mut grads = LayerGrads::new(&sink);
        // Each block's backward returns its input gradient with the skip connection's share
        // already added.
        let dx2 = section("layer.bwd.mlp", &dev, || mlp.backward(mlp_saved, &x2, dy, &mut grads))?;
        drop(x2);
        let dx = section("layer.bwd.attn", &dev, || {
            attn.backward(attn_saved, &x, &inputs, &dx2, &mut grads)
        })?;
        grads.push()?;
        Ok(dx)
    });
    Ok((y, backward))
}

/// Consecutive layers of a stage (each `x + attn(x)`, then `+ mlp(·)`) with
/// written-out backwards, entered into candle's graph as ONE node: candle starts each node's
/// input gradient as zeros and adds into it, and hands each node's output over as a copy,
/// a pass over the activations per node, which the layers of a run skip (the gradient goes
/// from one layer's backward straight into the next). Parameter gradients go to `sink`. The
/// caller checks [`SelfAttention::explicit_ok`] / [`Mlp::explicit_ok`] of every layer.
/// `first` is the stage index of the first layer, for the profiler's per-layer ranges (None
/// opens none: the recompute path runs layers again in the backward).
pub fn forward_run(
    layers: &[(&SelfAttention, &Mlp)],
    first: Option<usize>,
    x: &Tensor,
    inputs: &Arc<ExplicitInputs>,
    sink: &RecomputeGrads,
) -> Result<Tensor> {
    let mut h = x.detach();
    let mut backwards = Vec::with_capacity(layers.len());
    for (i, (attn, mlp)) in layers.iter().enumerate() {
        let index = first.map(|f| f + i);
        let _range = index.map(crate::profiling::Range::layer);
        let (y, backward) = forward_untracked(attn, mlp, index, &h, inputs, sink)?;
        backwards.push(backward);
        h = y;
    }
    let anchor =
        layers.iter().find_map(|(a, m)| a.adapter_anchor().or(m.adapter_anchor())).cloned();
    let backward: BackwardFn = Box::new(move |_x: &Tensor, dy: &Tensor| {
        let run = || -> Result<Tensor> {
            let mut g = dy.contiguous()?;
            // Last layer first; each backward is dropped (with its saved state) once done.
            for backward in backwards.into_iter().rev() {
                g = backward(&g)?;
            }
            Ok(g)
        };
        run()
            .map(Some)
            .map_err(|e| candle_core::Error::Msg(format!("explicit layer backward: {e:#}")))
    });
    Ok(with_backward_anchored(x, anchor.as_ref(), h, "explicit-layers", backward)?)
}

/// [`forward_run`] without a backward (evaluation): each layer's saved state is dropped as
/// soon as its output exists, so the pass holds one layer's activations at a time, as a
/// forward under `torch.no_grad()` does, and the output is outside candle's graph.
pub fn forward_only_run(
    layers: &[(&SelfAttention, &Mlp)],
    first: usize,
    x: &Tensor,
    inputs: &ExplicitInputs,
) -> Result<Tensor> {
    let mut h = x.detach();
    for (i, (attn, mlp)) in layers.iter().enumerate() {
        let _range = crate::profiling::Range::layer(first + i);
        let (x2, attn_saved) = attn.forward_saving(&h, inputs)?;
        drop(attn_saved);
        let (y, mlp_saved) = mlp.forward_saving(&x2, inputs)?;
        drop(mlp_saved);
        h = y;
    }
    Ok(h)
}

/// One layer of [`forward_run`] (its own node of the graph, no profiler range).
pub fn forward(
    attn: &SelfAttention,
    mlp: &Mlp,
    x: &Tensor,
    inputs: &Arc<ExplicitInputs>,
    sink: &RecomputeGrads,
) -> Result<Tensor> {
    forward_run(&[(attn, mlp)], None, x, inputs, sink)
}
