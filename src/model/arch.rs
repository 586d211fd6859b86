//! The resolved architecture of a GPT decoder: `ModelConfig` checked once and reduced to the
//! numbers the layers need, plus the parallel layout of the stage being built.

use crate::config::model::{Activation, ModelConfig, Normalization, PositionEmbedding};
use crate::ops::{RopeScaling, Yarn};
use anyhow::{bail, Result};

/// Where this model instance sits in the tensor/pipeline-parallel grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelLayout {
    /// Tensor-parallel rank of this process.
    pub tp_rank: usize,
    /// Tensor-parallel group size.
    pub tp_size: usize,
    /// Pipeline stage of this process.
    pub pp_rank: usize,
    /// Number of pipeline stages.
    pub pp_size: usize,
}

impl ParallelLayout {
    /// A single-process layout (TP=1, PP=1).
    pub fn single() -> Self {
        Self { tp_rank: 0, tp_size: 1, pp_rank: 0, pp_size: 1 }
    }
    /// True on the first pipeline stage (it owns the embedding).
    pub fn pre_process(&self) -> bool {
        self.pp_rank == 0
    }
    /// True on the last pipeline stage (it owns the final norm and output layer).
    pub fn post_process(&self) -> bool {
        self.pp_rank + 1 == self.pp_size
    }
}

/// Architecture numbers of a dense GPT decoder (global, i.e. unsharded, sizes).
#[derive(Debug, Clone, PartialEq)]
pub struct GptArch {
    /// Transformer layers in the whole model.
    pub num_layers: usize,
    /// Model width h.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query groups).
    pub groups: usize,
    /// Per-head channels (`kv_channels`).
    pub head_dim: usize,
    /// MLP hidden size f.
    pub ffn: usize,
    /// Padded vocabulary size (rows of embedding and output layer).
    pub vocab: usize,
    /// Longest supported sequence.
    pub max_positions: usize,
    /// Norm type of every norm in the model.
    pub normalization: Normalization,
    /// Norm epsilon.
    pub eps: f64,
    /// `layernorm_zero_centered_gamma`.
    pub zero_centered_gamma: bool,
    /// `gated_linear_unit`: `linear_fc1` is `[gate; up]`.
    pub gated: bool,
    /// MLP activation.
    pub activation: Activation,
    /// Biases on all linear layers.
    pub add_bias_linear: bool,
    /// Bias on `linear_qkv` (implied by `add_bias_linear`).
    pub add_qkv_bias: bool,
    /// Per-head norms of q and k.
    pub qk_layernorm: bool,
    /// Output layer shares the word-embedding matrix.
    pub tied_embeddings: bool,
    /// Position encoding.
    pub position_embedding: PositionEmbedding,
    /// RoPE base.
    pub rotary_base: f64,
    /// Fraction of head dims that rotate.
    pub rotary_percent: f64,
    /// RoPE frequency scaling: Llama-3.1's or YaRN's.
    pub rope_scaling: RopeScaling,
    /// Linear position interpolation factor.
    pub seq_len_interpolation_factor: Option<f64>,
    /// Sliding window: number of previous tokens visible (`window_size[0]`).
    pub window_left: Option<i64>,
    /// `model.attention_backend`.
    pub attention_backend: crate::config::model::AttnBackend,
    /// `init_method_std`.
    pub init_std: f64,
    /// Dropout after the embedding and on both residual branches (training only).
    pub hidden_dropout: f64,
    /// Dropout on attention probabilities (training only).
    pub attention_dropout: f64,
}

