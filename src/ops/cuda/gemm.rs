//! cuBLAS GemmEx products that candle's `matmul` cannot express:
//! - weight gradients `dyᵀ·x` of half-precision linears written straight in the main-grad
//!   dtype (`ops::main_grads`): f32, as Megatron's fp32 `main_grad` buffers receive them (no
//!   half-precision gradient is written, rounded, and converted afterwards), or bf16;
//! - `c += alpha·a·op(b)` into an existing half-precision tensor (GEMM with beta = 1), so an
//!   adapter's low-rank term joins the base layer's output without a separate add pass over it;
//! - weight gradients added into the step's running sum in place (beta = 1).

use super::{cuda_storage, dptr, wrap};
use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
use candle_core::{DType, Result, Tensor};
use std::ffi::c_void;

/// The cuBLAS type of a half-precision operand pair.
fn half_type(a: &Tensor, b: &Tensor, what: &str) -> Result<sys::cudaDataType> {
    match (a.dtype(), b.dtype()) {
        (DType::BF16, DType::BF16) => Ok(sys::cudaDataType::CUDA_R_16BF),
        (DType::F16, DType::F16) => Ok(sys::cudaDataType::CUDA_R_16F),
        (x, y) => candle_core::bail!("{what} GEMM: dtypes {x:?} and {y:?}"),
    }
}

fn to_i32(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("GEMM dimension {v} too large")))
}

/// One column-major operand of [`gemm`]: a contiguous tensor, whether cuBLAS transposes it,
/// and its leading dimension.
struct Operand<'a> {
    t: &'a Tensor,
    trans: bool,
    ld: usize,
}

impl Operand<'_> {
    fn op(&self) -> sys::cublasOperation_t {
        if self.trans {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    }
}

/// Column-major `C[m, n] = alpha·op(A)·op(B) + beta·C` (f32 compute) into the buffer at
/// device pointer `c` (type `c_ty`, leading dimension `m`), on candle's stream.
#[allow(clippy::too_many_arguments)]
fn gemm(
    a: Operand,
    b: Operand,
    c: u64,
    c_ty: sys::cudaDataType,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
    what: &str,
) -> Result<()> {
    let ty = half_type(a.t, b.t, what)?;
    let dev = a.t.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (sa, la) = a.t.storage_and_layout();
    let (sb, lb) = b.t.storage_and_layout();
    let (pa, _g1) = dptr(cuda_storage(&sa, what)?, &stream, la.start_offset())?;
    let (pb, _g2) = dptr(cuda_storage(&sb, what)?, &stream, lb.start_offset())?;
    // SAFETY: the pointers address live buffers of the sizes implied by m, n, k and the
    // leading dimensions (checked by the callers against the tensors' shapes); the handle
    // runs on candle's stream, like every other kernel.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            a.op(),
            b.op(),
            to_i32(m)?,
            to_i32(n)?,
            to_i32(k)?,
            (&alpha as *const f32).cast::<c_void>(),
            pa as *const c_void,
            ty,
            to_i32(a.ld)?,
            pb as *const c_void,
            ty,
            to_i32(b.ld)?,
            (&beta as *const f32).cast::<c_void>(),
            c as *mut c_void,
            c_ty,
            to_i32(m)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("{what} GEMM: {e:?}")))
}

/// Row-major `C[rows, n] = alpha · a · op(b) + beta · C` at device pointer `c` for `a`
/// `[rows, k]` and `b` `[n, k]` (`b_transposed`) or `[k, n]`: cuBLAS's column-major
/// `C[n, rows] = op(B)[n, k] · A[k, rows]`.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    a: &Tensor,
    b: &Tensor,
    b_transposed: bool,
    c: u64,
    c_ty: sys::cudaDataType,
    (rows, n, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    what: &str,
) -> Result<()> {
    gemm(
        Operand { t: b, trans: b_transposed, ld: if b_transposed { k } else { n } },
        Operand { t: a, trans: false, ld: k },
        c,
        c_ty,
        (n, rows, k),
        alpha,
        beta,
        what,
    )
}

/// `(out, in)` of `dyᵀ · x` for half-precision `dy` `[rows, out]` and `x` `[rows, in]`, and
/// the cuBLAS type of a result in `out_dtype` (f32 or the inputs' own dtype).
fn weight_grad_shape(
    dy: &Tensor,
    x: &Tensor,
    out_dtype: DType,
) -> Result<((usize, usize), sys::cudaDataType)> {
    let (rows, out) = dy.dims2()?;
    let (rows_x, inp) = x.dims2()?;
    if rows != rows_x {
        candle_core::bail!("weight gradient GEMM: dy {:?} with x {:?}", dy.dims(), x.dims());
    }
    let c_ty = match out_dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        d if d == dy.dtype() => half_type(dy, x, "weight gradient")?,
        d => candle_core::bail!("weight gradient GEMM: {d:?} output for {:?} inputs", dy.dtype()),
    };
    Ok(((out, inp), c_ty))
}

