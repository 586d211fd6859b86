//! Flash attention (forward + backward) on CUDA: the candle op around `kernels/flash_attn.cu`.
//!
//! [`flash_attention`] takes `q` `[b, heads, sq, d]` and `k`/`v` `[b, groups, sk, d]` in any
//! layout whose rows are dense and 16-byte aligned (see [`crate::ops::flash::kernel_strides`];
//! others are copied once) and returns `[b, heads, sq, d]` as a transposed view of a
//! `[b, sq, heads, d]` buffer, so the model's `transpose(1, 2).reshape((b, s, h·d))` is free.
//! The gradients come back in the same `[b, s, h, d]` memory order. No `sq×sk` tensor exists
//! at any point: the kernel keeps only a per-row logsumexp (fp32) for the backward pass.

use crate::config::model::AttnBackend;
use crate::kernel_module;
use crate::ops::cuda::copy_rows::{copy_rows, Rows};
use crate::ops::cuda::cudnn::sdpa::{self as cudnn_sdpa, Operand, SdpaDims};
use crate::ops::cuda::{div_ceil, dptr};
use crate::ops::flash::{kernel_strides, query_shape, query_strides, FlashSpec, HEAD_DIMS};
use crate::ops::manual::QkvGrads;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub mod selftest;

kernel_module!(FLASH_ATTN, "flash_attn");

/// Forward tile rows (BM) and threads; backward query rows per step (BM) of the mma.sync
/// kernels.
const FWD_BM: usize = 128;
const FWD_THREADS: u32 = 128;
const BWD_BM: usize = 64;
/// The backward's elementwise passes (`ELEM_*` in `kernels/flash_attn.cu`): threads per
/// block, pairs of elements each thread converts, and rows per block of the dO·O pass.
const ELEM_THREADS: u32 = 256;
const ELEM_PAIRS: usize = 4;
const ELEM_DOT_ROWS: usize = 32;

/// Backward tile variants (kernels at the end of `kernels/flash_attn.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BwdTile {
    /// bf16: warpgroup MMA, 128 keys per block, 128 query rows per step at d=64 and 64 at
    /// d=128; other dtypes: [`BwdTile::Warps8`].
    Default = 0,
    /// Warpgroup MMA with 64 query rows per step at d=64 too.
    WgmmaQueries64 = 1,
    /// mma.sync, 4 warps (64 keys per block; bf16 only).
    Warps4 = 4,
    /// mma.sync, 8 warps (128 keys per block).
    Warps8 = 8,
}

/// Forward tile variants (kernels at the end of `kernels/flash_attn.cu`, bf16 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdTile {
    /// Hopper warpgroup MMA for bf16 (2 warpgroups × 64 query rows; 128-key tiles at d=128,
    /// [`FwdTile::WgmmaKeys64`] at d=64); other dtypes: [`FwdTile::MmaSync`].
    Default = 0,
    /// 128-key tiles (d=64 only; the default for bf16).
    Keys128 = 1,
    /// 8 warps × 16 query rows (fewer registers, more shared-memory reads).
    Warps8 = 2,
    /// 32-key tiles (d=128 only): no register spills.
    Keys32 = 3,
    /// At most 168 registers so 3 blocks share an SM (d=64 only).
    Blocks3 = 4,
    /// mma.sync, 4 warps × 32 query rows; 64-key tiles, except 128 for bf16 d=64.
    MmaSync = 5,
    /// Warpgroup MMA with 64-key tiles and two blocks per SM (d=64 only; its default).
    WgmmaKeys64 = 6,
    /// Warpgroup MMA with 128-key tiles at d=64 (the d=128 default).
    WgmmaKeys128 = 7,
}

/// Tile selection for later calls (the self-test benchmarks the variants). Defaults: forward
/// [`FwdTile::Default`], backward 0 (warpgroup MMA, 128 keys per block).
static FWD_TILE: AtomicUsize = AtomicUsize::new(FwdTile::Default as usize);
static BWD_TILE: AtomicUsize = AtomicUsize::new(BwdTile::Default as usize);

/// Selects the tile variants. Combinations a dtype/head dim lacks fall back to the defaults.
pub fn set_tiles(fwd: FwdTile, bwd: BwdTile) {
    FWD_TILE.store(fwd as usize, Ordering::Relaxed);
    BWD_TILE.store(bwd as usize, Ordering::Relaxed);
}

/// Forward kernel name, threads and shared memory for `dtype`/`d` under the current selection.
fn fwd_kernel(tname: &str, d: usize) -> (String, u32, usize) {
    let tile = FWD_TILE.load(Ordering::Relaxed);
    // mma.sync kernels: Q tile plus one K and one V tile of `bn` keys.
    let sync = |name: String, bn: usize, threads: u32| (name, threads, (FWD_BM + 2 * bn) * d * 2);
    // Warpgroup MMA: Q plus two stages of K and V, and slack to align the tiles to 1024 bytes.
    let wgmma = |name: String, bn: usize| (name, 2 * FWD_THREADS, (FWD_BM + 4 * bn) * d * 2 + 1024);
    match (tile, tname, d) {
        // d=64: 64-key tiles, two blocks per SM (H100 selftest bench: 249 vs 230 TFLOP/s
        // with 128-key tiles at b=2, h=32/8, s=4096).
        (0 | 6, "bf16", 64) => wgmma(format!("flash_fwd_{tname}_d{d}_wg2"), 64),
        (0, "bf16", _) => wgmma(format!("flash_fwd_{tname}_d{d}_wg"), 128),
        (7, "bf16", 64) => wgmma(format!("flash_fwd_{tname}_d{d}_wg"), 128),
        // bf16 d=64: 128-key tiles measured ~5% faster than 64 on H100 (selftest bench).
        (1 | 5, "bf16", 64) => sync(format!("flash_fwd_{tname}_d{d}_n128"), 128, FWD_THREADS),
        (2, "bf16", _) => sync(format!("flash_fwd_{tname}_d{d}_w8"), 64, 2 * FWD_THREADS),
        (3, "bf16", 128) => sync(format!("flash_fwd_{tname}_d{d}_n32"), 32, FWD_THREADS),
        (4, "bf16", 64) => sync(format!("flash_fwd_{tname}_d{d}_b3"), 64, FWD_THREADS),
        _ => sync(format!("flash_fwd_{tname}_d{d}"), 64, FWD_THREADS),
    }
}

