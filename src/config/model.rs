//! `model.*`: the GPT model provider (architecture + model parallelism), Megatron Bridge's
//! `GPTModelProvider` / MCore `TransformerConfig` fields under their Megatron names.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// Normalization layer type (`model.normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Normalization {
    LayerNorm,
    RMSNorm,
}

/// MLP activation (`model.activation_func`), named as Megatron Bridge's recipes spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Gelu,
    /// tanh approximation of GELU (HF `gelu_pytorch_tanh`).
    GeluTanh,
    Silu,
    Relu,
    SquaredRelu,
}

/// Position embedding type (`model.position_embedding_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEmbedding {
    LearnedAbsolute,
    Rope,
    Yarn,
    None,
}

/// Which attention implementation runs (`model.attention_backend`, Megatron's `AttnBackend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnBackend {
    /// cuDNN's fused attention where it serves the call, else mbridge's flash kernels.
    #[default]
    Auto,
    /// mbridge's own flash-attention kernels (`kernels/flash_attn.cu`).
    Flash,
    /// cuDNN's fused attention (as Transformer Engine's `FusedAttention`); calls it does not
    /// cover here (sliding windows, packed sequences, a KV cache) run mbridge's kernels.
    Fused,
    /// The composite reference: the `s × s` scores are materialized.
    Unfused,
    /// Megatron's local (non-Transformer-Engine) attention: the composite, as `unfused`.
    Local,
}

/// Activation recompute granularity (`model.recompute_granularity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeGranularity {
    Full,
    Selective,
}

/// Activation recompute method (`model.recompute_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecomputeMethod {
    Uniform,
    Block,
}

/// Tensor dtype names accepted in configs ("bf16", "fp16", "fp32" and torch-style aliases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    #[serde(rename = "fp32", alias = "float32", alias = "torch.float32")]
    F32,
    #[serde(rename = "bf16", alias = "bfloat16", alias = "torch.bfloat16")]
    BF16,
    #[serde(rename = "fp16", alias = "float16", alias = "torch.float16")]
    F16,
}

