//! The CUDA side of `ops::fp8`: tensorwise current-scaling quantization (kernels/fp8.cu) and
//! the three GEMMs of a linear layer on Hopper's FP8 tensor cores (`gemm_lt::fp8_gemm`).
//!
//! Hopper takes both FP8 operands K-major, so each GEMM wants its own orientation of the
//! tensors: the forward `x·Wᵀ` reads x and W as they are, the input gradient `dy·W` reads dy
//! and Wᵀ, the weight gradient `dyᵀ·x` reads dyᵀ and xᵀ. One pass writes an operand's FP8
//! values in the orientations asked for; the scale never leaves the GPU.

use super::gemm_lt::{fp8_gemm, fp8_gemm_into, Fp8Matrix};
use super::{contiguous_view, cuda_storage, dtype_suffix, elementwise_blocks, wrap};
use crate::ops::fp8::{Fp8Format, Fp8Recipe};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

crate::kernel_module!(MODULE, "fp8");

/// A matrix quantized with its own scale: its FP8 values row-major and/or transposed.
pub(crate) struct Quantized {
    rows: usize,
    cols: usize,
    e5m2: bool,
    data: Option<RowMajor>,
    data_t: Option<CudaSlice<u8>>,
    scale_inv: CudaSlice<f32>,
}

/// Where the row-major FP8 values live.
enum RowMajor {
    /// Written for this GEMM.
    Owned(CudaSlice<u8>),
    /// An FP8 primary weight's own storage (`F8E4M3`, contiguous), read in place.
    Stored(Tensor),
}

impl Quantized {
    /// `f` of the row-major values as a GEMM operand (`[rows, cols]`, K = cols).
    fn with_matrix<R>(&self, f: impl FnOnce(&Fp8Matrix<'_>) -> Result<R>) -> Result<R> {
        let operand = |data| Fp8Matrix {
            data,
            e5m2: self.e5m2,
            scale_inv: self.scale_inv.slice(..),
            rows: self.rows,
        };
        match self.data.as_ref().expect("quantized row-major") {
            RowMajor::Owned(data) => f(&operand(data.slice(..))),
            RowMajor::Stored(t) => {
                let (s, l) = t.storage_and_layout();
                let view =
                    contiguous_view::<float8::F8E4M3>(cuda_storage(&s, "fp8 weight")?, l, "fp8")?;
                // SAFETY: F8E4M3 is one byte, as u8; the view covers exactly rows × cols.
                let bytes = unsafe { view.transmute::<u8>(self.rows * self.cols) }
                    .ok_or_else(|| candle_core::Error::Msg("fp8 weight: short storage".into()))?;
                f(&operand(bytes))
            }
        }
    }

    /// The transposed values as a GEMM operand (`[cols, rows]`, K = rows).
    fn transposed(&self) -> Fp8Matrix<'_> {
        let data = self.data_t.as_ref().expect("quantized transposed");
        Fp8Matrix {
            data: data.slice(..),
            e5m2: self.e5m2,
            scale_inv: self.scale_inv.slice(..),
            rows: self.cols,
        }
    }
}

/// Quantizes the matrix `x` (bf16/f16/f32, any layout) to `format` with its current scale,
/// writing the row-major values if `row_major` and the transposed ones if `transposed`.
fn quantize(x: &Tensor, format: Fp8Format, row_major: bool, transposed: bool) -> Result<Quantized> {
    quantize_with(x, format, row_major, transposed, None)
}

