//! FP8 GEMMs of the transformer blocks' linear layers, with Transformer Engine's tensorwise
//! current scaling (megatron-core's `fp8_recipe = "tensorwise"`, TE's `Float8CurrentScaling`):
//! each GEMM operand is quantized with a scale of its own, `scale = fp8_max / amax(|x|)`, right
//! before the GEMM, and the GEMM multiplies the FP8 values in f32 and scales the sum back by
//! both operands' `1 / scale`.
//!
//! `mixed_precision.fp8 = "hybrid"` quantizes activations and weights to E4M3 and gradients
//! to E5M2 (its wider range); `"e4m3"` uses E4M3 for all. With `fp8_wgrad = false` the
//! weight gradient stays a GEMM of the unquantized tensors.
//!
//! This module is the reference: CPU tensors are quantized value by value here ("fake"
//! quantization: the FP8 values held in f32) and multiplied in f32; CUDA tensors go to FP8
//! cuBLASLt GEMMs (`ops::cuda::fp8`), which `mbridge selftest cuda` checks against it.

use candle_core::{DType, Result, Tensor};

/// An FP8 encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits: ±448.
    E4M3,
    /// 5 exponent bits, 2 mantissa bits: ±57344.
    E5M2,
}

impl Fp8Format {
    /// The largest finite value.
    pub fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    fn mantissa_bits(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    /// Exponent of the smallest normal value (below it the spacing stays that of subnormals).
    fn min_normal_exponent(self) -> i32 {
        match self {
            Fp8Format::E4M3 => -6,
            Fp8Format::E5M2 => -14,
        }
    }

    /// `x` rounded to the nearest value of the format, ties to even, saturated to ±max as
    /// NVIDIA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, ·)` does; NaN stays NaN.
    pub fn round(self, x: f32) -> f32 {
        if x.is_nan() {
            return x;
        }
        let a = x.abs();
        if a == 0.0 {
            return x;
        }
        // The binary exponent of `a` (f32 subnormals lie far below every FP8 normal).
        let exponent = ((a.to_bits() >> 23) as i32 - 127).max(self.min_normal_exponent());
        let quantum = 2f32.powi(exponent - self.mantissa_bits());
        let r = ((a / quantum).round_ties_even() * quantum).min(self.max());
        r.copysign(x)
    }
}

/// The FP8 settings of a run (`mixed_precision.fp8`, `fp8_wgrad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Recipe {
    /// Activations and weights.
    pub forward: Fp8Format,
    /// Output gradients (E5M2 under "hybrid").
    pub gradient: Fp8Format,
    /// Whether the weight gradient is an FP8 GEMM too.
    pub wgrad: bool,
}

impl Fp8Recipe {
    /// The recipe of `mixed_precision.fp8` (`"hybrid"` or `"e4m3"`); None for other values.
    pub fn from_name(fp8: &str, wgrad: bool) -> Option<Self> {
        let gradient = match fp8 {
            "hybrid" => Fp8Format::E5M2,
            "e4m3" => Fp8Format::E4M3,
            _ => return None,
        };
        Some(Self { forward: Fp8Format::E4M3, gradient, wgrad })
    }
}

/// Transformer Engine's current scaling factor for a tensor whose largest magnitude is
/// `amax`, in f32 as the GPU computes it: `max / amax`, 1 for an all-zero (or non-finite)
/// tensor, f32::MAX where the division overflows.
pub fn scale_for(amax: f32, format: Fp8Format) -> f32 {
    if amax == 0.0 || !amax.is_finite() {
        return 1.0;
    }
    let scale = format.max() / amax;
    if scale.is_infinite() {
        f32::MAX
    } else {
        scale
    }
}

/// A tensor quantized with its own scale, held as f32 FP8 values (CPU reference).
struct Quantized {
    values: Tensor,
    scale_inv: f32,
}

fn quantize_cpu(x: &Tensor, format: Fp8Format) -> Result<Quantized> {
    let dims = x.dims().to_vec();
    let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let amax = v.iter().fold(0f32, |m, e| m.max(e.abs()));
    let scale = scale_for(amax, format);
    let q: Vec<f32> = v.iter().map(|e| format.round(e * scale)).collect();
    Ok(Quantized { values: Tensor::from_vec(q, dims, x.device())?, scale_inv: 1.0 / scale })
}

