//! `dataset.*`: one table for the three dataset kinds Megatron Bridge offers.
//!
//! Megatron Bridge picks a dataclass (`GPTDatasetConfig`, `GPTSFTDatasetConfig`, mock). TOML has
//! no class tag, so mbridge keeps the union of their fields and derives the kind from what is
//! set: `dataset_root` ⇒ finetuning (SFT), `blend`/`data_path`/`blend_per_split` ⇒ pretraining,
//! neither ⇒ megatron-core's `MockGPTDataset`. Validation rejects fields of the other kind.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// One element of a Megatron blend list: `[0.3, "a_text_document", 0.7, "b_text_document"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlendItem {
    Weight(f64),
    Path(String),
}

/// `data_path` / `blend`: a single prefix or a list (optionally with interleaved weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Blend {
    One(String),
    Many(Vec<BlendItem>),
}

/// Which dataset a run reads, derived from the fields that are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    Pretraining,
    Finetuning,
    Mock,
}

/// `dataset.packed_sequence_specs.*` (offline packing of SFT data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct PackedSequenceSpecs {
    /// ≤ 0 disables packing.
    #[default(-1)]
    pub packed_sequence_size: i64,
    pub max_single_sequence_length: Option<usize>,
    pub tokenizer_model_name: Option<String>,
    pub packed_train_data_path: Option<String>,
    pub packed_val_data_path: Option<String>,
    pub packed_metadata_path: Option<String>,
    pub pad_cu_seqlens: bool,
    #[default = 1]
    pub pad_seq_to_mult: usize,
    #[default(-1)]
    pub num_tokenizer_workers: i64,
}

/// `dataset.preprocessing.*`: how SFT rows become tokens (Megatron Bridge's
/// `PromptCompletionSFTPreprocessingConfig` / `ChatSFTPreprocessingConfig`, flattened).
///
/// Every field is optional. When none is set, Megatron Bridge's default for `dataset_root`
/// applies: columns `input`/`output`, separator `" "`. When any is set, the unset ones take
/// `PromptCompletionSFTPreprocessingConfig`'s defaults (columns `prompt`/`completion`,
/// separator `""`). Rows whose configured columns are absent but that carry `prompt` and
/// `completion` are accepted either way. Chat rows use only `loss_mode`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftPreprocessingConfig {
    /// Prompt column ("prompt").
    pub prompt_column: Option<String>,
    /// Completion column ("completion").
    pub completion_column: Option<String>,
    /// Python format string with the single placeholder `{prompt}` ("{prompt}").
    pub prompt_template: Option<String>,
    /// Text put before the completion ("").
    pub separator: Option<String>,
    /// "completion" | "full" for prompt/completion rows (default "completion");
    /// "assistant" | "last_turn" | "full" for chat rows (default "assistant").
    pub loss_mode: Option<String>,
    /// Strip ASCII spaces around prompt and completion (true).
    pub strip_whitespace: Option<bool>,
    /// Prepend the tokenizer's BOS (false).
    pub add_bos: Option<bool>,
    /// Append the separator id (the EOS id) after the prompt (false).
    pub add_sep: Option<bool>,
    /// Append EOS after the completion (true).
    pub add_eos: Option<bool>,
    /// "right" (keep the head) | "left" (keep the tail) when a row is too long ("right").
    pub truncation_method: Option<String>,
}

