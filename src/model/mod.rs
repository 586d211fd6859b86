//! The GPT model: Megatron-named, TP/PP-aware parameters, a differentiable forward for
//! training, greedy generation with a KV cache, Megatron's FLOPs count (the HF
//! mapping lives in `crate::bridge::mapping`).
//!
//! One micro-batch step and a greedy decode:
//!
//! ```
//! use candle_core::{DType, Device};
//! use mbridge::config::model::{ModelConfig, Normalization, PositionEmbedding};
//! use mbridge::model::{generate, loss_for_microbatch, GptModel, Microbatch, ParallelLayout};
//! use mbridge::ops::DropoutRng;
//!
//! # fn main() -> anyhow::Result<()> {
//! let cfg = ModelConfig {
//!     num_layers: 2, hidden_size: 16, num_attention_heads: 4, num_query_groups: Some(2),
//!     vocab_size: Some(64), seq_length: 8, normalization: Normalization::RMSNorm,
//!     position_embedding_type: PositionEmbedding::Rope, gated_linear_unit: true,
//!     ..Default::default()
//! };
//! let model = GptModel::new(&cfg, ParallelLayout::single(), 1234, DType::F32, &Device::Cpu)?;
//! let batch = Microbatch::from_rows(
//!     &[vec![1, 2, 3, 4]], &[vec![2, 3, 4, 5]], &[vec![1.0; 4]], None, &Device::Cpu,
//! )?;
//! // Training mode: one dropout stream per (seed, iteration, micro-batch).
//! let rng = DropoutRng::new(1234, 1, 0);
//! let (sum, count) = loss_for_microbatch(&model, &batch, Some(&rng))?;
//! let grads = (sum / count)?.backward()?; // count summed over the global batch in a real loop
//! assert!(model.params().params().iter().all(|p| grads.get(p.var.as_tensor()).is_some()));
//! let new_tokens = generate(&model, &[1, 2, 3], 4, None)?;
//! assert_eq!(new_tokens.len(), 4);
//! # Ok(())
//! # }
//! ```

pub mod arch;
pub mod attention;
pub mod explicit_layer;
mod explicit_linear;
pub mod flops;
pub mod fp8_params;
pub mod fp8_weights;
pub mod generate;
pub mod gpt;
pub mod init;
pub mod mlp;
pub mod norm;
pub mod params;
pub mod recompute;
pub mod step;

pub use arch::{chunk_layers, stage_layers, virtual_stages, GptArch, ParallelLayout};
pub use generate::{generate, generate_no_cache};
pub use gpt::{ForwardOpts, GptModel, KvCache};
pub use params::{Param, ParamStore, ShardLayout};
pub use step::{
    eval_loss_for_microbatch, loss_for_microbatch, loss_for_microbatch_recompute, HostStats,
    Microbatch,
};

/// A one-layer Llama-style block (GQA, SwiGLU, RoPE) of width 16 and 8 positions, without
/// dropout: the unit tests' smallest model.
#[cfg(test)]
pub(crate) fn one_block_config() -> crate::config::model::ModelConfig {
    use crate::config::model::{Activation, ModelConfig, Normalization, PositionEmbedding};
    ModelConfig {
        num_layers: 1,
        hidden_size: 16,
        ffn_hidden_size: Some(24),
        num_attention_heads: 4,
        num_query_groups: Some(2),
        vocab_size: Some(32),
        seq_length: 8,
        normalization: Normalization::RMSNorm,
        gated_linear_unit: true,
        activation_func: Activation::Silu,
        position_embedding_type: PositionEmbedding::Rope,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        ..Default::default()
    }
}