/// Backward kernel name, keys per block, threads and shared memory under the current
/// [`BwdTile`] selection.
fn bwd_kernel(tname: &str, d: usize) -> (String, usize, u32, usize) {
    // mma.sync: K, V, two stages of Q and dO, dSᵀ, logsumexp and dsum.
    let sync = |name: String, warps: usize| {
        let bn = 16 * warps;
        let smem = (2 * bn + 4 * BWD_BM) * d * 2 + bn * BWD_BM * 2 + 4 * BWD_BM * 4;
        (name, bn, (warps * 32) as u32, smem)
    };
    // Warpgroup MMA: the same buffers with 128 keys and `bm` query rows, plus slack to align
    // the tiles to 1024 bytes.
    let wgmma = |name: String, bm: usize| {
        let smem = (2 * 128 + 4 * bm) * d * 2 + 128 * bm * 2 + 4 * bm * 4 + 1024;
        (name, 128, 256, smem)
    };
    match (BWD_TILE.load(Ordering::Relaxed), tname) {
        (0, "bf16") if d == 64 => wgmma(format!("flash_bwd_{tname}_d{d}_wg_m128"), 128),
        (0 | 1, "bf16") => wgmma(format!("flash_bwd_{tname}_d{d}_wg"), BWD_BM),
        (4, "bf16") => sync(format!("flash_bwd_{tname}_d{d}_w4"), 4),
        _ => sync(format!("flash_bwd_{tname}_d{d}"), 8),
    }
}

/// Kernel arguments; mirrors `struct FlashParams` in `kernels/flash_attn.cu` field by field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FlashParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    dout: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    lse: u64,
    dsum: u64,
    dq_accum: u64,
    cu_seqlens: u64,
    dkv_accum: u64,
    q_bs: i64,
    q_hs: i64,
    q_ss: i64,
    k_bs: i64,
    k_hs: i64,
    k_ss: i64,
    v_bs: i64,
    v_hs: i64,
    v_ss: i64,
    o_bs: i64,
    o_hs: i64,
    o_ss: i64,
    do_bs: i64,
    do_hs: i64,
    do_ss: i64,
    dq_bs: i64,
    dq_hs: i64,
    dq_ss: i64,
    dk_bs: i64,
    dk_hs: i64,
    dk_ss: i64,
    q_gs: i64,
    dq_gs: i64,
    batch: i32,
    heads: i32,
    groups: i32,
    sq: i32,
    sk: i32,
    causal: i32,
    window_left: i32,
    split_heads: i32,
    scale_log2: f32,
    scale: f32,
}

// The kernel static_asserts the same size.
const _: () = assert!(std::mem::size_of::<FlashParams>() == 328);

// SAFETY: plain-old-data with the C layout of the kernel's by-value parameter.
unsafe impl DeviceRepr for FlashParams {}

/// Packed sequences: `cu_seqlens` (u32 on the device, `[nseq + 1]` token offsets into the
/// single batch row), the longest sequence (sizes the grid) and the total token count.
#[derive(Debug, Clone)]
pub struct Varlen {
    cu_seqlens: Tensor,
    max_seqlen: usize,
    total: usize,
}

impl Varlen {
    /// Validates host offsets (start at 0, non-decreasing) and copies them to `device`.
    pub fn new(cu_seqlens: &[u32], device: &candle_core::Device) -> Result<Self> {
        crate::ops::flash::check_cu_seqlens(cu_seqlens).map_err(candle_core::Error::Msg)?;
        let max_seqlen = cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let total = *cu_seqlens.last().unwrap_or(&0) as usize;
        Ok(Self { cu_seqlens: Tensor::new(cu_seqlens, device)?, max_seqlen, total })
    }

    /// The offsets of a model forward pass, already validated and on the device (shared by
    /// all layers, so nothing is copied per call).
    pub fn from_packed(seqs: &crate::ops::flash::PackedSeqs) -> Self {
        Self {
            cu_seqlens: seqs.device_offsets().clone(),
            max_seqlen: seqs.max_seqlen(),
            total: seqs.rows() * seqs.seq(),
        }
    }
}

/// Problem sizes shared by forward and backward.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    groups: usize,
    sq: usize,
    sk: usize,
    d: usize,
}

/// Sizes from q's layout (`[b, heads, sq, d]` or grouped `[b, groups, hpg, sq, d]`, see
/// [`crate::ops::flash::query_dims`]) and k's `[b, groups, sk, d]`.
fn dims(q: &Layout, k: &Layout) -> Result<Dims> {
    let (b, heads, sq, d) = query_shape(q.shape())?;
    let (_, groups, sk, _) = k.shape().dims4()?;
    if q.dims().len() == 5 && q.dims()[1] != groups {
        candle_core::bail!("flash attention: grouped q {:?} with {groups} kv groups", q.dims());
    }
    Ok(Dims { b, heads, groups, sq, sk, d })
}

/// `[b, s, h, d]` memory viewed as `[b, h, s, d]`: strides (batch, head, seq).
fn bshd_strides(s: usize, h: usize, d: usize) -> [i64; 3] {
    [(s * h * d) as i64, d as i64, (h * d) as i64]
}

fn type_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        other => candle_core::bail!("flash attention: dtype {other:?} (bf16 or f16 only)"),
    }
}

