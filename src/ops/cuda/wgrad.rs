//! Weight gradients `dyᵀ·x` of half-precision linears computed straight into f32 (cuBLAS
//! GemmEx with f32 output and accumulation), as Megatron's fp32 `main_grad` buffers receive
//! them: no half-precision gradient is written, rounded, and converted afterwards.

use super::{cuda_storage, dptr, wrap};
use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
use candle_core::{DType, Result, Tensor};
use std::ffi::c_void;

/// f32 `[out, in]` = `dyᵀ · x` for half-precision `dy` `[rows, out]` and `x` `[rows, in]`.
pub fn weight_grad_f32(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, out) = dy.dims2()?;
    let (rows_x, inp) = x.dims2()?;
    let ty = match (dy.dtype(), x.dtype()) {
        (DType::BF16, DType::BF16) => sys::cudaDataType::CUDA_R_16BF,
        (DType::F16, DType::F16) => sys::cudaDataType::CUDA_R_16F,
        (a, b) => candle_core::bail!("weight gradient GEMM: dtypes {a:?} and {b:?}"),
    };
    if rows != rows_x {
        candle_core::bail!("weight gradient GEMM: dy {:?} with x {:?}", dy.dims(), x.dims());
    }
    let to_i32 = |v: usize| -> Result<i32> {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("GEMM dimension {v} too large")))
    };
    let (m, n, k) = (to_i32(inp)?, to_i32(out)?, to_i32(rows)?);
    let (dy, x) = (dy.contiguous()?, x.contiguous()?);
    let dev = dy.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    // SAFETY: fully written by the GEMM below (beta = 0).
    let mut c = unsafe { dev.alloc::<f32>(out * inp)? };
    {
        let (dys, dyl) = dy.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (pdy, _g1) = dptr(cuda_storage(&dys, "dy")?, &stream, dyl.start_offset())?;
        let (px, _g2) = dptr(cuda_storage(&xs, "x")?, &stream, xl.start_offset())?;
        let (pc, _g3) = c.device_ptr_mut(&stream);
        let (alpha, beta) = (1f32, 0f32);
        // Column-major view: C[in, out] = X[in, rows] · DYᵀ[rows, out], i.e. the row-major
        // [out, in] result.
        // SAFETY: the pointers address live buffers of the sizes implied by m, n, k and the
        // leading dimensions; the handle runs on candle's stream, like every other kernel.
        unsafe {
            result::gemm_ex(
                *blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_N,
                sys::cublasOperation_t::CUBLAS_OP_T,
                m,
                n,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                px as *const c_void,
                ty,
                m,
                pdy as *const c_void,
                ty,
                n,
                (&beta as *const f32).cast::<c_void>(),
                pc as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                m,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("weight gradient GEMM: {e:?}")))?;
    }
    Ok(wrap(c, &dev, (out, inp)))
}