/// `a · bᵀ` of two quantized operands (`a` `[m, k]`, `b` `[n, k]`), scaled back, plus
/// `residual`, rounded to `dtype`.
fn gemm_cpu(
    a: &Quantized,
    b: &Quantized,
    residual: Option<&Tensor>,
    dtype: DType,
) -> Result<Tensor> {
    let d = a.values.matmul(&b.values.t()?)?;
    let d = d.affine(f64::from(a.scale_inv * b.scale_inv), 0.0)?;
    let d = match residual {
        Some(r) => (d + r.to_dtype(DType::F32)?)?,
        None => d,
    };
    d.to_dtype(dtype)
}

fn check_2d(what: &str, t: &Tensor) -> Result<(usize, usize)> {
    t.dims2().map_err(|_| {
        candle_core::Error::Msg(format!("fp8 {what}: expected a matrix, got shape {:?}", t.dims()))
    })
}

/// `x · Wᵀ (+ residual)` for `x` `[rows, in]`, `w` `[out, in]`, both quantized to
/// `recipe.forward`; the result has `x`'s dtype.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    residual: Option<&Tensor>,
    recipe: &Fp8Recipe,
) -> Result<Tensor> {
    check_2d("linear input", x)?;
    check_2d("linear weight", w)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::fp8::linear(x, w, residual, recipe);
    }
    let (qx, qw) = (quantize_cpu(x, recipe.forward)?, quantize_cpu(w, recipe.forward)?);
    gemm_cpu(&qx, &qw, residual, x.dtype())
}

/// The input gradient `dy · W` for `dy` `[rows, out]` (quantized to `recipe.gradient`) and
/// `w` `[out, in]` (to `recipe.forward`).
pub fn input_grad(dy: &Tensor, w: &Tensor, recipe: &Fp8Recipe) -> Result<Tensor> {
    check_2d("output gradient", dy)?;
    check_2d("linear weight", w)?;
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() {
        return super::cuda::fp8::input_grad(dy, w, recipe);
    }
    let (qd, qw) = (quantize_cpu(dy, recipe.gradient)?, quantize_cpu(&w.t()?, recipe.forward)?);
    gemm_cpu(&qd, &qw, None, dy.dtype())
}

/// Both gradients of a linear layer: [`input_grad`] and, when `x` is given (the weight
/// trains), [`weight_grad`]; on the GPU the output gradient is quantized once for both.
pub fn grads(
    dy: &Tensor,
    w: &Tensor,
    x: Option<&Tensor>,
    recipe: &Fp8Recipe,
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() && (recipe.wgrad || x.is_none()) {
        check_2d("output gradient", dy)?;
        check_2d("linear weight", w)?;
        return super::cuda::fp8::grads(dy, w, x, recipe);
    }
    let dw = x.map(|x| weight_grad(dy, x, recipe)).transpose()?;
    Ok((input_grad(dy, w, recipe)?, dw))
}

