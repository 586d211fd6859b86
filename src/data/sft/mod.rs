//! Supervised fine-tuning data (spec `finetune-data.md`): JSONL rows under `dataset_root`,
//! prompt/completion and chat tokenization with loss masks, unpacked collate, offline packing
//! into reusable files and packed (THD) collate.
//!
//! ```ignore
//! use mbridge::data::sft::{build_sft_datasets, SftBuildOptions};
//! let opts = SftBuildOptions::from_config(&cfg)?;   // seq_length, tokenizer name, chat template, PP/EP padding
//! let ds = build_sft_datasets(&cfg.dataset, tok.as_ref(), &opts)?;
//! let sampler = PretrainingSampler::new(ds.train.len(), consumed, mbs, dp_rank, dp, true, false)?;
//! for micro in sampler {
//!     let b = ds.train.collate(&micro)?;          // SftBatch::Unpacked(Batch) | Packed(PackedBatch)
//!     let cu = b.cu_seqlens()?;                   // Some(THD offsets) for packed batches
//! }
//! ```
pub mod build;
pub mod chat;
pub mod collate;
pub mod legacy;
pub mod packing;
pub mod prompt;
pub mod rows;
pub mod store;

pub use build::{
    build_sft_datasets, SftBatch, SftBuildOptions, SftDatasets, SftSplit, SftTokenization,
};
pub use chat::{ChatLossMode, ChatTemplate};
pub use collate::{
    block_causal_mask, collate_packed, collate_unpacked, CollateParams, PackedBatch, PackedParams,
};
pub use packing::{pack_examples, PackParams, PackedBin, PackingAlgorithm, PackingMetadata};

/// One tokenized SFT row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftExample {
    /// Prompt/context tokens followed by the target tokens.
    pub input_ids: Vec<i64>,
    /// Per-token 0/1, aligned with `input_ids` (1 = supervised).
    pub loss_mask: Vec<u8>,
    /// Index of the first target token (= context length).
    pub answer_start_idx: usize,
}
