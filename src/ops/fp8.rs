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
use std::sync::Arc;

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

/// The largest magnitude of a tensor about to be quantized, from the kernel that produced
/// the tensor (the fused SwiGLU forward and backward): the quantization then skips its own
/// pass over the tensor. It must be the exact maximum of the tensor's values as stored.
pub struct Fp8Amax(AmaxRepr);

enum AmaxRepr {
    Cpu(f32),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>),
}

impl Fp8Amax {
    /// The largest magnitude of a CPU tensor (as the CPU producers report it).
    pub fn of_cpu(t: &Tensor) -> Result<Self> {
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Self(AmaxRepr::Cpu(amax_of(&v))))
    }

    /// The device value a CUDA producer wrote.
    #[cfg(feature = "cuda")]
    pub fn cuda(amax: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>) -> Self {
        Self(AmaxRepr::Cuda(amax))
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn device_value(
        &self,
    ) -> Result<&candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>> {
        match &self.0 {
            AmaxRepr::Cuda(a) => Ok(a),
            AmaxRepr::Cpu(_) => candle_core::bail!("fp8: a CPU amax for a CUDA tensor"),
        }
    }

    fn host_value(&self) -> Result<f32> {
        match &self.0 {
            AmaxRepr::Cpu(a) => Ok(*a),
            #[cfg(feature = "cuda")]
            AmaxRepr::Cuda(_) => candle_core::bail!("fp8: a CUDA amax for a CPU tensor"),
        }
    }
}

/// The largest magnitude (NaN skipped, as `f32::max` and the GPU's `fmaxf` do).
fn amax_of(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, e| m.max(e.abs()))
}

/// A tensor quantized with its own scale, held as f32 FP8 values (CPU reference).
struct Quantized {
    values: Tensor,
    scale_inv: f32,
}

impl Quantized {
    /// The transposed values, with the same scale (quantizing is element-wise).
    fn transposed(&self) -> Result<Quantized> {
        Ok(Quantized { values: self.values.t()?, scale_inv: self.scale_inv })
    }
}

fn quantize_cpu(x: &Tensor, format: Fp8Format) -> Result<Quantized> {
    quantize_cpu_with(x, format, None)
}

/// [`quantize_cpu`] with the tensor's amax when its producer gave it.
fn quantize_cpu_with(x: &Tensor, format: Fp8Format, amax: Option<&Fp8Amax>) -> Result<Quantized> {
    let dims = x.dims().to_vec();
    let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let amax = match amax {
        Some(a) => a.host_value()?,
        None => amax_of(&v),
    };
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

/// An FP8 primary weight (`mixed_precision.fp8_param`, Transformer Engine's FP8 model
/// parameters): the matrix `x` (the f32 master, or initial values) cast to E4M3 with its own
/// current scale, the scale every GEMM operand gets, into the stored weight `var`
/// (`F8E4M3`, `x`'s shape; in place on a GPU). Returns `1 / scale` (`[1]` f32).
pub fn quantize_stored_into(x: &Tensor, var: &candle_core::Var) -> Result<Tensor> {
    check_2d("fp8 weight", x)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::fp8::quantize_stored_into(x, var.as_tensor());
    }
    let q = quantize_cpu(x, Fp8Format::E4M3)?;
    // Every value is an E4M3 value already: the conversion is exact.
    var.set(&q.values.to_dtype(DType::F8E4M3)?)?;
    Tensor::from_vec(vec![q.scale_inv], 1, x.device())
}

/// The f32 values of a stored FP8 weight (its E4M3 values times `1 / scale`).
pub fn dequantize_stored(data: &Tensor, scale_inv: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if data.device().is_cuda() {
        // candle's own FP8 casts are not built for every GPU; this one is.
        return super::cuda::fp8::widen_stored(data, Some(scale_inv));
    }
    data.to_dtype(DType::F32)?.broadcast_mul(&scale_inv.to_dtype(DType::F32)?)
}

/// A weight quantized for its layer's GEMMs: the forward reads it as it is, the input
/// gradient transposed. Clones share one copy, so the micro-batches of an optimizer step can
/// all use one quantization of weights that do not change between them (Transformer Engine
/// caches its FP8 weights across micro-batches the same way).
#[derive(Clone)]
pub struct Fp8Weight(WeightRepr);

#[derive(Clone)]
enum WeightRepr {
    Cpu(Arc<Quantized>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<super::cuda::fp8::Quantized>),
}

