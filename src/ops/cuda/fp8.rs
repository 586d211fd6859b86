//! The CUDA side of `ops::fp8`: tensorwise current-scaling quantization (kernels/fp8.cu) and
//! the three GEMMs of a linear layer on Hopper's FP8 tensor cores (`gemm_lt::fp8_gemm`).
//!
//! Hopper takes both FP8 operands K-major, so each GEMM wants its own orientation of the
//! tensors: the forward `x·Wᵀ` reads x and W as they are, the input gradient `dy·W` reads dy
//! and Wᵀ, the weight gradient `dyᵀ·x` reads dyᵀ and xᵀ. One pass writes an operand's FP8
//! values in the orientations asked for; the scale never leaves the GPU.

use super::gemm_lt::{fp8_gemm, fp8_gemm_into, Fp8Matrix};
use super::{contiguous_view, cuda_storage, dtype_suffix, elementwise_blocks};
use crate::ops::fp8::{Fp8Format, Fp8Recipe};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

crate::kernel_module!(MODULE, "fp8");

/// A matrix quantized with its own scale: its FP8 values row-major and/or transposed.
pub(crate) struct Quantized {
    rows: usize,
    cols: usize,
    e5m2: bool,
    data: Option<CudaSlice<u8>>,
    data_t: Option<CudaSlice<u8>>,
    scale_inv: CudaSlice<f32>,
}

impl Quantized {
    /// The row-major values as a GEMM operand (`[rows, cols]`, K = cols).
    fn matrix(&self) -> Fp8Matrix<'_> {
        let data = self.data.as_ref().expect("quantized row-major");
        Fp8Matrix {
            data: data.slice(..),
            e5m2: self.e5m2,
            scale_inv: self.scale_inv.slice(..),
            rows: self.rows,
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
    let suffix = dtype_suffix(x.dtype())?;
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
    let (s, l) = x.storage_and_layout();
    let s = cuda_storage(&s, "fp8 quantize")?;
    let (n64, r64, c64) = (n as u64, rows as u64, cols as u64);
    let e5m2 = format == Fp8Format::E5M2;
    crate::with_float_type!(x.dtype(), T, {
        let xv = contiguous_view::<T>(s, l, "fp8 quantize")?;
        if let Some(amax) = &computed {
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
        // A null pointer tells the kernel to skip that orientation.
        let null = 0u64;
        let mut b = f.builder();
        b.arg(&xv).arg(&r64).arg(&c64).arg(amax);
        match &data {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        match &data_t {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        b.arg(&scale_inv);
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
    Ok(Quantized { rows, cols, e5m2, data, data_t, scale_inv })
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
    fp8_gemm(&qw.matrix(), &qx.matrix(), qx.cols, residual, x.dtype(), true, &device(x)?)
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
    fp8_gemm(&qw.transposed(), &qd.matrix(), qd.cols, None, dy.dtype(), false, &device(dy)?)
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
