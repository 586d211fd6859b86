//! cuBLASLt GEMMs whose output is not their accumulator input (`D = A·B + C` with D ≠ C),
//! which cuBLAS's GemmEx cannot express: a linear layer's output with the residual stream
//! added inside the GEMM (`y = x·Wᵀ + r`). The transformer block's residual adds then need
//! no pass of their own over the activations (two per layer, each reading two activation
//! tensors and writing one), and `r`, which the backward still needs, stays as it is.
//!
//! One cuBLASLt handle, 32 MiB workspace (NVIDIA's recommendation for Hopper) and plan per
//! shape are kept per thread and device: the heuristic query is the slow part of a call.

use super::{cuda_storage, dptr, wrap};
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::DeviceId;
use candle_core::{DType, Result, Tensor};
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;

const WORKSPACE_BYTES: usize = 32 << 20;

fn lt_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
}

/// Descriptors and the chosen algorithm of one `[m, n, k]` product (column-major, A
/// transposed: `D[m, n] = Aᵀ[m, k]·B[k, n] + C[m, n]`).
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    cd: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Plan::new` and destroyed only here. Errors are ignored: this
        // runs at thread exit, when there is nobody to report to.
        unsafe {
            let _ = result::destroy_matrix_layout(self.a);
            let _ = result::destroy_matrix_layout(self.b);
            let _ = result::destroy_matrix_layout(self.cd);
            let _ = result::destroy_matmul_desc(self.desc);
        }
    }
}

impl Plan {
    fn new(
        handle: sys::cublasLtHandle_t,
        ty: sys::cudaDataType,
        (m, n, k): (u64, u64, u64),
    ) -> Result<Self> {
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err("matmul descriptor", e))?;
        let layout = |rows: u64, cols: u64| {
            result::create_matrix_layout(ty, rows, cols, rows as i64)
                .map_err(|e| lt_err("matrix layout", e))
        };
        // Each descriptor is owned by the plan as soon as it exists, so an error below
        // frees what was made before it.
        let mut plan = Plan {
            desc,
            a: layout(k, m)?,
            b: std::ptr::null_mut(),
            cd: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.b = layout(k, n)?;
        plan.cd = layout(m, n)?;
        let transpose: i32 = 1;
        // SAFETY: a live descriptor and an attribute of the documented type (int32).
        unsafe {
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose as *const i32).cast::<c_void>(),
                std::mem::size_of::<i32>(),
            )
        }
        .map_err(|e| lt_err("transpose attribute", e))?;
        let pref = result::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        // SAFETY: live descriptors; the preference is destroyed right after the query.
        let heuristic = unsafe {
            let size = WORKSPACE_BYTES;
            let r = result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&size as *const usize).cast::<c_void>(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                result::get_matmul_algo_heuristic(
                    handle, plan.desc, plan.a, plan.b, plan.cd, plan.cd, pref,
                )
            });
            let _ = result::destroy_matmul_pref(pref);
            r
        }
        .map_err(|e| lt_err(&format!("no algorithm for [{m}, {n}, {k}]"), e))?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

/// A thread's cuBLASLt state on one device.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<(DType, usize, usize, usize), Plan>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `linear_plus`, destroyed only here.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

thread_local! {
    static LT: RefCell<HashMap<DeviceId, Lt>> = RefCell::new(HashMap::new());
}

/// `x·Wᵀ + r` for half-precision `x` `[rows, in]`, `w` `[out, in]` and `r` `[rows, out]`, one
/// cuBLASLt GEMM with `r` as its C operand (f32 accumulation; the sum is rounded once).
pub fn linear_plus(x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    if w_in != inp || r.dims() != [rows, out] {
        candle_core::bail!(
            "linear_plus: x {:?} · wᵀ {:?} + r {:?}: shapes do not agree",
            x.dims(),
            w.dims(),
            r.dims()
        );
    }
    let dtype = x.dtype();
    let ty = match dtype {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        d => candle_core::bail!("linear_plus: {d:?} inputs (expected bf16 or f16)"),
    };
    if w.dtype() != dtype || r.dtype() != dtype {
        candle_core::bail!(
            "linear_plus: dtypes x {dtype:?}, w {:?}, r {:?} differ",
            w.dtype(),
            r.dtype()
        );
    }
    let (x, w, r) = (x.contiguous()?, w.contiguous()?, r.contiguous()?);
    let dev = x.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let device_id = dev.id();
    LT.with(|cell| -> Result<Tensor> {
        let mut map = cell.borrow_mut();
        let lt = match map.entry(device_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let handle = result::create_handle().map_err(|e| lt_err("handle", e))?;
                // SAFETY: scratch space cuBLASLt writes before it reads.
                let workspace = unsafe { dev.alloc::<u8>(WORKSPACE_BYTES) }?;
                e.insert(Lt { handle, workspace, plans: HashMap::new() })
            }
        };
        // Column-major: D[out, rows] = (W stored as [in, out])ᵀ · (x stored as [in, rows]) + C.
        let plan = match lt.plans.entry((dtype, out, rows, inp)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                e.insert(Plan::new(lt.handle, ty, (out as u64, rows as u64, inp as u64))?)
            }
        };
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = w.storage_and_layout();
        let (sr, lr) = r.storage_and_layout();
        let (px, _g1) = dptr(cuda_storage(&sx, "linear_plus")?, &stream, lx.start_offset())?;
        let (pw, _g2) = dptr(cuda_storage(&sw, "linear_plus")?, &stream, lw.start_offset())?;
        let (pr, _g3) = dptr(cuda_storage(&sr, "linear_plus")?, &stream, lr.start_offset())?;
        let (one, handle) = (1.0f32, lt.handle);
        let (pws, _g4) = lt.workspace.device_ptr(&stream);
        crate::with_float_type!(dtype, T, {
            // SAFETY: fully written by the GEMM below.
            let mut d = unsafe { dev.alloc::<T>(rows * out)? };
            {
                let (pd, _g5) = d.device_ptr_mut(&stream);
                // SAFETY: the pointers address live buffers of the shapes checked above, laid
                // out as the plan's descriptors say; candle's stream orders it with every
                // other kernel.
                unsafe {
                    result::matmul(
                        handle,
                        plan.desc,
                        (&one as *const f32).cast::<c_void>(),
                        (&one as *const f32).cast::<c_void>(),
                        pw as *const c_void,
                        plan.a,
                        px as *const c_void,
                        plan.b,
                        pr as *const c_void,
                        plan.cd,
                        pd as *mut c_void,
                        plan.cd,
                        &plan.algo,
                        pws as *mut c_void,
                        WORKSPACE_BYTES,
                        stream.cu_stream() as *mut _,
                    )
                }
                .map_err(|e| lt_err("matmul", e))?;
            }
            Ok(wrap(d, &dev, (rows, out)))
        })
    })
}
