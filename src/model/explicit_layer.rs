//! A transformer layer whose backward pass is written out, as Megatron's Transformer Engine
//! layers are, instead of recorded op by op by candle's autograd.
//!
//! candle's backward starts every gradient as a zeros tensor and adds into it, turns each
//! view (narrow, transpose, reshape) back into a full copy, and the graph keeps every
//! intermediate activation until the whole backward is over. This layer runs the GEMMs and
//! fused kernels of its backward directly, saves only what they need (the fused QKV, the
//! attention output and logsumexp, `linear_fc1`'s output and the activation; the norms are
//! recomputed, they are cheap), and frees them as soon as the layer's backward is done. The
//! whole layer is one node of candle's graph ([`with_backward`]); its parameter gradients go
//! to the step's side sink ([`RecomputeGrads`]), like those of recomputed segments.
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
use super::recompute::{with_backward_anchored, BackwardFn, RecomputeGrads, SelectiveRecompute};
use crate::ops::attention::OwnedAttnMask;
use crate::ops::timing::section;
use anyhow::Result;
use candle_core::backprop::GradStore;
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
        Ok(Self { rope, mask, selective })
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

/// `x + attn(x)`, then `+ mlp(·)`, with a written-out backward whose parameter gradients go
/// to `sink`. The caller checks [`SelfAttention::explicit_ok`] / [`Mlp::explicit_ok`].
pub fn forward(
    attn: &SelfAttention,
    mlp: &Mlp,
    x: &Tensor,
    inputs: &Arc<ExplicitInputs>,
    sink: &RecomputeGrads,
) -> Result<Tensor> {
    let dev = x.device().clone();
    let xd = x.detach();
    let (a, attn_saved) = section("layer.fwd.attn", &dev, || attn.forward_saving(&xd, inputs))?;
    let x2 = (&xd + a)?;
    let (m, mlp_saved) =
        section("layer.fwd.mlp", &dev, || mlp.forward_saving(&x2, inputs.selective.mlp))?;
    let y = (&x2 + m)?;
    let (attn_anchor, mlp_anchor) = (attn.adapter_anchor().cloned(), mlp.adapter_anchor().cloned());
    let (attn, mlp, inputs, sink) = (attn.clone(), mlp.clone(), inputs.clone(), sink.clone());
    let backward: BackwardFn = Box::new(move |x: &Tensor, dy: &Tensor| {
        let run = || -> Result<Tensor> {
            let mut grads = GradStore::default();
            let dy = dy.contiguous()?;
            let dm =
                section("layer.bwd.mlp", &dev, || mlp.backward(mlp_saved, &x2, &dy, &mut grads))?;
            let dx2 = (&dy + dm)?;
            drop(x2);
            let da = section("layer.bwd.attn", &dev, || {
                attn.backward(attn_saved, &x.detach(), &inputs, &dx2, &mut grads)
            })?;
            let dx = (&dx2 + da)?;
            sink.push(grads)?;
            Ok(dx)
        };
        run()
            .map(Some)
            .map_err(|e| candle_core::Error::Msg(format!("explicit layer backward: {e:#}")))
    });
    let anchor = attn_anchor.or(mlp_anchor);
    Ok(with_backward_anchored(x, anchor.as_ref(), y, "explicit-layer", backward)?)
}
