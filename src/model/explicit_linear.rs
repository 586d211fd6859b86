//! One linear layer of the written-out backward ([`super::explicit_layer`]): `y = x Wᵀ + b`,
//! plus a LoRA adapter's `s·(x Aᵀ) Bᵀ` when the layer has one.
//!
//! Frozen weights (PEFT's base model) get no gradient at all: adapter training skips the
//! weight-gradient GEMMs, a third of a layer's GEMM work. The base GEMM accumulates onto the
//! adapter's low-rank term (and onto its share of the input gradient) in place, so a LoRA
//! layer costs two skinny GEMMs more than the bare one, no extra pass over its output.
//!
//! With an FP8 recipe (`mixed_precision.fp8`, layers without adapters) the three GEMMs of the
//! layer run in FP8 with tensorwise current scaling ([`crate::ops::fp8`]); the bias and
//! the residual are added in the layer's dtype. The forward keeps its quantized weight and
//! input for the backward, which then needs no high-precision input at all.

use super::fp8_weights::Fp8Linears;
use super::recompute::LayerGrads;
use crate::ops::fp8::{self, Fp8Amax, Fp8Recipe, Fp8Saved};
use crate::ops::{self, manual};
use crate::parallel::tensor::TensorParallel;
use crate::parallel::ReduceOp;
use crate::peft::Adapter;
use anyhow::{Context, Result};
use candle_core::Tensor;

/// Whether `t` is a parameter that trains (frozen base weights are detached views).
pub(super) fn trains(t: &Tensor) -> bool {
    t.is_variable()
}

/// The weight, bias and adapter of one linear layer.
#[derive(Clone, Copy)]
pub(super) struct ExplicitLinear<'a> {
    pub w: &'a Tensor,
    pub b: Option<&'a Tensor>,
    pub adapter: Option<&'a Adapter>,
    /// The TP group of a column-parallel layer (its adapter's B is split by rows, A is
    /// replicated); None for row-parallel layers and without TP.
    pub column_tp: Option<&'a TensorParallel>,
    /// FP8 GEMMs (None: the parameters' dtype). Adapters keep their layer in that dtype.
    pub fp8: Option<&'a Fp8Linears>,
    /// Whether a backward follows the forward (false in evaluation): an FP8 forward without
    /// one quantizes only what its GEMM reads and keeps nothing.
    pub backward_follows: bool,
}

/// What [`ExplicitLinear::backward`] needs from the forward besides its input.
pub(super) enum LinearSaved {
    Nothing,
    /// The adapter's `x Aᵀ`.
    Adapter(Tensor),
    /// The quantized operands of an FP8 layer.
    Fp8(Fp8Saved),
}

impl LinearSaved {
    /// Whether this holds an FP8 layer's quantized operands.
    #[cfg(test)]
    pub fn is_fp8(&self) -> bool {
        matches!(self, LinearSaved::Fp8(_))
    }

    /// The same without an FP8 layer's quantized input, for a caller that recomputes the
    /// input in the backward rather than keep it (selective recompute).
    pub fn without_input(self) -> Self {
        match self {
            LinearSaved::Fp8(s) => LinearSaved::Fp8(s.without_input()),
            other => other,
        }
    }
}