fn alloc_like(dev: &CudaDevice, dtype: DType, len: usize) -> Result<CudaStorage> {
    // Every element is written by a kernel before it is read.
    let slice = match dtype {
        DType::BF16 => CudaStorageSlice::BF16(unsafe { dev.alloc::<half::bf16>(len)? }),
        DType::F16 => CudaStorageSlice::F16(unsafe { dev.alloc::<half::f16>(len)? }),
        other => candle_core::bail!("flash attention: dtype {other:?}"),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

fn launch(
    dev: &CudaDevice,
    name: &str,
    grid: (u32, u32, u32),
    threads: u32,
    smem: usize,
    params: &FlashParams,
) -> Result<()> {
    let func = crate::function!(dev, FLASH_ATTN, name)?;
    if smem > 48 * 1024 {
        // Above 48 KiB a kernel must opt in to dynamic shared memory.
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| candle_core::Error::Msg(format!("{name}: shared memory {smem}: {e:?}")))?;
    }
    let cfg =
        LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
    let mut b = func.builder();
    b.arg(params);
    // SAFETY: the kernel reads exactly the FlashParams layout; every pointer in it refers to
    // storage kept alive (and stream-ordered) by the caller until after this launch.
    unsafe { b.launch(cfg) }
        .map_err(|e| candle_core::Error::Msg(format!("{name}: launch failed: {e:?}")))?;
    Ok(())
}

fn check(d: &Dims, varlen: Option<&Varlen>) -> Result<()> {
    if !HEAD_DIMS.contains(&d.d) {
        candle_core::bail!("flash attention: head_dim {} (supported: {HEAD_DIMS:?})", d.d);
    }
    if d.groups == 0 || !d.heads.is_multiple_of(d.groups) {
        candle_core::bail!("flash attention: {} heads / {} groups", d.heads, d.groups);
    }
    if d.sq > d.sk {
        candle_core::bail!("flash attention: {} queries > {} keys", d.sq, d.sk);
    }
    if let Some(v) = varlen {
        if d.b != 1 || d.sq != d.sk || v.total != d.sq {
            candle_core::bail!(
                "flash attention: packed sequences cover {} tokens; need one row of that many \
                 queries and keys (got b={} sq={} sk={})",
                v.total,
                d.b,
                d.sq,
                d.sk
            );
        }
    }
    if d.sk > i32::MAX as usize || d.b * d.heads * d.sq > i32::MAX as usize {
        candle_core::bail!("flash attention: problem too large for 32-bit row indices");
    }
    Ok(())
}

/// The strides the kernel uses for an operand, or an error naming it (the public entry makes
/// operands kernel-readable first, so this only fires on internal misuse).
fn strides(l: &Layout, what: &str) -> Result<[i64; 3]> {
    kernel_strides(l)
        .map(|s| s.map(|x| x as i64))
        .ok_or_else(|| candle_core::Error::Msg(format!("flash attention: {what} layout {l:?}")))
}

/// Query strides (batch, group, head in group, seq) for the kernel, see [`strides`].
fn q_strides(l: &Layout, groups: usize) -> Result<[i64; 4]> {
    query_strides(l, groups)
        .map(|s| s.map(|x| x as i64))
        .ok_or_else(|| candle_core::Error::Msg(format!("flash attention: q layout {l:?}")))
}

fn base_params(d: &Dims, spec: &FlashSpec, varlen: Option<&Varlen>) -> FlashParams {
    let scale = spec.softmax_scale as f32;
    FlashParams {
        batch: varlen.map_or(d.b, |v| v.cu_seqlens.dims1().unwrap_or(1) - 1) as i32,
        heads: d.heads as i32,
        groups: d.groups as i32,
        sq: d.sq as i32,
        sk: d.sk as i32,
        causal: i32::from(spec.causal),
        window_left: spec.kernel_window(),
        scale_log2: scale * std::f32::consts::LOG2_E,
        scale,
        ..Default::default()
    }
}

/// Grid rows of query (forward) or key (backward) tiles: the longest sequence decides.
fn tiles(len: usize, varlen: Option<&Varlen>, tile: usize) -> u32 {
    div_ceil(varlen.map_or(len, |v| v.max_seqlen), tile).max(1) as u32
}

/// Which logsumexp a forward left for its backward. The tensor's rank tells them apart:
/// mbridge's kernels keep `[b, heads, sq]` in the log2 domain of the scaled scores, cuDNN
/// `[b, heads, sq, 1]` in natural log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stats {
    Log2,
    Natural,
}

/// Whether a call goes to cuDNN's fused attention ([`crate::ops::flash::cudnn_covers`]).
fn wants_cudnn(spec: &FlashSpec, d: &Dims, varlen: Option<&Varlen>) -> bool {
    crate::ops::flash::cudnn_covers(spec, d.sq, d.sk, varlen.is_some())
}

/// Runs `f` (a cuDNN call) for `spec`'s backend: `Some` when it ran. Under `auto` a failure
/// (no cuDNN on this machine, or no engine for the shape) is logged once and gives `None`,
/// so mbridge's kernels run instead; under `fused` it is an error.
fn via_cudnn<R>(spec: &FlashSpec, f: impl FnOnce() -> Result<R>) -> Result<Option<R>> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    match f() {
        Ok(r) => Ok(Some(r)),
        Err(e) if spec.backend == AttnBackend::Auto => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "attention: cuDNN's fused attention is not used, mbridge's flash kernels \
                     run instead: {e}"
                );
            }
            Ok(None)
        }
        Err(e) => candle_core::bail!("model.attention_backend = \"fused\": {e}"),
    }
}

/// A `[b, h, s, d]` operand for cuDNN: its address and strides (`kernel_strides` + dense d).
fn operand<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
    stream: &'a candle_core::cuda_backend::cudarc::driver::CudaStream,
) -> Result<(Operand, candle_core::cuda_backend::cudarc::driver::SyncOnDrop<'a>)> {
    let [b, h, sq] = strides(l, what)?;
    let (ptr, guard) = dptr(s, stream, l.start_offset())?;
    Ok((Operand { ptr, strides: [b, h, sq, 1] }, guard))
}

