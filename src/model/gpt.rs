//! The GPT decoder of one pipeline stage: embedding → transformer layers → final norm →
//! output layer (or tied embedding), with Megatron parameter names.

use super::arch::{chunk_layers, virtual_stages, GptArch, ParallelLayout};
use super::attention::{AttnInputs, KvEntry, SelfAttention};
use super::explicit_layer::{self, ExplicitInputs};
use super::explicit_linear::TpBoundary;
use super::fp8_weights::{Fp8Linears, Fp8WeightCache, Fp8WeightHold};
use super::init::Init;
use super::mlp::Mlp;
use super::norm::Norm;
use super::params::{ParamStore, ShardLayout, TpCoord};
use super::recompute::LayerGrads;
use super::recompute::{
    checkpoint, with_backward, BackwardFn, RecomputeGrads, RecomputePlan, SegmentFn,
    SelectiveRecompute,
};
use super::step::{HostStats, Microbatch};
use crate::config::model::{ModelConfig, PositionEmbedding};
use crate::ops::attention::OwnedAttnMask;
use crate::ops::fp8::Fp8Recipe;
use crate::ops::timing::section;
use crate::ops::{self, AttnMask, DropoutRng, PackedSeqs, RopeTable};
use crate::parallel::comm::Communicator;
use crate::parallel::context::ContextParallel;
use crate::parallel::tensor::TensorParallel;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// One pre-norm transformer layer.
#[derive(Debug, Clone)]
struct Layer {
    attn: SelfAttention,
    mlp: Mlp,
}

impl Layer {
    /// A trainable adapter tensor of the layer, if its base is adapted (PEFT).
    fn adapter_anchor(&self) -> Option<&Tensor> {
        self.attn.adapter_anchor().or(self.mlp.adapter_anchor())
    }
}

/// Optional inputs of a forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOpts<'a> {
    /// Position ids `[b, s]` (u32/i64); None ⇒ `0..s` for every row.
    pub position_ids: Option<&'a Tensor>,
    /// Megatron-style attention mask `[b or 1, 1, s, s]`, nonzero = masked out, combined with
    /// the causal (and sliding-window) mask; None ⇒ causal only.
    pub attention_mask: Option<&'a Tensor>,
    /// Packed sequences (THD): token offsets into the `[b, s]` input flattened row-major (row
    /// `r` starts at `r·s`, which must be a boundary); attention stays inside each sequence.
    /// Exclusive with `attention_mask`. On CUDA in half precision the fused kernel takes them
    /// as they are, so no `s×s` mask exists.
    pub cu_seqlens: Option<&'a [u32]>,
    /// Dropout mask source: Some in training, None in evaluation/generation.
    pub dropout: Option<&'a DropoutRng>,
    /// The ids' maxima as the batch builder knew them (None ⇒ read back from the device).
    pub host_stats: Option<HostStats>,
    /// No backward follows (evaluation): the written-out layers run forward only, freeing
    /// each layer's activations as the next starts, and FP8 layers run their FP8 GEMMs.
    pub no_grad: bool,
}

/// Keys/values of every layer of this stage for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    entries: Vec<KvEntry>,
    len: usize,
}

impl KvCache {
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a layer with a written-out backward needs: the side sink and the shared inputs.
type Explicit<'a> = Option<(&'a RecomputeGrads, &'a Arc<ExplicitInputs>)>;

/// One layer without dropout (the recompute path): with a written-out backward when
/// `explicit` is given and the layer allows it, else `x + attn(x)`, then `+ mlp(·)`.
fn layer_step(
    layer: &Layer,
    x: &Tensor,
    inputs: &AttnInputs,
    explicit: Explicit,
) -> Result<Tensor> {
    if let Some((sink, ei)) = explicit {
        if layer.attn.explicit_ok() && layer.mlp.explicit_ok() {
            return explicit_layer::forward(&layer.attn, &layer.mlp, x, ei, sink);
        }
    }
    let x = (x + layer.attn.forward(x, inputs, None)?)?;
    Ok((&x + layer.mlp.forward_train(&x, None)?)?)
}

/// Which layers run their linear layers' GEMMs in FP8, with which recipe
/// ([`ModelConfig::fp8_layers`], `model.fp8`, `fp8_wgrad`).
struct Fp8Layers {
    recipe: Option<Fp8Recipe>,
    /// Global layer numbers `start..end` run in FP8.
    span: std::ops::Range<usize>,
    /// The quantized weights of all of them.
    weights: Fp8WeightCache,
}

impl Fp8Layers {
    fn of(cfg: &ModelConfig) -> Result<Self> {
        let (Some(name), Some(span)) = (&cfg.fp8, cfg.fp8_layers()) else {
            return Ok(Self { recipe: None, span: 0..0, weights: Fp8WeightCache::default() });
        };
        let recipe = Fp8Recipe::from_name(name, cfg.fp8_wgrad).ok_or_else(|| {
            anyhow::anyhow!("model.fp8 = {name:?}: mbridge runs \"hybrid\" and \"e4m3\"")
        })?;
        Ok(Self { recipe: Some(recipe), span, weights: Fp8WeightCache::default() })
    }

