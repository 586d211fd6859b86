//! cuDNN's fused causal attention (forward and backward) as cuDNN's own frontend writes it.
//!
//! The graphs below are the ones cudnn-frontend 1.18 lowers `sdpa` / `sdpa_backward` to for
//! PyTorch 2.11 (read from cuDNN 9.19's API log on an H200, `scripts/bench/cudnn_graph_log.py`):
//! cuDNN recognises these exact patterns and runs its flash-attention engines on them. Tensor
//! uids follow that log so a log of ours compares line by line.
//!
//! Layouts: q, o, dO, dQ are `[b, heads, s, d]` and k, v, dK, dV `[b, groups, s, d]`, each
//! with any strides whose last dim is dense; the statistics are the natural-log logsumexp of
//! the scaled scores, f32 `[b, heads, s, 1]` contiguous.

use super::ffi::{DataType, Pointwise, Reduce};
use super::graph::{Backing, GraphBuilder, Plan, TensorSpec};
use super::handle::with_handle;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

/// Problem sizes (self-attention: as many keys as queries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SdpaDims {
    pub b: usize,
    pub heads: usize,
    pub groups: usize,
    pub s: usize,
    pub d: usize,
    pub dtype: DataType,
}

/// A device operand: address and `[b, h, s, d]` element strides (last one 1).
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub strides: [i64; 4],
}

impl Operand {
    fn raw(&self) -> *mut c_void {
        self.ptr as *mut c_void
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Direction {
    Forward,
    Backward,
}

/// What a plan depends on: the device, sizes and every operand's strides.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    ordinal: usize,
    direction: Direction,
    dims: SdpaDims,
    strides: Vec<[i64; 4]>,
}

type PlanCache = Mutex<HashMap<PlanKey, std::result::Result<Arc<Plan>, String>>>;

/// Most plans kept. cuDNN compiles its attention engines at run time, once per shape:
/// training has a few shapes, but generation prefills every prompt length, and past this
/// many shapes mbridge's own kernels (`attention_backend = "auto"`) run the new ones.
const MAX_PLANS: usize = 64;

/// Plans by key; a shape cuDNN refused stays refused (its error is kept) so it is asked once.
fn plans() -> &'static PlanCache {
    static PLANS: OnceLock<PlanCache> = OnceLock::new();
    PLANS.get_or_init(Default::default)
}

fn plan_for(
    handle: super::ffi::Handle,
    key: PlanKey,
    build: impl FnOnce() -> Result<GraphBuilder>,
) -> Result<Arc<Plan>> {
    let mut cache = plans().lock().map_err(|_| candle_core::Error::Msg("cuDNN plans".into()))?;
    if cache.len() >= MAX_PLANS && !cache.contains_key(&key) {
        candle_core::bail!(
            "{MAX_PLANS} attention shapes already have cuDNN plans; a new one is not compiled"
        );
    }
    let entry = cache.entry(key.clone()).or_insert_with(|| {
        let what = match key.direction {
            Direction::Forward => "attention forward",
            Direction::Backward => "attention backward",
        };
        build().and_then(|g| g.build(handle, what)).map(Arc::new).map_err(|e| e.to_string())
    });
    entry.clone().map_err(candle_core::Error::Msg)
}

/// Contiguous strides of `dims`.
fn dense(dims: [i64; 4]) -> [i64; 4] {
    [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1]
}

/// `[b, h, s, d]` strides seen as the transposed `[b, h, d, s]`.
fn transposed(s: [i64; 4]) -> [i64; 4] {
    [s[0], s[1], s[3], s[2]]
}

/// Declares the graph's tensors in the attention's terms (scores, rows, heads).
struct Tensors<'a> {
    g: &'a mut GraphBuilder,
    dims: SdpaDims,
}

