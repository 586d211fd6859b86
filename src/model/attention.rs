//! Self-attention block: pre-norm fused into `linear_qkv` (TE layer spec), per-query-group
//! fused QKV, optional per-head QK-norm, RoPE, grouped-query attention, `linear_proj`.

use super::arch::GptArch;
use super::explicit_layer::ExplicitInputs;
use super::explicit_linear::{ExplicitLinear, LinearSaved, TpBoundary};
use super::fp8_weights::Fp8Linears;
use super::init::Init;
use super::norm::Norm;
use super::params::{ParamStore, ShardLayout};
use super::recompute::LayerGrads;
use crate::config::model::AttnBackend;
use crate::ops::attention::OwnedAttnMask;
use crate::ops::manual::{self, AttnState, QkvGrads};
use crate::ops::timing::section;
use crate::ops::{self, AttentionShape, AttnMask, DropoutRng};
use crate::parallel::context::{ContextParallel, CpAttnState};
use crate::parallel::tensor::TensorParallel;
use crate::peft::{Adapter, BaseParallel, Split};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Per-layer key/value cache entry: keys (after RoPE) and values, `[b, groups, t, d]`.
pub type KvEntry = Option<(Tensor, Tensor)>;

/// One layer's self-attention with its pre-norm.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    norm: Norm,
    qkv_w: Tensor,
    qkv_b: Option<Tensor>,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    proj_w: Tensor,
    proj_b: Option<Tensor>,
    shape: AttentionShape,
    attention_dropout: f64,
    tp: Option<TensorParallel>,
    /// Context parallelism: keys and values are gathered over the CP group.
    cp: Option<ContextParallel>,
    qkv_adapter: Option<Adapter>,
    proj_adapter: Option<Adapter>,
    /// FP8 GEMMs for `linear_qkv` and `linear_proj` in training (`ops::fp8`).
    fp8: Option<Fp8Linears>,
}

/// Per-call inputs shared by all layers.
pub struct AttnInputs<'a> {
    /// RoPE `(cos, sin)` `[b, 1, s, rot_dim]`, None without rotary embeddings.
    pub rope: Option<&'a (Tensor, Tensor)>,
    /// Which keys each query sees: a dense u8 mask `[B, 1, s, t]` over all keys (cached +
    /// new), or "causal (+ window)" when the fused kernel can run without one.
    pub mask: AttnMask<'a>,
    /// Mask source in training mode; None = evaluation (no dropout).
    pub dropout: Option<&'a DropoutRng>,
}

impl SelfAttention {
    /// Registers the parameters of layer `layer` (global number); heads are split over
    /// `tp_size` tensor-parallel ranks.
    pub fn new(
        store: &mut ParamStore,
        arch: &GptArch,
        layer: usize,
        tp_size: usize,
    ) -> Result<Self> {
        let p = format!("decoder.layers.{layer}.self_attention");
        let (h, d) = (arch.hidden, arch.head_dim);
        let std = arch.init_std;
        let out_std = std / (2.0 * arch.num_layers as f64).sqrt();
        let rows = arch.qkv_rows();
        let norm = Norm::new(
            store,
            arch,
            &format!("{p}.linear_qkv.layer_norm_weight"),
            &format!("{p}.linear_qkv.layer_norm_bias"),
            h,
        )?;
        let qkv_w = store.create(
            &format!("{p}.linear_qkv.weight"),
            &[rows, h],
            Some(0),
            ShardLayout::Contiguous,
            Init::Normal(std),
        )?;
        let qkv_b = if arch.add_qkv_bias {
            Some(store.create(
                &format!("{p}.linear_qkv.bias"),
                &[rows],
                Some(0),
                ShardLayout::Contiguous,
                Init::Zeros,
            )?)
        } else {
            None
        };
        let (q_norm, k_norm) = if arch.qk_layernorm {
            (
                Some(Norm::new(
                    store,
                    arch,
                    &format!("{p}.q_layernorm.weight"),
                    &format!("{p}.q_layernorm.bias"),
                    d,
                )?),
                Some(Norm::new(
                    store,
                    arch,
                    &format!("{p}.k_layernorm.weight"),
                    &format!("{p}.k_layernorm.bias"),
                    d,
                )?),
            )
        } else {
            (None, None)
        };
        let (proj_w, proj_b) = store.create_row_parallel(
            &format!("{p}.linear_proj"),
            h,
            arch.heads * d,
            out_std,
            arch.add_bias_linear,
        )?;
        let shape = AttentionShape {
            heads: arch.heads / tp_size,
            groups: arch.groups / tp_size,
            head_dim: d,
            softmax_scale: 1.0 / (d as f64).sqrt(),
            backend: arch.attention_backend,
        };
        let qkv_adapter = Adapter::maybe_new(
            store,
            &format!("{p}.linear_qkv"),
            rows,
            h,
            BaseParallel::Column(ShardLayout::Contiguous),
            Some(Split::Qkv { heads: arch.heads, groups: arch.groups, head_dim: d }),
        )?;
        let proj_adapter = Adapter::maybe_new(
            store,
            &format!("{p}.linear_proj"),
            h,
            arch.heads * d,
            BaseParallel::Row,
            None,
        )?;
        Ok(Self {
            qkv_adapter,
            proj_adapter,
            norm,
            qkv_w,
            qkv_b,
            q_norm,
            k_norm,
            proj_w,
            proj_b,
            shape,
            attention_dropout: arch.attention_dropout,
            tp: None,
            cp: None,
            fp8: None,
        })
    }