/// `model.*` — architecture, numerics and model parallelism of a GPT decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    // ---- architecture ----
    pub num_layers: usize,
    pub hidden_size: usize,
    /// None ⇒ 4 × hidden_size.
    pub ffn_hidden_size: Option<usize>,
    pub num_attention_heads: usize,
    /// None ⇒ num_attention_heads (plain multi-head attention).
    pub num_query_groups: Option<usize>,
    /// Per-head dimension; None ⇒ hidden_size / num_attention_heads.
    pub kv_channels: Option<usize>,
    /// Unpadded vocabulary size; None ⇒ taken from the tokenizer.
    pub vocab_size: Option<usize>,
    #[default = 128]
    pub make_vocab_size_divisible_by: usize,
    /// Pad an explicit `vocab_size` to a multiple of `make_vocab_size_divisible_by × TP` (set by
    /// `import-hf`, whose `vocab_size` is the HF one; export drops the padded rows again).
    pub should_pad_vocab: bool,
    #[default = 1024]
    pub seq_length: usize,
    /// Longest position the model supports (RoPE tables / learned embeddings); None ⇒ seq_length.
    pub max_position_embeddings: Option<usize>,
    #[default(Normalization::LayerNorm)]
    pub normalization: Normalization,
    #[default = 1e-5]
    pub layernorm_epsilon: f64,
    pub layernorm_zero_centered_gamma: bool,
    pub gated_linear_unit: bool,
    #[default(Activation::Gelu)]
    pub activation_func: Activation,
    #[default = true]
    pub add_bias_linear: bool,
    pub add_qkv_bias: bool,
    pub qk_layernorm: bool,
    #[default = true]
    pub share_embeddings_and_output_weights: bool,
    #[default(PositionEmbedding::LearnedAbsolute)]
    pub position_embedding_type: PositionEmbedding,
    #[default = 10000.0]
    pub rotary_base: f64,
    #[default = 1.0]
    pub rotary_percent: f64,
    pub rotary_interleaved: bool,
    /// Llama-3.1 style frequency scaling (low/high frequency factors 1 and 4, original 8192).
    pub rope_scaling: bool,
    #[default = 1.0]
    pub rope_scaling_factor: f64,
    pub seq_len_interpolation_factor: Option<f64>,
    /// Attention implementation (CUDA half precision; the CPU always runs the composite).
    pub attention_backend: AttnBackend,
    /// Sliding-window attention `[left, right]` (Mistral); None = full causal attention.
    pub window_size: Option<[i64; 2]>,
    #[default = 0.1]
    pub hidden_dropout: f64,
    #[default = 0.1]
    pub attention_dropout: f64,
    #[default = 0.02]
    pub init_method_std: f64,
    pub apply_residual_connection_post_layernorm: bool,
    pub fp32_residual_connection: bool,
    pub attention_softmax_in_fp32: bool,
    pub calculate_per_token_loss: bool,
    #[default = true]
    pub cross_entropy_loss_fusion: bool,
    #[default = true]
    pub masked_softmax_fusion: bool,
    pub bias_activation_fusion: bool,
    pub bias_dropout_fusion: bool,
    pub apply_rope_fusion: bool,
    pub persist_layer_norm: bool,
    /// Weight-gradient GEMMs add into the step's running gradient sum in place (Megatron
    /// Bridge turns it on where the fused kernel exists; mbridge always has it).
    #[default = true]
    pub gradient_accumulation_fusion: bool,
    pub deterministic_mode: bool,
    pub hf_model_id: Option<String>,

    // ---- numerics (mixed precision presets copy onto these) ----
    pub fp16: bool,
    pub bf16: bool,
    #[default(DType::F32)]
    pub params_dtype: DType,
    pub pipeline_dtype: Option<DType>,
    pub autocast_dtype: Option<DType>,
    pub fp8: Option<String>,
    pub fp8_recipe: Option<String>,
    pub fp8_param: Option<bool>,
    /// FP8 weight-gradient GEMMs (`mixed_precision.fp8_wgrad`); false keeps them unquantized.
    #[default = true]
    pub fp8_wgrad: bool,
    pub fp4: Option<String>,
    pub first_last_layers_bf16: bool,
    pub num_layers_at_start_in_bf16: usize,
    pub num_layers_at_end_in_bf16: usize,

    // ---- model parallelism ----
    #[default = 1]
    pub tensor_model_parallel_size: usize,
    #[default = 1]
    pub pipeline_model_parallel_size: usize,
    pub virtual_pipeline_model_parallel_size: Option<usize>,
    /// Micro-batches run back to back through one model chunk by the interleaved schedule;
    /// None = `pipeline_model_parallel_size` (megatron-core's default).
    pub microbatch_group_size_per_vp_stage: Option<usize>,
    pub sequence_parallel: bool,
    #[default = 1]
    pub context_parallel_size: usize,
    /// How context-parallel attention communicates (Transformer Engine's `cp_comm_type`);
    /// mbridge runs `"all_gather"`, which unset means.
    pub cp_comm_type: Option<String>,
    #[default = 1]
    pub expert_model_parallel_size: usize,
    pub expert_tensor_parallel_size: Option<usize>,
    pub num_layers_in_first_pipeline_stage: Option<usize>,
    pub num_layers_in_last_pipeline_stage: Option<usize>,
    pub account_for_embedding_in_pipeline_split: bool,
    pub account_for_loss_in_pipeline_split: bool,
    #[default = true]
    pub defer_embedding_wgrad_compute: bool,

    // ---- activation recompute ----
    pub recompute_granularity: Option<RecomputeGranularity>,
    pub recompute_method: Option<RecomputeMethod>,
    pub recompute_num_layers: Option<usize>,
    pub recompute_modules: Option<Vec<String>>,

    // ---- mixture of experts ----
    pub num_moe_experts: Option<usize>,
    #[default = 2]
    pub moe_router_topk: usize,
    pub moe_ffn_hidden_size: Option<usize>,
    pub moe_shared_expert_intermediate_size: Option<usize>,
    pub moe_aux_loss_coeff: f64,
    pub moe_z_loss_coeff: Option<f64>,
    #[default = "aux_loss"]
    pub moe_router_load_balancing_type: String,
    #[default = "softmax"]
    pub moe_router_score_function: String,
    pub moe_router_pre_softmax: bool,
    pub moe_grouped_gemm: bool,
    #[default = "allgather"]
    pub moe_token_dispatcher_type: String,
    pub moe_permute_fusion: bool,
    pub mtp_num_layers: Option<usize>,

    // ---- YaRN RoPE scaling (`position_embedding_type = "yarn"`) ----
    /// The context-extension factor (`s`); YaRN needs it.
    pub yarn_rotary_scaling_factor: Option<f64>,
    /// The context the model was trained on before extension; YaRN needs it.
    pub yarn_original_max_position_embeddings: Option<usize>,
    /// Rotations per context above which a dimension keeps its frequency (default 32).
    pub yarn_beta_fast: Option<f64>,
    /// Rotations per context below which a dimension is fully interpolated (default 1).
    pub yarn_beta_slow: Option<f64>,
    /// Attention temperature: cos/sin are scaled by `mscale(s, yarn_mscale) /
    /// mscale(s, yarn_mscale_all_dim)` (defaults 1 and 0).
    pub yarn_mscale: Option<f64>,
    pub yarn_mscale_all_dim: Option<f64>,
    /// Round the correction range to whole dimensions (default true).
    pub yarn_correction_range_round_to_int: Option<bool>,

    // ---- Provider fields parsed so Megatron Bridge configs load; `config::inert` lists
    // ---- which values mbridge refuses and which only tune machinery it does not have.
    pub fp16_lm_cross_entropy: bool,
    pub logit_dtype: Option<DType>,
    #[default = true]
    pub parallel_output: bool,
    pub rotary_scaling_factor: Option<f64>,
    #[default = true]
    pub deallocate_pipeline_outputs: bool,
    #[default = true]
    pub scatter_embedding_sequence_parallel: bool,
    pub tp_only_amax_red: bool,
    pub tp_comm_overlap_cfg: Option<toml::Value>,
    pub use_transformer_engine_full_layer_spec: bool,
    pub use_transformer_engine_op_fuser: bool,
    pub dense_grouped_gemm: bool,
    pub transformer_layer_spec: Option<String>,
    pub hf_model_revision: Option<String>,
    pub mtp_enabled: bool,
    #[default = 0.1]
    pub mtp_loss_scaling_factor: f64,
    pub init_model_with_meta_device: bool,
    pub use_te_rng_tracker: bool,
    pub restore_modelopt_state: bool,
    pub use_arbitrary_attention_mask: Option<bool>,
    pub qk_l2_norm: bool,
    pub attention_output_gate: bool,
    pub apply_query_key_layer_scaling: bool,
    #[default = "transformer_engine"]
    pub transformer_impl: String,
    #[default = "none"]
    pub cuda_graph_impl: String,
    pub hierarchical_context_parallel_sizes: Option<Vec<usize>>,
    // Multi-latent attention (DeepSeek) and hybrid Mamba models, which mbridge refuses.
    pub multi_latent_attention: bool,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: Option<usize>,
    pub qk_head_dim: Option<usize>,
    pub qk_pos_emb_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub rope_type: Option<String>,
    pub mamba_state_dim: Option<usize>,
    pub mamba_head_dim: Option<usize>,
    pub mamba_num_groups: Option<usize>,
    pub mamba_num_heads: Option<usize>,
    pub hybrid_layer_pattern: Option<String>,
}

