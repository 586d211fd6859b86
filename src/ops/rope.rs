//! Rotary position embedding (non-interleaved "rotate half", as Megatron and HF), with
//! `rotary_percent`, Llama-3.1/3.2 frequency scaling and linear position interpolation.

use candle_core::{DType, Device, Result, Tensor, D};

/// Llama-3 scaling constants Megatron hard-codes (HF `rope_type = "llama3"`).
const LLAMA3_LOW_FREQ_FACTOR: f64 = 1.0;
const LLAMA3_HIGH_FREQ_FACTOR: f64 = 4.0;
const LLAMA3_ORIGINAL_MAX_POSITIONS: f64 = 8192.0;

/// Inverse frequencies of a rotary embedding; cos/sin are computed per call from the
/// position ids, so no table of `max_positions` rows is held (128K-context models would
/// need hundreds of MB for it).
#[derive(Debug, Clone)]
pub struct RopeTable {
    inv_freq: Vec<f64>,
    /// Number of leading head dims that rotate (`head_dim · rotary_percent`, even).
    pub rot_dim: usize,
    /// Positions are divided by this (`seq_len_interpolation_factor`), 1 = off.
    pub interpolation: f64,
}

impl RopeTable {
    /// Builds the frequencies for `head_dim` with `rotary_percent`; `llama3_factor` enables
    /// Llama-3.1-style scaling with that factor.
    pub fn new(
        head_dim: usize,
        rotary_percent: f64,
        base: f64,
        llama3_factor: Option<f64>,
        interpolation: Option<f64>,
    ) -> Result<Self> {
        // Megatron: dim = int(kv_channels * rotary_percent).
        let rot_dim = (head_dim as f64 * rotary_percent) as usize;
        if rot_dim == 0 || !rot_dim.is_multiple_of(2) || rot_dim > head_dim {
            candle_core::bail!(
                "rotary dimension {rot_dim} (head_dim {head_dim} × rotary_percent {rotary_percent}) must be even and in 2..=head_dim"
            );
        }
        let mut inv_freq: Vec<f64> =
            (0..rot_dim / 2).map(|k| 1.0 / base.powf((2 * k) as f64 / rot_dim as f64)).collect();
        if let Some(factor) = llama3_factor {
            for f in inv_freq.iter_mut() {
                *f = llama3_scale(*f, factor);
            }
        }
        Ok(Self { inv_freq, rot_dim, interpolation: interpolation.unwrap_or(1.0) })
    }

    /// The (possibly scaled) inverse frequencies, one per rotated pair.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// `(cos, sin)` of shape `[b, 1, s, rot_dim]` for integer `position_ids` `[b, s]`.
    pub fn cos_sin(&self, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let dev: &Device = position_ids.device();
        let pos = (position_ids.to_dtype(DType::F64)? / self.interpolation)?;
        let inv = Tensor::new(self.inv_freq.as_slice(), dev)?;
        // [b, s, 1] * [half] -> [b, s, half]; emb = cat(freqs, freqs) as Megatron/HF.
        let freqs = pos.unsqueeze(D::Minus1)?.broadcast_mul(&inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
    }
}

/// Llama-3.1 frequency scaling of one inverse frequency (HF and Megatron agree).
pub fn llama3_scale(inv_freq: f64, factor: f64) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    let low_wl = LLAMA3_ORIGINAL_MAX_POSITIONS / LLAMA3_LOW_FREQ_FACTOR;
    let high_wl = LLAMA3_ORIGINAL_MAX_POSITIONS / LLAMA3_HIGH_FREQ_FACTOR;
    if wavelen < high_wl {
        inv_freq
    } else if wavelen > low_wl {
        inv_freq / factor
    } else {
        let s = (LLAMA3_ORIGINAL_MAX_POSITIONS / wavelen - LLAMA3_LOW_FREQ_FACTOR)
            / (LLAMA3_HIGH_FREQ_FACTOR - LLAMA3_LOW_FREQ_FACTOR);
        (1.0 - s) * inv_freq / factor + s * inv_freq
    }
}

/// Rotates the first `rot_dim` channels of `x` `[b, heads, s, d]` by `(cos, sin)`
/// `[b, 1, s, rot_dim]`; the remaining channels pass through (`rotary_percent < 1`).
/// Half precision on CUDA takes the fused kernel (any strides of `x`, so q/k need no copy
/// out of the fused QKV); [`apply_rope_composite`] is the reference.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::fused::use_fused(x.device(), x.dtype())
        && cos.dtype() == x.dtype()
        && sin.dtype() == x.dtype()
        && x.rank() == 4
    {
        return x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, super::cuda::rope::Rope);
    }
    apply_rope_composite(x, cos, sin)
}

/// Device-generic form of [`apply_rope`] from basic ops.
pub fn apply_rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let r = cos.dim(D::Minus1)?;
    let x_rot = x.narrow(D::Minus1, 0, r)?;
    let x1 = x_rot.narrow(D::Minus1, 0, r / 2)?;
    let x2 = x_rot.narrow(D::Minus1, r / 2, r / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let out = x_rot.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)?;
    if r == d {
        Ok(out)
    } else {
        Tensor::cat(&[&out, &x.narrow(D::Minus1, r, d - r)?], D::Minus1)
    }
}