/// [`quantize`] with `x`'s amax when its producer computed it (no amax pass then).
fn quantize_with(
    x: &Tensor,
    format: Fp8Format,
    row_major: bool,
    transposed: bool,
    known_amax: Option<&CudaSlice<f32>>,
) -> Result<Quantized> {
    let (rows, cols) = x.dims2()?;
    let x = x.contiguous()?;
    let dev = x.device().as_cuda_device()?.clone();
    let n = rows * cols;
    let computed = match known_amax {
        Some(_) => None,
        None => Some(dev.alloc_zeros::<f32>(1)?),
    };
    let amax = known_amax.or(computed.as_ref()).expect("one of them is set");
    // SAFETY: written by the cast kernel below before anything reads them.
    let (data, data_t, scale_inv) = unsafe {
        (
            if row_major { Some(dev.alloc::<u8>(n)?) } else { None },
            if transposed { Some(dev.alloc::<u8>(n)?) } else { None },
            dev.alloc::<f32>(1)?,
        )
    };
    let stream = dev.cuda_stream();
    let out = data.as_ref().map(|d| d.device_ptr(&stream));
    let out_t = data_t.as_ref().map(|d| d.device_ptr(&stream));
    // A null pointer tells the kernel to skip that orientation.
    let (a, a_t) = (out.as_ref().map_or(0, |p| p.0), out_t.as_ref().map_or(0, |p| p.0));
    cast(&x, format, amax, computed.is_some(), a, a_t, &scale_inv)?;
    drop((out, out_t));
    let data = data.map(RowMajor::Owned);
    Ok(Quantized { rows, cols, e5m2: format == Fp8Format::E5M2, data, data_t, scale_inv })
}

