//! Activation recompute as Megatron's `recompute_granularity = "full"` with
//! `recompute_method` uniform/block and `recompute_num_layers`.
//!
//! candle has no checkpoint primitive, so a checkpointed segment of layers is one CustomOp on
//! its input: the forward runs the layers on a detached copy of the input and keeps only the
//! output (every intermediate activation is freed at once); the backward runs the same layers
//! again with a graph on the saved input, backpropagates the output gradient through them and
//! returns the input gradient. The layers' parameter gradients cannot leave a CustomOp's
//! backward, so they go to a [`RecomputeGrads`] sink that the training step adds to its
//! gradients after `backward()` (the outer graph never sees those parameters, so nothing is
//! counted twice).

use crate::config::model::{ModelConfig, RecomputeGranularity, RecomputeMethod};
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, TensorId, Var,
};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Which layers of a stage are recomputed, in checkpointed segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecomputePlan {
    pub method: RecomputeMethod,
    pub num_layers: usize,
}

impl RecomputePlan {
    /// The plan of `cfg`, or None without full recompute (selective recompute is
    /// [`SelectiveRecompute`]).
    pub fn from_config(cfg: &ModelConfig) -> Result<Option<Self>> {
        match cfg.recompute_granularity {
            None | Some(RecomputeGranularity::Selective) => Ok(None),
            Some(RecomputeGranularity::Full) => {
                let Some(method) = cfg.recompute_method else {
                    bail!("model.recompute_granularity = \"full\" needs model.recompute_method (uniform or block)")
                };
                let num_layers = cfg.recompute_num_layers.unwrap_or(1);
                if num_layers == 0 {
                    bail!("model.recompute_num_layers must be at least 1 with full recompute");
                }
                Ok(Some(Self { method, num_layers }))
            }
        }
    }

    /// Splits a stage's `n` layers into consecutive segments, `true` = checkpointed.
    /// Uniform: segments of `num_layers` layers, each checkpointed (the last may be shorter).
    /// Block: the first `num_layers` layers checkpointed one by one, the rest run normally.
    pub fn segments(&self, n: usize) -> Vec<(Range<usize>, bool)> {
        match self.method {
            RecomputeMethod::Uniform => (0..n)
                .step_by(self.num_layers)
                .map(|s| (s..(s + self.num_layers).min(n), true))
                .collect(),
            RecomputeMethod::Block => {
                let k = self.num_layers.min(n);
                let mut v: Vec<_> = (0..k).map(|i| (i..i + 1, true)).collect();
                if k < n {
                    v.push((k..n, false));
                }
                v
            }
        }
    }
}

/// Megatron's `recompute_granularity = "selective"`: which parts of each layer drop their
/// activations in the forward and recompute them in the backward (`model.recompute_modules`,
/// default `["core_attn"]`). It runs in layers with a written-out backward
/// ([`super::explicit_layer`]), which keep the pre-norms' outputs for the backward unless
/// `layernorm` is named (as Megatron keeps them unless its `layernorm` module is recomputed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SelectiveRecompute {
    /// Core attention: its output and logsumexp are recomputed (one more flash forward).
    pub core_attn: bool,
    /// The MLP: `linear_fc1`'s output is recomputed (its norm and GEMM again).
    pub mlp: bool,
    /// The pre-norms (`input_layernorm`, `pre_mlp_layernorm`): their outputs are recomputed
    /// for the weight gradients of `linear_qkv` / `linear_fc1`.
    pub layernorm: bool,
}

impl SelectiveRecompute {
    /// The selective recompute of `cfg`, None unless `recompute_granularity = "selective"`.
    pub fn from_config(cfg: &ModelConfig) -> Result<Option<Self>> {
        if cfg.recompute_granularity != Some(RecomputeGranularity::Selective) {
            return Ok(None);
        }
        let default = vec!["core_attn".to_string()];
        let mut out = Self::default();
        for m in cfg.recompute_modules.as_ref().unwrap_or(&default) {
            match m.as_str() {
                "core_attn" => out.core_attn = true,
                "mlp" => out.mlp = true,
                "layernorm" => out.layernorm = true,
                "moe" | "moe_act" | "shared_experts" | "mla_up_proj" => bail!(
                    "model.recompute_modules: \"{m}\" applies to MoE/MLA models, which mbridge does not have"
                ),
                other => bail!(
                    "model.recompute_modules: unknown module \"{other}\" (expected core_attn, mlp or layernorm)"
                ),
            }
        }
        Ok(Some(out))
    }
}