    /// Runs the block's linear layers as FP8 GEMMs in training (None: bf16).
    pub(super) fn set_fp8(&mut self, fp8: Option<Fp8Linears>) {
        self.fp8 = fp8;
    }

    /// Runs `linear_qkv` column-parallel and `linear_proj` row-parallel over `tp` (required
    /// when the layer was built with `tp_size > 1`).
    pub fn with_tensor_parallel(mut self, tp: TensorParallel) -> Self {
        // QK-norm runs on this rank's heads only: sum its weight gradients over TP.
        self.q_norm = self.q_norm.map(|n| n.with_tp_grad_sum(tp.clone()));
        self.k_norm = self.k_norm.map(|n| n.with_tp_grad_sum(tp.clone()));
        if tp.sequence_parallel() {
            // The pre-norm sees only this rank's part of the sequence.
            self.norm = self.norm.with_tp_grad_sum(tp.clone());
        }
        self.tp = Some(tp);
        self
    }

    /// Splits the sequence over `cp` (the input holds this rank's chunks; see
    /// [`crate::parallel::context`]).
    pub fn with_context_parallel(mut self, cp: ContextParallel) -> Self {
        self.cp = Some(cp);
        self
    }

    /// Attention output (before the residual add) for `x` `[b, s, h]`; with `cache`, the new
    /// keys/values are appended to it and attention runs over all cached positions.
    pub fn forward(
        &self,
        x: &Tensor,
        inputs: &AttnInputs,
        cache: Option<&mut KvEntry>,
    ) -> Result<Tensor> {
        let AttentionShape { heads, groups, head_dim: d, .. } = self.shape;
        let hpg = heads / groups;
        let xn = self.norm.forward(x)?;
        let xe = match &self.tp {
            Some(tp) => tp.enter_column(&xn)?,
            None => xn.clone(),
        };
        // The whole sequence (gathered under sequence parallelism).
        let (b, s, _) = xe.dims3()?;
        let qkv = match &self.qkv_adapter {
            Some(a) => a.forward_column(
                &xn,
                &xe,
                &self.qkv_w,
                self.qkv_b.as_ref(),
                self.tp.as_ref(),
                inputs.dropout,
            )?,
            None => ops::linear(&xe, &self.qkv_w, self.qkv_b.as_ref())?,
        };
        // Megatron layout: per query group, hpg query heads then one key and one value head.
        let qkv = qkv.reshape((b, s, groups, hpg + 2, d))?;
        let q = qkv.narrow(3, 0, hpg)?.reshape((b, s, heads, d))?.transpose(1, 2)?;
        let k = qkv.narrow(3, hpg, 1)?.squeeze(3)?.transpose(1, 2)?;
        // Left strided: flash attention reads it in place, the composite path copies it.
        let v = qkv.narrow(3, hpg + 1, 1)?.squeeze(3)?.transpose(1, 2)?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q.contiguous()?)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k.contiguous()?)?,
            None => k,
        };
        let (q, k) = match inputs.rope {
            Some((cos, sin)) => (ops::apply_rope(&q, cos, sin)?, ops::apply_rope(&k, cos, sin)?),
            None => (q, k),
        };
        let (k, v) = match cache {
            Some(_) if self.cp.is_some() => {
                bail!("context parallelism splits the sequence: it cannot use a KV cache")
            }
            Some(entry) => {
                let (k, v) = match entry.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k.contiguous()?, v.contiguous()?),
                };
                *entry = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let shard = self.tp.as_ref().map_or((0, 1), |tp| (tp.rank(), tp.size()));
        let dropout = inputs.dropout.map(|r| (self.attention_dropout, r, shard));
        let out = match &self.cp {
            Some(cp) => {
                let AttnMask::Causal { window_left } = inputs.mask else {
                    bail!("context parallelism supports causal attention only (no attention mask or packed sequences)")
                };
                cp.attention(&q, &k, &v, window_left, self.shape, dropout)?
            }
            None => ops::attention_auto(&q, &k, &v, inputs.mask, self.shape, dropout)?,
        };
        let out = out.transpose(1, 2)?.reshape((b, s, heads * d))?;
        match &self.proj_adapter {
            Some(a) => a.forward_row(
                &out,
                &self.proj_w,
                self.proj_b.as_ref(),
                self.tp.as_ref(),
                inputs.dropout,
            ),
            None => row_parallel(&out, &self.proj_w, self.proj_b.as_ref(), self.tp.as_ref()),
        }
    }

    /// DoRA: initializes the adapters' magnitudes from the current base weights.
    pub fn init_dora(&self) -> Result<()> {
        for (a, w) in [(&self.qkv_adapter, &self.qkv_w), (&self.proj_adapter, &self.proj_w)] {
            if let Some(a) = a {
                a.init_magnitude(w, self.tp.as_ref())?;
            }
        }
        Ok(())
    }
}