    fn of_layer(&self, layer: usize) -> Option<Fp8Linears> {
        let recipe = self.recipe.filter(|_| self.span.contains(&layer))?;
        Some(Fp8Linears { recipe, weights: self.weights.clone() })
    }
}

/// A GPT decoder stage holding this rank's parameter shards.
#[derive(Debug)]
pub struct GptModel {
    arch: GptArch,
    layout: ParallelLayout,
    store: ParamStore,
    layer_numbers: Vec<usize>,
    /// Holds the embedding (first model chunk of the first pipeline stage).
    pre_process: bool,
    /// Holds the final norm and output layer (last chunk of the last stage).
    post_process: bool,
    word_emb: Option<Tensor>,
    pos_emb: Option<Tensor>,
    layers: Vec<Layer>,
    final_norm: Option<Norm>,
    output_w: Option<Tensor>,
    rope: Option<RopeTable>,
    tp: Option<TensorParallel>,
    /// Context parallelism: the inputs hold this rank's chunks of every sequence.
    cp: Option<ContextParallel>,
    dtype: DType,
    device: Device,
    /// Activation recompute of the layers in training (`model.recompute_*`).
    recompute: Option<RecomputePlan>,
    /// Training layers use the written-out backward where they can (`explicit_layer`).
    explicit_layers: bool,
    /// `recompute_granularity = "selective"` (runs in the written-out backward).
    selective: Option<SelectiveRecompute>,
    /// Some layers of this stage run FP8 GEMMs (which live in the written-out layers).
    has_fp8_layers: bool,
    /// Their quantized weights, kept across the micro-batches of a step while held.
    fp8_weights: Fp8WeightCache,
    /// `gradient_accumulation_fusion`: weight-gradient GEMMs add into the step's sum.
    accumulation_fusion: bool,
}

impl GptModel {
    /// Builds and initializes the stage `layout` of the model described by `cfg`
    /// (see [`super::init`] for the seeded initialization). `cfg.vocab_size` must hold the
    /// padded vocabulary. With `layout.tp_size > 1` this holds the rank's shards but cannot
    /// run a forward; use [`Self::new_parallel`] for that.
    pub fn new(
        cfg: &ModelConfig,
        layout: ParallelLayout,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new_parallel(cfg, layout, None, seed, dtype, device)
    }

    /// Like [`Self::new`], with the communicator of this rank's tensor-parallel group
    /// (`tp_comm.size() == layout.tp_size`, `tp_comm.rank() == layout.tp_rank`): the layers run
    /// column/row-parallel, the embedding and the loss vocab-parallel, and every TP rank of
    /// the group must run the same forward/backward calls. The same `seed` gives the same
    /// global weights as the TP=1 model.
    pub fn new_parallel(
        cfg: &ModelConfig,
        layout: ParallelLayout,
        tp_comm: Option<Arc<dyn Communicator>>,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new_peft(cfg, layout, tp_comm, None, seed, dtype, device)
    }

    /// Like [`Self::new_parallel`]; with `peft`, every base parameter is frozen (its
    /// `Param::trainable` is false and the layers use a detached view) and the linear layers
    /// matched by `peft.target_modules` get trainable LoRA/DoRA adapters
    /// (`<module>.adapter.linear_in.weight` / `.linear_out.weight`). A target list that
    /// matches no layer of this stage is an error listing the module names.
    pub fn new_peft(
        cfg: &ModelConfig,
        layout: ParallelLayout,
        tp_comm: Option<Arc<dyn Communicator>>,
        peft: Option<&crate::config::peft::PeftConfig>,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::new_chunk(cfg, layout, 0, tp_comm, peft, seed, dtype, device)
    }