impl Tensors<'_> {
    /// A tensor in device memory, passed at execution.
    fn io(&mut self, uid: i64, dims: [i64; 4], strides: [i64; 4], dtype: DataType) -> Result<i64> {
        self.g.tensor(TensorSpec { uid, dtype, dims, strides, backing: Backing::Memory })
    }

    /// A tensor cuDNN keeps to itself.
    fn virt(
        &mut self,
        uid: i64,
        dims: [i64; 4],
        strides: [i64; 4],
        dtype: DataType,
    ) -> Result<i64> {
        self.g.tensor(TensorSpec { uid, dtype, dims, strides, backing: Backing::Virtual })
    }

    /// A `[b, h, s, s]` intermediate (scores, probabilities, masks) kept inside cuDNN.
    fn scores(&mut self, uid: i64, dtype: DataType) -> Result<i64> {
        let d = self.score_dims();
        self.virt(uid, d, dense(d), dtype)
    }

    fn score_dims(&self) -> [i64; 4] {
        let SdpaDims { b, heads, s, .. } = self.dims;
        [b as i64, heads as i64, s as i64, s as i64]
    }

    /// `[b, h, s, 1]`: one value per query row (statistics, dO·O sums).
    fn row_dims(&self) -> [i64; 4] {
        let SdpaDims { b, heads, s, .. } = self.dims;
        [b as i64, heads as i64, s as i64, 1]
    }

    /// `[b, heads, s, d]`: q, o and their gradients (`heads`), or k, v (`groups`).
    fn head_dims(&self, heads: usize) -> [i64; 4] {
        let SdpaDims { b, s, d, .. } = self.dims;
        [b as i64, heads as i64, s as i64, d as i64]
    }
}

/// The causal mask on scores `x` (uid): keeps `x` where row ≥ column, else -inf (`neg_inf`).
/// Index uids `row`, `col`, condition `cond`, result `out`.
fn causal_mask(
    t: &mut Tensors,
    x: i64,
    [row, col, cond, out]: [i64; 4],
    neg_inf: i64,
) -> Result<()> {
    t.scores(col, DataType::Int32)?;
    t.scores(row, DataType::Int32)?;
    t.scores(cond, DataType::Boolean)?;
    t.scores(out, DataType::Float)?;
    t.g.pointwise(Pointwise::GenIndex, x, None, None, col, Some(3))?;
    t.g.pointwise(Pointwise::GenIndex, x, None, None, row, Some(2))?;
    t.g.pointwise(Pointwise::CmpGe, row, Some(col), None, cond, None)?;
    t.g.pointwise(Pointwise::BinarySelect, x, Some(neg_inf), Some(cond), out, None)
}

fn forward_graph(dims: SdpaDims, [q, k, v, o]: [[i64; 4]; 4]) -> Result<GraphBuilder> {
    let mut g = GraphBuilder::default();
    let mut t = Tensors { g: &mut g, dims };
    let io = dims.dtype;
    let (h, gr) = (dims.heads, dims.groups);
    let kv_t = [dims.b as i64, gr as i64, dims.d as i64, dims.s as i64];
    t.io(0, t.head_dims(h), q, io)?;
    t.io(1, kv_t, transposed(k), io)?;
    t.io(2, t.head_dims(gr), v, io)?;
    t.io(3, t.head_dims(h), o, io)?;
    t.scores(4, DataType::Float)?;
    t.g.tensor(TensorSpec::scalar(5))?;
    t.scores(6, DataType::Float)?;
    let rows = t.row_dims();
    t.io(8, rows, dense(rows), DataType::Float)?;
    t.g.tensor(TensorSpec::scalar(11))?;
    t.scores(13, io)?;
    t.virt(14, rows, dense(rows), DataType::Float)?;
    t.scores(15, DataType::Float)?;
    t.scores(16, DataType::Float)?;
    t.virt(17, rows, dense(rows), DataType::Float)?;
    t.virt(18, rows, dense(rows), DataType::Float)?;
    t.g.matmul(0, 1, 4)?;
    t.g.pointwise(Pointwise::Mul, 4, Some(5), None, 6, None)?;
    causal_mask(&mut t, 6, [7, 9, 10, 12], 11)?;
    t.g.reduction(Reduce::Max, 12, 14)?;
    t.g.pointwise(Pointwise::Sub, 12, Some(14), None, 15, None)?;
    t.g.pointwise(Pointwise::Exp, 15, None, None, 16, None)?;
    t.g.reduction(Reduce::Add, 16, 17)?;
    t.g.pointwise(Pointwise::Log, 17, None, None, 18, None)?;
    t.g.pointwise(Pointwise::Add, 14, Some(18), None, 8, None)?;
    t.g.pointwise(Pointwise::Div, 16, Some(17), None, 13, None)?;
    t.g.matmul(13, 2, 3)?;
    Ok(g)
}

