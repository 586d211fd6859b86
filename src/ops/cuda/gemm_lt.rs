//! cuBLASLt GEMMs whose output is not their accumulator input (`D = A·B + C` with D ≠ C),
//! which cuBLAS's GemmEx cannot express: a linear layer's output with the residual stream
//! added inside the GEMM (`y = x·Wᵀ + r`). The transformer block's residual adds then need
//! no pass of their own over the activations (two per layer, each reading two activation
//! tensors and writing one), and `r`, which the backward still needs, stays as it is.
//!
//! The FP8 GEMMs of `ops::fp8` run here too ([`fp8_gemm`]): Hopper's FP8 tensor cores take
//! both operands K-major (cuBLASLt's "TN" layout, the one this module uses throughout), with
//! a device-side scale per operand.
//!
//! One cuBLASLt handle, 32 MiB workspace (NVIDIA's recommendation for Hopper) and plan per
//! shape and types are kept per thread and device: the heuristic query is the slow part of a
//! call.

use super::{cuda_storage, dptr, wrap};
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{DType, Result, Tensor};
use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;

const WORKSPACE_BYTES: usize = 32 << 20;

fn lt_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
}

/// The element types of a product: A, B, and C = D; `fast_accum`: FP8 products summed in the
/// tensor cores' fast (less precise) accumulator, as Transformer Engine's forward GEMMs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Types {
    a: sys::cudaDataType,
    b: sys::cudaDataType,
    cd: sys::cudaDataType,
    fast_accum: bool,
}

impl Types {
    fn half(ty: sys::cudaDataType) -> Self {
        Self { a: ty, b: ty, cd: ty, fast_accum: false }
    }
}

/// Sets one attribute of a matmul descriptor.
///
/// # Safety
/// `desc` is live and `T` is the attribute's documented type.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
    what: &str,
) -> Result<()> {
    result::set_matmul_desc_attribute(
        desc,
        attr,
        (value as *const T).cast::<c_void>(),
        std::mem::size_of::<T>(),
    )
    .map_err(|e| lt_err(what, e))
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
        types: Types,
        (m, n, k): (u64, u64, u64),
    ) -> Result<Self> {
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err("matmul descriptor", e))?;
        let layout = |ty: sys::cudaDataType, rows: u64, cols: u64| {
            result::create_matrix_layout(ty, rows, cols, rows as i64)
                .map_err(|e| lt_err("matrix layout", e))
        };
        // Each descriptor is owned by the plan as soon as it exists, so an error below
        // frees what was made before it.
        let mut plan = Plan {
            desc,
            a: layout(types.a, k, m)?,
            b: std::ptr::null_mut(),
            cd: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.b = layout(types.b, k, n)?;
        plan.cd = layout(types.cd, m, n)?;
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        // SAFETY: a live descriptor and attributes of their documented types (int32, int8).
        unsafe {
            set_desc(plan.desc, Attr::CUBLASLT_MATMUL_DESC_TRANSA, &1i32, "transpose attribute")?;
            if types.fast_accum {
                set_desc(
                    plan.desc,
                    Attr::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                    &1i8,
                    "fast accumulation",
                )?;
            }
        }
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
    plans: HashMap<(Types, usize, usize, usize), Plan>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `with_lt`, destroyed only here.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

thread_local! {
    static LT: RefCell<HashMap<DeviceId, Lt>> = RefCell::new(HashMap::new());
}

/// The thread's cuBLASLt state on `dev`, made on first use.
fn with_lt<R>(dev: &CudaDevice, f: impl FnOnce(&mut Lt) -> Result<R>) -> Result<R> {
    LT.with(|cell| {
        let mut map = cell.borrow_mut();
        let lt = match map.entry(dev.id()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let handle = result::create_handle().map_err(|e| lt_err("handle", e))?;
                // SAFETY: scratch space cuBLASLt writes before it reads.
                let workspace = unsafe { dev.alloc::<u8>(WORKSPACE_BYTES) }?;
                e.insert(Lt { handle, workspace, plans: HashMap::new() })
            }
        };
        f(lt)
    })
}

/// Device pointers of one product, laid out as its plan says: `D = scale_a·scale_b·Aᵀ·B + C`
/// (C absent: `D = ...`; scales absent: 1).
struct Operands {
    a: u64,
    b: u64,
    c: Option<u64>,
    d: u64,
    scales: Option<(u64, u64)>,
}