/// q as cuDNN reads it, whose heads must be evenly strided: in place for `[b, h, s, d]`
/// views, else (the grouped view of a fused QKV buffer, where each group's key and value
/// heads sit between its query heads) a `[b, s, h, d]` copy, returned with its strides.
fn cudnn_query(q: &CudaStorage, ql: &Layout, d: &Dims) -> Result<(Option<CudaStorage>, [i64; 4])> {
    let [bs, gs, hs, ss] = q_strides(ql, d.groups)?;
    if gs == (d.heads / d.groups) as i64 * hs {
        return Ok((None, [bs, hs, ss, 1]));
    }
    let mut dense = alloc_like(&q.device, q.dtype(), d.b * d.sq * d.heads * d.d)?;
    match grouped_query_rows(d, [bs, gs, ss], ql.start_offset()) {
        Some(rows) => copy_rows(q, &mut dense, rows)?,
        None => q.copy_strided_src(&mut dense, 0, &ql.permute(&[0, 3, 1, 2, 4])?)?,
    }
    Ok((Some(dense), dense_query_strides(d)))
}

/// cuDNN's `[b, h, s, d]` strides of a dense `[b, s, h, d]` query-shaped buffer.
fn dense_query_strides(d: &Dims) -> [i64; 4] {
    let [b, h, s] = bshd_strides(d.sq, d.heads, d.d);
    [b, h, s, 1]
}

/// The query heads of a token-major grouped layout (the fused QKV buffer: batch, group and
/// token strides `bs`, `gs`, `ss`, the first head at `offset`) as rows of one group's heads,
/// copied from there into a dense `[b, s, h, d]`; None for any other layout.
fn grouped_query_rows(d: &Dims, [bs, gs, ss]: [i64; 3], offset: usize) -> Option<Rows> {
    let hpg = d.heads / d.groups;
    (ss == d.groups as i64 * gs && bs == d.sq as i64 * ss).then(|| Rows {
        rows: d.b * d.sq * d.groups,
        cols: hpg * d.d,
        src_offset: offset,
        src_stride: gs as usize,
        dst_offset: 0,
        dst_stride: hpg * d.d,
    })
}

fn sdpa_dims(d: &Dims, dtype: DType) -> Result<SdpaDims> {
    let dtype = match dtype {
        DType::BF16 => crate::ops::cuda::cudnn::ffi::DataType::BFloat16,
        DType::F16 => crate::ops::cuda::cudnn::ffi::DataType::Half,
        other => candle_core::bail!("cuDNN attention: dtype {other:?}"),
    };
    Ok(SdpaDims { b: d.b, heads: d.heads, groups: d.groups, s: d.sq, d: d.d, dtype })
}

/// cuDNN's forward: O (`[b, sq, heads, d]` contiguous) and its statistics (`[b, heads, sq]`,
/// natural log).
#[allow(clippy::too_many_arguments)]
fn forward_cudnn(
    spec: &FlashSpec,
    d: &Dims,
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = &q.device;
    let stream = dev.cuda_stream();
    let out = alloc_like(dev, q.dtype(), d.b * d.sq * d.heads * d.d)?;
    // Every row's statistic is written by cuDNN.
    let stats = CudaStorage {
        slice: CudaStorageSlice::F32(unsafe { dev.alloc::<f32>(d.b * d.heads * d.sq)? }),
        device: dev.clone(),
    };
    {
        let (q_copy, q_strides) = cudnn_query(q, ql, d)?;
        let (qp, _g1) = match &q_copy {
            Some(c) => dptr(c, &stream, 0)?,
            None => dptr(q, &stream, ql.start_offset())?,
        };
        let (ko, _g2) = operand(k, kl, "k", &stream)?;
        let (vo, _g3) = operand(v, vl, "v", &stream)?;
        let (op, _g4) = dptr(&out, &stream, 0)?;
        let (sp, _g5) = dptr(&stats, &stream, 0)?;
        let o = Operand { ptr: op, strides: dense_query_strides(d) };
        let operands = [Operand { ptr: qp, strides: q_strides }, ko, vo, o];
        let scale = spec.softmax_scale as f32;
        cudnn_sdpa::forward(dev, sdpa_dims(d, q.dtype())?, operands, sp, scale)?;
    }
    Ok((out, stats))
}

/// Runs the forward kernel: returns O (`[b, sq, heads, d]` contiguous) and lse (`[b, heads, sq]`).
#[allow(clippy::too_many_arguments)]
fn forward(
    spec: &FlashSpec,
    varlen: Option<&Varlen>,
    q: &CudaStorage,
    ql: &Layout,
    k: &CudaStorage,
    kl: &Layout,
    v: &CudaStorage,
    vl: &Layout,
) -> Result<(CudaStorage, CudaStorage, Stats)> {
    let d = dims(ql, kl)?;
    check(&d, varlen)?;
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype {
        candle_core::bail!("flash attention: q/k/v dtypes differ");
    }
    if wants_cudnn(spec, &d, varlen) {
        let run = || forward_cudnn(spec, &d, q, ql, k, kl, v, vl);
        if let Some((out, stats)) = via_cudnn(spec, run)? {
            return Ok((out, stats, Stats::Natural));
        }
    }
    let dev = &q.device;
    let stream = dev.cuda_stream();
    let out = alloc_like(dev, dtype, d.b * d.sq * d.heads * d.d)?;
    let lse = dev.alloc_zeros::<f32>(d.b * d.heads * d.sq)?;
    let lse = CudaStorage { slice: CudaStorageSlice::F32(lse), device: dev.clone() };
    {
        let mut p = base_params(&d, spec, varlen);
        let cu_guard = varlen.map(|v| v.cu_seqlens.storage_and_layout());
        let (qp, _g1) = dptr(q, &stream, ql.start_offset())?;
        let (kp, _g2) = dptr(k, &stream, kl.start_offset())?;
        let (vp, _g3) = dptr(v, &stream, vl.start_offset())?;
        let (op, _g4) = dptr(&out, &stream, 0)?;
        let (lp, _g5) = dptr(&lse, &stream, 0)?;
        let _g6 = match &cu_guard {
            Some((s, l)) => {
                let Storage::Cuda(s) = &**s else {
                    candle_core::bail!("flash attention: cu_seqlens must be on the GPU")
                };
                let (cp, g) = dptr(s, &stream, l.start_offset())?;
                p.cu_seqlens = cp;
                Some(g)
            }
            None => None,
        };
        [p.q, p.k, p.v, p.o, p.lse] = [qp, kp, vp, op, lp];
        [p.q_bs, p.q_gs, p.q_hs, p.q_ss] = q_strides(ql, d.groups)?;
        [p.k_bs, p.k_hs, p.k_ss] = strides(kl, "k")?;
        [p.v_bs, p.v_hs, p.v_ss] = strides(vl, "v")?;
        [p.o_bs, p.o_hs, p.o_ss] = bshd_strides(d.sq, d.heads, d.d);
        let grid = (tiles(d.sq, varlen, FWD_BM), d.heads as u32, p.batch as u32);
        let (name, threads, smem) = fwd_kernel(type_name(dtype)?, d.d);
        launch(dev, &name, grid, threads, smem, &p)?;
    }
    Ok((out, lse, Stats::Log2))
}