/// Parameter gradients produced outside the recorded graph during backward passes: by
/// recomputed segments and by layers with a written-out backward
/// ([`super::explicit_layer`]). They are summed as they arrive, in the main-grad dtype the
/// step's accumulator keeps them in ([`crate::ops::main_grads`]), so a step holds one copy of
/// them however many micro-batches it runs (Megatron's layers add into `main_grad` the same
/// way), rather than each micro-batch's full set waiting beside the running sum until its
/// backward ends. The training step moves the sum into its gradients once its micro-batches
/// are done.
#[derive(Debug, Clone, Default)]
pub struct RecomputeGrads(Arc<Mutex<SideGrads>>);

/// Told of every push into a [`RecomputeGrads`] sink, with the sum so far: the
/// data-parallel reducer starts reducing a bucket once its last gradient has arrived
/// (`ddp.overlap_grad_reduce`), taking those gradients out of the sum.
pub trait PushObserver: Send + Sync {
    /// `ids`: the tensors whose gradients the push added to (each once).
    fn pushed(&self, ids: &[TensorId], sum: &mut GradStore) -> candle_core::Result<()>;
}

#[derive(Default)]
struct SideGrads {
    sum: GradStore,
    /// Stores pushed since the last take (one per recomputed segment or written-out piece).
    pushes: usize,
    observer: Option<Arc<dyn PushObserver>>,
    /// `model.gradient_accumulation_fusion = false`: every gradient gets a buffer of its own
    /// and is added to the sum in a pass of its own, nothing is written into the sum in place.
    unfused: bool,
}

impl std::fmt::Debug for SideGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideGrads")
            .field("pushes", &self.pushes)
            .field("observed", &self.observer.is_some())
            .field("unfused", &self.unfused)
            .finish()
    }
}

impl SideGrads {
    fn notify(&mut self, ids: &[TensorId]) -> candle_core::Result<()> {
        match &self.observer {
            Some(o) => o.clone().pushed(ids, &mut self.sum),
            None => Ok(()),
        }
    }
}

impl RecomputeGrads {
    /// An empty sink whose pushes `observer` sees.
    pub fn observed(observer: Arc<dyn PushObserver>) -> Self {
        Self(Arc::new(Mutex::new(SideGrads { observer: Some(observer), ..Default::default() })))
    }