/// Forward: writes `o` and the f32 statistics (`stats`, `[b, h, s]` contiguous).
pub fn forward(
    dev: &CudaDevice,
    dims: SdpaDims,
    [q, k, v, o]: [Operand; 4],
    stats: u64,
    scale: f32,
) -> Result<()> {
    let strides = [q.strides, k.strides, v.strides, o.strides];
    let neg_inf = f32::NEG_INFINITY;
    let pointers = [
        (0, q.raw()),
        (1, k.raw()),
        (2, v.raw()),
        (3, o.raw()),
        (5, &scale as *const f32 as *mut c_void),
        (8, stats as *mut c_void),
        (11, &neg_inf as *const f32 as *mut c_void),
    ];
    let build = || forward_graph(dims, strides);
    run(dev, Direction::Forward, dims, &strides, build, &pointers)
}

/// Runs the plan for `direction`, `dims` and the operands' `strides` (built by `build` on
/// first use) with `pointers` and a fresh workspace.
fn run(
    dev: &CudaDevice,
    direction: Direction,
    dims: SdpaDims,
    strides: &[[i64; 4]],
    build: impl FnOnce() -> Result<GraphBuilder>,
    pointers: &[(i64, *mut c_void)],
) -> Result<()> {
    let ordinal = dev.cuda_stream().context().ordinal();
    let key = PlanKey { ordinal, direction, dims, strides: strides.to_vec() };
    with_handle(dev, |handle| {
        let plan = plan_for(handle, key, build)?;
        let workspace = Workspace::new(dev, plan.workspace)?;
        plan.execute(handle, pointers, workspace.ptr)
    })
}

fn backward_graph(dims: SdpaDims, strides: [[i64; 4]; 8]) -> Result<GraphBuilder> {
    let [q, k, v, o, dout, dq, dk, dv] = strides;
    let mut g = GraphBuilder::default();
    let mut t = Tensors { g: &mut g, dims };
    let io = dims.dtype;
    let f32t = DataType::Float;
    let (h, gr) = (dims.heads, dims.groups);
    let gqa = h != gr;
    let kv_t = [dims.b as i64, gr as i64, dims.d as i64, dims.s as i64];
    let (hd, kvd, rows) = (t.head_dims(h), t.head_dims(gr), t.row_dims());
    // Per-head [b, h, s, d] intermediates in the frontend's layout.
    let (s_, d_) = (dims.s as i64, dims.d as i64);
    let per_head = [h as i64 * s_ * d_, s_ * d_, d_, 1];
    t.io(0, hd, q, io)?;
    t.io(1, kv_t, transposed(k), io)?;
    t.io(2, kv_t, transposed(v), io)?;
    t.io(3, hd, o, io)?;
    t.virt(4, hd, [h as i64 * s_ * d_, s_ * d_, h as i64 * d_, 1], f32t)?;
    t.g.tensor(TensorSpec::scalar(5))?;
    t.virt(6, rows, dense(rows), f32t)?;
    t.g.tensor(TensorSpec::scalar(7))?;
    t.io(8, rows, dense(rows), f32t)?;
    t.io(9, hd, dout, io)?;
    t.io(10, hd, dq, io)?;
    t.io(11, kvd, dk, io)?;
    t.io(12, kvd, dv, io)?;
    t.io(13, rows, dense(rows), f32t)?;
    for uid in [14, 15, 16] {
        t.scores(uid, f32t)?;
    }
    t.g.tensor(TensorSpec::scalar(20))?;
    t.scores(22, f32t)?;
    let sd = t.score_dims();
    t.virt(23, sd, transposed(dense(sd)), io)?;
    for uid in [25, 26, 27, 28] {
        t.scores(uid, f32t)?;
    }
    t.virt(29, sd, transposed(dense(sd)), io)?;
    t.virt(31, kvd, k, f32t)?;
    t.io(32, hd, per_head, f32t)?;
    // With GQA the per-query-head dK/dV (30, 24) are summed into each group's.
    let (dv_h, dk_h) = if gqa { (24, 30) } else { (12, 11) };
    if gqa {
        t.virt(24, hd, per_head, io)?;
        t.virt(30, hd, per_head, io)?;
    }
    t.g.matmul(9, 2, 25)?;
    t.g.matmul(0, 1, 14)?;
    t.g.pointwise(Pointwise::Mul, 9, Some(3), None, 4, None)?;
    t.g.reshape(1, 31)?;
    t.g.pointwise(Pointwise::Mul, 14, Some(5), None, 15, None)?;
    t.g.pointwise(Pointwise::Sub, 15, Some(8), None, 16, None)?;
    causal_mask(&mut t, 16, [17, 18, 19, 21], 20)?;
    t.g.pointwise(Pointwise::Exp, 21, None, None, 22, None)?;
    t.g.reshape(22, 23)?;
    t.g.matmul(23, 9, dv_h)?;
    t.g.reduction(Reduce::Add, 4, 6)?;
    t.g.pointwise(Pointwise::Mul, 6, Some(7), None, 13, None)?;
    t.g.pointwise(Pointwise::Sub, 25, Some(13), None, 26, None)?;
    t.g.pointwise(Pointwise::Mul, 26, Some(22), None, 27, None)?;
    t.g.pointwise(Pointwise::Mul, 27, Some(5), None, 28, None)?;
    t.g.matmul(28, 31, 32)?;
    t.g.pointwise(Pointwise::Identity, 32, None, None, 10, None)?;
    t.g.reshape(28, 29)?;
    t.g.matmul(29, 0, dk_h)?;
    if gqa {
        t.g.reduction(Reduce::Add, 30, 11)?;
        t.g.reduction(Reduce::Add, 24, 12)?;
    }
    Ok(g)
}