impl GptArch {
    /// Validates `cfg` and resolves defaults. `cfg.vocab_size` must already hold the padded
    /// vocabulary size.
    pub fn from_config(cfg: &ModelConfig) -> Result<Self> {
        let Some(vocab) = cfg.vocab_size else {
            bail!("model.vocab_size is not set (it must be resolved before building the model)");
        };
        let heads = cfg.num_attention_heads;
        let groups = cfg.query_groups();
        if cfg.num_layers == 0 || cfg.hidden_size == 0 || heads == 0 || vocab == 0 {
            bail!("model.num_layers, hidden_size, num_attention_heads and vocab_size must be > 0");
        }
        if groups == 0 || !heads.is_multiple_of(groups) {
            bail!("model.num_attention_heads ({heads}) must be a multiple of num_query_groups ({groups})");
        }
        if cfg.num_moe_experts.is_some() {
            bail!("model.num_moe_experts: mixture-of-experts layers are not implemented yet");
        }
        if cfg.mtp_num_layers.is_some_and(|n| n > 0) {
            bail!("model.mtp_num_layers: multi-token prediction is not implemented yet");
        }
        if cfg.rotary_interleaved {
            bail!("model.rotary_interleaved = true is not implemented yet");
        }
        if cfg.apply_residual_connection_post_layernorm {
            bail!("model.apply_residual_connection_post_layernorm = true is not implemented yet");
        }
        if let Some([_, right]) = cfg.window_size {
            if right != 0 {
                bail!("model.window_size right side must be 0 for causal models, got {right}");
            }
        }
        let head_dim = cfg.head_dim();
        if head_dim == 0 {
            bail!("model.kv_channels must be > 0");
        }
        Ok(Self {
            num_layers: cfg.num_layers,
            hidden: cfg.hidden_size,
            heads,
            groups,
            head_dim,
            ffn: cfg.ffn_hidden(),
            vocab,
            max_positions: cfg.max_positions(),
            normalization: cfg.normalization,
            eps: cfg.layernorm_epsilon,
            zero_centered_gamma: cfg.layernorm_zero_centered_gamma,
            gated: cfg.gated_linear_unit,
            activation: cfg.activation_func,
            add_bias_linear: cfg.add_bias_linear,
            add_qkv_bias: cfg.add_qkv_bias || cfg.add_bias_linear,
            qk_layernorm: cfg.qk_layernorm,
            tied_embeddings: cfg.share_embeddings_and_output_weights,
            position_embedding: cfg.position_embedding_type,
            rotary_base: cfg.rotary_base,
            rotary_percent: cfg.rotary_percent,
            rope_scaling: rope_scaling(cfg)?,
            seq_len_interpolation_factor: cfg.seq_len_interpolation_factor,
            window_left: cfg.window_size.map(|[left, _]| left),
            attention_backend: cfg.attention_backend,
            init_std: cfg.init_method_std,
            hidden_dropout: cfg.hidden_dropout,
            attention_dropout: cfg.attention_dropout,
        })
    }

    /// Checks that every TP-split dimension divides by `tp_size`.
    pub fn check_tp(&self, tp_size: usize) -> Result<()> {
        for (what, n) in [
            ("num_attention_heads", self.heads),
            ("num_query_groups", self.groups),
            ("ffn_hidden_size", self.ffn),
            ("vocab_size (padded)", self.vocab),
        ] {
            if n % tp_size != 0 {
                bail!(
                    "model.{what} = {n} is not divisible by tensor_model_parallel_size = {tp_size}"
                );
            }
        }
        Ok(())
    }

    /// Rows of the fused `linear_qkv` weight: `(heads + 2·groups) · head_dim`.
    pub fn qkv_rows(&self) -> usize {
        (self.heads + 2 * self.groups) * self.head_dim
    }
}