impl Fp8Weight {
    /// `w` `[out, in]` quantized to `recipe.forward` with its current scale.
    pub fn quantize(w: &Tensor, recipe: &Fp8Recipe) -> Result<Self> {
        check_2d("linear weight", w)?;
        #[cfg(feature = "cuda")]
        if w.device().is_cuda() {
            return Ok(Self(WeightRepr::Cuda(Arc::new(super::cuda::fp8::quantize_weight(
                w, recipe,
            )?))));
        }
        Ok(Self(WeightRepr::Cpu(Arc::new(quantize_cpu(w, recipe.forward)?))))
    }

    /// `w` quantized for the forward GEMM alone (a pass without a backward: evaluation),
    /// which skips writing the transposed values.
    pub fn quantize_for_forward(w: &Tensor, recipe: &Fp8Recipe) -> Result<Self> {
        check_2d("linear weight", w)?;
        #[cfg(feature = "cuda")]
        if w.device().is_cuda() {
            return Ok(Self(WeightRepr::Cuda(Arc::new(
                super::cuda::fp8::quantize_weight_for_forward(w, recipe)?,
            ))));
        }
        Ok(Self(WeightRepr::Cpu(Arc::new(quantize_cpu(w, recipe.forward)?))))
    }

    /// An FP8 primary weight ([`quantize_stored_into`]'s values and `1 / scale`) as a GEMM
    /// operand: the forward reads the values as they are stored; `transposed` also writes
    /// them transposed for the input gradient (a backward follows).
    pub fn from_stored(data: &Tensor, scale_inv: &Tensor, transposed: bool) -> Result<Self> {
        check_2d("stored fp8 weight", data)?;
        #[cfg(feature = "cuda")]
        if data.device().is_cuda() {
            return Ok(Self(WeightRepr::Cuda(Arc::new(super::cuda::fp8::weight_from_stored(
                data, scale_inv, transposed,
            )?))));
        }
        let _ = transposed;
        let values = data.to_dtype(DType::F32)?;
        let scale_inv = scale_inv.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
        Ok(Self(WeightRepr::Cpu(Arc::new(Quantized { values, scale_inv }))))
    }

    /// Whether another holder (a cache) shares these values.
    pub fn is_shared(&self) -> bool {
        match &self.0 {
            WeightRepr::Cpu(q) => Arc::strong_count(q) > 1,
            #[cfg(feature = "cuda")]
            WeightRepr::Cuda(q) => Arc::strong_count(q) > 1,
        }
    }
}

/// The quantized operands a linear layer's forward keeps for its backward: the weight (for
/// the input gradient) and, when the weight gradient is an FP8 GEMM of a trained weight, the
/// input. They hold exactly the values the backward would quantize again (the same tensors,
/// the same scales), in the orientation its GEMMs read: the backward skips two amax passes
/// and two casts per layer, and the input's FP8 copy takes half the bytes of the input.
pub struct Fp8Saved(Saved);

enum Saved {
    Cpu {
        weight: Arc<Quantized>,
        input: Option<Quantized>,
    },
    #[cfg(feature = "cuda")]
    Cuda(Box<super::cuda::fp8::Saved>),
}

impl Fp8Saved {
    /// Whether the input's FP8 values were kept (the weight gradient needs no input then).
    pub fn keeps_input(&self) -> bool {
        match &self.0 {
            Saved::Cpu { input, .. } => input.is_some(),
            #[cfg(feature = "cuda")]
            Saved::Cuda(s) => s.keeps_input(),
        }
    }

    /// The same without the input (which the backward then quantizes from the input it is
    /// given): for callers that recompute the input rather than keep it.
    pub fn without_input(self) -> Self {
        Self(match self.0 {
            Saved::Cpu { weight, .. } => Saved::Cpu { weight, input: None },
            #[cfg(feature = "cuda")]
            Saved::Cuda(s) => Saved::Cuda(Box::new(s.without_input())),
        })
    }
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
    linear_forward(x, &Fp8Weight::quantize_for_forward(w, recipe)?, residual, recipe, None)
}

