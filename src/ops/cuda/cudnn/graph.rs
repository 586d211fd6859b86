//! A cuDNN operation graph built through the backend API, its execution plan, and running it.
//!
//! The builder mirrors cuDNN's own vocabulary (tensors with unique ids, pointwise / matmul /
//! reduction / reshape operations between them); [`super::sdpa`] writes the attention graphs
//! with it. Every descriptor is owned by the [`Plan`] that uses it, so nothing cuDNN refers to
//! is freed while the plan lives.

use super::ffi::{api, attr, kind, ty, Api, DataType, Handle, Pointwise, Raw, Reduce, HEUR_MODE_A};
use candle_core::Result;
use std::collections::HashMap;
use std::ffi::c_void;

/// One backend descriptor, destroyed on drop.
pub struct Descriptor {
    raw: Raw,
    api: &'static Api,
}

// SAFETY: a finalized cuDNN descriptor is immutable; executions that use it are serialized by
// the handle's mutex (see `super::handle`).
unsafe impl Send for Descriptor {}
unsafe impl Sync for Descriptor {}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: `raw` came from cudnnBackendCreateDescriptor and is destroyed once.
        unsafe { (self.api.destroy_descriptor)(self.raw) };
    }
}

impl Descriptor {
    pub fn new(kind: i32) -> Result<Self> {
        let api = api().map_err(candle_core::Error::Msg)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one descriptor pointer.
        api.check(unsafe { (api.create_descriptor)(kind, &mut raw) }, "create descriptor")?;
        Ok(Self { raw, api })
    }

    pub fn raw(&self) -> Raw {
        self.raw
    }

    /// Sets attribute `name` to `values` of cuDNN attribute type `ty` (`T` must be that
    /// type's C representation).
    pub fn set<T: Copy>(&self, name: i32, ty: i32, values: &[T]) -> Result<()> {
        // SAFETY: `values` holds `len` elements of the C type cuDNN reads for `ty`.
        let status = unsafe {
            (self.api.set_attribute)(
                self.raw,
                name,
                ty,
                values.len() as i64,
                values.as_ptr() as *const c_void,
            )
        };
        self.api.check(status, &format!("set attribute {name}"))
    }

    fn set_descs(&self, name: i32, descs: &[&Descriptor]) -> Result<()> {
        let raws: Vec<Raw> = descs.iter().map(|d| d.raw).collect();
        self.set(name, ty::BACKEND_DESCRIPTOR, &raws)
    }

    pub fn finalize(&self, what: &str) -> Result<()> {
        // SAFETY: finalizes a descriptor whose attributes were set above.
        self.api.check(unsafe { (self.api.finalize)(self.raw) }, &format!("finalize {what}"))
    }

    fn get_i64(&self, name: i32) -> Result<i64> {
        let (mut n, mut v) = (0i64, 0i64);
        // SAFETY: one INT64 element is written into `v`.
        let status = unsafe {
            (self.api.get_attribute)(self.raw, name, ty::INT64, 1, &mut n, &mut v as *mut i64 as _)
        };
        self.api.check(status, &format!("get attribute {name}"))?;
        Ok(v)
    }
}

/// How a tensor of the graph is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Device memory passed at execution.
    Memory,
    /// An intermediate cuDNN keeps to itself (fused away).
    Virtual,
    /// A host scalar passed at execution (scales, masking fill values).
    ByValue,
}

/// A tensor of the graph: unique id, element type, 4-d dims and strides, backing.
#[derive(Debug, Clone, Copy)]
pub struct TensorSpec {
    pub uid: i64,
    pub dtype: DataType,
    pub dims: [i64; 4],
    pub strides: [i64; 4],
    pub backing: Backing,
}

impl TensorSpec {
    /// A host scalar (`[1, 1, 1, 1]` f32).
    pub fn scalar(uid: i64) -> Self {
        Self {
            uid,
            dtype: DataType::Float,
            dims: [1; 4],
            strides: [1; 4],
            backing: Backing::ByValue,
        }
    }
}

/// An operation graph under construction.
#[derive(Default)]
pub struct GraphBuilder {
    tensors: HashMap<i64, Descriptor>,
    /// Pointwise / matmul / reduction descriptors the operations refer to.
    configs: Vec<Descriptor>,
    ops: Vec<Descriptor>,
}

impl GraphBuilder {
    /// Declares a tensor; returns its uid.
    pub fn tensor(&mut self, t: TensorSpec) -> Result<i64> {
        let d = Descriptor::new(kind::TENSOR)?;
        d.set(attr::TENSOR_DATA_TYPE, ty::DATA_TYPE, &[t.dtype as i32])?;
        d.set(attr::TENSOR_DIMENSIONS, ty::INT64, &t.dims)?;
        d.set(attr::TENSOR_STRIDES, ty::INT64, &t.strides)?;
        d.set(attr::TENSOR_UNIQUE_ID, ty::INT64, &[t.uid])?;
        d.set(attr::TENSOR_BYTE_ALIGNMENT, ty::INT64, &[16i64])?;
        if t.backing == Backing::Virtual {
            d.set(attr::TENSOR_IS_VIRTUAL, ty::BOOLEAN, &[true])?;
        }
        if t.backing == Backing::ByValue {
            d.set(attr::TENSOR_IS_BY_VALUE, ty::BOOLEAN, &[true])?;
        }
        d.finalize(&format!("tensor {}", t.uid))?;
        if self.tensors.insert(t.uid, d).is_some() {
            candle_core::bail!("cuDNN graph: tensor uid {} declared twice", t.uid);
        }
        Ok(t.uid)
    }