    /// Like [`Self::new_peft`], for model chunk `vp_stage` of this pipeline rank under the
    /// interleaved schedule (`model.virtual_pipeline_model_parallel_size`): the chunk holds
    /// the layers of virtual stage `vp_stage · pp + pp_rank` ([`chunk_layers`]); only chunk 0
    /// of the first rank embeds and only the last chunk of the last rank has the output layer.
    #[allow(clippy::too_many_arguments)]
    pub fn new_chunk(
        cfg: &ModelConfig,
        layout: ParallelLayout,
        vp_stage: usize,
        tp_comm: Option<Arc<dyn Communicator>>,
        peft: Option<&crate::config::peft::PeftConfig>,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tp_group = match tp_comm {
            Some(c) => {
                if c.size() != layout.tp_size || c.rank() != layout.tp_rank {
                    bail!(
                        "tensor-parallel communicator ({}, rank {} of {}) does not match the layout's TP rank {} of {}",
                        c.describe(),
                        c.rank(),
                        c.size(),
                        layout.tp_rank,
                        layout.tp_size
                    );
                }
                (layout.tp_size > 1)
                    .then(|| TensorParallel::new(c).with_sequence_parallel(cfg.sequence_parallel))
            }
            None => None,
        };
        let arch = GptArch::from_config(cfg)?;
        arch.check_tp(layout.tp_size)?;
        let recompute = RecomputePlan::from_config(cfg)?;
        let selective = SelectiveRecompute::from_config(cfg)?;
        if selective.is_some() {
            let why = if peft.is_some_and(|p| {
                p.peft_scheme != crate::config::peft::PeftScheme::Lora || p.dropout > 0.0
            }) {
                Some("DoRA / canonical LoRA adapters or adapter dropout")
            } else if cfg.hidden_dropout > 0.0 || cfg.attention_dropout > 0.0 {
                Some("dropout")
            } else {
                None
            };
            if let Some(why) = why {
                bail!(
                    "model.recompute_granularity = \"selective\" runs in the layers' written-out backward, which does not cover {why} yet; use \"full\" or leave it unset"
                );
            }
        }
        if layout.tp_rank >= layout.tp_size {
            bail!(
                "tensor-parallel rank {} out of range for size {}",
                layout.tp_rank,
                layout.tp_size
            );
        }
        let layer_numbers = chunk_layers(cfg, layout.pp_rank, layout.pp_size, vp_stage)?;
        let pre_process = layout.pre_process() && vp_stage == 0;
        let post_process =
            layout.post_process() && vp_stage + 1 == virtual_stages(cfg, layout.pp_size);
        let tp = TpCoord { rank: layout.tp_rank, size: layout.tp_size };
        let mut store = ParamStore::new(tp, seed, dtype, device.clone());
        if let Some(p) = peft {
            crate::peft::canonical::check_targets(p)?;
            store.enable_peft(p.clone());
        }
        let (h, std) = (arch.hidden, arch.init_std);

        let (mut word_emb, mut pos_emb) = (None, None);
        if pre_process {
            word_emb = Some(store.create(
                "embedding.word_embeddings.weight",
                &[arch.vocab, h],
                Some(0),
                ShardLayout::Contiguous,
                Init::Normal(std),
            )?);
            if arch.position_embedding == PositionEmbedding::LearnedAbsolute {
                pos_emb = Some(store.create(
                    "embedding.position_embeddings.weight",
                    &[arch.max_positions, h],
                    None,
                    ShardLayout::Contiguous,
                    Init::Normal(std),
                )?);
            }
        }
        let fp8 = Fp8Layers::of(cfg)?;
        let has_fp8_layers = layer_numbers.iter().any(|&l| fp8.of_layer(l).is_some());
        let mut layers = Vec::with_capacity(layer_numbers.len());
        for &l in &layer_numbers {
            // `mixed_precision.fp8_param`: the FP8 layers' GEMM weights are stored in FP8.
            let fp8_stored = cfg.fp8_param == Some(true) && fp8.of_layer(l).is_some();
            store.store_gemm_weights_in_fp8(fp8_stored);
            let mut attn = SelfAttention::new(&mut store, &arch, l, layout.tp_size)?;
            let mut mlp = Mlp::new(&mut store, &arch, l)?;
            store.store_gemm_weights_in_fp8(false);
            attn.set_fp8(fp8.of_layer(l));
            mlp.set_fp8(fp8.of_layer(l));
            if let Some(tp) = &tp_group {
                attn = attn.with_tensor_parallel(tp.clone());
                mlp = mlp.with_tensor_parallel(tp.clone());
            }
            layers.push(Layer { attn, mlp });
        }
        let (mut final_norm, mut output_w) = (None, None);
        if post_process {
            final_norm = Some(Norm::new(
                &mut store,
                &arch,
                "decoder.final_layernorm.weight",
                "decoder.final_layernorm.bias",
                h,
            )?);
            output_w = match (&word_emb, arch.tied_embeddings) {
                (Some(w), true) => Some(w.clone()),
                _ => {
                    // Untied, or tied on a last stage without the embedding: Megatron keeps an
                    // `output_layer.weight` copy there, synchronised with the embedding.
                    // The tied copy starts from the embedding's own random stream, i.e. equal to
                    // it, as Megatron's initial embedding all-reduce makes it.
                    let init_key = if arch.tied_embeddings {
                        "embedding.word_embeddings.weight"
                    } else {
                        "output_layer.weight"
                    };
                    let w = store.create_keyed(
                        "output_layer.weight",
                        init_key,
                        &[arch.vocab, h],
                        Some(0),
                        ShardLayout::Contiguous,
                        Init::Normal(std),
                    )?;
                    if arch.tied_embeddings {
                        store.mark_shared_embedding("output_layer.weight");
                    }
                    Some(w)
                }
            };
        }
        if let Some(tp) = tp_group.as_ref().filter(|tp| tp.sequence_parallel()) {
            // Under sequence parallelism the final norm sees this rank's part of the sequence.
            final_norm = final_norm.map(|n| n.with_tp_grad_sum(tp.clone()));
        }
        let rope = match arch.position_embedding {
            PositionEmbedding::Rope | PositionEmbedding::Yarn => Some(RopeTable::new(
                arch.head_dim,
                arch.rotary_percent,
                arch.rotary_base,
                arch.rope_scaling,
                arch.seq_len_interpolation_factor,
            )?),
            _ => None,
        };
        if let (Some(p), false) = (peft, layer_numbers.is_empty()) {
            crate::peft::matcher::ensure_matched(&store, p)?;
        }
        store.finish_init()?;
        Ok(Self {
            arch,
            layout,
            store,
            layer_numbers,
            pre_process,
            post_process,
            word_emb,
            pos_emb,
            layers,
            final_norm,
            output_w,
            rope,
            tp: tp_group,
            cp: None,
            dtype,
            device: device.clone(),
            recompute,
            // Selective recompute and the FP8 GEMMs live in the written-out backward, on every
            // device.
            explicit_layers: selective.is_some()
                || fp8.recipe.is_some()
                || explicit_layer::enabled_by_default(device),
            selective,
            has_fp8_layers,
            fp8_weights: fp8.weights,
            accumulation_fusion: cfg.gradient_accumulation_fusion,
        })
    }

    /// Whether the weight-gradient GEMMs of a training step add into its running gradient
    /// sum in place (`model.gradient_accumulation_fusion`, see
    /// [`super::recompute::RecomputeGrads::with_accumulation_fusion`]).
    pub fn accumulation_fusion(&self) -> bool {
        self.accumulation_fusion
    }

    /// Keeps the FP8 layers' quantized weights for reuse until the hold is dropped (see
    /// [`super::fp8_weights`]); None without FP8 layers. The parameters must not change
    /// while it is held: hold it around a step's forward and backward passes only.
    pub fn hold_fp8_weights(&self) -> Option<Fp8WeightHold> {
        self.has_fp8_layers.then(|| self.fp8_weights.hold())
    }

    /// How many quantized FP8 weights a hold keeps now.
    pub fn held_fp8_weights(&self) -> usize {
        self.fp8_weights.held()
    }

    /// The resolved architecture.
    pub fn arch(&self) -> &GptArch {
        &self.arch
    }
    /// Named parameters of this stage/rank.
    /// DoRA: sets every adapter magnitude to the row norms of its (now loaded) base weight,
    /// as Megatron Bridge does when it wraps a pretrained layer; no-op without DoRA.
    pub fn init_dora_magnitudes(&self) -> Result<()> {
        for l in &self.layers {
            l.attn.init_dora()?;
            l.mlp.init_dora()?;
        }
        Ok(())
    }

    pub fn params(&self) -> &ParamStore {
        &self.store
    }
    /// Global numbers of the layers this stage holds.
    pub fn layer_numbers(&self) -> &[usize] {
        &self.layer_numbers
    }
    /// True when this chunk embeds token ids (its input is token ids, not hidden states).
    pub fn pre_process(&self) -> bool {
        self.pre_process
    }
    /// True when this chunk ends in the output layer (its output is logits).
    pub fn post_process(&self) -> bool {
        self.post_process
    }
    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// An empty KV cache for [`Self::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache { entries: vec![None; self.layers.len()], len: 0 }
    }

    /// Splits every sequence over the context-parallel group `comm` (no-op for one rank):
    /// the model then takes this rank's chunks of each sequence (tokens and their position
    /// ids, see [`crate::parallel::context::split_sequence`]) and attention gathers the keys
    /// and values of the others.
    pub fn with_context_parallel(mut self, comm: Arc<dyn Communicator>) -> Self {
        if comm.size() > 1 {
            let cp = ContextParallel::new(comm);
            for layer in &mut self.layers {
                layer.attn = layer.attn.clone().with_context_parallel(cp.clone());
            }
            self.cp = Some(cp);
        }
        self
    }

