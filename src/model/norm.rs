//! Norm layers (RMSNorm / LayerNorm) bound to their registered parameters.

use super::arch::GptArch;
use super::explicit_linear::trains;
use super::init::Init;
use super::params::{ParamStore, ShardLayout};
use crate::config::model::Normalization;
use crate::ops;
use crate::parallel::tensor::TensorParallel;
use crate::parallel::ReduceOp;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;

/// A norm over the last dimension with its weight (and bias for LayerNorm).
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    kind: Normalization,
    eps: f64,
    zero_centered: bool,
    /// Set for norms applied to TP-local data (QK-norm over this rank's heads): their
    /// replicated weights then get the sum of the ranks' gradients.
    grad_sum: Option<TensorParallel>,
}

impl Norm {
    /// Registers `{weight_name}` (and `{bias_name}` for LayerNorm) of width `dim`.
    /// Weights start at one, or zero with zero-centered gamma (then gamma = 1 + w).
    pub fn new(
        store: &mut ParamStore,
        arch: &GptArch,
        weight_name: &str,
        bias_name: &str,
        dim: usize,
    ) -> Result<Self> {
        let w_init = if arch.zero_centered_gamma { Init::Zeros } else { Init::Ones };
        let weight = store.create(weight_name, &[dim], None, ShardLayout::Contiguous, w_init)?;
        let bias = match arch.normalization {
            Normalization::LayerNorm => {
                Some(store.create(bias_name, &[dim], None, ShardLayout::Contiguous, Init::Zeros)?)
            }
            Normalization::RMSNorm => None,
        };
        Ok(Self {
            weight,
            bias,
            kind: arch.normalization,
            eps: arch.eps,
            zero_centered: arch.zero_centered_gamma,
            grad_sum: None,
        })
    }

    /// Marks this norm as applied to tensor-parallel shards of the data (per-head QK-norm):
    /// its replicated weight and bias enter the graph through `copy_to_region`, so their
    /// gradients are summed over the TP group and equal the TP=1 gradients on every rank.
    pub fn with_tp_grad_sum(mut self, tp: TensorParallel) -> Self {
        self.grad_sum = Some(tp);
        self
    }

    /// Normalizes `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias) = match &self.grad_sum {
            Some(tp) => (
                tp.copy_to_region(&self.weight)?,
                self.bias.as_ref().map(|b| tp.copy_to_region(b)).transpose()?,
            ),
            None => (self.weight.clone(), self.bias.clone()),
        };
        self.apply(x, &weight, bias.as_ref())
    }

    /// The norm of `x` with these weight and bias tensors (tracked or detached).
    fn apply(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        Ok(match (&self.kind, bias) {
            (Normalization::LayerNorm, Some(b)) => {
                ops::layer_norm(x, weight, b, self.eps, self.zero_centered)?
            }
            _ => ops::rms_norm(x, weight, self.eps, self.zero_centered)?,
        })
    }

    /// [`Self::forward`] outside the autograd graph (a layer with a written-out backward).
    pub fn forward_untracked(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, &self.weight.detach(), self.bias.as_ref().map(Tensor::detach).as_ref())
    }

    /// Backward of [`Self::forward_untracked`] at `x` for the output gradient `dy`: returns
    /// `dx` (plus `residual`, the gradient the skip connection of a pre-norm block carries
    /// around the norm: added in the same pass) and puts the weight (and bias) gradients into
    /// `grads`, summed over TP for a norm of TP-local data (see [`Self::with_tp_grad_sum`]).
    pub fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        residual: Option<&Tensor>,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let (eps, zc) = (self.eps, self.zero_centered);
        let sum = |g: &Tensor| -> Result<Tensor> {
            Ok(match &self.grad_sum {
                Some(tp) => tp.comm().all_reduce(g, ReduceOp::Sum)?,
                None => g.clone(),
            })
        };
        match (&self.kind, &self.bias) {
            (Normalization::LayerNorm, Some(b)) => {
                let g = ops::manual::vjp(
                    |a| ops::layer_norm(&a[0], &a[1], &a[2], eps, zc),
                    &[x, &self.weight, b],
                    dy,
                )?;
                // Frozen norms (PEFT's base) get no gradient.
                if trains(&self.weight) {
                    grads.insert(&self.weight, sum(&g[1])?);
                    grads.insert(b, sum(&g[2])?);
                }
                Ok(match residual {
                    Some(r) => (&g[0] + r)?,
                    None => g[0].clone(),
                })
            }
            _ => {
                let (dx, dw) = ops::manual::rms_norm_backward(
                    x,
                    &self.weight.detach(),
                    dy,
                    residual,
                    eps,
                    zc,
                )?;
                if trains(&self.weight) {
                    grads.insert(&self.weight, sum(&dw)?);
                }
                Ok(dx)
            }
        }
    }
}