/// Runs one `[m, n, k]` product of `types` on candle's stream of `dev`.
///
/// # Safety
/// The pointers address live buffers of the plan's shapes and types, which stay alive until
/// the stream has run the GEMM (candle's stream-ordered allocator keeps them so while the
/// caller holds them).
unsafe fn matmul(
    dev: &CudaDevice,
    types: Types,
    (m, n, k): (usize, usize, usize),
    ops: Operands,
) -> Result<()> {
    let stream = dev.cuda_stream();
    with_lt(dev, |lt| {
        let plan = match lt.plans.entry((types, m, n, k)) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                e.insert(Plan::new(lt.handle, types, (m as u64, n as u64, k as u64))?)
            }
        };
        if let Some((sa, sb)) = ops.scales {
            use sys::cublasLtMatmulDescAttributes_t as Attr;
            // SAFETY: a live descriptor; the attributes are device pointers to f32. The
            // descriptor is read when the GEMM is enqueued below, on this thread.
            unsafe {
                set_desc(plan.desc, Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, "A scale")?;
                set_desc(plan.desc, Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, "B scale")?;
            }
        }
        let (one, beta) = (1.0f32, if ops.c.is_some() { 1.0f32 } else { 0.0 });
        let (pws, _g) = lt.workspace.device_ptr(&stream);
        // SAFETY: the caller's contract; C is D itself (not read) without a C operand.
        unsafe {
            result::matmul(
                lt.handle,
                plan.desc,
                (&one as *const f32).cast::<c_void>(),
                (&beta as *const f32).cast::<c_void>(),
                ops.a as *const c_void,
                plan.a,
                ops.b as *const c_void,
                plan.b,
                ops.c.unwrap_or(ops.d) as *const c_void,
                plan.cd,
                ops.d as *mut c_void,
                plan.cd,
                &plan.algo,
                pws as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(|e| lt_err("matmul", e))
    })
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
    let ty = half_type(dtype, "linear_plus")?;
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
    let (sx, lx) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let (sr, lr) = r.storage_and_layout();
    let (px, _g1) = dptr(cuda_storage(&sx, "linear_plus")?, &stream, lx.start_offset())?;
    let (pw, _g2) = dptr(cuda_storage(&sw, "linear_plus")?, &stream, lw.start_offset())?;
    let (pr, _g3) = dptr(cuda_storage(&sr, "linear_plus")?, &stream, lr.start_offset())?;
    crate::with_float_type!(dtype, T, {
        // SAFETY: fully written by the GEMM below.
        let mut d = unsafe { dev.alloc::<T>(rows * out)? };
        {
            let (pd, _g5) = d.device_ptr_mut(&stream);
            // Column-major: D[out, rows] = (W stored as [in, out])ᵀ · (x stored as [in, rows]) + C.
            let ops = Operands { a: pw, b: px, c: Some(pr), d: pd, scales: None };
            // SAFETY: the pointers address live buffers of the shapes checked above.
            unsafe { matmul(&dev, Types::half(ty), (out, rows, inp), ops)? };
        }
        Ok(wrap(d, &dev, (rows, out)))
    })
}

fn half_type(dtype: DType, what: &str) -> Result<sys::cudaDataType> {
    match dtype {
        DType::BF16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Ok(sys::cudaDataType::CUDA_R_16F),
        d => candle_core::bail!("{what}: {d:?} (expected bf16 or f16)"),
    }
}

/// An FP8 GEMM operand: `rows × k` values, row-major (K-major), with the device scalar that
/// scales them back (`1 / scale`).
pub struct Fp8Matrix<'a> {
    pub data: CudaView<'a, u8>,
    pub e5m2: bool,
    pub scale_inv: CudaView<'a, f32>,
    pub rows: usize,
}