    /// The same sink with gradient-accumulation fusion on (the default) or off
    /// (`model.gradient_accumulation_fusion`): whether gradients may be added into the
    /// running sum in place (see [`Self::weight_grad`], [`Self::push_embedding`]).
    pub fn with_accumulation_fusion(self, fused: bool) -> Self {
        self.lock().unfused = !fused;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SideGrads> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the sum collected so far (the sink is empty afterwards).
    pub fn take(&self) -> GradStore {
        let mut side = self.lock();
        side.pushes = 0;
        std::mem::take(&mut side.sum)
    }

    /// How many stores were pushed since the last [`Self::take`].
    pub fn pushes(&self) -> usize {
        self.lock().pushes
    }

    /// Adds the gradient of the lookup `w[ids]` (output gradient `dy` `[n, h]`) to the sum:
    /// straight into the sum's gradient of `w` where it has one (a tied output layer's, from
    /// earlier in the same backward or an earlier micro-batch), else as a new store.
    pub(super) fn push_embedding(
        &self,
        w: &Tensor,
        ids: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<()> {
        {
            let mut side = self.lock();
            if let Some(sum) = side.sum.get(w).filter(|_| !side.unfused) {
                // The sum owns its tensors (see `push`), so it may be written in place.
                if crate::ops::manual::embedding_backward_into(ids, dy, sum)? {
                    side.pushes += 1;
                    return side.notify(&[w.id()]);
                }
            }
        }
        let mut grads = GradStore::default();
        grads.insert(w, crate::ops::manual::embedding_backward(ids, dy, w.dim(0)?)?);
        self.push(grads)
    }

    /// The weight gradient `dyᵀ·x` of `w` for a store that will be pushed here: added in place
    /// to the sum where it already holds one for `w` (an earlier micro-batch's), and then that
    /// sum's tensor, which [`Self::push`] takes as already added; else a new tensor
    /// (`at_least_f32`: f32 for half-precision inputs, see
    /// [`crate::ops::manual::weight_grad_at_least_f32`]). This is megatron-core's
    /// `gradient_accumulation_fusion`: the GEMM accumulates into the main grad, so no second
    /// gradient buffer and no add pass over it.
    pub fn weight_grad(
        &self,
        w: &Tensor,
        dy: &Tensor,
        x: &Tensor,
        at_least_f32: bool,
    ) -> candle_core::Result<Tensor> {
        if let Some(sum) = self.sum_of(w) {
            if crate::ops::manual::add_weight_grad_into(&sum, dy, x)? {
                return Ok(sum);
            }
        }
        if at_least_f32 {
            crate::ops::manual::weight_grad_at_least_f32(dy, x)
        } else {
            crate::ops::manual::weight_grad(dy, x)
        }
    }

    /// The running sum of `w`'s gradients (sharing its storage) to add a gradient into in
    /// place: None where the sink has none yet or accumulation fusion is off.
    pub fn sum_of(&self, w: &Tensor) -> Option<Tensor> {
        let side = self.lock();
        side.sum.get(w).filter(|_| !side.unfused).cloned()
    }

    /// Adds `g` to the sum. The sink takes ownership: the caller keeps no clone of `g`'s
    /// tensors (the sum may be written in place, see [`Self::push_embedding`]). A tensor that
    /// is the sum's own (from [`Self::weight_grad`]) is already added.
    pub(crate) fn push(&self, g: GradStore) -> candle_core::Result<()> {
        let mut side = self.lock();
        side.pushes += 1;
        let sum = &mut side.sum;
        let mut ids = Vec::new();
        for &id in g.get_ids() {
            let Some(grad) = g.get_id(id) else { continue };
            ids.push(id);
            if sum.get_id(id).is_some_and(|prev| prev.id() == grad.id()) {
                continue;
            }
            // Half precision is summed in the main-grad dtype; an f32 gradient (a tied output
            // layer's) stays f32.
            let grad = match grad.dtype() {
                d @ (DType::BF16 | DType::F16) => {
                    grad.to_dtype(crate::ops::main_grads::main_grad_dtype(d))?
                }
                _ => grad.detach(),
            };
            let total = match sum.get_id(id) {
                Some(prev) => (prev + grad.to_dtype(prev.dtype())?)?.detach(),
                None => grad,
            };
            sum.insert_id(id, total);
        }
        side.notify(&ids)
    }
}

/// The parameter gradients of one written-out backward (a layer's, the head's), to be pushed
/// into the step's sink: a [`GradStore`] (which it derefs to) whose weight gradients come from
/// [`RecomputeGrads::weight_grad`], accumulated in place into the sink's sum where it has one.
pub struct LayerGrads {
    store: GradStore,
    sink: RecomputeGrads,
}

impl LayerGrads {
    /// Gradients bound for `sink`.
    pub fn new(sink: &RecomputeGrads) -> Self {
        Self { store: GradStore::default(), sink: sink.clone() }
    }

    /// Records the weight gradient `dyᵀ·x` of `w` (see [`RecomputeGrads::weight_grad`]).
    pub fn weight_grad(
        &mut self,
        w: &Tensor,
        dy: &Tensor,
        x: &Tensor,
        at_least_f32: bool,
    ) -> candle_core::Result<()> {
        let g = self.sink.weight_grad(w, dy, x, at_least_f32)?;
        self.store.insert(w, g);
        Ok(())
    }

    /// The sink's running sum of `w`'s gradients, if it has one: a weight gradient may be
    /// added into it in place and then recorded here as already added (see
    /// [`RecomputeGrads::weight_grad`]).
    pub fn sum_of(&self, w: &Tensor) -> Option<Tensor> {
        self.sink.sum_of(w)
    }

    /// Pushes the gradients into the sink they were made for.
    pub fn push(self) -> candle_core::Result<()> {
        self.sink.push(self.store)
    }
}

impl std::ops::Deref for LayerGrads {
    type Target = GradStore;
    fn deref(&self) -> &GradStore {
        &self.store
    }
}

impl std::ops::DerefMut for LayerGrads {
    fn deref_mut(&mut self) -> &mut GradStore {
        &mut self.store
    }
}

/// A segment's forward function: hidden states in, hidden states out (same shape).
pub type SegmentFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// Runs `f` on `x` without keeping its activations; see the module docs.
/// `anchor`: a trainable tensor of the segment, for when `x` is not tracked (see
/// [`with_backward_anchored`]).
pub fn checkpoint(
    x: &Tensor,
    anchor: Option<&Tensor>,
    f: SegmentFn,
    grads: &RecomputeGrads,
) -> candle_core::Result<Tensor> {
    let y = f(&x.detach())?;
    if y.dims() != x.dims() {
        candle_core::bail!(
            "checkpointed segment changed the shape {:?} to {:?}",
            x.dims(),
            y.dims()
        );
    }
    let grads = grads.clone();
    let backward: BackwardFn = Box::new(move |x: &Tensor, grad: &Tensor| {
        let xv = Var::from_tensor(&x.detach())?;
        let y = f(xv.as_tensor())?;
        // backward() seeds with ones, so d(y·grad)/dy = grad exactly: no sum needed.
        let seeded = y.mul(&grad.detach())?;
        let params: Vec<Tensor> = seeded
            .sorted_nodes()
            .into_iter()
            .filter(|t| t.is_variable() && t.id() != xv.as_tensor().id())
            .cloned()
            .collect();
        let mut store = seeded.backward()?;
        let dx = store.remove(xv.as_tensor());
        // Only the parameters' gradients go to the sink: candle's store also holds those of
        // untracked leaves (the seed, frozen PEFT weights), which would live until the step
        // ends.
        let mut kept = GradStore::default();
        for p in &params {
            if let Some(g) = store.remove(p) {
                kept.insert(p, g);
            }
        }
        grads.push(kept)?;
        Ok(dx)
    });
    with_backward_anchored(x, anchor, y, "recompute-checkpoint", backward)
}

/// A hand-written backward: `(input, output gradient)` → input gradient. It runs at most once,
/// so it may move (and then free) what its forward saved.
pub type BackwardFn =
    Box<dyn FnOnce(&Tensor, &Tensor) -> candle_core::Result<Option<Tensor>> + Send>;

/// `y`, computed from `x` outside candle's graph, entered into the graph as a function of `x`
/// whose gradient `backward` computes. candle has no such primitive, so this is a CustomOp on
/// `x` whose forward hands over the precomputed `y` and whose backward calls
/// `backward`.
pub fn with_backward(
    x: &Tensor,
    y: Tensor,
    name: &'static str,
    backward: BackwardFn,
) -> candle_core::Result<Tensor> {
    with_backward_anchored(x, None, y, name, backward)
}

/// [`with_backward`] for a node whose input may not be tracked while the node itself holds
/// trainable parameters: frozen embeddings under PEFT feed layers whose adapters train. candle
/// records an op only when an input is tracked, so the node is attached to `anchor` (one of
/// its trainable tensors) as a second input that receives no gradient; its gradients still
/// go to the side sink.
pub fn with_backward_anchored(
    x: &Tensor,
    anchor: Option<&Tensor>,
    y: Tensor,
    name: &'static str,
    backward: BackwardFn,
) -> candle_core::Result<Tensor> {
    // The forward hands over a clone of `y`'s whole storage (candle cannot move one out of
    // a tensor: one device copy of the output, small next to the work that produced it), so
    // `y` must be contiguous from offset 0.
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y.detach()
    } else {
        y.detach().copy()?
    };
    let shape = y.shape().clone();
    let op = Precomputed {
        name,
        shape,
        value: Mutex::new(Some(y)),
        backward: Mutex::new(Some(backward)),
    };
    match anchor {
        Some(a) if !x.track_op() => x.apply_op2(a, op),
        _ => x.apply_op1(op),
    }
}

struct Precomputed {
    name: &'static str,
    shape: Shape,
    /// The output, computed before the op is applied; moved out by the forward.
    value: Mutex<Option<Tensor>>,
    backward: Mutex<Option<BackwardFn>>,
}

impl Precomputed {
    fn take_value(&self) -> candle_core::Result<Storage> {
        let v = self.value.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(v) = v else { candle_core::bail!("{}: forward ran twice", self.name) };
        let (s, l) = v.storage_and_layout();
        s.try_clone(l)
    }
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take_value()? {
            Storage::Cpu(c) => Ok((c, self.shape.clone())),
            _ => candle_core::bail!("{}: output is not on the CPU", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.take_value()? {
            Storage::Cuda(c) => Ok((c, self.shape.clone())),
            _ => candle_core::bail!("{}: output is not on the GPU", self.name),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.run_backward(x, grad)
    }
}

impl Precomputed {
    fn run_backward(&self, x: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let f = self.backward.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(f) = f else { candle_core::bail!("{}: backward ran twice", self.name) };
        f(x, grad)
    }
}

/// The anchored form ([`with_backward_anchored`]): the second input only makes candle record
/// the node; it gets no gradient.
impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        CustomOp1::cpu_fwd(self, s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        CustomOp1::cuda_fwd(self, s, l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.run_backward(x, grad)?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(method: RecomputeMethod, num_layers: usize) -> RecomputePlan {
        RecomputePlan { method, num_layers }
    }

    /// A weight gradient whose parameter the sum already holds is added into the sum's own
    /// tensor (the same tensor, changed in place) and pushed as already added; the first one
    /// is a new tensor. Both micro-batches' products end up in the sum exactly once.
    #[test]
    fn weight_gradients_accumulate_into_the_sum_in_place() {
        let dev = candle_core::Device::Cpu;
        let w = Var::zeros((2, 3), DType::F64, &dev).unwrap();
        let t = |v: &[f64], r: usize, c: usize| Tensor::from_slice(v, (r, c), &dev).unwrap();
        let (dy1, x1) = (t(&[1., 2., 3., 4.], 2, 2), t(&[1., 0., 2., 0., 1., 3.], 2, 3));
        let (dy2, x2) = (t(&[0.5, -1., 2., 1.], 2, 2), t(&[2., 1., 0., 1., 1., 1.], 2, 3));
        let sink = RecomputeGrads::default();
        let mut first = LayerGrads::new(&sink);
        first.weight_grad(w.as_tensor(), &dy1, &x1, false).unwrap();
        first.push().unwrap();
        let held = sink.sum_of(w.as_tensor()).unwrap();
        let mut second = LayerGrads::new(&sink);
        second.weight_grad(w.as_tensor(), &dy2, &x2, false).unwrap();
        assert_eq!(second.get(w.as_tensor()).unwrap().id(), held.id(), "the sum's own tensor");
        second.push().unwrap();
        assert_eq!(sink.pushes(), 2);
        let sum = sink.take();
        let got = sum.get(w.as_tensor()).unwrap();
        assert_eq!(got.id(), held.id(), "added in place, not replaced");
        let want = (dy1.t().unwrap().matmul(&x1).unwrap() + dy2.t().unwrap().matmul(&x2).unwrap())
            .unwrap();
        assert_eq!(got.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
    }

    /// With accumulation fusion off (`model.gradient_accumulation_fusion = false`) the
    /// second micro-batch's gradient gets its own tensor and the sum is a new tensor with the
    /// same value; nothing is written into the first one.
    #[test]
    fn without_accumulation_fusion_gradients_get_their_own_tensors() {
        let dev = candle_core::Device::Cpu;
        let w = Var::zeros((2, 2), DType::F64, &dev).unwrap();
        let t = |v: &[f64]| Tensor::from_slice(v, (2, 2), &dev).unwrap();
        let (dy, x) = (t(&[1., 2., 3., 4.]), t(&[1., 0., 2., 1.]));
        let sink = RecomputeGrads::default().with_accumulation_fusion(false);
        let mut first = LayerGrads::new(&sink);
        first.weight_grad(w.as_tensor(), &dy, &x, false).unwrap();
        let first_grad = first.get(w.as_tensor()).unwrap().clone();
        first.push().unwrap();
        assert!(sink.sum_of(w.as_tensor()).is_none(), "no sum to add into");
        let mut second = LayerGrads::new(&sink);
        second.weight_grad(w.as_tensor(), &dy, &x, false).unwrap();
        let second_id = second.get(w.as_tensor()).unwrap().id();
        second.push().unwrap();
        let sum = sink.take();
        let got = sum.get(w.as_tensor()).unwrap();
        assert_ne!(got.id(), first_grad.id());
        assert_ne!(got.id(), second_id);
        let once = dy.t().unwrap().matmul(&x).unwrap();
        assert_eq!(first_grad.to_vec2::<f64>().unwrap(), once.to_vec2::<f64>().unwrap());
        let twice = (&once + &once).unwrap();
        assert_eq!(got.to_vec2::<f64>().unwrap(), twice.to_vec2::<f64>().unwrap());
    }

    /// Pushes of the same parameter are summed in place (half precision in f32), so the sink
    /// never holds a second copy; other parameters keep their own entries.
    #[test]
    fn the_sink_sums_gradients_as_they_arrive() {
        let dev = candle_core::Device::Cpu;
        let (w, u) =
            (Var::zeros(3, DType::BF16, &dev).unwrap(), Var::zeros(2, DType::F32, &dev).unwrap());
        let sink = RecomputeGrads::default();
        for (wg, ug) in
            [([1.0f32, 2.0, 3.0], [0.5f32, 0.25]), ([1.0 / 512.0, 1.0, -3.0], [1.0, 1.0])]
        {
            let mut g = GradStore::default();
            g.insert(w.as_tensor(), Tensor::new(&wg, &dev).unwrap().to_dtype(DType::BF16).unwrap());
            g.insert(u.as_tensor(), Tensor::new(&ug, &dev).unwrap());
            sink.push(g).unwrap();
        }
        let sum = sink.take();
        assert_eq!(sum.get_ids().count(), 2);
        let gw = sum.get(w.as_tensor()).unwrap();
        assert_eq!(gw.dtype(), DType::F32, "half-precision gradients are summed in f32");
        // 1 + 2^-9 is exact in f32; bf16 (8 significant bits) would round it to 1.
        assert_eq!(gw.to_vec1::<f32>().unwrap(), [1.0 + 1.0 / 512.0, 3.0, 0.0]);
        assert_eq!(sum.get(u.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), [1.5, 1.25]);
        assert_eq!(sink.take().get_ids().count(), 0, "take empties the sink");
    }

    #[test]
    fn uniform_and_block_segments_follow_megatron() {
        let u = plan(RecomputeMethod::Uniform, 2).segments(5);
        assert_eq!(u, vec![(0..2, true), (2..4, true), (4..5, true)]);
        let b = plan(RecomputeMethod::Block, 2).segments(5);
        assert_eq!(b, vec![(0..1, true), (1..2, true), (2..5, false)]);
        let all = plan(RecomputeMethod::Block, 9).segments(3);
        assert_eq!(all, vec![(0..1, true), (1..2, true), (2..3, true)]);
    }

    #[test]
    fn checkpoint_gives_the_same_gradients() {
        let dev = candle_core::Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap()).unwrap();
        let x0 =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [-3.0, 0.5]], &dev).unwrap()).unwrap();
        let wt = w.as_tensor().clone();
        let f: SegmentFn = Arc::new(move |x: &Tensor| x.matmul(&wt)?.tanh()?.add(x));
        let plain =
            f(x0.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let sink = RecomputeGrads::default();
        let y = checkpoint(x0.as_tensor(), None, f.clone(), &sink).unwrap();
        let outer = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(
            outer.get(w.as_tensor()).is_none(),
            "the outer graph must not see the segment's parameters"
        );
        assert_eq!(sink.pushes(), 1, "one segment, one store");
        let store = sink.take();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-6, "difference {d}");
        };
        close(store.get(w.as_tensor()).unwrap(), plain.get(w.as_tensor()).unwrap());
        close(outer.get(x0.as_tensor()).unwrap(), plain.get(x0.as_tensor()).unwrap());
    }
}
