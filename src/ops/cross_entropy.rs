//! Masked token cross-entropy returning `(sum, count)` for global-batch reduction.

use super::fused_cpu::CrossEntropyRows;
use super::softmax::logsumexp_keepdim;
use candle_core::{DType, Result, Tensor, D};

/// Per-token cross-entropy `logsumexp(x) − x[label]` of logits `[N, V]` and labels `[N]`
/// (u32) → `[N]`. Uses the fused CPU kernel for f32/f64 on CPU, else
/// [`token_cross_entropy_composite`].
pub fn token_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        logits.contiguous()?.apply_op2(&labels.contiguous()?, CrossEntropyRows)
    } else {
        token_cross_entropy_composite(logits, labels)
    }
}

/// Device-generic form of [`token_cross_entropy`] from basic ops (max-shifted, so stable).
pub fn token_cross_entropy_composite(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let lse = logsumexp_keepdim(logits)?;
    let target = logits.gather(&labels.reshape((n, 1))?, D::Minus1)?;
    (lse - target)?.reshape(n)
}

/// Per-token cross-entropy `[N]` (f32) straight from half-precision CUDA logits `[N, V]`.
#[cfg(feature = "cuda")]
fn fused_token_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let out = logits
        .contiguous()?
        .apply_op2(&labels.contiguous()?, super::cuda::cross_entropy::CrossEntropy)?;
    out.narrow(1, 0, 1)?.squeeze(1)
}

#[cfg(not(feature = "cuda"))]
fn fused_token_cross_entropy(_logits: &Tensor, _labels: &Tensor) -> Result<Tensor> {
    candle_core::bail!("fused cross-entropy needs the cuda feature")
}

/// Cross-entropy of `logits` `[b, s, V]` against `labels` `[b, s]` (u32), weighted by
/// `loss_mask` `[b, s]` (float, usually 0/1).
///
/// Returns `(Σ mask·CE, Σ mask)`: the training loop adds both over all micro-batches (and DP
/// ranks) and divides once, which is Megatron Bridge's `{key: [sum, count]}` contract. The sum
/// is an f32 (or f64 for f64 logits) scalar tensor that carries the gradient. Log-softmax is
/// computed stably (max-shifted) in at least f32.
pub fn masked_cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    loss_mask: &Tensor,
) -> Result<(Tensor, f64)> {
    let (b, s, v) = logits.dims3()?;
    let labels = checked_labels(labels, v, None)?;
    let ce = if super::fused::use_fused(logits.device(), logits.dtype()) {
        fused_token_cross_entropy(&logits.reshape((b * s, v))?, &labels)?
    } else {
        // The composite path needs f32 statistics: this is the fp32 copy of the logits the
        // fused kernel avoids.
        token_cross_entropy(&at_least_f32(logits)?.reshape((b * s, v))?, &labels)?
    }
    .reshape((b, s))?;
    let (sum, count, _) = masked_sum(&ce, loss_mask, None)?;
    Ok((sum, count))
}

/// Logits as the composite cross-entropy computes its statistics: half precision in f32,
/// other float types as they are (contiguous).
pub fn at_least_f32(logits: &Tensor) -> Result<Tensor> {
    match logits.dtype() {
        DType::BF16 | DType::F16 => logits.to_dtype(DType::F32),
        _ => logits.contiguous(),
    }
}

/// The largest of `ids` (any integer dtype): `known` when the host already knows it (the
/// batch builder does, see `model::HostStats`); otherwise read back from the device, which
/// waits for the work queued before.
pub fn max_id(ids: &Tensor, known: Option<u32>) -> Result<u32> {
    match known {
        Some(m) => Ok(m),
        None => ids.to_dtype(DType::U32)?.max_all()?.to_scalar::<u32>(),
    }
}

/// `labels` (any integer dtype, any shape) as flat u32, checked to lie in `0..vocab`
/// (`known_max`: see [`max_id`]).
pub fn checked_labels(labels: &Tensor, vocab: usize, known_max: Option<u32>) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::U32)?.flatten_all()?;
    let max_label = max_id(&labels, known_max)? as usize;
    if max_label >= vocab {
        candle_core::bail!("label id {max_label} out of range for vocabulary of size {vocab}");
    }
    Ok(labels)
}

/// `(Σ mask·ce, Σ mask, mask)` for per-token losses `ce` and `loss_mask` of the same shape
/// (the mask in `ce`'s dtype, as the sum's gradient needs it). `known_count` is `Σ mask`
/// when the host already knows it; otherwise it is read back from the device.
pub fn masked_sum(
    ce: &Tensor,
    loss_mask: &Tensor,
    known_count: Option<f64>,
) -> Result<(Tensor, f64, Tensor)> {
    let mask = loss_mask.reshape(ce.shape())?.to_dtype(ce.dtype())?;
    let sum = ce.mul(&mask)?.sum_all()?;
    let count = match known_count {
        Some(c) => c,
        None => mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
    };
    Ok((sum, count, mask))
}