impl ExplicitLinear<'_> {
    /// Whether the written-out path covers this layer's adapter (if any).
    pub fn explicit_ok(adapter: Option<&Adapter>) -> bool {
        adapter.is_none_or(|a| a.explicit_parts().is_some())
    }

    /// The same layer in a pass after which a backward follows or not.
    pub fn in_pass(self, backward_follows: bool) -> Self {
        Self { backward_follows, ..self }
    }

    /// Whether [`Self::backward`] reads the forward input (for a weight or adapter gradient
    /// that the forward's quantized input does not cover).
    pub fn needs_input(&self) -> bool {
        (trains(self.w) && !self.keeps_fp8_input()) || self.adapter.is_some()
    }

    /// Whether the forward keeps the FP8 input of a trained weight's FP8 gradient. Not for a
    /// column-parallel layer under sequence parallelism: its input is the gathered sequence,
    /// which the backward gathers again from this rank's part.
    fn keeps_fp8_input(&self) -> bool {
        let gathered = self.column_tp.is_some_and(|tp| tp.sequence_parallel());
        self.fp8().is_some_and(|r| r.wgrad) && trains(self.w) && !gathered
    }

    /// The FP8 recipe when this layer's GEMMs run in FP8 (no adapter).
    fn fp8(&self) -> Option<&Fp8Recipe> {
        self.fp8.filter(|_| self.adapter.is_none()).map(|f| &f.recipe)
    }

    /// Whether this layer's GEMMs run in FP8 (so an amax of its input or output gradient
    /// from their producer saves a pass).
    pub fn runs_fp8(&self) -> bool {
        self.fp8().is_some()
    }

    /// `x Wᵀ (+ residual)` (no bias) for `x` `[..., in]` (`residual` shaped like the
    /// output): FP8, keeping its operands (`x_amax`: `x`'s amax from its producer), or the
    /// parameters' dtype.
    fn product(
        &self,
        x: &Tensor,
        x_amax: Option<&Fp8Amax>,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, LinearSaved)> {
        let Some(recipe) = self.fp8() else {
            let w = self.w.detach();
            let y = match residual {
                Some(r) => manual::add(r, &ops::linear(x, &w, None)?)?,
                None => ops::linear(x, &w, None)?,
            };
            return Ok((y, LinearSaved::Nothing));
        };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().context("linear input without dims")? = self.w.dim(0)?;
        let rows = x.reshape(((), x.dim(candle_core::D::Minus1)?))?;
        let r = residual.map(|r| r.reshape(((), r.dim(candle_core::D::Minus1)?))).transpose()?;
        let cache = &self.fp8.context("an FP8 layer without its weight cache")?.weights;
        if !self.backward_follows {
            let w = cache.weight_for_forward(self.w, recipe)?;
            let y = fp8::linear_forward(&rows, &w, r.as_ref(), recipe, x_amax)?;
            return Ok((y.reshape(dims)?, LinearSaved::Nothing));
        }
        let keep = self.keeps_fp8_input();
        let w = cache.weight(self.w, recipe)?;
        let (y, saved) = fp8::linear_saving(&rows, w, r.as_ref(), recipe, keep, x_amax)?;
        Ok((y.reshape(dims)?, LinearSaved::Fp8(saved)))
    }

    /// `y` for `x` `[..., in]` (`x_amax`: its amax from its producer, if any), outside
    /// autograd.
    pub fn forward(&self, x: &Tensor, x_amax: Option<&Fp8Amax>) -> Result<(Tensor, LinearSaved)> {
        let bias = self.b.map(Tensor::detach);
        let Some(adapter) = self.adapter else {
            let (y, saved) = self.product(x, x_amax, None)?;
            let y = match bias {
                Some(b) => y.broadcast_add(&b)?,
                None => y,
            };
            return Ok((y, saved));
        };
        let (a, b, scale) =
            adapter.explicit_parts().context("adapter outside the explicit path")?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().context("linear input without dims")? = self.w.dim(0)?;
        let x = x.reshape(((), x.dim(candle_core::D::Minus1)?))?;
        let h = x.matmul(&a.detach().t()?)?;
        // The adapter's term first (a write-only skinny GEMM), then the base GEMM accumulates
        // onto it (beta = 1 inside a compute-bound GEMM): in the other order the skinny GEMM
        // read and rewrote the whole output.
        let y = manual::matmul_scaled(&h, &b.detach(), true, scale)?;
        let y = manual::add_matmul(y, &x, &self.w.detach(), true, 1.0)?;
        let y = match bias {
            Some(bias) => y.broadcast_add(&bias)?,
            None => y,
        };
        Ok((y.reshape(dims)?, LinearSaved::Adapter(h)))
    }

    /// The input gradient `[rows, in]` for the output gradient `dy` `[rows, out]` (with its
    /// amax when its producer computed one); the trainable parameters' gradients go into
    /// `grads`. `x` gives the forward input as `[rows, in]`; it is only called when a weight
    /// gradient needs it.
    pub fn backward(
        &self,
        dy: &Tensor,
        dy_amax: Option<&Fp8Amax>,
        x: impl FnOnce() -> Result<Tensor>,
        saved: LinearSaved,
        grads: &mut LayerGrads,
    ) -> Result<Tensor> {
        if let Some(b) = self.b.filter(|b| trains(b)) {
            grads.insert(b, manual::bias_grad(dy)?);
        }
        if let Some(recipe) = self.fp8() {
            let LinearSaved::Fp8(saved) = saved else {
                anyhow::bail!("the FP8 linear layer's forward state is missing")
            };
            let x = if trains(self.w) && !saved.keeps_input() { Some(x()?) } else { None };
            // Added into the step's running sum where it has one (see `LayerGrads`).
            let into = if trains(self.w) { grads.sum_of(self.w) } else { None };
            let (dx, dw) = fp8::backward(dy, saved, x.as_ref(), recipe, dy_amax, into.as_ref())?;
            if let (true, Some(dw)) = (trains(self.w), dw) {
                grads.insert(self.w, dw);
            }
            return Ok(dx);
        }
        let x = if self.needs_input() { Some(x()?) } else { None };
        if let (true, Some(x)) = (trains(self.w), &x) {
            grads.weight_grad(self.w, dy, x, false)?;
        }
        let (Some(adapter), Some(x)) = (self.adapter, x) else {
            return Ok(dy.matmul(&self.w.detach())?);
        };
        let (a, b, scale) =
            adapter.explicit_parts().context("adapter outside the explicit path")?;
        let LinearSaved::Adapter(h) = saved else {
            anyhow::bail!("the adapter's forward state is missing")
        };
        // y = y_base + s·h Bᵀ with h = x Aᵀ: dB = s·dyᵀh, g = dy B, dA = s·gᵀx, dx += s·g A.
        grads.insert(b, manual::weight_grad_scaled(dy, &h, scale)?);
        drop(h);
        let g = dy.matmul(&b.detach())?;
        // Column-parallel: each rank's g covers its rows of B only. The replicated A takes the
        // sum; dx stays partial, like the base's, and the caller sums both over TP.
        let g_all = match self.column_tp {
            Some(tp) => tp.comm().all_reduce(&g, ReduceOp::Sum)?,
            None => g.clone(),
        };
        grads.insert(a, manual::weight_grad_scaled(&g_all, &x, scale)?);
        // As in the forward: the low-rank term first, the base GEMM accumulating onto it.
        let dx = manual::matmul_scaled(&g, &a.detach(), false, scale)?;
        Ok(manual::add_matmul(dx, dy, &self.w.detach(), false, 1.0)?)
    }

    /// `residual + ` [`Self::forward_row`]: a transformer block's output with its skip
    /// connection (`residual` shaped like the output, this rank's part of the sequence under
    /// SP). Without TP, adapter or bias, one GEMM adds `residual` in its epilogue
    /// ([`manual::linear_plus`]) instead of a separate pass over three activation tensors.
    pub fn forward_row_plus(
        &self,
        x: &Tensor,
        x_amax: Option<&Fp8Amax>,
        tp: TpBoundary,
        residual: &Tensor,
    ) -> Result<(Tensor, LinearSaved)> {
        if tp.0.is_none() && self.adapter.is_none() && self.b.is_none() {
            if self.fp8().is_some() {
                return self.product(x, x_amax, Some(residual));
            }
            let rows = x.reshape(((), x.dim(candle_core::D::Minus1)?))?;
            let r = residual.reshape(((), residual.dim(candle_core::D::Minus1)?))?;
            if let Some(y) = manual::linear_plus(&rows, &self.w.detach(), &r)? {
                return Ok((y.reshape(residual.dims())?, LinearSaved::Nothing));
            }
        }
        let (y, saved) = self.forward_row(x, x_amax, tp)?;
        Ok((manual::add(residual, &y)?, saved))
    }

    /// A row-parallel linear (`linear_proj`, `linear_fc2`) over this rank's input columns
    /// `x` `[b, s, in/tp]`: the partial products summed over TP (reduce-scattered over the
    /// sequence under SP), then the adapter's `s·(A x) Bᵀ`, its `A x` summed over TP first,
    /// and the bias, each added once. Under SP the adapter term is added for this rank's part
    /// of the sequence only, which the backward's gathered output gradient covers whole, so
    /// [`Self::backward`] is the same as without TP.
    pub fn forward_row(
        &self,
        x: &Tensor,
        x_amax: Option<&Fp8Amax>,
        tp: TpBoundary,
    ) -> Result<(Tensor, LinearSaved)> {
        let Some(group) = tp.0 else { return self.forward(x, x_amax) };
        let (y, saved) = self.product(x, x_amax, None)?;
        let y = tp.exit(&y)?;
        let (y, saved) = match self.adapter {
            None => (y, saved),
            Some(adapter) => {
                let (a, b, scale) =
                    adapter.explicit_parts().context("adapter outside the explicit path")?;
                let dims = y.dims().to_vec();
                let (batch, seq, inp) = x.dims3()?;
                let x = x.reshape((batch * seq, inp))?;
                let h = group.comm().all_reduce(&x.matmul(&a.detach().t()?)?, ReduceOp::Sum)?;
                // This rank's rows of the sequence (all of them without SP): the reduce-scatter
                // gave rank r the r-th chunk of y's sequence dimension.
                let local = dims[1];
                let h_local = if local == seq {
                    h.clone()
                } else {
                    h.reshape((batch, seq, ()))?
                        .narrow(1, group.rank() * local, local)?
                        .reshape((batch * local, ()))?
                };
                let y = y.reshape((batch * local, ()))?;
                let y = manual::add_matmul(y, &h_local, &b.detach(), true, scale)?;
                (y.reshape(dims)?, LinearSaved::Adapter(h))
            }
        };
        Ok(match self.b {
            Some(b) => (y.broadcast_add(&b.detach())?, saved),
            None => (y, saved),
        })
    }
}