    fn get(&self, uid: i64) -> Result<&Descriptor> {
        self.tensors
            .get(&uid)
            .ok_or_else(|| candle_core::Error::Msg(format!("cuDNN graph: no tensor {uid}")))
    }

    /// `y = mode(x[, b])`; `t` is the condition of a binary select, `axis` the axis of an
    /// index generator.
    pub fn pointwise(
        &mut self,
        mode: Pointwise,
        x: i64,
        b: Option<i64>,
        t: Option<i64>,
        y: i64,
        axis: Option<i64>,
    ) -> Result<()> {
        let pw = Descriptor::new(kind::POINTWISE)?;
        pw.set(attr::POINTWISE_MODE, ty::POINTWISE_MODE, &[mode as i32])?;
        let prec = if mode == Pointwise::CmpGe { DataType::Boolean } else { DataType::Float };
        pw.set(attr::POINTWISE_MATH_PREC, ty::DATA_TYPE, &[prec as i32])?;
        if let Some(axis) = axis {
            pw.set(attr::POINTWISE_AXIS, ty::INT64, &[axis])?;
        }
        pw.finalize("pointwise")?;
        let op = Descriptor::new(kind::OPERATION_POINTWISE)?;
        op.set_descs(attr::OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?;
        op.set_descs(attr::OPERATION_POINTWISE_XDESC, &[self.get(x)?])?;
        if let Some(b) = b {
            op.set_descs(attr::OPERATION_POINTWISE_BDESC, &[self.get(b)?])?;
        }
        if let Some(t) = t {
            op.set_descs(attr::OPERATION_POINTWISE_TDESC, &[self.get(t)?])?;
        }
        op.set_descs(attr::OPERATION_POINTWISE_YDESC, &[self.get(y)?])?;
        op.set(attr::OPERATION_POINTWISE_ALPHA1, ty::FLOAT, &[1f32])?;
        op.set(attr::OPERATION_POINTWISE_ALPHA2, ty::FLOAT, &[1f32])?;
        op.finalize(&format!("pointwise {mode:?} -> {y}"))?;
        self.configs.push(pw);
        self.ops.push(op);
        Ok(())
    }

    /// `c = a @ b` over the last two dims, batched over the first two (f32 accumulation).
    pub fn matmul(&mut self, a: i64, b: i64, c: i64) -> Result<()> {
        let mm = Descriptor::new(kind::MATMUL)?;
        mm.set(attr::MATMUL_COMP_TYPE, ty::DATA_TYPE, &[DataType::Float as i32])?;
        mm.finalize("matmul")?;
        let op = Descriptor::new(kind::OPERATION_MATMUL)?;
        op.set_descs(attr::OPERATION_MATMUL_ADESC, &[self.get(a)?])?;
        op.set_descs(attr::OPERATION_MATMUL_BDESC, &[self.get(b)?])?;
        op.set_descs(attr::OPERATION_MATMUL_CDESC, &[self.get(c)?])?;
        op.set_descs(attr::OPERATION_MATMUL_DESC, &[&mm])?;
        op.finalize(&format!("matmul -> {c}"))?;
        self.configs.push(mm);
        self.ops.push(op);
        Ok(())
    }

    /// `y = reduce(x)` over the dims where `y` has extent 1 (f32).
    pub fn reduction(&mut self, op_kind: Reduce, x: i64, y: i64) -> Result<()> {
        let r = Descriptor::new(kind::REDUCTION)?;
        r.set(attr::REDUCTION_OPERATOR, ty::REDUCTION_OPERATOR_TYPE, &[op_kind as i32])?;
        r.set(attr::REDUCTION_COMP_TYPE, ty::DATA_TYPE, &[DataType::Float as i32])?;
        r.finalize("reduction")?;
        let op = Descriptor::new(kind::OPERATION_REDUCTION)?;
        op.set_descs(attr::OPERATION_REDUCTION_XDESC, &[self.get(x)?])?;
        op.set_descs(attr::OPERATION_REDUCTION_YDESC, &[self.get(y)?])?;
        op.set_descs(attr::OPERATION_REDUCTION_DESC, &[&r])?;
        op.finalize(&format!("reduction {op_kind:?} -> {y}"))?;
        self.configs.push(r);
        self.ops.push(op);
        Ok(())
    }

    /// `y` = `x` under another shape or layout.
    pub fn reshape(&mut self, x: i64, y: i64) -> Result<()> {
        let op = Descriptor::new(kind::OPERATION_RESHAPE)?;
        op.set_descs(attr::OPERATION_RESHAPE_XDESC, &[self.get(x)?])?;
        op.set_descs(attr::OPERATION_RESHAPE_YDESC, &[self.get(y)?])?;
        op.finalize(&format!("reshape -> {y}"))?;
        self.ops.push(op);
        Ok(())
    }

    /// Finalizes the graph on `handle` and builds the first engine configuration cuDNN's
    /// heuristics (mode A) rank that finalizes into an execution plan.
    pub fn build(self, handle: Handle, what: &str) -> Result<Plan> {
        let graph = Descriptor::new(kind::OPERATIONGRAPH)?;
        graph.set(attr::OPERATIONGRAPH_HANDLE, ty::HANDLE, &[handle.0])?;
        let ops: Vec<&Descriptor> = self.ops.iter().collect();
        graph.set_descs(attr::OPERATIONGRAPH_OPS, &ops)?;
        graph.finalize(&format!("{what} operation graph"))?;
        let heur = Descriptor::new(kind::ENGINEHEUR)?;
        heur.set_descs(attr::ENGINEHEUR_OPERATION_GRAPH, &[&graph])?;
        heur.set(attr::ENGINEHEUR_MODE, ty::HEUR_MODE, &[HEUR_MODE_A])?;
        heur.finalize(&format!("{what} heuristics"))?;
        let api = heur.api;
        let mut count = 0i64;
        // SAFETY: asks only for the number of results (no elements written).
        let status = unsafe {
            (api.get_attribute)(
                heur.raw,
                attr::ENGINEHEUR_RESULTS,
                ty::BACKEND_DESCRIPTOR,
                0,
                &mut count,
                std::ptr::null_mut(),
            )
        };
        api.check(status, &format!("{what} heuristics count"))?;
        let configs: Vec<Descriptor> =
            (0..count).map(|_| Descriptor::new(kind::ENGINECFG)).collect::<Result<_>>()?;
        let mut raws: Vec<Raw> = configs.iter().map(|c| c.raw).collect();
        let mut got = 0i64;
        // SAFETY: cuDNN fills up to `count` engine-config descriptors created above.
        let status = unsafe {
            (api.get_attribute)(
                heur.raw,
                attr::ENGINEHEUR_RESULTS,
                ty::BACKEND_DESCRIPTOR,
                count,
                &mut got,
                raws.as_mut_ptr() as *mut c_void,
            )
        };
        api.check(status, &format!("{what} heuristics results"))?;
        let mut refusals = Vec::new();
        for config in configs.into_iter().take(got.max(0) as usize) {
            let plan = Descriptor::new(kind::EXECUTION_PLAN)?;
            plan.set_descs(attr::EXECUTION_PLAN_ENGINE_CONFIG, &[&config])?;
            match plan.finalize(&format!("{what} execution plan")) {
                Ok(()) => {
                    let workspace = plan.get_i64(attr::EXECUTION_PLAN_WORKSPACE_SIZE)?.max(0);
                    return Ok(Plan {
                        plan,
                        workspace: workspace as usize,
                        _keep: (self, graph, heur, config),
                    });
                }
                Err(e) => refusals.push(e.to_string()),
            }
        }
        candle_core::bail!(
            "cuDNN has no engine for the {what} graph ({} candidates{})",
            got,
            if refusals.is_empty() { String::new() } else { format!(": {}", refusals.join("; ")) }
        )
    }
}

/// A finalized execution plan and the descriptors it was built from.
pub struct Plan {
    plan: Descriptor,
    /// Bytes of device workspace an execution needs.
    pub workspace: usize,
    _keep: (GraphBuilder, Descriptor, Descriptor, Descriptor),
}

impl Plan {
    /// Runs the plan on `handle` (bound to the caller's stream): `pointers` gives every
    /// non-virtual tensor's device address (by-value tensors: a host address of the value).
    pub fn execute(
        &self,
        handle: Handle,
        pointers: &[(i64, *mut c_void)],
        workspace: u64,
    ) -> Result<()> {
        let pack = Descriptor::new(kind::VARIANT_PACK)?;
        let uids: Vec<i64> = pointers.iter().map(|p| p.0).collect();
        let ptrs: Vec<*mut c_void> = pointers.iter().map(|p| p.1).collect();
        pack.set(attr::VARIANT_PACK_UNIQUE_IDS, ty::INT64, &uids)?;
        pack.set(attr::VARIANT_PACK_DATA_POINTERS, ty::VOID_PTR, &ptrs)?;
        pack.set(attr::VARIANT_PACK_WORKSPACE, ty::VOID_PTR, &[workspace as *mut c_void])?;
        pack.finalize("variant pack")?;
        let api = pack.api;
        // SAFETY: every pointer in the pack refers to memory the caller keeps alive and
        // stream-ordered until the plan's kernels have run.
        api.check(unsafe { (api.execute)(handle.0, self.plan.raw, pack.raw) }, "execute")
    }
}