/// [`linear`] of an already quantized weight, keeping nothing for a backward (evaluation):
/// the input's cast writes only the orientation the forward GEMM reads. `x_amax`: `x`'s
/// amax from its producer, if it gave one.
pub fn linear_forward(
    x: &Tensor,
    w: &Fp8Weight,
    residual: Option<&Tensor>,
    recipe: &Fp8Recipe,
    x_amax: Option<&Fp8Amax>,
) -> Result<Tensor> {
    check_2d("linear input", x)?;
    match &w.0 {
        #[cfg(feature = "cuda")]
        WeightRepr::Cuda(w) => {
            if !x.device().is_cuda() {
                candle_core::bail!("fp8 linear: a CUDA weight for a {:?} input", x.device());
            }
            let x_amax = x_amax.map(Fp8Amax::device_value).transpose()?;
            super::cuda::fp8::linear_forward(x, w, residual, recipe, x_amax)
        }
        WeightRepr::Cpu(qw) => {
            if !x.device().is_cpu() {
                candle_core::bail!("fp8 linear: a CPU weight for a {:?} input", x.device());
            }
            let qx = quantize_cpu_with(x, recipe.forward, x_amax)?;
            check_product_shapes(x, &qx, qw)?;
            gemm_cpu(&qx, qw, residual, x.dtype())
        }
    }
}

/// That `x · wᵀ` is defined: the CPU GEMM's inner dimensions agree.
fn check_product_shapes(x: &Tensor, qx: &Quantized, qw: &Quantized) -> Result<()> {
    if qx.values.dim(1)? != qw.values.dim(1)? {
        candle_core::bail!(
            "fp8 linear: x {:?} · wᵀ {:?}: shapes do not agree",
            x.dims(),
            qw.values.t()?.dims()
        );
    }
    Ok(())
}

/// [`linear`] of an already quantized weight, keeping it and, with `keep_input` (only under
/// `recipe.wgrad`), the quantized input for [`backward`]. `x_amax`: `x`'s amax from its
/// producer, if it gave one. A weight that nothing else shares keeps only what the backward
/// reads of it.
pub fn linear_saving(
    x: &Tensor,
    w: Fp8Weight,
    residual: Option<&Tensor>,
    recipe: &Fp8Recipe,
    keep_input: bool,
    x_amax: Option<&Fp8Amax>,
) -> Result<(Tensor, Fp8Saved)> {
    check_2d("linear input", x)?;
    let keep_input = keep_input && recipe.wgrad;
    match w.0 {
        #[cfg(feature = "cuda")]
        WeightRepr::Cuda(w) => {
            if !x.device().is_cuda() {
                candle_core::bail!("fp8 linear: a CUDA weight for a {:?} input", x.device());
            }
            let x_amax = x_amax.map(Fp8Amax::device_value).transpose()?;
            let (y, saved) =
                super::cuda::fp8::linear_saving(x, w, residual, recipe, keep_input, x_amax)?;
            Ok((y, Fp8Saved(Saved::Cuda(Box::new(saved)))))
        }
        WeightRepr::Cpu(qw) => {
            if !x.device().is_cpu() {
                candle_core::bail!("fp8 linear: a CPU weight for a {:?} input", x.device());
            }
            let qx = quantize_cpu_with(x, recipe.forward, x_amax)?;
            check_product_shapes(x, &qx, &qw)?;
            let y = gemm_cpu(&qx, &qw, residual, x.dtype())?;
            Ok((y, Fp8Saved(Saved::Cpu { weight: qw, input: keep_input.then_some(qx) })))
        }
    }
}

/// The input gradient `dy · W` for `dy` `[rows, out]` (quantized to `recipe.gradient`) and
/// `w` `[out, in]` (to `recipe.forward`).
pub fn input_grad(dy: &Tensor, w: &Tensor, recipe: &Fp8Recipe) -> Result<Tensor> {
    Ok(grads(dy, w, None, recipe)?.0)
}

/// Both gradients of a linear layer: [`input_grad`] and, when `x` is given (the weight
/// trains), [`weight_grad`]; on the GPU the output gradient is quantized once for both.
pub fn grads(
    dy: &Tensor,
    w: &Tensor,
    x: Option<&Tensor>,
    recipe: &Fp8Recipe,
) -> Result<(Tensor, Option<Tensor>)> {
    check_2d("linear weight", w)?;
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        let saved = super::cuda::fp8::Saved::of_weight(w, recipe)?;
        return backward(dy, Fp8Saved(Saved::Cuda(Box::new(saved))), x, recipe, None, None);
    }
    let saved = Saved::Cpu { weight: Arc::new(quantize_cpu(w, recipe.forward)?), input: None };
    backward(dy, Fp8Saved(saved), x, recipe, None, None)
}

