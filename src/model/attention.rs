//! Self-attention block: pre-norm fused into `linear_qkv` (TE layer spec), per-query-group
//! fused QKV, optional per-head QK-norm, RoPE, grouped-query attention, `linear_proj`.

use super::arch::GptArch;
use super::init::Init;
use super::norm::Norm;
use super::params::{ParamStore, ShardLayout};
use crate::ops::{self, AttentionShape, AttnMask, DropoutRng};
use crate::parallel::tensor::TensorParallel;
use crate::peft::{Adapter, BaseParallel};
use anyhow::Result;
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
    qkv_adapter: Option<Adapter>,
    proj_adapter: Option<Adapter>,
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
        };
        let qkv_adapter = Adapter::maybe_new(
            store,
            &format!("{p}.linear_qkv"),
            rows,
            h,
            BaseParallel::Column(ShardLayout::Contiguous),
        )?;
        let proj_adapter = Adapter::maybe_new(
            store,
            &format!("{p}.linear_proj"),
            h,
            arch.heads * d,
            BaseParallel::Row,
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
        })
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
        let out = ops::attention_auto(&q, &k, &v, inputs.mask, self.shape, dropout)?;
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
                a.init_magnitude(w)?;
            }
        }
        Ok(())
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