/// The RoPE scaling `cfg` asks for: YaRN with `position_embedding_type = "yarn"` (its
/// factor and original context are required, the rest take megatron-core's defaults), else
/// Llama-3.1's with `rope_scaling`.
fn rope_scaling(cfg: &ModelConfig) -> Result<RopeScaling> {
    if cfg.position_embedding_type != PositionEmbedding::Yarn {
        return Ok(match cfg.rope_scaling {
            true => RopeScaling::Llama3(cfg.rope_scaling_factor),
            false => RopeScaling::None,
        });
    }
    if cfg.rope_scaling {
        bail!(
            "model.rope_scaling (Llama-3.1) and position_embedding_type = yarn exclude each other"
        );
    }
    let (Some(factor), Some(original)) =
        (cfg.yarn_rotary_scaling_factor, cfg.yarn_original_max_position_embeddings)
    else {
        bail!(
            "model.position_embedding_type = yarn needs model.yarn_rotary_scaling_factor and \
             model.yarn_original_max_position_embeddings"
        );
    };
    if !(factor.is_finite() && factor > 0.0) || original == 0 {
        bail!("model.yarn_rotary_scaling_factor ({factor}) and yarn_original_max_position_embeddings ({original}) must be > 0");
    }
    Ok(RopeScaling::Yarn(Yarn {
        factor,
        original_max_positions: original as f64,
        beta_fast: cfg.yarn_beta_fast.unwrap_or(32.0),
        beta_slow: cfg.yarn_beta_slow.unwrap_or(1.0),
        mscale: cfg.yarn_mscale,
        mscale_all_dim: cfg.yarn_mscale_all_dim,
        round_to_int: cfg.yarn_correction_range_round_to_int.unwrap_or(true),
    }))
}

/// Global layer numbers (0-based) owned by pipeline stage `pp_rank` of `pp_size`: every
/// model chunk of that rank (see [`chunk_layers`]), in chunk order.
pub fn stage_layers(cfg: &ModelConfig, pp_rank: usize, pp_size: usize) -> Result<Vec<usize>> {
    let vp = virtual_stages(cfg, pp_size);
    let mut out = Vec::new();
    for vp_stage in 0..vp {
        out.extend(chunk_layers(cfg, pp_rank, pp_size, vp_stage)?);
    }
    Ok(out)
}

/// Model chunks per pipeline rank: `virtual_pipeline_model_parallel_size` when the model is
/// pipelined (PP > 1), else 1.
pub fn virtual_stages(cfg: &ModelConfig, pp_size: usize) -> usize {
    match cfg.virtual_pipeline_model_parallel_size {
        Some(vp) if pp_size > 1 => vp.max(1),
        _ => 1,
    }
}