/// Backward launch inputs: the forward's operands and results plus the incoming gradient.
#[derive(Clone, Copy)]
struct BwdArgs<'a> {
    spec: &'a FlashSpec,
    varlen: Option<&'a Varlen>,
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    o: &'a Tensor,
    lse: &'a Tensor,
    dout: &'a Tensor,
}

/// Where the backward writes dQ, dK and dV: its output buffers, their kernel parameters, and
/// the tensors they become.
trait GradTarget {
    type Grads;
    fn buffers(dev: &CudaDevice, dtype: DType, d: &Dims) -> Result<GradBuffers>;
    fn grads(bufs: Vec<CudaStorage>, d: &Dims) -> Result<Self::Grads>;
}

/// Output buffers of the backward and their kernel parameters.
struct GradBuffers {
    /// One per gradient ([`Separate`]), or the one dQKV buffer ([`FusedQkv`]).
    bufs: Vec<CudaStorage>,
    /// (buffer index, element offset) of dQ, dK, dV.
    at: [(usize, usize); 3],
    dq_strides: [i64; 4],
    dk_strides: [i64; 3],
}

fn grad_tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// Three buffers, `[b, s, h, d]` each; the gradients are `[b, h, s, d]` views of them.
struct Separate;

impl GradTarget for Separate {
    type Grads = (Tensor, Tensor, Tensor);

    fn buffers(dev: &CudaDevice, dtype: DType, d: &Dims) -> Result<GradBuffers> {
        let [bs, hs, ss] = bshd_strides(d.sq, d.heads, d.d);
        let hpg = d.heads / d.groups;
        Ok(GradBuffers {
            bufs: vec![
                alloc_like(dev, dtype, d.b * d.heads * d.sq * d.d)?,
                alloc_like(dev, dtype, d.b * d.groups * d.sk * d.d)?,
                alloc_like(dev, dtype, d.b * d.groups * d.sk * d.d)?,
            ],
            at: [(0, 0), (1, 0), (2, 0)],
            dq_strides: [bs, hpg as i64 * hs, hs, ss],
            dk_strides: bshd_strides(d.sk, d.groups, d.d),
        })
    }

    fn grads(bufs: Vec<CudaStorage>, d: &Dims) -> Result<Self::Grads> {
        let [dq, dk, dv]: [CudaStorage; 3] =
            bufs.try_into().map_err(|_| candle_core::Error::Msg("three buffers".into()))?;
        let bshd = |s, seq, h| grad_tensor(s, (d.b, seq, h, d.d)).transpose(1, 2);
        Ok((bshd(dq, d.sq, d.heads)?, bshd(dk, d.sk, d.groups)?, bshd(dv, d.sk, d.groups)?))
    }
}

/// One buffer in Megatron's fused QKV layout `[b, s, groups, hpg + 2, d]` (per group: its query
/// heads, then the key head, then the value head), what `linear_qkv`'s backward takes: no copy
/// puts the three gradients back together. The gradient is `[b, s, groups·(hpg+2)·d]`.
struct FusedQkv;

impl GradTarget for FusedQkv {
    type Grads = Tensor;

    fn buffers(dev: &CudaDevice, dtype: DType, d: &Dims) -> Result<GradBuffers> {
        if d.sq != d.sk {
            candle_core::bail!(
                "flash attention: a fused dQKV needs as many queries as keys ({} vs {})",
                d.sq,
                d.sk
            );
        }
        let hpg = d.heads / d.groups;
        let head = d.d as i64;
        let group = (hpg + 2) as i64 * head;
        let token = d.groups as i64 * group;
        let batch = d.sq as i64 * token;
        Ok(GradBuffers {
            bufs: vec![alloc_like(dev, dtype, d.b * d.sq * d.groups * (hpg + 2) * d.d)?],
            at: [(0, 0), (0, hpg * d.d), (0, (hpg + 1) * d.d)],
            dq_strides: [batch, group, head, token],
            dk_strides: [batch, group, token],
        })
    }

    fn grads(bufs: Vec<CudaStorage>, d: &Dims) -> Result<Self::Grads> {
        let [dqkv]: [CudaStorage; 1] =
            bufs.try_into().map_err(|_| candle_core::Error::Msg("one buffer".into()))?;
        let rows = d.groups * (d.heads / d.groups + 2) * d.d;
        Ok(grad_tensor(dqkv, (d.b, d.sq, rows)))
    }
}

/// [`FusedQkv`]'s buffer for dK and dV, with dQ in a second, dense `[b, s, heads, d]` buffer
/// (evenly strided heads, which cuDNN writes directly): `(dQKV, dQ)`, dQKV's query slots
/// unwritten. `rope_qkv::rope_qkv_backward` rotates dQ back into them.
struct FusedKvDenseQ;

impl GradTarget for FusedKvDenseQ {
    type Grads = (Tensor, Tensor);

    fn buffers(dev: &CudaDevice, dtype: DType, d: &Dims) -> Result<GradBuffers> {
        let mut out = FusedQkv::buffers(dev, dtype, d)?;
        let [bs, hs, ss] = bshd_strides(d.sq, d.heads, d.d);
        out.bufs.push(alloc_like(dev, dtype, d.b * d.sq * d.heads * d.d)?);
        out.at[0] = (1, 0);
        out.dq_strides = [bs, (d.heads / d.groups) as i64 * hs, hs, ss];
        Ok(out)
    }

