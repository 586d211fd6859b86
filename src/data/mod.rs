//! Megatron-compatible data pipeline: indexed datasets, GPT sample construction, blending,
//! tokenizers and preprocessing.
pub mod cache;
pub mod gpt_dataset;
pub mod indexed;
pub mod numpy_rng;
pub mod split;
