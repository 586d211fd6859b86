//! Megatron-compatible data pipeline: indexed datasets, GPT sample construction, blending,
//! tokenizers and preprocessing.
pub mod blended;
pub mod builder;
pub mod cache;
pub mod gpt_dataset;
pub mod gpt_indices;
pub mod indexed;
pub mod mock;
pub mod numpy_rng;
pub mod preprocess;
pub mod sampler;
pub mod show;
pub mod split;
pub mod tokenizer;

pub use blended::{parse_blend, Blend, BlendSpec, BlendedDataset};
pub use builder::{build_gpt_datasets, train_valid_test_num_samples, PretrainDataset};
pub use gpt_dataset::{GptDataset, GptDatasetParams, Sample};
pub use indexed::{DType, IndexedDataset, IndexedDatasetBuilder};