/// The weight gradient `dyᵀ · x` `[out, in]` in `x`'s dtype: an FP8 GEMM with
/// `recipe.wgrad`, else the plain product.
pub fn weight_grad(dy: &Tensor, x: &Tensor, recipe: &Fp8Recipe) -> Result<Tensor> {
    check_2d("output gradient", dy)?;
    check_2d("linear input", x)?;
    if !recipe.wgrad {
        return super::manual::weight_grad(dy, x);
    }
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() {
        return super::cuda::fp8::weight_grad(dy, x, recipe);
    }
    let qd = quantize_cpu(&dy.t()?, recipe.gradient)?;
    let qx = quantize_cpu(&x.t()?, recipe.forward)?;
    gemm_cpu(&qd, &qx, None, x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rounding_matches_the_formats() {
        let e4 = Fp8Format::E4M3;
        // Normal values: 3 mantissa bits (1.0, 1.125, ...), ties to even.
        assert_eq!(e4.round(1.0), 1.0);
        assert_eq!(e4.round(1.0625), 1.0); // halfway between 1.0 and 1.125: even is 1.0
        assert_eq!(e4.round(1.1875), 1.25); // halfway between 1.125 and 1.25: even is 1.25
        assert_eq!(e4.round(-3.3), -3.25);
        assert_eq!(e4.round(240.0), 240.0);
        assert_eq!(e4.round(440.0), 448.0);
        // Saturation instead of infinity.
        assert_eq!(e4.round(1e6), 448.0);
        assert_eq!(e4.round(-500.0), -448.0);
        // Subnormals: spacing 2^-9 below 2^-6.
        assert_eq!(e4.round(2f32.powi(-9)), 2f32.powi(-9));
        assert_eq!(e4.round(1.4 * 2f32.powi(-9)), 2f32.powi(-9));
        assert_eq!(e4.round(0.4 * 2f32.powi(-9)), 0.0);
        assert_eq!(e4.round(3.0 * 2f32.powi(-10)), 2.0 * 2f32.powi(-9)); // tie → even
        let e5 = Fp8Format::E5M2;
        assert_eq!(e5.round(1.125), 1.0); // halfway between 1.0 and 1.25
        assert_eq!(e5.round(1.375), 1.5);
        assert_eq!(e5.round(60000.0), 57344.0);
        assert_eq!(e5.round(2f32.powi(-16)), 2f32.powi(-16));
        assert!(e5.round(f32::NAN).is_nan());
        // Every value of the format rounds to itself, and values between two neighbours
        // round to one of them.
        for format in [e4, e5] {
            let mut values = vec![0f32];
            let mut v = 2f32.powi(format.min_normal_exponent() - format.mantissa_bits());
            while v <= format.max() {
                values.push(v);
                let exponent = ((v.to_bits() >> 23) as i32 - 127).max(format.min_normal_exponent());
                v += 2f32.powi(exponent - format.mantissa_bits());
            }
            assert_eq!(*values.last().unwrap(), format.max());
            for w in values.windows(2) {
                assert_eq!(format.round(w[0]), w[0]);
                let mid = 0.5 * (w[0] + w[1]);
                assert!([w[0], w[1]].contains(&format.round(mid * 0.999 + w[0] * 0.001)));
            }
        }
    }

    #[test]
    fn the_scale_maps_the_largest_magnitude_to_the_formats_maximum() {
        assert_eq!(scale_for(0.0, Fp8Format::E4M3), 1.0);
        assert_eq!(scale_for(448.0, Fp8Format::E4M3), 1.0);
        assert_eq!(scale_for(2.0, Fp8Format::E5M2), 28672.0);
        assert_eq!(scale_for(1e-45, Fp8Format::E4M3), f32::MAX);
    }

    #[test]
    fn fp8_gemms_approximate_the_exact_products() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (32, 48), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (16, 48), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1e-3, (32, 16), &dev).unwrap();
        let recipe = Fp8Recipe::from_name("hybrid", true).unwrap();
        let rel = |a: &Tensor, b: &Tensor| -> f32 {
            let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            (d / n).sqrt()
        };
        let y = linear(&x, &w, None, &recipe).unwrap();
        let e = rel(&y, &x.matmul(&w.t().unwrap()).unwrap());
        // E4M3 keeps ~3 bits: relative errors of a few percent per value, less in sums.
        assert!(e > 1e-4 && e < 0.05, "linear: {e}");
        let dx = input_grad(&dy, &w, &recipe).unwrap();
        let e = rel(&dx, &dy.matmul(&w).unwrap());
        assert!(e > 1e-4 && e < 0.1, "input grad: {e}");
        let dw = weight_grad(&dy, &x, &recipe).unwrap();
        let e = rel(&dw, &dy.t().unwrap().matmul(&x).unwrap());
        assert!(e > 1e-4 && e < 0.1, "weight grad: {e}");
        let exact = Fp8Recipe { wgrad: false, ..recipe };
        let dw = weight_grad(&dy, &x, &exact).unwrap();
        assert!(rel(&dw, &dy.t().unwrap().matmul(&x).unwrap()) < 1e-6);
    }
}
