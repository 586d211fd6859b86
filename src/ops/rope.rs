//! Rotary position embedding (non-interleaved "rotate half", as Megatron and HF), with
//! `rotary_percent`, Llama-3.1/3.2 frequency scaling, YaRN and linear position interpolation.

use candle_core::{DType, Device, Result, Tensor, D};

/// Llama-3 scaling constants Megatron hard-codes (HF `rope_type = "llama3"`).
const LLAMA3_LOW_FREQ_FACTOR: f64 = 1.0;
const LLAMA3_HIGH_FREQ_FACTOR: f64 = 4.0;
const LLAMA3_ORIGINAL_MAX_POSITIONS: f64 = 8192.0;

/// How the rotary frequencies are stretched for contexts longer than the training one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama-3.1's frequency scaling with this factor (`model.rope_scaling`).
    Llama3(f64),
    /// YaRN (`position_embedding_type = "yarn"`).
    Yarn(Yarn),
}

/// YaRN's settings (`model.yarn_*`) with Megatron's defaults filled in: megatron-core's
/// `YarnRotaryEmbedding`, which Hugging Face's `rope_type = "yarn"` computes alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// Context-extension factor `s`.
    pub factor: f64,
    /// The context the rotation was trained for before the extension.
    pub original_max_positions: f64,
    /// Dimensions turning more than this often over that context keep their frequency.
    pub beta_fast: f64,
    /// Dimensions turning less than this often are divided by `factor` fully.
    pub beta_slow: f64,
    /// `mscale` / `mscale_all_dim`: the attention temperature is their `get_mscale` ratio when
    /// both are set, else `0.1·ln(s) + 1`.
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Round the ramp's bounds to whole dimensions (Hugging Face's `truncate`).
    pub round_to_int: bool,
}

impl Yarn {
    /// Inverse frequencies of `rot_dim` rotated channels: the extrapolated (plain) ones where a
    /// dimension turns fast, the interpolated (`/ factor`) ones where it turns slowly, a linear
    /// ramp between.
    fn inv_freq(&self, rot_dim: usize, base: f64) -> Vec<f64> {
        let dim = rot_dim as f64;
        // The dimension whose wavelength fits `rotations` times into the original context.
        let correction_dim = |rotations: f64| {
            dim * (self.original_max_positions / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (correction_dim(self.beta_fast), correction_dim(self.beta_slow));
        if self.round_to_int {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001; // megatron-core's guard against a zero-width ramp
        }
        (0..rot_dim / 2)
            .map(|k| {
                let extrapolated = 1.0 / base.powf((2 * k) as f64 / dim);
                let ramp = ((k as f64 - low) / (high - low)).clamp(0.0, 1.0);
                extrapolated / self.factor * ramp + extrapolated * (1.0 - ramp)
            })
            .collect()
    }

    /// The factor cos and sin are multiplied by (megatron-core's concentration factor,
    /// Hugging Face's `attention_factor`).
    pub fn attention_scale(&self) -> f64 {
        let get_mscale =
            |m: f64| if self.factor <= 1.0 { 1.0 } else { 0.1 * m * self.factor.ln() + 1.0 };
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) => get_mscale(m) / get_mscale(all),
            _ => get_mscale(1.0),
        }
    }
}

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
    /// cos and sin are multiplied by this (YaRN's attention temperature), 1 = off.
    pub scale: f64,
}

impl RopeTable {
    /// Builds the frequencies for `head_dim` with `rotary_percent` and `scaling`.
    pub fn new(
        head_dim: usize,
        rotary_percent: f64,
        base: f64,
        scaling: RopeScaling,
        interpolation: Option<f64>,
    ) -> Result<Self> {
        // Megatron: dim = int(kv_channels * rotary_percent).
        let rot_dim = (head_dim as f64 * rotary_percent) as usize;
        if rot_dim == 0 || !rot_dim.is_multiple_of(2) || rot_dim > head_dim {
            candle_core::bail!(
                "rotary dimension {rot_dim} (head_dim {head_dim} × rotary_percent {rotary_percent}) must be even and in 2..=head_dim"
            );
        }
        let plain = || (0..rot_dim / 2).map(|k| 1.0 / base.powf((2 * k) as f64 / rot_dim as f64));
        let (inv_freq, scale) = match scaling {
            RopeScaling::None => (plain().collect(), 1.0),
            RopeScaling::Llama3(factor) => {
                (plain().map(|f| llama3_scale(f, factor)).collect(), 1.0)
            }
            RopeScaling::Yarn(y) => (y.inv_freq(rot_dim, base), y.attention_scale()),
        };
        Ok(Self { inv_freq, rot_dim, interpolation: interpolation.unwrap_or(1.0), scale })
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
        let (cos, sin) = (emb.cos()?, emb.sin()?);
        let (cos, sin) =
            if self.scale == 1.0 { (cos, sin) } else { ((cos * self.scale)?, (sin * self.scale)?) };
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// YaRN's frequencies and attention factor, worked out by hand from megatron-core's
    /// formulas: head dim 16, base 1000, a 4x extension of a 16-token context, betas 8 and
    /// 0.5 put the ramp's bounds at dimensions 0 and 2 (floor(-1.33) clamped to 0, ceil(1.89)), so
    /// pair 0 keeps its frequency, pair 1 is half interpolated and the rest fully.
    #[test]
    fn yarn_frequencies_ramp_between_extrapolation_and_interpolation() {
        let yarn = Yarn {
            factor: 4.0,
            original_max_positions: 16.0,
            beta_fast: 8.0,
            beta_slow: 0.5,
            mscale: Some(1.0),
            mscale_all_dim: Some(0.5),
            round_to_int: true,
        };
        let t = RopeTable::new(16, 1.0, 1000.0, RopeScaling::Yarn(yarn), None).unwrap();
        let plain = |k: i32| 1000f64.powf(-(2 * k) as f64 / 16.0);
        let want: Vec<f64> = (0..8)
            .map(|k| match k {
                0 => plain(0),
                1 => plain(1) * (0.5 / 4.0 + 0.5),
                k => plain(k) / 4.0,
            })
            .collect();
        for (g, w) in t.inv_freq().iter().zip(&want) {
            assert!((g - w).abs() <= 1e-12 * w, "{:?} vs {want:?}", t.inv_freq());
        }
        let ln4 = 4f64.ln();
        assert!((t.scale - (0.1 * ln4 + 1.0) / (0.05 * ln4 + 1.0)).abs() < 1e-12);
        // Without both mscales the factor is 0.1·ln(s) + 1; cos and sin carry it.
        let t =
            RopeTable::new(16, 1.0, 1000.0, RopeScaling::Yarn(Yarn { mscale: None, ..yarn }), None)
                .unwrap();
        let pos = Tensor::new(&[[0u32]], &Device::Cpu).unwrap();
        let (cos, _) = t.cos_sin(&pos, DType::F64).unwrap();
        let c0 = cos.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((c0 - (0.1 * ln4 + 1.0)).abs() < 1e-12, "{c0}");
    }
}