    fn grads(bufs: Vec<CudaStorage>, d: &Dims) -> Result<Self::Grads> {
        let [dqkv, dq]: [CudaStorage; 2] =
            bufs.try_into().map_err(|_| candle_core::Error::Msg("two buffers".into()))?;
        let dqkv = FusedQkv::grads(vec![dqkv], d)?;
        Ok((dqkv, grad_tensor(dq, (d.b, d.sq, d.heads, d.d))))
    }
}

/// The backward of either forward (see [`Stats`]), writing the gradients where `G` says.
fn backward<G: GradTarget>(a: &BwdArgs) -> Result<G::Grads> {
    if a.lse.rank() == 3 {
        return backward_kernels::<G>(a);
    }
    if let Some(grads) = via_cudnn(a.spec, || backward_cudnn::<G>(a))? {
        return Ok(grads);
    }
    // cuDNN ran the forward but cannot run the backward: its statistics in the kernels' terms.
    let lse = a.lse.squeeze(3)?.affine(std::f64::consts::LOG2_E, 0.0)?;
    backward_kernels::<G>(&BwdArgs { lse: &lse, ..*a })
}

/// cuDNN's backward from its forward's statistics.
fn backward_cudnn<G: GradTarget>(a: &BwdArgs) -> Result<G::Grads> {
    with_views(a, |w| {
        let BwdViews {
            q: (q, ql),
            k: (k, kl),
            v: (v, vl),
            o: (o, ol),
            lse: (lse, ll),
            dout: (dout, dol),
            d,
        } = *w;
        if !wants_cudnn(a.spec, &d, a.varlen) {
            candle_core::bail!("cuDNN attention backward: not a call its graph covers");
        }
        let dtype = q.dtype();
        let dev = &q.device;
        let stream = dev.cuda_stream();
        let mut out = G::buffers(dev, dtype, &d)?;
        let hpg = d.heads / d.groups;
        // dQ goes straight to its buffer when its heads are evenly strided; in the fused QKV
        // layout it is written dense and then copied row by row between the key/value heads.
        let [dbs, dgs, dhs, dss] = out.dq_strides;
        let dq_dense = (dgs != hpg as i64 * dhs)
            .then(|| alloc_like(dev, dtype, d.b * d.sq * d.heads * d.d))
            .transpose()?;
        {
            let (q_copy, q_strides) = cudnn_query(q, ql, &d)?;
            let (qp, _g1) = match &q_copy {
                Some(c) => dptr(c, &stream, 0)?,
                None => dptr(q, &stream, ql.start_offset())?,
            };
            let (ko, _g2) = operand(k, kl, "k", &stream)?;
            let (vo, _g3) = operand(v, vl, "v", &stream)?;
            let (oo, _g4) = operand(o, ol, "o", &stream)?;
            let (doo, _g5) = operand(dout, dol, "dO", &stream)?;
            let (lp, _g6) = dptr(lse, &stream, ll.start_offset())?;
            let (dq, _g7) = match &dq_dense {
                Some(t) => {
                    let (p, g) = dptr(t, &stream, 0)?;
                    (Operand { ptr: p, strides: dense_query_strides(&d) }, g)
                }
                None => {
                    let (buf, offset) = out.at[0];
                    let (p, g) = dptr(&out.bufs[buf], &stream, offset)?;
                    (Operand { ptr: p, strides: [dbs, dhs, dss, 1] }, g)
                }
            };
            let kv_grad = |i: usize| -> Result<_> {
                let (buf, offset) = out.at[i];
                let [b, h, s] = out.dk_strides;
                let (p, g) = dptr(&out.bufs[buf], &stream, offset)?;
                Ok((Operand { ptr: p, strides: [b, h, s, 1] }, g))
            };
            let ((dk, _g8), (dv, _g9)) = (kv_grad(1)?, kv_grad(2)?);
            cudnn_sdpa::backward(
                dev,
                sdpa_dims(&d, dtype)?,
                [Operand { ptr: qp, strides: q_strides }, ko, vo, oo, doo],
                [dq, dk, dv],
                lp,
                a.spec.softmax_scale as f32,
            )?;
        }
        if let Some(dense) = dq_dense {
            // The inverse of the query's copy: back between each group's key and value heads.
            let (buf, offset) = out.at[0];
            let rows = grouped_query_rows(&d, [dbs, dgs, dss], offset).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "cuDNN attention backward: dQ strides {:?}",
                    out.dq_strides
                ))
            })?;
            copy_rows(&dense, &mut out.bufs[buf], rows.reversed())?;
        }
        G::grads(out.bufs, &d)
    })
}