/// Backward: writes dQ, dK, dV from q, k, v, o, dO and the forward's statistics.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &CudaDevice,
    dims: SdpaDims,
    [q, k, v, o, dout]: [Operand; 5],
    [dq, dk, dv]: [Operand; 3],
    stats: u64,
    scale: f32,
) -> Result<()> {
    let strides = [
        q.strides,
        k.strides,
        v.strides,
        o.strides,
        dout.strides,
        dq.strides,
        dk.strides,
        dv.strides,
    ];
    let (neg_inf, one) = (f32::NEG_INFINITY, 1f32);
    let rows = dims.b * dims.heads * dims.s;
    // The row sums of dO·O, and the f32 dQ that every key block adds into (from zero).
    let dsum = unsafe { dev.alloc::<f32>(rows) }?;
    let dq_accum = dev.alloc_zeros::<f32>(rows * dims.d)?;
    let stream = dev.cuda_stream();
    let (dsum_ptr, _g1) = dsum.device_ptr(&stream);
    let (acc_ptr, _g2) = dq_accum.device_ptr(&stream);
    let pointers = [
        (0, q.raw()),
        (1, k.raw()),
        (2, v.raw()),
        (3, o.raw()),
        (5, &scale as *const f32 as *mut c_void),
        (7, &one as *const f32 as *mut c_void),
        (8, stats as *mut c_void),
        (9, dout.raw()),
        (10, dq.raw()),
        (11, dk.raw()),
        (12, dv.raw()),
        (13, dsum_ptr as *mut c_void),
        (20, &neg_inf as *const f32 as *mut c_void),
        (32, acc_ptr as *mut c_void),
    ];
    let build = || backward_graph(dims, strides);
    run(dev, Direction::Backward, dims, &strides, build, &pointers)
}

/// Device scratch for one execution, freed (stream-ordered) after it.
struct Workspace {
    _buf: Option<CudaSlice<u8>>,
    ptr: u64,
}

impl Workspace {
    fn new(dev: &CudaDevice, bytes: usize) -> Result<Self> {
        if bytes == 0 {
            return Ok(Self { _buf: None, ptr: 0 });
        }
        // cuDNN initialises what it reads of its workspace.
        let buf = unsafe { dev.alloc::<u8>(bytes) }?;
        let ptr = {
            let stream = dev.cuda_stream();
            let (p, _g) = buf.device_ptr(&stream);
            p
        };
        Ok(Self { _buf: Some(buf), ptr })
    }
}
