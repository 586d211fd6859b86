//! The GPT model: Megatron-named, TP/PP-aware parameters, a differentiable forward for
//! training, greedy generation with a KV cache, Megatron's FLOPs count and a small HF loader.

pub mod arch;
pub mod attention;
pub mod flops;
pub mod generate;
pub mod gpt;
pub mod hf;
pub mod init;
pub mod mlp;
pub mod norm;
pub mod params;
pub mod step;

pub use arch::{stage_layers, GptArch, ParallelLayout};
pub use generate::{generate, generate_no_cache};
pub use gpt::{ForwardOpts, GptModel, KvCache};
pub use hf::{export_to_hf_state, load_from_hf_state, megatron_to_hf};
pub use params::{Param, ParamStore, ShardLayout};
pub use step::{loss_for_microbatch, Microbatch};