/// The gradients of a linear layer from what its forward kept ([`linear_saving`]): the input
/// gradient, and the weight gradient when the input was kept or `x` (the forward input
/// `[rows, in]`) is given. Without `recipe.wgrad` the weight gradient is the plain product
/// of `x`. `dy_amax`: `dy`'s amax from its producer, if it gave one. The weight gradient
/// comes in the main-grad dtype ([`super::main_grads`]): f32 straight from the GEMM where
/// gradients are summed in f32, as Transformer Engine writes its FP8 wgrad into
/// megatron-core's fp32 `main_grad`, not rounded to bf16 first. With `dw_into` (a running
/// sum of this weight's gradients, a contiguous tensor of the caller's own in the main-grad
/// dtype) the weight gradient is added into it in place, inside the GEMM on the GPU, and the
/// returned weight gradient is `dw_into` itself.
pub fn backward(
    dy: &Tensor,
    saved: Fp8Saved,
    x: Option<&Tensor>,
    recipe: &Fp8Recipe,
    dy_amax: Option<&Fp8Amax>,
    dw_into: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    check_2d("output gradient", dy)?;
    if let Some(x) = x {
        check_2d("linear input", x)?;
    }
    let dw_dtype = super::main_grads::main_grad_dtype(dy.dtype());
    let dw_into = dw_into.filter(|c| c.dtype() == dw_dtype && c.is_contiguous());
    if !recipe.wgrad {
        let dw = match (x, dw_into) {
            (Some(x), Some(c)) if super::manual::add_weight_grad_into(c, dy, x)? => Some(c.clone()),
            (Some(x), _) => Some(super::manual::weight_grad(dy, x)?),
            (None, _) => None,
        };
        let no_input = Fp8Recipe { wgrad: true, ..*recipe };
        return Ok((backward(dy, saved.without_input(), None, &no_input, dy_amax, None)?.0, dw));
    }
    match saved.0 {
        #[cfg(feature = "cuda")]
        Saved::Cuda(saved) => {
            let dy_amax = dy_amax.map(Fp8Amax::device_value).transpose()?;
            super::cuda::fp8::backward(dy, *saved, x, recipe, dy_amax, dw_dtype, dw_into)
        }
        Saved::Cpu { weight, input } => {
            let qx = match (input, x) {
                (Some(q), _) => Some(q),
                (None, Some(x)) => Some(quantize_cpu(x, recipe.forward)?),
                (None, None) => None,
            };
            let qd = quantize_cpu_with(dy, recipe.gradient, dy_amax)?;
            let dx = gemm_cpu(&qd, &weight.transposed()?, None, dy.dtype())?;
            let dw = match qx {
                Some(qx) => {
                    let (a, b) = (qd.transposed()?, qx.transposed()?);
                    Some(match dw_into {
                        // The sum added in the GEMM's f32 result and rounded once, as the
                        // GPU's GEMM with beta = 1 does.
                        Some(c) => {
                            c.slice_set(&gemm_cpu(&a, &b, Some(c), dw_dtype)?, 0, 0)?;
                            c.clone()
                        }
                        None => gemm_cpu(&a, &b, None, dw_dtype)?,
                    })
                }
                None => None,
            };
            Ok((dx, dw))
        }
    }
}