/// `b · aᵀ (+ residual)` `[b.rows, a.rows]` in `dtype` (bf16, f16, or f32 for weight
/// gradients) for FP8 operands `a` `[m, k]` and `b` `[n, k]`, each scaled back by its
/// `scale_inv`; f32 accumulation, or the fast accumulator with `fast_accum`.
pub fn fp8_gemm(
    a: &Fp8Matrix,
    b: &Fp8Matrix,
    k: usize,
    residual: Option<&Tensor>,
    dtype: DType,
    fast_accum: bool,
    dev: &CudaDevice,
) -> Result<Tensor> {
    let (m, n) = (a.rows, b.rows);
    let types = fp8_types(a, b, k, dtype, fast_accum)?;
    let residual = match residual {
        Some(r) if r.dims() != [n, m] || r.dtype() != dtype => candle_core::bail!(
            "fp8 gemm: residual {:?} {:?}, expected [{n}, {m}] {dtype:?}",
            r.dims(),
            r.dtype()
        ),
        Some(r) => Some(r.contiguous()?),
        None => None,
    };
    let stream = dev.cuda_stream();
    let (pa, _g1) = a.data.device_ptr(&stream);
    let (pb, _g2) = b.data.device_ptr(&stream);
    let (sa, _g3) = a.scale_inv.device_ptr(&stream);
    let (sb, _g4) = b.scale_inv.device_ptr(&stream);
    let rguard = residual.as_ref().map(|r| r.storage_and_layout());
    let (pr, _g5) = match &rguard {
        Some((s, l)) => {
            let (p, g) = dptr(cuda_storage(s, "fp8 gemm residual")?, &stream, l.start_offset())?;
            (Some(p), Some(g))
        }
        None => (None, None),
    };
    crate::with_float_type!(dtype, T, {
        // SAFETY: fully written by the GEMM below.
        let mut d = unsafe { dev.alloc::<T>(n * m)? };
        {
            let (pd, _g6) = d.device_ptr_mut(&stream);
            let ops = Operands { a: pa, b: pb, c: pr, d: pd, scales: Some((sa, sb)) };
            // SAFETY: the operands' sizes are checked above; column-major D[m, n] is the
            // row-major [n, m] result.
            unsafe { matmul(dev, types, (m, n, k), ops)? };
        }
        Ok(wrap(d, dev, (n, m)))
    })
}

/// The checked types of an FP8 product [`fp8_gemm`] / [`fp8_gemm_into`] (shapes, formats).
fn fp8_types(
    a: &Fp8Matrix,
    b: &Fp8Matrix,
    k: usize,
    dtype: DType,
    fast_accum: bool,
) -> Result<Types> {
    let (m, n) = (a.rows, b.rows);
    if a.data.len() != m * k || b.data.len() != n * k {
        candle_core::bail!(
            "fp8 gemm: operands of {} and {} bytes for [{m}, {k}] and [{n}, {k}]",
            a.data.len(),
            b.data.len()
        );
    }
    if a.e5m2 && b.e5m2 {
        candle_core::bail!("fp8 gemm: Hopper multiplies E5M2 only with E4M3");
    }
    if [m, n, k].iter().any(|d| !d.is_multiple_of(16)) {
        candle_core::bail!(
            "fp8 gemm: [{m}, {n}, {k}]: FP8 GEMMs need every dimension divisible by 16"
        );
    }
    let fp8 = |e5m2: bool| {
        if e5m2 {
            sys::cudaDataType::CUDA_R_8F_E5M2
        } else {
            sys::cudaDataType::CUDA_R_8F_E4M3
        }
    };
    Ok(Types {
        a: fp8(a.e5m2),
        b: fp8(b.e5m2),
        // f32 for weight gradients summed in f32 main grads (as Transformer Engine writes its
        // FP8 wgrad into megatron-core's fp32 `main_grad`).
        cd: match dtype {
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            d => half_type(d, "fp8 gemm output")?,
        },
        fast_accum,
    })
}

/// `c += b · aᵀ` in place (C = D, beta = 1) for a contiguous `c` `[b.rows, a.rows]` (f32 or
/// half precision): an FP8 weight gradient added into the step's running sum, as Transformer
/// Engine's wgrad GEMM accumulates into megatron-core's `main_grad`. `c` must be a tensor of the
/// caller's own (nothing else may hold its storage).
pub fn fp8_gemm_into(
    a: &Fp8Matrix,
    b: &Fp8Matrix,
    k: usize,
    c: &Tensor,
    fast_accum: bool,
    dev: &CudaDevice,
) -> Result<()> {
    let (m, n) = (a.rows, b.rows);
    if c.dims() != [n, m] || !c.is_contiguous() {
        candle_core::bail!("fp8 gemm: sum {:?} for a [{n}, {m}] product", c.dims());
    }
    let types = fp8_types(a, b, k, c.dtype(), fast_accum)?;
    let stream = dev.cuda_stream();
    let (pa, _g1) = a.data.device_ptr(&stream);
    let (pb, _g2) = b.data.device_ptr(&stream);
    let (sa, _g3) = a.scale_inv.device_ptr(&stream);
    let (sb, _g4) = b.scale_inv.device_ptr(&stream);
    let (sc, lc) = c.storage_and_layout();
    let (pc, _g5) = dptr(cuda_storage(&sc, "fp8 gemm sum")?, &stream, lc.start_offset())?;
    let ops = Operands { a: pa, b: pb, c: Some(pc), d: pc, scales: Some((sa, sb)) };
    // SAFETY: the operands' sizes are checked above and in `fp8_types`; C and D are one
    // buffer with one layout, which cuBLASLt allows (each element read before written).
    unsafe { matmul(dev, types, (m, n, k), ops) }
}