/// Global layer numbers of model chunk `vp_stage` on pipeline rank `pp_rank`, as megatron-core
/// assigns them (`get_num_layers_to_build` and `get_transformer_layer_offset`):
/// - even split: `num_layers` (+1 with `account_for_embedding_in_pipeline_split`, +1 with
///   `account_for_loss_in_pipeline_split`) is divided into `pp · vp` equal virtual stages;
///   virtual stage `c·pp + r` (chunk c of rank r) holds the next slice, and the embedding
///   (loss) takes the place of one layer in the first (last) virtual stage;
/// - uneven split: `num_layers_in_{first,last}_pipeline_stage` go to the first/last rank
///   (divided among its chunks) and the remaining layers are divided evenly among the other
///   ranks; the embedding/loss accounting is not allowed with it (as in megatron-core).
pub fn chunk_layers(
    cfg: &ModelConfig,
    pp_rank: usize,
    pp_size: usize,
    vp_stage: usize,
) -> Result<Vec<usize>> {
    let n = cfg.num_layers;
    if pp_size == 0 || pp_rank >= pp_size {
        bail!("pipeline rank {pp_rank} out of range for pipeline size {pp_size}");
    }
    let vp = virtual_stages(cfg, pp_size);
    if vp_stage >= vp {
        bail!("virtual pipeline stage {vp_stage} out of range for {vp} model chunks");
    }
    if pp_size == 1 {
        return Ok((0..n).collect());
    }
    let (first, last) =
        (cfg.num_layers_in_first_pipeline_stage, cfg.num_layers_in_last_pipeline_stage);
    let (with_emb, with_loss) =
        (cfg.account_for_embedding_in_pipeline_split, cfg.account_for_loss_in_pipeline_split);
    let (offset, count) = if first.is_some() || last.is_some() {
        if with_emb || with_loss {
            bail!(
                "model.account_for_embedding/loss_in_pipeline_split cannot be combined with \
                 num_layers_in_first/last_pipeline_stage (megatron-core does not support it)"
            );
        }
        let (f, l) = (first.unwrap_or(0), last.unwrap_or(0));
        let middle_stages = pp_size - usize::from(first.is_some()) - usize::from(last.is_some());
        let middle_layers = n.checked_sub(f + l).ok_or_else(|| {
            anyhow::anyhow!(
                "first ({f}) and last ({l}) pipeline stage layers exceed model.num_layers ({n})"
            )
        })?;
        if middle_stages == 0 && middle_layers != 0 {
            bail!("pipeline stage overrides leave {middle_layers} layers unassigned");
        }
        if middle_stages > 0 && !middle_layers.is_multiple_of(middle_stages) {
            bail!(
                "model.num_layers ({n}) cannot be split evenly over {middle_stages} pipeline stages"
            );
        }
        let per_middle = middle_layers.checked_div(middle_stages).unwrap_or(0);
        let rank_count = match pp_rank {
            0 if first.is_some() => f,
            r if r + 1 == pp_size && last.is_some() => l,
            _ => per_middle,
        };
        let middle_rank = if first.is_some() { pp_rank.saturating_sub(1) } else { pp_rank };
        for (what, k) in [
            ("first pipeline stage", f),
            ("last pipeline stage", l),
            ("middle pipeline stages", per_middle),
        ] {
            if !k.is_multiple_of(vp) {
                bail!("{k} layers per {what} are not divisible by model.virtual_pipeline_model_parallel_size ({vp})");
            }
        }
        // Per chunk: the first rank's, then the middle ranks', then the last rank's layers.
        let (fc, lc, mc) = (f / vp, l / vp, middle_layers / vp);
        let per_chunk_round = fc + mc + lc;
        let offset = if pp_rank == 0 {
            vp_stage * per_chunk_round
        } else {
            vp_stage * per_chunk_round
                + fc
                + middle_rank * mc.checked_div(middle_stages).unwrap_or(0)
        };
        (offset, rank_count / vp)
    } else {
        let total = n + usize::from(with_emb) + usize::from(with_loss);
        if !total.is_multiple_of(pp_size) {
            bail!(
                "model.num_layers ({n}){} cannot be split evenly over {pp_size} pipeline stages",
                if with_emb || with_loss {
                    " with the embedding/loss accounted as layers"
                } else {
                    ""
                }
            );
        }
        let per_rank = total / pp_size;
        if !per_rank.is_multiple_of(vp) {
            bail!("{per_rank} layers per pipeline stage are not divisible by model.virtual_pipeline_model_parallel_size ({vp})");
        }
        let per_chunk = per_rank / vp;
        let first_chunk = pp_rank == 0 && vp_stage == 0;
        let last_chunk = pp_rank + 1 == pp_size && vp_stage + 1 == vp;
        let mut offset = vp_stage * (total / vp) + pp_rank * per_chunk;
        let mut count = per_chunk;
        // The embedding (loss) stands in for one layer of the first (last) virtual stage.
        if with_emb && !first_chunk {
            offset -= 1;
        }
        if with_emb && first_chunk {
            count = count.checked_sub(1).ok_or_else(|| {
                anyhow::anyhow!("the first virtual pipeline stage has no room for the embedding")
            })?;
        }
        if with_loss && last_chunk {
            count = count.checked_sub(1).ok_or_else(|| {
                anyhow::anyhow!("the last virtual pipeline stage has no room for the loss")
            })?;
        }
        (offset, count)
    };
    Ok((offset..offset + count).collect())
}
