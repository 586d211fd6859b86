//! One linear layer of the written-out backward ([`super::explicit_layer`]): `y = x Wᵀ + b`,
//! plus a LoRA adapter's `s·(x Aᵀ) Bᵀ` when the layer has one.
//!
//! Frozen weights (PEFT's base model) get no gradient at all: adapter training skips the
//! weight-gradient GEMMs, a third of a layer's GEMM work. The adapter's low-rank terms are
//! accumulated into the base GEMM's output (and into the input gradient) in place, so a LoRA
//! layer costs two skinny GEMMs more than the bare one, no extra pass over its output.

use crate::ops::{self, manual};
use crate::parallel::tensor::TensorParallel;
use crate::parallel::ReduceOp;
use crate::peft::Adapter;
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
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
}

/// What [`ExplicitLinear::backward`] needs from the forward: the adapter's `x Aᵀ`.
pub(super) type LinearSaved = Option<Tensor>;

impl ExplicitLinear<'_> {
    /// Whether the written-out path covers this layer's adapter (if any).
    pub fn explicit_ok(adapter: Option<&Adapter>) -> bool {
        adapter.is_none_or(|a| a.explicit_parts().is_some())
    }

    /// Whether [`Self::backward`] reads the forward input (for a weight or adapter gradient).
    pub fn needs_input(&self) -> bool {
        trains(self.w) || self.adapter.is_some()
    }

    /// `y` for `x` `[..., in]`, outside autograd.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, LinearSaved)> {
        let y = ops::linear(x, &self.w.detach(), self.b.map(Tensor::detach).as_ref())?;
        let Some(adapter) = self.adapter else { return Ok((y, None)) };
        let (a, b, scale) =
            adapter.explicit_parts().context("adapter outside the explicit path")?;
        let dims = y.dims().to_vec();
        let x = x.reshape(((), x.dim(candle_core::D::Minus1)?))?;
        let h = x.matmul(&a.detach().t()?)?;
        let y = manual::add_matmul(y.reshape((h.dim(0)?, ()))?, &h, &b.detach(), true, scale)?;
        Ok((y.reshape(dims)?, Some(h)))
    }

    /// The input gradient `[rows, in]` for the output gradient `dy` `[rows, out]`; the
    /// trainable parameters' gradients go into `grads`. `x` gives the forward input as
    /// `[rows, in]`; it is only called when a weight gradient needs it.
    pub fn backward(
        &self,
        dy: &Tensor,
        x: impl FnOnce() -> Result<Tensor>,
        saved: LinearSaved,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let x = if self.needs_input() { Some(x()?) } else { None };
        if let (true, Some(x)) = (trains(self.w), &x) {
            grads.insert(self.w, manual::weight_grad(dy, x)?);
        }
        if let Some(b) = self.b.filter(|b| trains(b)) {
            grads.insert(b, manual::bias_grad(dy)?);
        }
        let dx = dy.matmul(&self.w.detach())?;
        let (Some(adapter), Some(x)) = (self.adapter, x) else { return Ok(dx) };
        let (a, b, scale) =
            adapter.explicit_parts().context("adapter outside the explicit path")?;
        let h = saved.context("the adapter's forward state is missing")?;
        // y = y_base + s·h Bᵀ with h = x Aᵀ: dB = s·dyᵀh, g = dy B, dA = s·gᵀx, dx += s·g A.
        grads.insert(b, (manual::weight_grad(dy, &h)? * scale)?);
        drop(h);
        let g = dy.matmul(&b.detach())?;
        grads.insert(a, (manual::weight_grad(&g, &x)? * scale)?);
        Ok(manual::add_matmul(dx, &g, &a.detach(), false, scale)?)
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

    /// The row-parallel linear's bias as [`ExplicitLinear`] takes it: inside the linear
    /// without TP; with TP it is added once after the sum ([`Self::exit`]).
    pub fn linear_bias<'b>(&self, b: Option<&'b Tensor>) -> Option<&'b Tensor> {
        b.filter(|_| self.0.is_none())
    }

    /// Output of the row-parallel linear `[b, s, h]` from this rank's partial product: the
    /// ranks' sum (reduce-scattered over the sequence under SP), then the bias.
    pub fn exit(&self, y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let Some(tp) = self.0 else { return Ok(y.clone()) };
        let y = tp.reduce_partial_untracked(y)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(&b.detach())?,
            None => y,
        })
    }

    /// Output gradient `[b, s, h]` of the row-parallel linear over the whole sequence; with TP
    /// the bias gradient goes into `grads` (summed over TP under SP, where each rank saw its
    /// part of the sequence).
    pub fn exit_grad(
        &self,
        dy: &Tensor,
        bias: Option<&Tensor>,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let Some(tp) = self.0 else { return Ok(dy.clone()) };
        if let Some(b) = bias.filter(|b| trains(b)) {
            let h = dy.dim(candle_core::D::Minus1)?;
            let g = manual::bias_grad(&dy.reshape(((), h))?)?;
            let g =
                if tp.sequence_parallel() { tp.comm().all_reduce(&g, ReduceOp::Sum)? } else { g };
            grads.insert(b, g);
        }
        Ok(tp.gather_sequence_untracked(dy)?)
    }
}
