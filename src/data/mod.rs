//! Megatron-compatible data pipeline: indexed datasets, GPT sample construction, blending,
//! tokenizers and preprocessing; SFT data (JSONL, chat templates, packing) lives in [`sft`].
//!
//! Typical use (what `pretrain` and `data show-samples` do):
//!
//! ```ignore
//! use mbridge::data::{build_gpt_datasets, train_valid_test_num_samples, BlendSpec, GptDatasetParams};
//! let tok = mbridge::data::tokenizer::build_tokenizer(&spec)?;       // eod / pad / vocab size
//! let params = GptDatasetParams { seq_length: 4096, random_seed: 1234,
//!     split: Some("969,30,1".into()), eod_id: tok.eod(), pad_id: tok.pad().unwrap_or(-1),
//!     vocab_size: Some(tok.vocab_size()), ..Default::default() };
//! let blend = BlendSpec::from_config(Some(&blend_values), None)?;     // None, None ⇒ mock data
//! let n = train_valid_test_num_samples(train_iters, gbs, eval_iters, eval_gbs, eval_interval);
//! let [train, _valid, _test] = build_gpt_datasets(&params, &blend, n.map(Some))?;
//! let train = train.context("the split leaves no training data")?;
//! let sampler = sampler::PretrainingSampler::new(train.len(), consumed, mbs, dp_rank, dp, true, false)?; // or sampler::DataSampler
//! for micro in sampler { let batch = sampler::collate(&train, &micro)?; /* tokens [mbs*L] ... */ }
//! ```
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
pub mod sft;
pub mod show;
pub mod split;
pub mod tokenizer;

pub use blended::{parse_blend, Blend, BlendSpec, BlendedDataset};
pub use builder::{build_gpt_datasets, train_valid_test_num_samples, PretrainDataset};
pub use gpt_dataset::{GptDataset, GptDatasetParams, Sample};
pub use indexed::{DType, IndexedDataset, IndexedDatasetBuilder};
