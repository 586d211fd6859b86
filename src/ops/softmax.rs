//! Numerically stable softmax with a backward pass.

use candle_core::{Result, Tensor, D};

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