/// What the written-out backward of [`SelfAttention`] keeps from its forward: the fused QKV
/// projection (q/k/v, their norms and rotations are recomputed from it), the attention output
/// that entered `linear_proj` and the core attention's state.
pub struct AttnSaved {
    /// The pre-norm's output (this rank's part of the sequence under SP); None under
    /// selective recompute of `layernorm` (recomputed in the backward) and when `linear_qkv`
    /// keeps its FP8 input instead.
    normed: Option<Tensor>,
    qkv: Tensor,
    /// The rotated queries `[b, s, heads, d]` when they went to a dense buffer for cuDNN
    /// (the fused `qkv`'s query slots then hold the unrotated ones).
    q_dense: Option<Tensor>,
    /// The attention output `[tokens, heads·d]` and the core attention's state; None under
    /// selective recompute of `core_attn` (recomputed in the backward).
    core: Option<(Tensor, CoreState)>,
    /// q and k were rotated inside `qkv` ([`manual::rope_in_qkv`]).
    roped_in_qkv: bool,
    /// What `linear_qkv` and `linear_proj` keep (adapter state, FP8 operands).
    qkv_saved: LinearSaved,
    proj_saved: LinearSaved,
}

/// The core attention's backward state: this rank's, or under context parallelism that of
/// each local query chunk over the gathered keys and values.
enum CoreState {
    Local(AttnState),
    ContextParallel(CpAttnState),
}

/// The core attention's input gradients.
enum CoreGrads {
    /// dq `[b, heads, s, d]`, dk and dv `[b, groups, s, d]`.
    Separate(Tensor, Tensor, Tensor),
    /// Already in the fused QKV layout (dQ apart for a dense q).
    Qkv(QkvGrads),
}

impl AttnSaved {
    /// Whether the core attention's output and state were kept (not under selective
    /// recompute of `core_attn`).
    #[cfg(test)]
    pub(super) fn keeps_core(&self) -> bool {
        self.core.is_some()
    }

    /// Whether the pre-norm's output was kept (not under selective recompute of `layernorm`).
    #[cfg(test)]
    pub(super) fn keeps_normed(&self) -> bool {
        self.normed.is_some()
    }

    /// Whether an FP8 linear layer kept quantized operands.
    #[cfg(test)]
    pub(super) fn keeps_fp8(&self) -> bool {
        self.qkv_saved.is_fp8() || self.proj_saved.is_fp8()
    }
}

