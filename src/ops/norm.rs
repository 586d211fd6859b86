//! RMSNorm and LayerNorm over the last dimension, differentiable.

use candle_core::{DType, Result, Tensor, D};

/// Upcasts half-precision inputs so the statistics are computed in f32 (as HF and TE do).
fn stats_dtype(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Scale weight, optionally zero-centered (`layernorm_zero_centered_gamma`: gamma = 1 + w).
fn gamma(weight: &Tensor, zero_centered: bool) -> Result<Tensor> {
    if zero_centered {
        weight.affine(1.0, 1.0)
    } else {
        Ok(weight.clone())
    }
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) * gamma`. Half precision on CUDA takes the fused
/// kernel (see [`super::fused`]); [`rms_norm_composite`] is the reference.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, zero_centered: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused::use_fused(x.device(), x.dtype())
        && weight.dtype() == x.dtype()
        && super::cuda::rms_norm::supports_width(x.dim(D::Minus1)?, x.dtype())
    {
        let op = super::cuda::rms_norm::RmsNorm { eps: eps as f32, zero_centered };
        return x.contiguous()?.apply_op2(&weight.contiguous()?, op);
    }
    rms_norm_composite(x, weight, eps, zero_centered)
}

/// Device-generic form of [`rms_norm`] from basic ops (statistics in f32).
pub fn rms_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    zero_centered: bool,
) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = stats_dtype(x)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    let y = xf.broadcast_mul(&inv)?.to_dtype(dt)?;
    y.broadcast_mul(&gamma(weight, zero_centered)?)
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * gamma + beta` (biased variance, as torch).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    zero_centered: bool,
) -> Result<Tensor> {
    let dt = x.dtype();
    let xf = stats_dtype(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    let y = xc.broadcast_mul(&inv)?.to_dtype(dt)?;
    y.broadcast_mul(&gamma(weight, zero_centered)?)?.broadcast_add(bias)
}