/// `C = alpha · dyᵀ · x + beta · C` into the row-major `[out, in]` buffer at `c`.
fn weight_grad_gemm(
    dy: &Tensor,
    x: &Tensor,
    c: u64,
    c_ty: sys::cudaDataType,
    (alpha, beta): (f32, f32),
) -> Result<()> {
    let (rows, out) = dy.dims2()?;
    let inp = x.dim(1)?;
    let (dy, x) = (dy.contiguous()?, x.contiguous()?);
    // Column-major view: C[in, out] = X[in, rows] · DYᵀ[rows, out], i.e. the row-major
    // [out, in] result.
    gemm(
        Operand { t: &x, trans: false, ld: inp },
        Operand { t: &dy, trans: true, ld: out },
        c,
        c_ty,
        (inp, out, rows),
        alpha,
        beta,
        "weight gradient",
    )
}

/// `[out, in]` = `alpha · dyᵀ · x` for half-precision `dy` `[rows, out]` and `x` `[rows, in]`,
/// written by the GEMM as `out_dtype`: f32 or the inputs' own dtype.
pub fn weight_grad(dy: &Tensor, x: &Tensor, alpha: f32, out_dtype: DType) -> Result<Tensor> {
    let ((out, inp), c_ty) = weight_grad_shape(dy, x, out_dtype)?;
    let dev = dy.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    crate::with_float_type!(out_dtype, T, {
        // SAFETY: fully written by the GEMM below (beta = 0).
        let mut c = unsafe { dev.alloc::<T>(out * inp)? };
        {
            let (pc, _g) = c.device_ptr_mut(&stream);
            weight_grad_gemm(dy, x, pc, c_ty, (alpha, 0.0))?;
        }
        Ok(wrap(c, &dev, (out, inp)))
    })
}

/// `c += dyᵀ · x` in place for half-precision `dy` `[rows, out]`, `x` `[rows, in]` and a
/// contiguous `c` `[out, in]` of f32 or the inputs' dtype: the GEMM accumulates into `c`
/// (beta = 1), as megatron-core's gradient-accumulation fusion adds into `main_grad`. `c` must
/// be a tensor of the caller's own (nothing else may hold its storage).
pub fn weight_grad_into(c: &Tensor, dy: &Tensor, x: &Tensor) -> Result<()> {
    let ((out, inp), c_ty) = weight_grad_shape(dy, x, c.dtype())?;
    if c.dims() != [out, inp] || !c.is_contiguous() {
        candle_core::bail!(
            "weight gradient GEMM: {:?} += dy {:?}ᵀ · x {:?}",
            c.dims(),
            dy.dims(),
            x.dims()
        );
    }
    let stream = dy.device().as_cuda_device()?.cuda_stream();
    let (sc, lc) = c.storage_and_layout();
    let (pc, _g) = dptr(cuda_storage(&sc, "weight gradient sum")?, &stream, lc.start_offset())?;
    weight_grad_gemm(dy, x, pc, c_ty, (1.0, 1.0))
}

/// `alpha · a · bᵀ` (`b_transposed`, `b` `[n, k]`) or `alpha · a · b` (`b` `[k, n]`) for
/// half-precision `a` `[rows, k]`: a new `[rows, n]` tensor of `a`'s dtype.
pub fn matmul_scaled(a: &Tensor, b: &Tensor, b_transposed: bool, alpha: f32) -> Result<Tensor> {
    let (rows, k) = a.dims2()?;
    let (b0, b1) = b.dims2()?;
    let (n, bk) = if b_transposed { (b0, b1) } else { (b1, b0) };
    if bk != k {
        candle_core::bail!(
            "matmul_scaled: a {:?} · b{} {:?}",
            a.dims(),
            if b_transposed { "ᵀ" } else { "" },
            b.dims()
        );
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let c_ty = half_type(&a, &b, "matmul_scaled")?;
    let dev = a.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    crate::with_float_type!(a.dtype(), T, {
        // SAFETY: fully written by the GEMM below (beta = 0).
        let mut c = unsafe { dev.alloc::<T>(rows * n)? };
        {
            let (pc, _g) = c.device_ptr_mut(&stream);
            gemm_rows(&a, &b, b_transposed, pc, c_ty, (rows, n, k), (alpha, 0.0), "matmul_scaled")?;
        }
        Ok(wrap(c, &dev, (rows, n)))
    })
}

/// `c += alpha · a · bᵀ` (`b_transposed`, `b` `[n, k]`) or `c += alpha · a · b` (`b` `[k, n]`)
/// in place, for contiguous half-precision `c` `[rows, n]` and `a` `[rows, k]`. `c` must be a
/// tensor of the caller's own (nothing else may hold its storage).
pub fn add_matmul_in_place(
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    b_transposed: bool,
    alpha: f32,
) -> Result<()> {
    let (rows, n) = c.dims2()?;
    let (rows_a, k) = a.dims2()?;
    let (b0, b1) = b.dims2()?;
    let (bn, bk) = if b_transposed { (b0, b1) } else { (b1, b0) };
    if rows_a != rows || bn != n || bk != k || !c.is_contiguous() || c.dtype() != a.dtype() {
        candle_core::bail!(
            "add_matmul: c {:?} {:?} += a {:?} · b{} {:?}",
            c.dims(),
            c.dtype(),
            a.dims(),
            if b_transposed { "ᵀ" } else { "" },
            b.dims()
        );
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let c_ty = half_type(c, &a, "add_matmul")?;
    let dev = c.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let (sc, lc) = c.storage_and_layout();
    let (pc, _g) = dptr(cuda_storage(&sc, "add_matmul")?, &stream, lc.start_offset())?;
    gemm_rows(&a, &b, b_transposed, pc, c_ty, (rows, n, k), (alpha, 1.0), "add_matmul")
}