/// `dataset.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// None ⇒ model.seq_length; when both are set they must agree.
    pub seq_length: Option<usize>,

    // ---- pretraining (GPTDatasetConfig) ----
    /// Megatron-LM `--data-path` semantics; converted to `blend` at finalize.
    pub data_path: Option<Blend>,
    pub blend: Option<Blend>,
    /// `[train, valid, test]` blends; an empty list leaves that split without data.
    pub blend_per_split: Option<Vec<Vec<BlendItem>>>,
    /// e.g. "969,30,1"; required with `blend`/`data_path`.
    pub split: Option<String>,
    /// None ⇒ rng.seed.
    pub random_seed: Option<u64>,
    pub path_to_cache: Option<String>,
    #[default = true]
    pub mmap_bin_files: bool,
    #[default = 0.005]
    pub mid_level_dataset_surplus: f64,
    pub reset_position_ids: bool,
    pub reset_attention_mask: bool,
    pub eod_mask_loss: bool,
    #[default = true]
    pub create_attention_mask: bool,
    #[default = true]
    pub drop_last_partial_validation_sequence: bool,
    #[default = true]
    pub add_extra_token_to_sequence: bool,
    #[default = 1]
    pub num_dataset_builder_threads: usize,

    // ---- finetuning (GPTSFTDatasetConfig) ----
    /// Directory with training.jsonl / validation.jsonl / test.jsonl.
    pub dataset_root: Option<String>,
    #[default = 1234]
    pub seed: u64,
    #[default = 1]
    pub memmap_workers: usize,
    pub max_train_samples: Option<usize>,
    pub packed_sequence_specs: Option<PackedSequenceSpecs>,
    pub dataset_kwargs: Option<toml::Table>,
    /// SFT row tokenization settings (Megatron Bridge `GPTSFTDatasetConfig.preprocessing`).
    pub preprocessing: SftPreprocessingConfig,
    #[default = true]
    pub do_validation: bool,
    #[default = true]
    pub do_test: bool,

    // ---- data loader ----
    /// "single" | "cyclic" | "batch" | "external"; None ⇒ "single" (pretrain) / "batch" (SFT).
    pub dataloader_type: Option<String>,
    #[default = 2]
    pub num_workers: usize,
    #[default = true]
    pub data_sharding: bool,
    #[default = true]
    pub pin_memory: bool,
    #[default = true]
    pub drop_last: bool,
    #[default = true]
    pub persistent_workers: bool,

    // ---- megatron-core's copies of `validation.*` (either place turns them on) ----
    pub full_validation: Option<bool>,
    pub multiple_validation_sets: Option<bool>,

    // ---- Parsed so Megatron Bridge configs load; `config::inert` lists which values mbridge
    // ---- refuses and which only tune loader machinery it does not have.
    pub allow_ambiguous_pad_tokens: bool,
    pub fast_cache_load: bool,
    pub defer_npy_index_mmap: bool,
    #[default = 1]
    pub data_parallel_size: usize,
    pub sequences_per_dataset: Option<toml::Table>,
    pub per_dataset_sequences_path: Option<String>,
    pub context_parallel_size: Option<usize>,
    pub inter_document_masking: bool,
    #[default = true]
    pub skip_getting_attention_mask_from_dataset: bool,
    pub trust_remote_code: Option<bool>,
    pub dataloader_save: Option<String>,
    pub dataloader_load: Option<String>,
    pub hf_dataset: Option<toml::Value>,
    pub hf_validation_dataset: Option<toml::Value>,
    pub hf_test_dataset: Option<toml::Value>,
    pub hf_output_root: Option<String>,
    pub hf_validation_proportion: Option<f64>,
    pub hf_rewrite: bool,
    pub enable_offline_packing: bool,
    pub offline_packing_specs: Option<toml::Table>,
}

impl DatasetConfig {
    /// The dataset kind implied by the fields that are set.
    pub fn kind(&self) -> DatasetKind {
        if self.dataset_root.is_some() {
            DatasetKind::Finetuning
        } else if self.blend.is_some() || self.data_path.is_some() || self.blend_per_split.is_some()
        {
            DatasetKind::Pretraining
        } else {
            DatasetKind::Mock
        }
    }

    /// True when offline sequence packing is on.
    pub fn packing_enabled(&self) -> bool {
        self.packed_sequence_specs.as_ref().is_some_and(|p| p.packed_sequence_size > 0)
    }
}

/// Check a Megatron blend list: either all paths, or `weight, path` pairs with weights > 0.
pub fn check_blend(items: &[BlendItem]) -> Result<(), String> {
    let all_paths = items.iter().all(|i| matches!(i, BlendItem::Path(_)));
    if all_paths {
        return Ok(());
    }
    if !items.len().is_multiple_of(2) {
        return Err(format!(
            "`dataset.blend` mixes weights and paths; expected pairs like [0.3, \"a\", 0.7, \"b\"] \
             (got {} items)",
            items.len()
        ));
    }
    for pair in items.chunks(2) {
        match pair {
            [BlendItem::Weight(w), BlendItem::Path(_)] if *w > 0.0 => {}
            [BlendItem::Weight(w), BlendItem::Path(p)] => {
                return Err(format!("blend weight for `{p}` must be > 0 (got {w})"))
            }
            _ => {
                return Err(
                    "`dataset.blend` with weights must alternate weight, path: [0.3, \"a\", 0.7, \"b\"]"
                        .into(),
                )
            }
        }
    }
    Ok(())
}