impl ModelConfig {
    /// Global numbers (0-based) of the layers whose linear layers run in FP8 when `fp8` is
    /// set: all of them, or all but the first `num_layers_at_start_in_bf16` and the last
    /// `num_layers_at_end_in_bf16` with `first_last_layers_bf16`, as megatron-core.
    pub fn fp8_layers(&self) -> Option<std::ops::Range<usize>> {
        self.fp8.as_ref()?;
        let n = self.num_layers;
        Some(if self.first_last_layers_bf16 {
            self.num_layers_at_start_in_bf16.min(n)
                ..n.saturating_sub(self.num_layers_at_end_in_bf16)
        } else {
            0..n
        })
    }

    /// MLP hidden size (`ffn_hidden_size`, defaulting to 4h as MCore does).
    pub fn ffn_hidden(&self) -> usize {
        self.ffn_hidden_size.unwrap_or(4 * self.hidden_size)
    }

    /// Number of key/value heads (query groups).
    pub fn query_groups(&self) -> usize {
        self.num_query_groups.unwrap_or(self.num_attention_heads)
    }

    /// Per-head dimension (`kv_channels`, defaulting to h / heads).
    pub fn head_dim(&self) -> usize {
        self.kv_channels.unwrap_or_else(|| self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Longest sequence the position encoding supports.
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.unwrap_or(self.seq_length)
    }

    /// Vocabulary padded the way Megatron pads it: to a multiple of `divisible_by × TP`.
    pub fn padded_vocab_size(&self, unpadded: usize) -> usize {
        let multiple =
            self.make_vocab_size_divisible_by.max(1) * self.tensor_model_parallel_size.max(1);
        unpadded.div_ceil(multiple) * multiple
    }
}