/// Runs the backward kernels, writing the gradients where `G` says.
fn backward_kernels<G: GradTarget>(a: &BwdArgs) -> Result<G::Grads> {
    with_views(a, |w| {
        let BwdViews {
            q: (q, ql),
            k: (k, kl),
            v: (v, vl),
            o: (o, ol),
            lse: (lse, ll),
            dout: (dout, dol),
            d,
        } = *w;
        let dtype = q.dtype();
        let dev = &q.device;
        let stream = dev.cuda_stream();
        let tname = type_name(dtype)?;
        let rows = d.b * d.heads * d.sq;
        // Every row's dsum is written by the dot kernel before it is read.
        let dsum = CudaStorage {
            slice: CudaStorageSlice::F32(unsafe { dev.alloc::<f32>(rows)? }),
            device: dev.clone(),
        };
        // fp32 dQ accumulator: starts at zero, every key block adds its share with atomics.
        let dq_acc = CudaStorage {
            slice: CudaStorageSlice::F32(dev.alloc_zeros::<f32>(rows * d.d)?),
            device: dev.clone(),
        };
        let out = G::buffers(dev, dtype, &d)?;
        // GQA: one backward block per query head (more blocks in flight) whose dK/dV shares are
        // summed in fp32; MHA: one block per kv head writes dK/dV directly.
        let split = d.heads > d.groups;
        let kv_rows = d.b * d.groups * d.sk;
        let dkv_acc = CudaStorage {
            slice: CudaStorageSlice::F32(dev.alloc_zeros::<f32>(if split {
                2 * kv_rows * d.d
            } else {
                1
            })?),
            device: dev.clone(),
        };
        {
            let mut p = base_params(&d, a.spec, a.varlen);
            let cu_guard = a.varlen.map(|v| v.cu_seqlens.storage_and_layout());
            let _gc = match &cu_guard {
                Some((s, l)) => {
                    let Storage::Cuda(s) = &**s else {
                        candle_core::bail!("flash attention: cu_seqlens must be on the GPU")
                    };
                    let (cp, g) = dptr(s, &stream, l.start_offset())?;
                    p.cu_seqlens = cp;
                    Some(g)
                }
                None => None,
            };
            let (qp, _g1) = dptr(q, &stream, ql.start_offset())?;
            let (kp, _g2) = dptr(k, &stream, kl.start_offset())?;
            let (vp, _g3) = dptr(v, &stream, vl.start_offset())?;
            let (op, _g4) = dptr(o, &stream, ol.start_offset())?;
            let (dop, _g5) = dptr(dout, &stream, dol.start_offset())?;
            let (lp, _g6) = dptr(lse, &stream, ll.start_offset())?;
            let (sp, _g7) = dptr(&dsum, &stream, 0)?;
            let (ap, _g8) = dptr(&dq_acc, &stream, 0)?;
            let [gq, gk, gv] = out.at.map(|(buf, offset)| dptr(&out.bufs[buf], &stream, offset));
            let ((dqp, _g9), (dkp, _g10), (dvp, _g11)) = (gq?, gk?, gv?);
            let (dkvp, _g12) = dptr(&dkv_acc, &stream, 0)?;
            p.dkv_accum = dkvp;
            p.split_heads = i32::from(split);
            [p.q, p.k, p.v, p.o, p.dout, p.lse] = [qp, kp, vp, op, dop, lp];
            [p.dsum, p.dq_accum] = [sp, ap];
            [p.dq, p.dk, p.dv] = [dqp, dkp, dvp];
            [p.q_bs, p.q_gs, p.q_hs, p.q_ss] = q_strides(ql, d.groups)?;
            [p.k_bs, p.k_hs, p.k_ss] = strides(kl, "k")?;
            [p.v_bs, p.v_hs, p.v_ss] = strides(vl, "v")?;
            [p.o_bs, p.o_hs, p.o_ss] = strides(ol, "o")?;
            [p.do_bs, p.do_hs, p.do_ss] = strides(dol, "dO")?;
            [p.dq_bs, p.dq_gs, p.dq_hs, p.dq_ss] = out.dq_strides;
            [p.dk_bs, p.dk_hs, p.dk_ss] = out.dk_strides;
            // The elementwise passes' grids: (row blocks, head, batch); see kernels/flash_attn.cu.
            let dot_grid = (div_ceil(d.sq, ELEM_DOT_ROWS) as u32, d.heads as u32, d.b as u32);
            launch(dev, &format!("flash_bwd_dot_{tname}_d{}", d.d), dot_grid, ELEM_THREADS, 0, &p)?;
            let conv_rows = ELEM_THREADS as usize * ELEM_PAIRS / (d.d / 2);
            let (name, bn, threads, smem) = bwd_kernel(tname, d.d);
            let blocks_y = if split { d.heads } else { d.groups } as u32;
            let grid = (tiles(d.sk, a.varlen, bn), blocks_y, p.batch as u32);
            launch(dev, &name, grid, threads, smem, &p)?;
            if split {
                let grid = (div_ceil(d.sk, conv_rows) as u32, 2 * d.groups as u32, d.b as u32);
                launch(dev, &format!("flash_bwd_dkv_{tname}_d{}", d.d), grid, ELEM_THREADS, 0, &p)?;
            }
            let dq_grid = (div_ceil(d.sq, conv_rows) as u32, d.heads as u32, d.b as u32);
            launch(dev, &format!("flash_bwd_dq_{tname}_d{}", d.d), dq_grid, ELEM_THREADS, 0, &p)?;
        }
        G::grads(out.bufs, &d)
    })
}

/// The backward's operands as the launches read them (storage and layout) and the sizes.
#[derive(Clone, Copy)]
struct BwdViews<'a> {
    q: (&'a CudaStorage, &'a Layout),
    k: (&'a CudaStorage, &'a Layout),
    v: (&'a CudaStorage, &'a Layout),
    o: (&'a CudaStorage, &'a Layout),
    lse: (&'a CudaStorage, &'a Layout),
    dout: (&'a CudaStorage, &'a Layout),
    d: Dims,
}

/// Runs `f` on the operands of `a` (checked; their storages stay read-locked meanwhile).
fn with_views<R>(a: &BwdArgs, f: impl FnOnce(&BwdViews) -> Result<R>) -> Result<R> {
    let (qs, ql) = a.q.storage_and_layout();
    let (ks, kl) = a.k.storage_and_layout();
    let (vs, vl) = a.v.storage_and_layout();
    let (os, ol) = a.o.storage_and_layout();
    let (ls, ll) = a.lse.storage_and_layout();
    let (dos, dol) = a.dout.storage_and_layout();
    let d = dims(ql, kl)?;
    check(&d, a.varlen)?;
    f(&BwdViews {
        q: (as_cuda(&qs)?, ql),
        k: (as_cuda(&ks)?, kl),
        v: (as_cuda(&vs)?, vl),
        o: (as_cuda(&os)?, ol),
        lse: (as_cuda(&ls)?, ll),
        dout: (as_cuda(&dos)?, dol),
        d,
    })
}

fn as_cuda(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("flash attention: tensor not on the GPU"),
    }
}

/// The differentiable op: forward kernel in `cuda_fwd`, backward kernels in `bwd`.
struct FlashAttnOp {
    spec: FlashSpec,
    varlen: Option<Varlen>,
    /// Per-row logsumexp of the forward call, kept for `bwd`.
    lse: Mutex<Option<Tensor>>,
}

