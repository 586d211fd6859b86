//! Numerically stable softmax with a backward pass.

use super::fused_cpu::MaskedSoftmax;
use candle_core::{DType, Result, Tensor, D};
use std::sync::Arc;

/// Value written into masked-out scores by the composite path: finite so that a fully masked
/// row (padding) gives a uniform distribution instead of NaN, and far below any real score.
const MASKED_SCORE: f64 = -1e30;

/// Softmax over the last dimension.
///
/// The row maximum is subtracted for stability and *detached*: softmax is shift-invariant, so
/// the gradient is the same and we avoid differentiating through `max`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// `log(sum(exp(x)))` over the last dimension, keeping that dimension (size 1).
pub fn logsumexp_keepdim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    s.log()?.broadcast_add(&max)
}

/// `softmax(scale · scores)` over the last dim, restricted to keys where `allowed` is 1.
///
/// `scores` is `[b, ..., sq, sk]` (any number of head dims), `allowed` a u8 mask
/// `[B, 1, sq, sk]` with `B` 1 or `b`. Uses the fused CPU kernel for f32/f64 on CPU, else
/// [`masked_softmax_composite`].
pub fn masked_softmax(scores: &Tensor, allowed: &Tensor, scale: f64) -> Result<Tensor> {
    if !(scores.device().is_cpu() && matches!(scores.dtype(), DType::F32 | DType::F64)) {
        return masked_softmax_composite(scores, allowed, scale);
    }
    let dims = scores.dims();
    let (b, sq, sk) = (dims[0], dims[dims.len() - 2], dims[dims.len() - 1]);
    let (mb, _, msq, msk) = allowed.dims4()?;
    if (msq, msk) != (sq, sk) || (mb != 1 && mb != b) {
        candle_core::bail!("attention mask {:?} does not fit scores {:?}", allowed.dims(), dims);
    }
    let op = MaskedSoftmax {
        scale,
        allowed: Arc::new(allowed.flatten_all()?.to_vec1::<u8>()?),
        mask_batches: mb,
        rows_per_batch: scores.elem_count() / b / sk,
        sq,
        sk,
    };
    scores.contiguous()?.apply_op1(op)
}

/// Device-generic form of [`masked_softmax`] from basic ops with a backward pass.
pub fn masked_softmax_composite(scores: &Tensor, allowed: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let n = dims.len();
    let (b, sq, sk) = (dims[0], dims[n - 2], dims[n - 1]);
    let heads = scores.elem_count() / (b * sq * sk);
    let s4 = (scores.reshape((b, heads, sq, sk))? * scale)?;
    let mask = allowed.broadcast_as(s4.shape())?;
    let fill =
        Tensor::new(MASKED_SCORE, s4.device())?.to_dtype(s4.dtype())?.broadcast_as(s4.shape())?;
    softmax_last_dim(&mask.where_cond(&s4, &fill)?)?.reshape(dims)
}