/// The tensor-parallel boundaries of a block with a written-out backward: Megatron's
/// column-parallel input and row-parallel output, with sequence parallelism when the group
/// has it; pass-through without tensor parallelism.
#[derive(Clone, Copy)]
pub(super) struct TpBoundary<'a>(pub Option<&'a TensorParallel>);

impl TpBoundary<'_> {
    /// Input of the column-parallel linear: the whole sequence under sequence parallelism.
    pub fn enter(&self, xn: &Tensor) -> Result<Tensor> {
        match self.0 {
            Some(tp) => Ok(tp.gather_sequence_untracked(xn)?),
            None => Ok(xn.clone()),
        }
    }

    /// Gradient of the block input from the column-parallel linear's input gradient: the sum
    /// of the ranks' partial gradients (this rank's part of the sequence under SP).
    pub fn enter_grad(&self, dxe: &Tensor) -> Result<Tensor> {
        match self.0 {
            Some(tp) => Ok(tp.reduce_partial_untracked(dxe)?),
            None => Ok(dxe.clone()),
        }
    }

    /// Output of the row-parallel linear `[b, s, h]` from this rank's partial product: the
    /// ranks' sum (reduce-scattered over the sequence under SP), the same collective as
    /// [`Self::enter_grad`].
    pub fn exit(&self, y: &Tensor) -> Result<Tensor> {
        self.enter_grad(y)
    }

    /// Output gradient `[b, s, h]` of the row-parallel linear over the whole sequence
    /// (gathered under SP, as [`Self::enter`] gathers): the bias gradient taken from it is the
    /// sum over the ranks' parts.
    pub fn exit_grad(&self, dy: &Tensor) -> Result<Tensor> {
        self.enter(dy)
    }
}