impl CustomOp3 for FlashAttnOp {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention runs on CUDA only; the CPU path is ops::attention")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = dims(ql, kl)?;
        let (out, lse, kind) = forward(&self.spec, self.varlen.as_ref(), q, ql, k, kl, v, vl)?;
        let shape: Shape = match kind {
            Stats::Log2 => (d.b, d.heads, d.sq).into(),
            Stats::Natural => (d.b, d.heads, d.sq, 1).into(),
        };
        let lse = Tensor::from_storage(Storage::Cuda(lse), shape, BackpropOp::none(), false);
        *self.lse.lock().map_err(|_| candle_core::Error::Msg("flash lse lock".into()))? = Some(lse);
        Ok((out, Shape::from((d.b, d.sq, d.heads, d.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("flash lse lock".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("flash attention: bwd before fwd".into()))?;
        // res / grad_res are [b, sq, heads, d]; the kernels index them as [b, heads, sq, d].
        let o = res.transpose(1, 2)?;
        let dout = kernel_ready(&grad_res.transpose(1, 2)?)?;
        let (dq, dk, dv) = backward::<Separate>(&BwdArgs {
            spec: &self.spec,
            varlen: self.varlen.as_ref(),
            q: &kernel_ready(q)?,
            k: &kernel_ready(k)?,
            v: &kernel_ready(v)?,
            o: &o,
            lse: &lse,
            dout: &dout,
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Query operand `q` itself when the kernel can read it in place, else a contiguous copy
/// (of the same rank); `k` gives the group count.
fn query_ready(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    if query_strides(q.layout(), k.dim(1)?).is_some() {
        Ok(q.clone())
    } else {
        q.contiguous()
    }
}

/// `t` itself when the kernel can read it in place, else a contiguous copy.
fn kernel_ready(t: &Tensor) -> Result<Tensor> {
    if kernel_strides(t.layout()).is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// Flash attention: `q` `[b, heads, sq, d]`, `k`/`v` `[b, groups, sk, d]` (bf16/f16 on CUDA)
/// → `[b, heads, sq, d]`, differentiable in all three inputs.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: FlashSpec,
    varlen: Option<Varlen>,
) -> Result<Tensor> {
    if q.rank() != 4 {
        // The op's gradient for q comes back as [b, heads, sq, d].
        candle_core::bail!(
            "flash attention with autograd: q must be [b, heads, sq, d], got {:?}",
            q.dims()
        );
    }
    let op = FlashAttnOp { spec, varlen, lse: Mutex::new(None) };
    let out = kernel_ready(q)?.apply_op3(&kernel_ready(k)?, &kernel_ready(v)?, op)?;
    out.transpose(1, 2)
}

/// Forward without a graph (benchmarks, and layers with a written-out backward): O
/// (`[b, h, s, d]` view) and the lse its backward needs. `q` may also be a grouped
/// `[b, groups, hpg, sq, d]` view (see [`crate::ops::flash::query_dims`]), read in place.
pub fn forward_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: FlashSpec,
    varlen: Option<Varlen>,
) -> Result<(Tensor, Tensor)> {
    let op = Arc::new(FlashAttnOp { spec, varlen, lse: Mutex::new(None) });
    let (q, k, v) = (query_ready(q, k)?, kernel_ready(k)?, kernel_ready(v)?);
    let out = {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (Storage::Cuda(qs), Storage::Cuda(ks), Storage::Cuda(vs)) = (&*qs, &*ks, &*vs) else {
            candle_core::bail!("flash attention: tensors must be on the GPU")
        };
        let (s, shape) = op.cuda_fwd(qs, ql, ks, kl, vs, vl)?;
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    };
    let lse = op.lse.lock().map_err(|_| candle_core::Error::Msg("lock".into()))?.clone();
    Ok((out.transpose(1, 2)?, lse.expect("cuda_fwd stores lse")))
}

/// Backward of a [`forward_with_lse`] result: (dQ, dK, dV).
#[allow(clippy::too_many_arguments)]
pub fn backward_only(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    spec: FlashSpec,
    varlen: Option<&Varlen>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let args = bwd_args(q, k, v, o, lse, dout, &spec, varlen)?;
    backward::<Separate>(&args.borrow())
}

/// Backward of a [`forward_with_lse`] result of self-attention, written as one dQKV
/// `[b, s, groups·(hpg+2)·d]` in Megatron's fused QKV layout (see [`FusedQkv`]), or with dQ
/// apart, dense `[b, s, heads, d]`, when `dense_q` (see [`FusedKvDenseQ`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_to_qkv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    spec: FlashSpec,
    varlen: Option<&Varlen>,
    dense_q: bool,
) -> Result<QkvGrads> {
    let args = bwd_args(q, k, v, o, lse, dout, &spec, varlen)?;
    Ok(match dense_q {
        true => {
            let (dqkv, dq) = backward::<FusedKvDenseQ>(&args.borrow())?;
            QkvGrads::DenseQ(dqkv, dq)
        }
        false => QkvGrads::Fused(backward::<FusedQkv>(&args.borrow())?),
    })
}

/// The operands of a public backward call, made readable by the kernels.
struct OwnedBwdArgs<'a> {
    spec: &'a FlashSpec,
    varlen: Option<&'a Varlen>,
    tensors: [Tensor; 5],
    lse: &'a Tensor,
}

impl OwnedBwdArgs<'_> {
    fn borrow(&self) -> BwdArgs<'_> {
        let [q, k, v, o, dout] = &self.tensors;
        BwdArgs { spec: self.spec, varlen: self.varlen, q, k, v, o, lse: self.lse, dout }
    }
}

#[allow(clippy::too_many_arguments)]
fn bwd_args<'a>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &'a Tensor,
    dout: &Tensor,
    spec: &'a FlashSpec,
    varlen: Option<&'a Varlen>,
) -> Result<OwnedBwdArgs<'a>> {
    Ok(OwnedBwdArgs {
        spec,
        varlen,
        tensors: [
            query_ready(q, k)?,
            kernel_ready(k)?,
            kernel_ready(v)?,
            kernel_ready(o)?,
            kernel_ready(dout)?,
        ],
        lse,
    })
}