    /// The tensor-parallel group this model runs over (None for TP=1).
    pub fn tensor_parallel(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    fn require_tp_comm(&self) -> Result<()> {
        if self.layout.tp_size != 1 && self.tp.is_none() {
            bail!(
                "TP={} layers need the tensor-parallel communicator: build the model with GptModel::new_parallel",
                self.layout.tp_size
            );
        }
        Ok(())
    }

    fn require_whole_model(&self) -> Result<()> {
        self.require_tp_comm()?;
        if self.layout.pp_size != 1 {
            bail!(
                "PP={} model: run each stage with forward_stage (this forward needs the whole model)",
                self.layout.pp_size
            );
        }
        Ok(())
    }

    /// Full forward of a PP=1 model: token ids `[b, s]` (u32) → logits `[b, s, vocab]`; with
    /// TP > 1, this rank's vocab shard `[b, s, vocab/tp]` (see [`Self::gather_logits`] and
    /// [`Self::cross_entropy`]). Pass `opts.dropout` in training; without it the forward is
    /// in evaluation mode.
    pub fn forward(&self, tokens: &Tensor, opts: &ForwardOpts) -> Result<Tensor> {
        self.require_whole_model()?;
        self.run(tokens, 0, opts, None, None)
    }

    /// Turns the written-out layer backward ([`super::explicit_layer`]) on or off for this
    /// model (the default follows the device and `MBRIDGE_EXPLICIT_LAYERS`).
    pub fn set_explicit_layers(&mut self, on: bool) {
        self.explicit_layers = on;
    }

    /// The activation recompute plan, if `model.recompute_granularity` asks for one.
    pub fn recompute_plan(&self) -> Option<&RecomputePlan> {
        self.recompute.as_ref()
    }

    /// Forward of one pipeline stage: the first stage takes token ids `[b, s]`, later
    /// stages the previous stage's hidden states `[b, s, h]` (replicated over TP; `[b, s/tp, h]`,
    /// this rank's part of the sequence, under sequence parallelism); the last
    /// stage returns logits `[b, s, vocab]` (this rank's vocab shard with TP > 1), earlier
    /// stages hidden states. Every stage needs the same `opts` (positions, mask) and, in
    /// training, its own [`DropoutRng`] stream. With `recompute` (training) the parameter
    /// gradients of checkpointed and explicit layers arrive there during `backward()`.
    pub fn forward_stage(
        &self,
        input: &Tensor,
        opts: &ForwardOpts,
        recompute: Option<&RecomputeGrads>,
    ) -> Result<Tensor> {
        self.require_tp_comm()?;
        self.run(input, 0, opts, None, recompute)
    }

    /// Training (or evaluation) forward of a stage that ends in the loss: `(Σ mask·CE, Σ
    /// mask)` as [`Self::cross_entropy`] of [`Self::forward_stage`]'s logits. With a side
    /// sink and the written-out backward on, the final norm, output layer and (vocab-parallel
    /// under TP) cross-entropy are one explicit op whose gradients go to `sink`; its backward
    /// writes the logits' gradient over the logits (the largest buffer of a step).
    pub fn forward_stage_loss(
        &self,
        input: &Tensor,
        opts: &ForwardOpts,
        sink: Option<&RecomputeGrads>,
        targets: &Microbatch,
    ) -> Result<(Tensor, f64)> {
        self.require_tp_comm()?;
        let (labels, loss_mask) = (&targets.labels, &targets.loss_mask);
        if !self.post_process {
            bail!("forward_stage_loss: this stage has no output layer");
        }
        let x = self.run_layers(input, 0, opts, None, sink)?;
        match sink {
            Some(sink) if self.explicit_layers => {
                section("head.fwd", &self.device, || self.explicit_head_loss(&x, targets, sink))
            }
            _ => {
                let logits = section("head.fwd", &self.device, || self.head(&x))?;
                section("loss.fwd", &self.device, || self.cross_entropy(&logits, labels, loss_mask))
            }
        }
    }

    /// Final norm → output layer → masked cross-entropy of `x` `[b, s, h]` with a written-out
    /// backward (see [`Self::forward_stage_loss`]). Under TP the output layer is
    /// column-parallel (its input gathered over the sequence with SP) and the cross-entropy
    /// vocab-parallel, with the gathers and partial sums written out as in the layers.
    fn explicit_head_loss(
        &self,
        x: &Tensor,
        targets: &Microbatch,
        sink: &RecomputeGrads,
    ) -> Result<(Tensor, f64)> {
        let (labels, loss_mask) = (&targets.labels, &targets.loss_mask);
        let stats = targets.host_stats;
        let (Some(norm), Some(w)) = (&self.final_norm, &self.output_w) else {
            bail!("stage has no output layer");
        };
        // The embedding's scatter-add joins a tied output layer's gradient in place, in f32.
        let tied_here = self.arch.tied_embeddings && self.pre_process();
        let tp = TpBoundary(self.tp.as_ref());
        let xn = norm.forward_untracked(&x.detach())?;
        let xg = tp.enter(&xn)?;
        let (b, s, h) = xg.dims3()?;
        let xg = xg.reshape((b * s, h))?;
        let logits = xg.matmul(&w.detach().t()?)?;
        let (ce, state) = match &self.tp {
            Some(tp) => {
                let max = stats.map(|t| t.max_label);
                let (ce, state) = tp.cross_entropy_untracked(&logits, labels, max)?;
                (ce, HeadCe::VocabParallel(tp.clone(), state))
            }
            None => {
                let max = stats.map(|t| t.max_label);
                let labels = ops::cross_entropy::checked_labels(labels, w.dim(0)?, max)?;
                let (ce, state) = ops::manual::cross_entropy_forward(&logits, &labels)?;
                (ce, HeadCe::Whole(labels, state))
            }
        };
        let known_count = stats.map(|t| t.mask_sum);
        let (sum, count, mask) = ops::cross_entropy::masked_sum(&ce, loss_mask, known_count)?;
        let (norm, w, sink, tp) = (norm.clone(), w.clone(), sink.clone(), self.tp.clone());
        let backward: BackwardFn = Box::new(move |x: &Tensor, g: &Tensor| {
            let run = || -> Result<Tensor> {
                let mut grads = LayerGrads::new(&sink);
                let g_rows = mask.broadcast_mul(&g.to_dtype(mask.dtype())?)?;
                let dlogits = match &state {
                    HeadCe::Whole(labels, state) => {
                        ops::manual::cross_entropy_backward(logits, labels, state, &g_rows)?
                    }
                    HeadCe::VocabParallel(tp, state) => {
                        tp.cross_entropy_backward_untracked(logits, state, &g_rows)?
                    }
                };
                // A frozen output layer (PEFT) needs no weight gradient: a vocab-sized GEMM.
                if super::explicit_linear::trains(&w) {
                    grads.weight_grad(&w, &dlogits, &xg, tied_here)?;
                }
                let dxg = dlogits.matmul(&w.detach())?.reshape((b, s, h))?;
                drop(dlogits);
                let dxn = TpBoundary(tp.as_ref()).enter_grad(&dxg)?;
                let dx = norm.backward(&x.detach(), &dxn, None, &mut grads)?;
                grads.push()?;
                Ok(dx)
            };
            run()
                .map(Some)
                .map_err(|e| candle_core::Error::Msg(format!("explicit head backward: {e:#}")))
        });
        Ok((with_backward(x, sum, "explicit-head-loss", backward)?, count))
    }

    /// Incremental forward with a KV cache: `tokens` `[b, s]` continue the cached sequence
    /// (positions `cache.len()..cache.len()+s`); returns the full-vocabulary logits of the new
    /// tokens (gathered over TP).
    pub fn forward_cached(&self, tokens: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.require_whole_model()?;
        if self.tp.as_ref().is_some_and(|tp| tp.sequence_parallel()) {
            bail!("incremental decoding runs without sequence parallelism (model.sequence_parallel = false)");
        }
        if cache.entries.len() != self.layers.len() {
            bail!("KV cache was made for a different model");
        }
        let start = cache.len;
        let logits = self.run(tokens, start, &ForwardOpts::default(), Some(cache), None)?;
        cache.len = start + tokens.dim(1)?;
        self.gather_logits(&logits)
    }

    /// Full-vocabulary logits `[b, s, vocab]` from this rank's vocab-parallel shard (no
    /// gradient; identity for TP=1).
    pub fn gather_logits(&self, local: &Tensor) -> Result<Tensor> {
        match &self.tp {
            Some(tp) => Ok(tp.gather(local, 2)?),
            None => Ok(local.clone()),
        }
    }

    /// `(Σ mask·CE, Σ mask)` of this model's logits (vocab-parallel with TP > 1; the same
    /// values on every TP rank) — see [`ops::masked_cross_entropy`].
    pub fn cross_entropy(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        loss_mask: &Tensor,
    ) -> Result<(Tensor, f64)> {
        match &self.tp {
            Some(tp) => Ok(tp.cross_entropy(logits, labels, loss_mask)?),
            None => Ok(ops::masked_cross_entropy(logits, labels, loss_mask)?),
        }
    }

    /// Rejects token ids outside the vocabulary and sequences past `max_positions`.
    fn check_inputs(
        &self,
        tokens: Option<&Tensor>,
        start: usize,
        s: usize,
        pos: Option<&Tensor>,
        known: Option<HostStats>,
    ) -> Result<()> {
        if s == 0 {
            bail!("empty input sequence");
        }
        if let Some(tokens) = tokens {
            let max_id = ops::cross_entropy::max_id(tokens, known.map(|k| k.max_token))? as usize;
            if max_id >= self.arch.vocab {
                bail!("token id {max_id} is out of range for vocabulary size {}", self.arch.vocab);
            }
        }
        let end = start + s;
        if end > self.arch.max_positions {
            bail!(
                "sequence length {end} exceeds the model's maximum of {} positions (max_position_embeddings)",
                self.arch.max_positions
            );
        }
        if let Some(p) = pos {
            let max_pos =
                ops::cross_entropy::max_id(p, known.and_then(|k| k.max_position))? as usize;
            if max_pos >= self.arch.max_positions {
                bail!(
                    "position id {max_pos} exceeds the model's maximum of {} positions (max_position_embeddings)",
                    self.arch.max_positions
                );
            }
        }
        Ok(())
    }

    /// Runs this stage: `input` is token ids on the first stage, hidden states otherwise;
    /// logits when the stage ends in the output layer.
    fn run(
        &self,
        input: &Tensor,
        start: usize,
        opts: &ForwardOpts,
        cache: Option<&mut KvCache>,
        recompute: Option<&RecomputeGrads>,
    ) -> Result<Tensor> {
        let x = self.run_layers(input, start, opts, cache, recompute)?;
        if self.post_process {
            section("head.fwd", &self.device, || self.head(&x))
        } else {
            Ok(x)
        }
    }

    /// [`Self::run`] up to the last layer's output (no final norm / output layer).
    fn run_layers(
        &self,
        input: &Tensor,
        start: usize,
        opts: &ForwardOpts,
        mut cache: Option<&mut KvCache>,
        recompute: Option<&RecomputeGrads>,
    ) -> Result<Tensor> {
        let pre = self.pre_process;
        // Sequence parallelism: the residual stream holds this rank's part of the sequence.
        let sp = self.tp.as_ref().filter(|tp| tp.sequence_parallel());
        let (b, s) = if pre {
            input.dims2()?
        } else {
            let (b, s, h) = input.dims3()?;
            if h != self.arch.hidden {
                bail!("stage input has width {h}, expected hidden size {}", self.arch.hidden);
            }
            (b, s * sp.map_or(1, |tp| tp.size()))
        };
        if let Some(tp) = sp {
            if !s.is_multiple_of(tp.size()) {
                bail!(
                    "sequence parallelism: sequence length {s} is not divisible by tensor_model_parallel_size = {}",
                    tp.size()
                );
            }
        }
        self.check_inputs(pre.then_some(input), start, s, opts.position_ids, opts.host_stats)?;
        let pos = match opts.position_ids {
            Some(p) => p.to_dtype(DType::U32)?,
            None => Tensor::arange(start as u32, (start + s) as u32, &self.device)?
                .unsqueeze(0)?
                .repeat((b, 1))?,
        };
        let hidden_dropout = |t: Tensor| -> Result<Tensor> {
            let p = self.arch.hidden_dropout;
            Ok(match (opts.dropout, sp) {
                // The TP=1 mask of the whole sequence, this rank's part of it.
                (Some(r), Some(tp)) => r.dropout_shard(&t, p, 1, tp.rank(), tp.size())?,
                (Some(r), None) => r.dropout(&t, p)?,
                (None, _) => t,
            })
        };
        let mut x = if pre {
            // Training with the written-out backward: the lookups' gradients too.
            let sink = recompute.filter(|_| self.explicit_layers && cache.is_none());
            let e = section("embed.fwd", &self.device, || self.embed(input, &pos, sink))?;
            let e = match sp {
                Some(tp) => tp.scatter_to_sequence_region(&e, 1)?,
                None => e,
            };
            hidden_dropout(e)?
        } else {
            input.clone()
        };
        let rope = match &self.rope {
            Some(r) => Some(r.cos_sin(&pos, self.dtype)?),
            None => None,
        };
        let packed = match opts.cu_seqlens {
            None => None,
            Some(_) if opts.attention_mask.is_some() => {
                bail!("a forward pass takes either attention_mask or cu_seqlens, not both")
            }
            Some(_) if start > 0 => bail!("packed sequences (cu_seqlens) cannot use a KV cache"),
            Some(cu) => Some(
                PackedSeqs::new(cu, b, s, &self.device)
                    .map_err(|e| anyhow::anyhow!("packed micro-batch: {e}"))?,
            ),
        };
        if self.cp.is_some() && (packed.is_some() || opts.attention_mask.is_some()) {
            bail!(
                "context parallelism runs causal attention only: packed sequences (cu_seqlens) \
                 and attention masks are not supported with context_parallel_size > 1"
            );
        }
        if self.cp.is_some() && opts.position_ids.is_none() {
            bail!("context parallelism needs the position ids of this rank's sequence chunks");
        }
        // On CUDA in half precision the fused kernel masks by itself (causal, or per packed
        // sequence): no s×s mask is built. Context-parallel attention masks per query chunk.
        let dropout_active = opts.dropout.is_some() && self.arch.attention_dropout > 0.0;
        let fast = ops::flash::model_fast_path(
            &self.device,
            self.dtype,
            self.arch.attention_backend,
            opts.attention_mask.is_some(),
            dropout_active,
        );
        let window_left = self.arch.window_left;
        let dense = match (&packed, fast || self.cp.is_some()) {
            (_, true) => None,
            (Some(p), false) => {
                Some(ops::build_packed_attention_mask(p, window_left, &self.device)?)
            }
            (None, false) => Some(ops::build_attention_mask(
                start,
                s,
                start + s,
                window_left,
                opts.attention_mask,
                &self.device,
            )?),
        };
        if let (Some(plan), Some(grads), None) = (&self.recompute, recompute, &cache) {
            if opts.dropout.is_some() {
                bail!("activation recompute with dropout is not supported yet (the recomputed layers would draw new masks)");
            }
            // Recomputed layers keep their written-out backward: the recompute runs their
            // explicit forward again and their gradients reach `grads` directly.
            let explicit = match self.explicit_layers {
                true => {
                    let mask = attn_mask(dense.as_ref(), packed.as_ref(), window_left);
                    let mask = OwnedAttnMask::from_mask(mask);
                    let none = SelectiveRecompute::default();
                    Some(Arc::new(ExplicitInputs::new(rope.as_ref(), mask, none)?))
                }
                false => None,
            };
            for (range, checkpointed) in plan.segments(self.layers.len()) {
                let layers = self.layers[range].to_vec();
                if !checkpointed {
                    let inputs = AttnInputs {
                        rope: rope.as_ref(),
                        mask: attn_mask(dense.as_ref(), packed.as_ref(), window_left),
                        dropout: None,
                    };
                    for layer in &layers {
                        x = layer_step(layer, &x, &inputs, explicit.as_ref().map(|e| (grads, e)))?;
                    }
                    continue;
                }
                // Under PEFT the segment's input may be untracked (frozen embedding).
                let anchor = layers.iter().find_map(Layer::adapter_anchor).cloned();
                let (rope, dense, packed) = (rope.clone(), dense.clone(), packed.clone());
                let (explicit, sink) = (explicit.clone(), grads.clone());
                let f: SegmentFn = Arc::new(move |x: &Tensor| {
                    let inputs = AttnInputs {
                        rope: rope.as_ref(),
                        mask: attn_mask(dense.as_ref(), packed.as_ref(), window_left),
                        dropout: None,
                    };
                    let mut x = x.clone();
                    for layer in &layers {
                        let ex = explicit.as_ref().map(|e| (&sink, e));
                        x = layer_step(layer, &x, &inputs, ex)
                            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
                    }
                    Ok(x)
                });
                x = checkpoint(&x, anchor.as_ref(), f, grads)?;
            }
            return Ok(x);
        }
        let inputs = AttnInputs {
            rope: rope.as_ref(),
            mask: attn_mask(dense.as_ref(), packed.as_ref(), window_left),
            dropout: opts.dropout,
        };
        // Training layers with a written-out backward (see `explicit_layer`): their
        // parameter gradients go to the side sink, so one must be there.
        let dropout_in_effect = opts.dropout.is_some()
            && (self.arch.hidden_dropout > 0.0 || self.arch.attention_dropout > 0.0);
        let explicit_inputs = || -> Result<ExplicitInputs> {
            let mask = OwnedAttnMask::from_mask(inputs.mask);
            ExplicitInputs::new(rope.as_ref(), mask, self.selective.unwrap_or_default())
        };
        // Evaluation (`opts.no_grad`) runs the written-out layers forward only: each layer's
        // activations are freed as the next one starts (candle's graph would keep them all
        // until the loss), and FP8 layers run their FP8 GEMMs, as megatron-core enters its
        // FP8 context in every forward of the transformer block. Without a sink otherwise
        // (a caller's own backward through the graph) and in generation with a KV cache the
        // recorded layers run, in the parameters' dtype.
        let explicit = match (recompute, &cache) {
            _ if dropout_in_effect || !self.explicit_layers => None,
            (Some(sink), None) => Some((Some(sink), Arc::new(explicit_inputs()?))),
            (None, None) if opts.no_grad => {
                Some((None, Arc::new(explicit_inputs()?.forward_only())))
            }
            _ => None,
        };
        if self.selective.is_some() && recompute.is_some() && explicit.is_none() {
            bail!("selective recompute needs the written-out layer backward, which is turned off for this model");
        }
        let mut i = 0;
        while i < self.layers.len() {
            // Consecutive layers with a written-out backward run as one node of the graph.
            if let Some((sink, ei)) = &explicit {
                let run: Vec<_> = self.layers[i..]
                    .iter()
                    .take_while(|l| l.attn.explicit_ok() && l.mlp.explicit_ok())
                    .map(|l| (&l.attn, &l.mlp))
                    .collect();
                if !run.is_empty() {
                    x = match sink {
                        Some(sink) => explicit_layer::forward_run(&run, Some(i), &x, ei, sink)?,
                        None => explicit_layer::forward_only_run(&run, i, &x, ei)?,
                    };
                    i += run.len();
                    continue;
                }
            }
            // Forward only: the backward runs later inside candle's `backward()`.
            let _range = crate::profiling::Range::layer(i);
            let layer = &self.layers[i];
            let entry = cache.as_deref_mut().map(|c| &mut c.entries[i]);
            x = (&x + hidden_dropout(layer.attn.forward(&x, &inputs, entry)?)?)?;
            x = (&x + hidden_dropout(layer.mlp.forward_train(&x, opts.dropout)?)?)?;
            i += 1;
        }
        Ok(x)
    }

    /// Embedding stage input: word embeddings (+ learned positions) `[b, s, h]`.
    /// With `explicit` (training), the lookups' gradients are computed by
    /// [`explicit_lookup`] and go to that sink.
    fn embed(
        &self,
        tokens: &Tensor,
        pos: &Tensor,
        explicit: Option<&RecomputeGrads>,
    ) -> Result<Tensor> {
        let w = self.word_emb.as_ref().ok_or_else(|| anyhow::anyhow!("stage has no embedding"))?;
        let (b, s) = tokens.dims2()?;
        let ids = tokens.to_dtype(DType::U32)?.flatten_all()?;
        let lookup = |w: &Tensor, ids: &Tensor| -> Result<Tensor> {
            Ok(match explicit {
                Some(sink) => explicit_lookup(w, ids, sink)?,
                None => w.index_select(ids, 0)?,
            })
        };
        let mut x = match &self.tp {
            Some(tp) => tp.embedding(&ids, w)?,
            None => lookup(w, &ids)?,
        }
        .reshape((b, s, self.arch.hidden))?;
        if let Some(pw) = &self.pos_emb {
            let pe = lookup(pw, &pos.flatten_all()?)?.reshape((b, s, self.arch.hidden))?;
            x = (x + pe)?;
        }
        Ok(x)
    }

    /// Final norm and output projection: `[b, s, h]` → logits `[b, s, vocab]`.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let (Some(norm), Some(w)) = (&self.final_norm, &self.output_w) else {
            bail!("stage has no output layer");
        };
        let x = norm.forward(x)?;
        let x = match &self.tp {
            Some(tp) => tp.enter_column(&x)?,
            None => x,
        };
        Ok(ops::linear(&x, w, None)?)
    }
}