/// The amax pass (into `amax`, zeroed, when `compute_amax`) and the cast of the matrix `x`
/// (contiguous) with the scale of `amax`, writing the FP8 values to the device addresses
/// `out` (row-major) and `out_t` (transposed), each skipped when 0, and `1 / scale` to
/// `scale_inv`.
fn cast(
    x: &Tensor,
    format: Fp8Format,
    amax: &CudaSlice<f32>,
    compute_amax: bool,
    out: u64,
    out_t: u64,
    scale_inv: &CudaSlice<f32>,
) -> Result<()> {
    let (rows, cols) = x.dims2()?;
    let dev = device(x)?;
    let suffix = dtype_suffix(x.dtype())?;
    let n = rows * cols;
    let (s, l) = x.storage_and_layout();
    let s = cuda_storage(&s, "fp8 quantize")?;
    let (n64, r64, c64) = (n as u64, rows as u64, cols as u64);
    let e5m2 = format == Fp8Format::E5M2;
    crate::with_float_type!(x.dtype(), T, {
        let xv = contiguous_view::<T>(s, l, "fp8 quantize")?;
        if compute_amax {
            let f = crate::function!(&dev, &MODULE, &format!("fp8_amax_{suffix}"))?;
            let mut b = f.builder();
            b.arg(&xv).arg(&n64).arg(amax);
            let cfg = LaunchConfig {
                grid_dim: (elementwise_blocks(n / 8, 256).min(2048), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument list matches `fp8_amax_*` in kernels/fp8.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        // 64×64 tiles with 16-byte accesses where the shape and alignment allow them.
        let tiled = rows % 64 == 0
            && cols % 64 == 0
            && x.dtype().size_in_bytes() == 2
            && (l.start_offset() * 2) % 16 == 0;
        let kind = if tiled { "cast64" } else { "cast" };
        let name = format!("fp8_{kind}_{}_{suffix}", if e5m2 { "e5m2" } else { "e4m3" });
        let f = crate::function!(&dev, &MODULE, &name)?;
        let mut b = f.builder();
        b.arg(&xv).arg(&r64).arg(&c64).arg(amax).arg(&out).arg(&out_t).arg(scale_inv);
        let cfg = if tiled {
            LaunchConfig {
                grid_dim: ((cols / 64) as u32, (rows / 64) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            LaunchConfig {
                grid_dim: (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            }
        };
        // SAFETY: argument list matches `fp8_cast_*` in kernels/fp8.cu; the outputs hold
        // rows × cols bytes each.
        unsafe { b.launch(cfg) }.w()?;
    });
    Ok(())
}

/// An FP8 primary weight (see `ops::fp8::quantize_stored_into`): the matrix `x` cast to E4M3
/// with its own scale straight into `dst` (a contiguous `F8E4M3` matrix of `x`'s shape, the
/// weight's own storage); returns `1 / scale` (`[1]` f32).
pub(crate) fn quantize_stored_into(x: &Tensor, dst: &Tensor) -> Result<Tensor> {
    let (rows, cols) = x.dims2()?;
    if dst.dims() != [rows, cols] || dst.dtype() != DType::F8E4M3 || !dst.is_contiguous() {
        candle_core::bail!(
            "fp8 weight: cast of a {:?} value into a {:?} {:?} weight",
            x.dims(),
            dst.dims(),
            dst.dtype()
        )
    }
    let x = x.contiguous()?;
    let dev = device(&x)?;
    let amax = dev.alloc_zeros::<f32>(1)?;
    // SAFETY: written by the cast kernel before anything reads it.
    let scale_inv = unsafe { dev.alloc::<f32>(1)? };
    let stream = dev.cuda_stream();
    let (s, l) = dst.storage_and_layout();
    let bytes = contiguous_view::<float8::F8E4M3>(cuda_storage(&s, "fp8 weight")?, l, "fp8")?;
    {
        // Written in place through the view, as the fused optimizer writes its parameters.
        let (out, _guard) = bytes.device_ptr(&stream);
        cast(&x, Fp8Format::E4M3, &amax, true, out, 0, &scale_inv)?;
    }
    Ok(wrap(scale_inv, &dev, 1))
}

/// A stored FP8 weight `data` (`F8E4M3`, with its `1 / scale`) as a GEMM operand: the
/// forward reads the storage in place; with `transposed` its bytes are also written
/// transposed for the input gradient. That cast reads the values widened to f16 (exact for
/// every E4M3 value) with a scale of exactly 1, so it moves the bytes unchanged.
pub(crate) fn weight_from_stored(
    data: &Tensor,
    scale_inv: &Tensor,
    transposed: bool,
) -> Result<Quantized> {
    let (rows, cols) = data.dims2()?;
    if data.dtype() != DType::F8E4M3 || !data.is_contiguous() {
        candle_core::bail!(
            "fp8 weight: expected a contiguous F8E4M3 matrix, got {:?}",
            data.dtype()
        )
    }
    let dev = device(data)?;
    let data_t = if transposed {
        let unscaled = widen_stored(data, None)?;
        let stream = dev.cuda_stream();
        // Set on the device: a copy from the host would wait for the GPU to catch up.
        let unit = f32_copy(&Tensor::full(Fp8Format::E4M3.max(), 1, data.device())?)?;
        // SAFETY: written by the cast kernel before anything reads them.
        let (t, ignored) = unsafe { (dev.alloc::<u8>(rows * cols)?, dev.alloc::<f32>(1)?) };
        {
            let (out_t, _guard) = t.device_ptr(&stream);
            cast(&unscaled, Fp8Format::E4M3, &unit, false, 0, out_t, &ignored)?;
        }
        Some(t)
    } else {
        None
    };
    Ok(Quantized {
        rows,
        cols,
        e5m2: false,
        data: Some(RowMajor::Stored(data.clone())),
        data_t,
        scale_inv: f32_copy(scale_inv)?,
    })
}

/// The values of a stored weight `data` (`F8E4M3`) times `scale_inv` as f32, or unscaled as
/// f16 without it (exact).
pub(crate) fn widen_stored(data: &Tensor, scale_inv: Option<&Tensor>) -> Result<Tensor> {
    let data = data.contiguous()?;
    let dev = device(&data)?;
    let n = data.elem_count();
    let (s, l) = data.storage_and_layout();
    let bytes = contiguous_view::<float8::F8E4M3>(cuda_storage(&s, "fp8 widen")?, l, "fp8 widen")?;
    let scale = scale_inv.map(f32_copy).transpose()?;
    let null = 0u64;
    let cfg = LaunchConfig {
        grid_dim: (elementwise_blocks(n, 256).min(4096), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! launch {
        ($t:ty, $suffix:literal) => {{
            // SAFETY: every element is written by the kernel below.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let f = crate::function!(&dev, &MODULE, concat!("fp8_e4m3_widen_", $suffix))?;
            let mut b = f.builder();
            let n64 = n as u64;
            b.arg(&bytes).arg(&n64);
            match &scale {
                Some(sc) => b.arg(sc),
                None => b.arg(&null),
            };
            b.arg(&out);
            // SAFETY: argument list matches `fp8_e4m3_widen_*` in kernels/fp8.cu.
            unsafe { b.launch(cfg) }.w()?;
            wrap(out, &dev, data.shape().clone())
        }};
    }
    Ok(match scale_inv {
        Some(_) => launch!(f32, "f32"),
        None => launch!(half::f16, "f16"),
    })
}

/// A device copy of the f32 tensor `t` (a scale or amax).
fn f32_copy(t: &Tensor) -> Result<CudaSlice<f32>> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let view = contiguous_view::<f32>(cuda_storage(&s, "fp8 scale")?, l, "fp8 scale")?;
    device(&t)?.cuda_stream().clone_dtod(&view).w()
}

fn device(t: &Tensor) -> Result<CudaDevice> {
    Ok(t.device().as_cuda_device()?.clone())
}

/// What a linear layer's forward keeps for the backward (see `ops::fp8::Fp8Saved`): the
/// weight quantized transposed and, for an FP8 weight gradient, the input quantized
/// transposed (the orientations of the input- and weight-gradient GEMMs).
pub struct Saved {
    weight_t: Arc<Quantized>,
    input_t: Option<Quantized>,
}

impl Saved {
    /// The weight alone, quantized for the input gradient.
    pub fn of_weight(w: &Tensor, recipe: &Fp8Recipe) -> Result<Self> {
        let weight_t = Arc::new(quantize(w, recipe.forward, false, true)?);
        Ok(Self { weight_t, input_t: None })
    }

    pub fn keeps_input(&self) -> bool {
        self.input_t.is_some()
    }

    pub fn without_input(self) -> Self {
        Self { input_t: None, ..self }
    }
}

impl Quantized {
    /// Only the transposed values (the row-major ones freed).
    fn transposed_only(self) -> Self {
        Self { data: None, ..self }
    }
}

/// `x·Wᵀ (+ residual)` of a weight quantized for the forward (see
/// `ops::fp8::linear_forward`): the cast of `x` writes its row-major values only. The fast
/// accumulator, as Transformer Engine's forward GEMMs.
pub(crate) fn linear_forward(
    x: &Tensor,
    qw: &Quantized,
    residual: Option<&Tensor>,
    recipe: &Fp8Recipe,
    x_amax: Option<&CudaSlice<f32>>,
) -> Result<Tensor> {
    let qx = quantize_with(x, recipe.forward, true, false, x_amax)?;
    forward_gemm(&qx, qw, residual, x)
}

/// A weight quantized for the forward GEMM alone (row-major).
pub(crate) fn quantize_weight_for_forward(w: &Tensor, recipe: &Fp8Recipe) -> Result<Quantized> {
    quantize(w, recipe.forward, true, false)
}

/// A weight quantized in both orientations: row-major for the forward GEMM, transposed for
/// the input gradient's.
pub(crate) fn quantize_weight(w: &Tensor, recipe: &Fp8Recipe) -> Result<Quantized> {
    quantize(w, recipe.forward, true, true)
}

/// [`linear`] of a weight quantized by [`quantize_weight`], whose cast of `x` also writes
/// its transposed values with `keep_input`: one pass over the input for both GEMMs that read
/// it. The backward keeps the weight's transposed values, all of it when a cache shares it.
pub(crate) fn linear_saving(
    x: &Tensor,
    qw: Arc<Quantized>,
    residual: Option<&Tensor>,
    recipe: &Fp8Recipe,
    keep_input: bool,
    x_amax: Option<&CudaSlice<f32>>,
) -> Result<(Tensor, Saved)> {
    let qx = quantize_with(x, recipe.forward, true, keep_input, x_amax)?;
    let y = forward_gemm(&qx, &qw, residual, x)?;
    let input_t = keep_input.then(|| qx.transposed_only());
    // Nobody else holds a weight quantized for this GEMM alone: free its row-major values.
    let weight_t = match Arc::try_unwrap(qw) {
        Ok(q) => Arc::new(q.transposed_only()),
        Err(shared) => shared,
    };
    Ok((y, Saved { weight_t, input_t }))
}

fn forward_gemm(
    qx: &Quantized,
    qw: &Quantized,
    residual: Option<&Tensor>,
    x: &Tensor,
) -> Result<Tensor> {
    if qx.cols != qw.cols {
        candle_core::bail!(
            "fp8 linear: x {:?} · wᵀ [{}, {}]: shapes do not agree",
            x.dims(),
            qw.cols,
            qw.rows
        );
    }
    let dev = device(x)?;
    qw.with_matrix(|w| {
        qx.with_matrix(|xm| fp8_gemm(w, xm, qx.cols, residual, x.dtype(), true, &dev))
    })
}

/// `dy·W` from the quantized output gradient (row-major) and weight (transposed).
fn dgrad(qd: &Quantized, qw: &Quantized, dy: &Tensor) -> Result<Tensor> {
    if qd.cols != qw.rows {
        candle_core::bail!(
            "fp8 input grad: dy {:?} · w [{}, {}]: shapes do not agree",
            dy.dims(),
            qw.rows,
            qw.cols
        );
    }
    let dev = device(dy)?;
    qd.with_matrix(|d| fp8_gemm(&qw.transposed(), d, qd.cols, None, dy.dtype(), false, &dev))
}

/// `dyᵀ·x` from the quantized output gradient and input (both transposed), as `out`, or
/// added in place into `into` (then returned) when given.
fn wgrad(
    qd: &Quantized,
    qx: &Quantized,
    dy: &Tensor,
    out: DType,
    into: Option<&Tensor>,
) -> Result<Tensor> {
    if qd.rows != qx.rows {
        candle_core::bail!(
            "fp8 weight grad: dyᵀ {:?} · x [{}, {}]: shapes do not agree",
            dy.dims(),
            qx.rows,
            qx.cols
        );
    }
    let (a, b, k) = (qx.transposed(), qd.transposed(), qd.rows);
    match into {
        Some(c) => {
            fp8_gemm_into(&a, &b, k, c, false, &device(dy)?)?;
            Ok(c.clone())
        }
        None => fp8_gemm(&a, &b, k, None, out, false, &device(dy)?),
    }
}

/// The input gradient `dy·W` and the weight gradient `dyᵀ·x` (as `dw_dtype`, or added into
/// `dw_into`) from the kept input or else `x` (see `ops::fp8::backward`): dy is quantized
/// once, in both orientations, with the amax its producer computed if it did.
pub fn backward(
    dy: &Tensor,
    saved: Saved,
    x: Option<&Tensor>,
    recipe: &Fp8Recipe,
    dy_amax: Option<&CudaSlice<f32>>,
    dw_dtype: DType,
    dw_into: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    let qx = match (saved.input_t, x) {
        (Some(q), _) => Some(q),
        (None, Some(x)) => Some(quantize(x, recipe.forward, false, true)?),
        (None, None) => None,
    };
    let qd = quantize_with(dy, recipe.gradient, true, qx.is_some(), dy_amax)?;
    let dx = dgrad(&qd, &saved.weight_t, dy)?;
    let dw = qx.map(|qx| wgrad(&qd, &qx, dy, dw_dtype, dw_into)).transpose()?;
    Ok((dx, dw))
}

/// `dyᵀ·x` as `out` (see `ops::fp8::weight_grad`).
pub fn weight_grad(dy: &Tensor, x: &Tensor, recipe: &Fp8Recipe, out: DType) -> Result<Tensor> {
    let qd = quantize(dy, recipe.gradient, false, true)?;
    wgrad(&qd, &quantize(x, recipe.forward, false, true)?, dy, out, None)
}
