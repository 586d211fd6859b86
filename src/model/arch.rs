//! The resolved architecture of a GPT decoder: `ModelConfig` checked once and reduced to the
//! numbers the layers need, plus the parallel layout of the stage being built.

use crate::config::model::{Activation, ModelConfig, Normalization, PositionEmbedding};
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
    /// Llama-3.1 RoPE scaling factor, when enabled.
    pub rope_scaling_factor: Option<f64>,
    /// Linear position interpolation factor.
    pub seq_len_interpolation_factor: Option<f64>,
    /// Sliding window: number of previous tokens visible (`window_size[0]`).
    pub window_left: Option<i64>,
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
        if cfg.position_embedding_type == PositionEmbedding::Yarn {
            bail!("model.position_embedding_type = yarn is not implemented yet");
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
            rope_scaling_factor: cfg.rope_scaling.then_some(cfg.rope_scaling_factor),
            seq_len_interpolation_factor: cfg.seq_len_interpolation_factor,
            window_left: cfg.window_size.map(|[left, _]| left),
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

/// Global layer numbers (0-based) owned by pipeline stage `pp_rank`, as Megatron splits them:
/// `first`/`last` stage overrides (`num_layers_in_{first,last}_pipeline_stage`) take their
/// layers and the rest are divided evenly among the remaining stages.
pub fn stage_layers(cfg: &ModelConfig, pp_rank: usize, pp_size: usize) -> Result<Vec<usize>> {
    let n = cfg.num_layers;
    if pp_size == 0 || pp_rank >= pp_size {
        bail!("pipeline rank {pp_rank} out of range for pipeline size {pp_size}");
    }
    let mut counts = vec![0usize; pp_size];
    let first = if pp_size > 1 { cfg.num_layers_in_first_pipeline_stage } else { None };
    let last = if pp_size > 1 { cfg.num_layers_in_last_pipeline_stage } else { None };
    let mut rest = n;
    let mut middle: Vec<usize> = (0..pp_size).collect();
    if let Some(f) = first {
        counts[0] = f;
        rest = rest
            .checked_sub(f)
            .ok_or_else(|| anyhow::anyhow!("first stage has more layers than the model"))?;
        middle.retain(|&s| s != 0);
    }
    if let Some(l) = last {
        counts[pp_size - 1] = l;
        rest = rest
            .checked_sub(l)
            .ok_or_else(|| anyhow::anyhow!("last stage has more layers than the model"))?;
        middle.retain(|&s| s != pp_size - 1);
    }
    if middle.is_empty() {
        if rest != 0 {
            bail!("pipeline stage overrides leave {rest} layers unassigned");
        }
    } else {
        if !rest.is_multiple_of(middle.len()) {
            bail!(
                "model.num_layers ({n}) cannot be split evenly over {} pipeline stages",
                middle.len()
            );
        }
        for &s in &middle {
            counts[s] = rest / middle.len();
        }
    }
    let start: usize = counts[..pp_rank].iter().sum();
    Ok((start..start + counts[pp_rank]).collect())
}