/// The cross-entropy state of the written-out head: over the whole vocabulary (checked
/// labels), or vocab-parallel over the TP group.
enum HeadCe {
    Whole(Tensor, ops::manual::CeState),
    VocabParallel(TensorParallel, crate::parallel::tensor::VocabShardCe),
}

/// The attention mask of a forward pass: the dense mask when one was built, else the packed
/// boundaries or causal (the fused kernel masks by itself).
fn attn_mask<'a>(
    dense: Option<&'a Tensor>,
    packed: Option<&'a PackedSeqs>,
    window_left: Option<i64>,
) -> AttnMask<'a> {
    match (dense, packed) {
        (Some(m), _) => AttnMask::Dense(m),
        (None, Some(seqs)) => AttnMask::Packed { seqs, window_left },
        (None, None) => AttnMask::Causal { window_left },
    }
}

/// `w[ids]` whose weight gradient is computed by [`ops::manual::embedding_backward`] (a
/// scatter-add kernel on CUDA, instead of candle's `index_add`) and goes to `sink`, on CUDA
/// straight into a tied output layer's gradient already there.
fn explicit_lookup(w: &Tensor, ids: &Tensor, sink: &RecomputeGrads) -> Result<Tensor> {
    let y = w.detach().index_select(ids, 0)?;
    let (ids, sink) = (ids.clone(), sink.clone());
    let backward: BackwardFn = Box::new(move |w: &Tensor, dy: &Tensor| {
        sink.push_embedding(w, &ids, &dy.contiguous()?)?;
        Ok(None)
    });
    Ok(with_backward(w, y, "explicit-embedding", backward)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::RecomputeGranularity;

    /// Selective recompute really drops what it names: the blocks' saved state of a
    /// selective model lacks the core attention output / `linear_fc1` output.
    #[test]
    fn selective_recompute_drops_the_named_activations() {
        let mut cfg = crate::model::one_block_config();
        cfg.recompute_granularity = Some(RecomputeGranularity::Selective);
        // (modules, core attention kept, fc1 output kept, attention / MLP norm outputs kept)
        let names = |v: &[&str]| Some(v.iter().map(|m| m.to_string()).collect::<Vec<_>>());
        for (modules, core, fc1, normed) in [
            (None, false, true, (true, true)),
            (names(&["mlp"]), true, false, (true, false)),
            (names(&["core_attn", "mlp"]), false, false, (true, false)),
            (names(&["layernorm"]), true, true, (false, false)),
        ] {
            cfg.recompute_modules = modules.clone();
            let model =
                GptModel::new(&cfg, ParallelLayout::single(), 3, DType::F32, &Device::Cpu).unwrap();
            let selective = model.selective.expect("selective config");
            let x = Tensor::ones((1, 8, 16), DType::F32, &Device::Cpu).unwrap();
            let mask = crate::ops::attention::OwnedAttnMask::Causal { window_left: None };
            let inputs = ExplicitInputs::new(None, mask, selective).unwrap();
            let layer = &model.layers[0];
            let (_, a) = layer.attn.forward_saving(&x, &inputs).unwrap();
            let (_, m) = layer.mlp.forward_saving(&x, &inputs).unwrap();
            assert_eq!((a.keeps_core(), m.keeps_fc1()), (core, fc1), "{modules:?}");
            assert_eq!((a.keeps_normed(), m.keeps_normed()), normed, "{modules:?}");
        }
    }

    /// FP8 blocks keep the quantized inputs of `linear_qkv` and `linear_fc1` / `linear_fc2`
    /// for the weight gradients instead of the norm outputs and the activation; with a
    /// high-precision weight gradient (`fp8_wgrad = false`) they keep those as before.
    #[test]
    fn fp8_blocks_keep_quantized_inputs_instead_of_activations() {
        let mut cfg = crate::model::one_block_config();
        cfg.fp8 = Some("hybrid".into());
        for (wgrad, kept) in [(true, false), (false, true)] {
            cfg.fp8_wgrad = wgrad;
            let model =
                GptModel::new(&cfg, ParallelLayout::single(), 3, DType::F32, &Device::Cpu).unwrap();
            let x = Tensor::ones((1, 8, 16), DType::F32, &Device::Cpu).unwrap();
            let mask = crate::ops::attention::OwnedAttnMask::Causal { window_left: None };
            let selective = SelectiveRecompute::default();
            let inputs = ExplicitInputs::new(None, mask, selective).unwrap();
            let layer = &model.layers[0];
            let (_, a) = layer.attn.forward_saving(&x, &inputs).unwrap();
            let (_, m) = layer.mlp.forward_saving(&x, &inputs).unwrap();
            let keeps = (a.keeps_normed(), m.keeps_normed(), m.keeps_act());
            assert_eq!(keeps, (kept, kept, kept), "fp8_wgrad = {wgrad}");
        }
    }

    /// A forward that no backward follows (evaluation) runs the same FP8 GEMMs, so its
    /// output equals the training forward's bit for bit, and keeps no quantized operands.
    #[test]
    fn an_fp8_forward_without_backward_matches_and_keeps_nothing() {
        let mut cfg = crate::model::one_block_config();
        cfg.fp8 = Some("hybrid".into());
        let model =
            GptModel::new(&cfg, ParallelLayout::single(), 3, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 8, 16), &Device::Cpu).unwrap();
        let layer = &model.layers[0];
        let run = |inputs: ExplicitInputs| {
            let (x2, a) = layer.attn.forward_saving(&x, &inputs).unwrap();
            let (y, m) = layer.mlp.forward_saving(&x2, &inputs).unwrap();
            (y, a.keeps_fp8(), m.keeps_fp8())
        };
        let inputs = || {
            let mask = crate::ops::attention::OwnedAttnMask::Causal { window_left: None };
            ExplicitInputs::new(None, mask, SelectiveRecompute::default()).unwrap()
        };
        let (y_train, attn_kept, mlp_kept) = run(inputs());
        assert!(attn_kept && mlp_kept, "training keeps the FP8 operands");
        let (y_eval, attn_kept, mlp_kept) = run(inputs().forward_only());
        assert!(!attn_kept && !mlp_kept, "evaluation keeps no FP8 operands");
        let diff = (y_train - y_eval).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    /// `fp8_param`: the block's four GEMM weights are stored in FP8 (the norms are not), and
    /// the block computes what the same weights quantized at each GEMM give, bit for bit:
    /// both cast the same values with the same tensorwise scale.
    #[test]
    fn fp8_primary_weights_are_stored_in_fp8_and_compute_the_same_block() {
        let mut cfg = crate::model::one_block_config();
        cfg.fp8 = Some("hybrid".into());
        let quantized =
            GptModel::new(&cfg, ParallelLayout::single(), 3, DType::F32, &Device::Cpu).unwrap();
        cfg.fp8_param = Some(true);
        let stored =
            GptModel::new(&cfg, ParallelLayout::single(), 3, DType::F32, &Device::Cpu).unwrap();
        let dtypes: Vec<(String, DType)> =
            stored.params().params().iter().map(|p| (p.name.clone(), p.var.dtype())).collect();
        for (name, dtype) in &dtypes {
            let gemm = ["linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight"]
                .iter()
                .chain(&["linear_fc2.weight"])
                .any(|s| name.ends_with(s));
            let expected = if gemm { DType::F8E4M3 } else { DType::F32 };
            assert_eq!(*dtype, expected, "{name}");
        }
        assert_eq!(dtypes.iter().filter(|(_, d)| *d == DType::F8E4M3).count(), 4);
        // The checkpoint's view: the stored values scaled back, in the model's dtype.
        let state = stored.params().local_state().unwrap();
        assert!(state.iter().all(|(_, t)| t.dtype() == DType::F32));
        let x = Tensor::randn(0f32, 1.0, (1, 8, 16), &Device::Cpu).unwrap();
        let run = |model: &GptModel| {
            let mask = crate::ops::attention::OwnedAttnMask::Causal { window_left: None };
            let inputs = ExplicitInputs::new(None, mask, SelectiveRecompute::default()).unwrap();
            let layer = &model.layers[0];
            let (x2, _) = layer.attn.forward_saving(&x, &inputs).unwrap();
            layer.mlp.forward_saving(&x2, &inputs).unwrap().0
        };
        let diff = (run(&quantized) - run(&stored)).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}