impl SelfAttention {
    /// Whether the written-out forward/backward covers this block: adapters only as LoRA
    /// without dropout (the rest runs through autograd).
    pub(super) fn explicit_ok(&self) -> bool {
        ExplicitLinear::explicit_ok(self.qkv_adapter.as_ref())
            && ExplicitLinear::explicit_ok(self.proj_adapter.as_ref())
    }

    /// A trainable tensor of the block when its base is frozen (PEFT): what anchors its
    /// graph node when its input is untracked.
    pub(super) fn adapter_anchor(&self) -> Option<&Tensor> {
        self.qkv_adapter.as_ref().or(self.proj_adapter.as_ref()).map(Adapter::anchor)
    }

    fn qkv_linear(&self) -> ExplicitLinear<'_> {
        ExplicitLinear {
            w: &self.qkv_w,
            b: self.qkv_b.as_ref(),
            adapter: self.qkv_adapter.as_ref(),
            column_tp: self.tp.as_ref(),
            fp8: self.fp8.as_ref(),
            backward_follows: true,
        }
    }

    fn proj_linear(&self) -> ExplicitLinear<'_> {
        ExplicitLinear {
            w: &self.proj_w,
            b: self.proj_b.as_ref(),
            adapter: self.proj_adapter.as_ref(),
            column_tp: None,
            fp8: self.fp8.as_ref(),
            backward_follows: true,
        }
    }

    fn tp_boundary(&self) -> TpBoundary<'_> {
        TpBoundary(self.tp.as_ref())
    }

    /// q `[b, heads, s, d]` and k, v `[b, groups, s, d]` views into the fused QKV `[b, s, rows]`.
    /// q, k, v views of the fused QKV `[b, s, groups·(hpg + 2)·d]` as `[b, heads, s, d]` and
    /// `[b, groups, s, d]`; with `grouped_q`, q is the `[b, groups, hpg, s, d]` view that the
    /// flash kernel reads in place (collapsing its heads would copy it: they are not evenly
    /// spaced across groups).
    fn split_heads(&self, qkv: &Tensor, grouped_q: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let AttentionShape { heads, groups, head_dim: d, .. } = self.shape;
        let hpg = heads / groups;
        let (b, s, _) = qkv.dims3()?;
        let qkv = qkv.reshape((b, s, groups, hpg + 2, d))?;
        let q = qkv.narrow(3, 0, hpg)?;
        let q = if grouped_q {
            q.permute((0, 2, 3, 1, 4))?
        } else {
            q.reshape((b, s, heads, d))?.transpose(1, 2)?
        };
        let k = qkv.narrow(3, hpg, 1)?.squeeze(3)?.transpose(1, 2)?;
        let v = qkv.narrow(3, hpg + 1, 1)?.squeeze(3)?.transpose(1, 2)?;
        Ok((q, k, v))
    }

    /// QK-norm then RoPE of a q or k view: (norm input, rotated result).
    fn prepare(
        raw: &Tensor,
        norm: Option<&Norm>,
        inputs: &ExplicitInputs,
    ) -> Result<(Tensor, Tensor)> {
        let (normed_in, normed) = match norm {
            Some(n) => {
                let c = raw.contiguous()?;
                let y = n.forward_untracked(&c)?;
                (c, y)
            }
            None => (raw.clone(), raw.clone()),
        };
        let rotated = match &inputs.rope {
            Some((cos, sin, _)) => ops::apply_rope(&normed, cos, sin)?,
            None => normed,
        };
        Ok((normed_in, rotated))
    }

    /// Backward of [`Self::prepare`]: the gradient of the raw view.
    fn prepare_backward(
        d_rotated: &Tensor,
        normed_in: &Tensor,
        norm: Option<&Norm>,
        inputs: &ExplicitInputs,
        grads: &mut LayerGrads,
    ) -> Result<Tensor> {
        let d_normed = match &inputs.rope {
            Some((cos, _, neg_sin)) => manual::rope_backward(d_rotated, cos, neg_sin)?,
            None => d_rotated.clone(),
        };
        match norm {
            Some(n) => n.backward(normed_in, &d_normed.contiguous()?, None, grads),
            None => Ok(d_normed),
        }
    }

    /// `x +` [`Self::forward`] (the block with its skip connection) without autograd (no
    /// cache, no dropout), keeping what [`Self::backward`] needs.
    pub(super) fn forward_saving(
        &self,
        x: &Tensor,
        inputs: &ExplicitInputs,
    ) -> Result<(Tensor, AttnSaved)> {
        let heads = self.shape.heads;
        let (b, s, h) = x.dims3()?;
        // Under sequence parallelism `x` is this rank's part of the sequence, `xe` all of it.
        let xn = self.norm.forward_untracked(x)?;
        let xe = self.tp_boundary().enter(&xn)?;
        let (qkv, qkv_saved) =
            self.qkv_linear().in_pass(inputs.backward_follows).forward(&xe, None)?;
        drop(xe);
        // Kept for `linear_qkv`'s weight gradient unless its FP8 input was kept instead.
        let normed = (!inputs.selective.layernorm && self.qkv_linear().needs_input()).then_some(xn);
        // Without QK-norm the rotation runs inside the fused buffer (one kernel, and the
        // backward keeps the rotated q, k instead of recomputing them). For cuDNN the
        // rotated queries go to a dense buffer of their own (it cannot read them between
        // each group's key and value heads).
        let (groups, hpg) = (self.shape.groups, heads / self.shape.groups);
        let (roped_in_qkv, q_dense) = match &inputs.rope {
            Some((cos, sin, _))
                if self.q_norm.is_none()
                    && self.k_norm.is_none()
                    && qkv.is_contiguous()
                    && manual::rope_in_qkv_available(&qkv) =>
            {
                if self.cudnn_reads_dense_q(inputs, cos.dim(3)?) {
                    (true, Some(manual::rope_in_qkv_dense_q(&qkv, cos, sin, groups, hpg)?))
                } else {
                    manual::rope_in_qkv(&qkv, cos, sin, groups, hpg)?;
                    (true, None)
                }
            }
            _ => (false, None),
        };
        // Rotated in place, q goes to the kernel as a view of the fused buffer (k and v
        // always do; q from its dense buffer when there is one).
        let (q, k, v) = self.split_heads(&qkv, roped_in_qkv && self.reads_grouped_q())?;
        let q = match &q_dense {
            Some(q) => q.transpose(1, 2)?,
            None => q,
        };
        let (q, k) = if roped_in_qkv {
            (q, k)
        } else {
            let (_, q) = Self::prepare(&q, self.q_norm.as_ref(), inputs)?;
            let (_, k) = Self::prepare(&k, self.k_norm.as_ref(), inputs)?;
            (q, k)
        };
        let (out, state) = section("attn.core.fwd", x.device(), || self.core(&q, &k, &v, inputs))?;
        let s_full = qkv.dim(1)?;
        let proj = self.proj_linear().in_pass(inputs.backward_follows);
        let (y, proj_saved) =
            proj.forward_row_plus(&out.reshape((b, s_full, ()))?, None, self.tp_boundary(), x)?;
        let core = (!inputs.selective.core_attn).then_some((out, state));
        // Recomputing the core attention means not keeping its output, in FP8 neither.
        let proj_saved =
            if inputs.selective.core_attn { proj_saved.without_input() } else { proj_saved };
        let saved = AttnSaved { normed, qkv, q_dense, core, roped_in_qkv, qkv_saved, proj_saved };
        Ok((y.reshape((b, s, h))?, saved))
    }

    /// Whether the core attention takes q as the grouped view of the fused QKV (the local
    /// kernels do; context parallelism splits q by heads).
    fn reads_grouped_q(&self) -> bool {
        self.cp.is_none()
    }

    /// Whether cuDNN runs this layer's attention (`auto` / `fused` backend, plain causal
    /// mask, no context parallelism) with a full rotary (`rot` = head dim): then q goes to
    /// it from a dense buffer ([`manual::rope_in_qkv_dense_q`]), sparing a copy of q in the
    /// forward, another in the backward and one of dQ. (Should cuDNN decline a call under
    /// `auto`, mbridge's kernels read the dense q as well.)
    fn cudnn_reads_dense_q(&self, inputs: &ExplicitInputs, rot: usize) -> bool {
        matches!(self.shape.backend, AttnBackend::Auto | AttnBackend::Fused)
            && matches!(inputs.mask, OwnedAttnMask::Causal { window_left: None })
            && self.reads_grouped_q()
            && rot == self.shape.head_dim
    }

    /// Core attention of the prepared q, k, v: the output as `[tokens, heads·d]` (the
    /// `linear_proj` input) and the state of its backward.
    fn core(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        inputs: &ExplicitInputs,
    ) -> Result<(Tensor, CoreState)> {
        let AttentionShape { heads, head_dim: d, .. } = self.shape;
        let (b, _, s, _) = crate::ops::flash::query_dims(q)?;
        let (out, state) = match &self.cp {
            Some(cp) => {
                let OwnedAttnMask::Causal { window_left } = inputs.mask else {
                    bail!("context parallelism supports causal attention only (no attention mask or packed sequences)")
                };
                let (out, state) = cp.attention_forward(q, k, v, window_left, self.shape)?;
                (out, CoreState::ContextParallel(state))
            }
            None => {
                let (out, state) =
                    manual::attention_forward(q, k, v, inputs.mask.as_mask(), self.shape)?;
                (out, CoreState::Local(state))
            }
        };
        Ok((out.transpose(1, 2)?.reshape((b * s, heads * d))?, state))
    }

    /// Gradient of the residual block's input `x` (`x + attn(x)`) for the output gradient
    /// `dy` `[b, s, h]`: the attention's input gradient plus `dy` itself, the skip
    /// connection's share (added by the norm's backward pass). Parameter gradients go into
    /// `grads`.
    pub(super) fn backward(
        &self,
        saved: AttnSaved,
        x: &Tensor,
        inputs: &ExplicitInputs,
        dy: &Tensor,
        grads: &mut LayerGrads,
    ) -> Result<Tensor> {
        let AttentionShape { heads, groups, head_dim: d, .. } = self.shape;
        let hpg = heads / groups;
        let residual = dy;
        // The whole sequence's output gradient (gathered under sequence parallelism).
        let dy = self.tp_boundary().exit_grad(dy)?;
        let (b, s, h) = dy.dims3()?;
        let dev = x.device();
        // q, k, v: views of the kept QKV (rotated in place), else recomputed from it.
        let (q_raw, k_raw, v) =
            self.split_heads(&saved.qkv, saved.roped_in_qkv && self.reads_grouped_q())?;
        let q_dense = saved.q_dense;
        let q_raw = match &q_dense {
            Some(q) => q.transpose(1, 2)?,
            None => q_raw,
        };
        let ((q_in, q), (k_in, k)) = if saved.roped_in_qkv {
            ((q_raw.clone(), q_raw), (k_raw.clone(), k_raw))
        } else {
            section("attn.bwd.prep", dev, || -> Result<_> {
                Ok((
                    Self::prepare(&q_raw, self.q_norm.as_ref(), inputs)?,
                    Self::prepare(&k_raw, self.k_norm.as_ref(), inputs)?,
                ))
            })?
        };
        let (out, state) = match saved.core {
            Some(core) => core,
            // Selective recompute: the core attention runs again.
            None => section("attn.core.fwd", dev, || self.core(&q, &k, &v, inputs))?,
        };
        let dy = dy.reshape((b * s, h))?;
        // linear_proj
        let dout = section("attn.bwd.proj", dev, || -> Result<Tensor> {
            let dout = self.proj_linear().backward(
                &dy,
                None,
                || Ok(out.clone()),
                saved.proj_saved,
                grads,
            )?;
            Ok(dout.reshape((b, s, heads, d))?.transpose(1, 2)?)
        })?;
        drop(out);
        // With q and k rotated inside the fused QKV, the flash backward writes dQKV in that
        // layout itself; other paths return dq, dk, dv, put back together below.
        let core_grads = section("attn.core.bwd", dev, || -> Result<CoreGrads> {
            match (&state, &self.cp) {
                (CoreState::Local(s), _) => {
                    if saved.roped_in_qkv {
                        let dense_q = q_dense.is_some();
                        let grads =
                            manual::attention_backward_to_qkv(&q, &k, &v, s, &dout, dense_q)?;
                        if let Some(grads) = grads {
                            return Ok(CoreGrads::Qkv(grads));
                        }
                    }
                    let (dq, dk, dv) = manual::attention_backward(&q, &k, &v, s, &dout)?;
                    Ok(CoreGrads::Separate(dq, dk, dv))
                }
                (CoreState::ContextParallel(s), Some(cp)) => {
                    let (dq, dk, dv) = cp.attention_backward(&q, s, &dout)?;
                    Ok(CoreGrads::Separate(dq, dk, dv))
                }
                (CoreState::ContextParallel(_), None) => {
                    bail!("context-parallel attention state in a layer without context parallelism")
                }
            }
        })?;
        drop((state, q, k, v, dout, q_dense));
        // Back into the per-group layout [b, s, groups, hpg + 2, d] of the fused QKV.
        let assemble = |dq: &Tensor, dk: &Tensor, dv: &Tensor| {
            section("attn.bwd.assemble", dev, || -> Result<Tensor> {
                let per_group = |t: &Tensor, n: usize| -> Result<Tensor> {
                    Ok(t.transpose(1, 2)?.contiguous()?.reshape((b, s, groups, n, d))?)
                };
                let parts = [per_group(dq, hpg)?, per_group(dk, 1)?, per_group(dv, 1)?];
                Ok(Tensor::cat(&parts, 3)?.reshape((b, s, (hpg + 2) * groups * d))?)
            })
        };
        let dqkv = if saved.roped_in_qkv {
            drop(saved.qkv);
            let Some((cos, sin, _)) = &inputs.rope else {
                anyhow::bail!("attention backward: q/k were rotated but no rotary table is given");
            };
            let (dqkv, dq) = match core_grads {
                CoreGrads::Qkv(QkvGrads::DenseQ(dqkv, dq)) => (dqkv, Some(dq)),
                CoreGrads::Qkv(QkvGrads::Fused(dqkv)) => (dqkv, None),
                CoreGrads::Separate(dq, dk, dv) => (assemble(&dq, &dk, &dv)?, None),
            };
            section("attn.bwd.rope", dev, || {
                manual::rope_in_qkv_backward(&dqkv, dq.as_ref(), cos, sin, groups, hpg)
            })?;
            dqkv.reshape((b * s, ()))?
        } else {
            let CoreGrads::Separate(dq, dk, dv) = core_grads else {
                bail!("attention backward: a fused dQKV without RoPE inside the QKV");
            };
            let (dq, dk) = section("attn.bwd.unprep", dev, || -> Result<_> {
                Ok((
                    Self::prepare_backward(&dq, &q_in, self.q_norm.as_ref(), inputs, grads)?,
                    Self::prepare_backward(&dk, &k_in, self.k_norm.as_ref(), inputs, grads)?,
                ))
            })?;
            assemble(&dq, &dk, &dv)?.reshape((b * s, ()))?
        };
        self.qkv_backward(x, saved.normed, &dqkv, residual, saved.qkv_saved, grads)
    }

    /// Backward of the pre-norm and `linear_qkv` for dQKV `[tokens, rows]`: the input
    /// gradient plus `residual`. `normed` is the kept norm output (recomputed when None).
    fn qkv_backward(
        &self,
        x: &Tensor,
        normed: Option<Tensor>,
        dqkv: &Tensor,
        residual: &Tensor,
        lora: LinearSaved,
        grads: &mut LayerGrads,
    ) -> Result<Tensor> {
        let (dev, (b, _, h)) = (x.device(), x.dims3()?);
        let tpb = self.tp_boundary();
        let dxe = section("attn.bwd.qkv", dev, || -> Result<Tensor> {
            let xe = || {
                let xn = match normed {
                    Some(xn) => xn,
                    None => self.norm.forward_untracked(x)?,
                };
                Ok(tpb.enter(&xn)?.reshape(((), h))?)
            };
            Ok(self.qkv_linear().backward(dqkv, None, xe, lora, grads)?.reshape((b, (), h))?)
        })?;
        let dxn = tpb.enter_grad(&dxe)?;
        drop(dxe);
        section("attn.bwd.norm", dev, || self.norm.backward(x, &dxn, Some(residual), grads))
    }
}

/// `x Wᵀ (+ b)` of a row-parallel linear: the partial products are all-reduced (or
/// reduce-scattered over the sequence) over `tp` before the replicated bias is added once.
pub(crate) fn row_parallel(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    tp: Option<&TensorParallel>,
) -> Result<Tensor> {
    let Some(tp) = tp else {
        return Ok(ops::linear(x, w, b)?);
    };
    let y = tp.exit_row(&ops::linear(x, w, None)?)?;
    Ok(match b {
        // Under sequence parallelism the replicated bias meets only this rank's part of the
        // sequence, so its gradient is summed over TP.
        Some(b) if tp.sequence_parallel() => y.broadcast_add(&tp.copy_to_region(b)?)?,
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