/// The weight gradient `dyᵀ · x` `[out, in]` in the main-grad dtype (see [`backward`]): an
/// FP8 GEMM with `recipe.wgrad`, else the plain product.
pub fn weight_grad(dy: &Tensor, x: &Tensor, recipe: &Fp8Recipe) -> Result<Tensor> {
    check_2d("output gradient", dy)?;
    check_2d("linear input", x)?;
    if !recipe.wgrad {
        return super::manual::weight_grad(dy, x);
    }
    let out = super::main_grads::main_grad_dtype(dy.dtype());
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() {
        return super::cuda::fp8::weight_grad(dy, x, recipe, out);
    }
    let qd = quantize_cpu(&dy.t()?, recipe.gradient)?;
    let qx = quantize_cpu(&x.t()?, recipe.forward)?;
    gemm_cpu(&qd, &qx, None, out)
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

    /// A bf16 layer's FP8 weight gradient comes in the main-grad dtype: f32 from the GEMM's
    /// accumulator where gradients are summed in f32 (not rounded to bf16 first), bf16 under
    /// `grad_reduce_in_fp32 = false`; the input gradient stays in the layer's dtype.
    #[test]
    fn the_fp8_weight_gradient_comes_in_the_main_grad_dtype() {
        let dev = Device::Cpu;
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = bf(Tensor::randn(0f32, 1.0, (32, 48), &dev).unwrap());
        let w = bf(Tensor::randn(0f32, 0.05, (16, 48), &dev).unwrap());
        let dy = bf(Tensor::randn(0f32, 1e-3, (32, 16), &dev).unwrap());
        let recipe = Fp8Recipe::from_name("hybrid", true).unwrap();
        let dtypes = || {
            let q = Fp8Weight::quantize(&w, &recipe).unwrap();
            let (_, kept) = linear_saving(&x, q, None, &recipe, true, None).unwrap();
            let (dx, dw) = backward(&dy, kept, None, &recipe, None, None).unwrap();
            let fresh = weight_grad(&dy, &x, &recipe).unwrap();
            (dx.dtype(), dw.unwrap().dtype(), fresh.dtype())
        };
        let f32_sums = dtypes();
        assert_eq!(f32_sums, (DType::BF16, DType::F32, DType::F32));
        let _bf16 = crate::ops::main_grads::bf16_main_grads(true);
        assert_eq!(dtypes(), (DType::BF16, DType::BF16, DType::BF16));
    }

    /// A linear layer's input `x` `[32, 48]`, weight `[16, 48]` and output gradient, f32.
    fn linear_operands() -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (32, 48), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (16, 48), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1e-3, (32, 16), &dev).unwrap();
        (x, w, dy)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// With a running sum to add into, the FP8 weight gradient is added into that tensor in
    /// place (the same tensor comes back) and equals the sum plus the fresh gradient, rounded
    /// once; also where the weight gradient is not FP8 (`wgrad` off).
    #[test]
    fn the_fp8_weight_gradient_adds_into_a_running_sum() {
        let (x, w, dy) = linear_operands();
        for wgrad in [true, false] {
            let recipe = Fp8Recipe { wgrad, ..Fp8Recipe::from_name("hybrid", true).unwrap() };
            let fresh = weight_grad(&dy, &x, &recipe).unwrap();
            let sum = Tensor::randn(0f32, 1e-2, (16, 48), &Device::Cpu).unwrap();
            let before = sum.copy().unwrap();
            let q = Fp8Weight::quantize(&w, &recipe).unwrap();
            let (_, kept) = linear_saving(&x, q, None, &recipe, true, None).unwrap();
            let (_, dw) = backward(&dy, kept, Some(&x), &recipe, None, Some(&sum)).unwrap();
            let dw = dw.unwrap();
            assert_eq!(dw.id(), sum.id(), "the sum itself comes back");
            let want = (&before + &fresh).unwrap();
            let d = max_abs_diff(&sum, &want);
            assert!(d < 1e-9, "wgrad {wgrad}: {d}");
            assert!(max_abs_diff(&sum, &before) > 0.0);
        }
    }

    #[test]
    fn fp8_gemms_approximate_the_exact_products() {
        let (x, w, dy) = linear_operands();
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
        // What the forward keeps gives the very gradients the backward would compute anew.
        let exact_eq = |a: &Tensor, b: &Tensor| {
            assert_eq!(max_abs_diff(a, b), 0.0);
        };
        let (dx_new, dw_new) = grads(&dy, &w, Some(&x), &recipe).unwrap();
        let qw = || Fp8Weight::quantize(&w, &recipe).unwrap();
        let (y_kept, kept) = linear_saving(&x, qw(), None, &recipe, true, None).unwrap();
        exact_eq(&y_kept, &y);
        assert!(kept.keeps_input());
        let (dx_kept, dw_kept) = backward(&dy, kept, None, &recipe, None, None).unwrap();
        exact_eq(&dx_kept, &dx_new);
        exact_eq(&dw_kept.unwrap(), &dw_new.unwrap());
        let (_, kept) = linear_saving(&x, qw(), None, &recipe, true, None).unwrap();
        let (_, no_dw) = backward(&dy, kept.without_input(), None, &recipe, None, None).unwrap();
        assert!(no_dw.is_none());
        // An amax from the producer is the one the quantization uses.
        let amax = Fp8Amax::of_cpu(&x).unwrap();
        let (y_given, _) = linear_saving(&x, qw(), None, &recipe, false, Some(&amax)).unwrap();
        exact_eq(&y_given, &y);
        // Not a power of two: that would only shift the exponents, not the rounding.
        let other = Fp8Amax(AmaxRepr::Cpu(1.5 * amax.host_value().unwrap()));
        let (y_other, _) = linear_saving(&x, qw(), None, &recipe, false, Some(&other)).unwrap();
        assert!(rel(&y_other, &y) > 1e-4, "the given amax was not used");
        let exact = Fp8Recipe { wgrad: false, ..recipe };
        let (_, kept) = linear_saving(&x, qw(), None, &exact, true, None).unwrap();
        assert!(!kept.keeps_input(), "a high-precision weight gradient needs no FP8 input");
        let dw = weight_grad(&dy, &x, &exact).unwrap();
        assert!(rel(&dw, &dy.t().unwrap().matmul(&x).unwrap()) < 1e-6);
    }
}
