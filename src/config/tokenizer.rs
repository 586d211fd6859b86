//! `tokenizer.*`: which tokenizer turns text into ids (and so fixes the vocabulary size).

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

/// Tokenizer kinds, under Megatron's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenizerType {
    HuggingFaceTokenizer,
    GPT2BPETokenizer,
    SentencePieceTokenizer,
    GPTSentencePieceTokenizer,
    Llama2Tokenizer,
    TikTokenizer,
    NullTokenizer,
}

/// `tokenizer.*`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizerConfig {
    pub tokenizer_type: Option<TokenizerType>,
    /// HF directory / tokenizer.json / SentencePiece model path.
    pub tokenizer_model: Option<String>,
    /// NullTokenizer vocabulary size (ids 0..vocab_size-1; EOD = vocab_size-1 unless set).
    pub vocab_size: Option<usize>,
    pub vocab_file: Option<String>,
    pub merge_file: Option<String>,
    pub vocab_extra_ids: usize,
    pub special_tokens: Option<Vec<String>>,
    pub null_tokenizer_eod_id: Option<usize>,
    /// Use the tokenizer's own vocabulary size (padded) even when model.vocab_size is set.
    pub use_tokenizer_vocab_size: bool,
    pub chat_template: Option<String>,
    pub chat_template_path: Option<String>,
    pub tokenizer_hf_no_use_fast: bool,
    pub tokenizer_hf_no_include_special_tokens: bool,
    pub force_system_message: bool,
    // Parsed so Megatron Bridge configs load (`config::inert`).
    pub padded_vocab_size: Option<usize>,
    #[default = true]
    pub pad_vocab_size: bool,
    pub metadata_path: Option<String>,
    pub tiktoken_pattern: Option<String>,
    #[default = 1000]
    pub tiktoken_num_special_tokens: usize,
    pub tokenizer_sentencepiece_legacy: bool,
    pub trust_remote_code: bool,
    #[default(-1)]
    pub null_tokenizer_pad_id: i64,
    /// Filled in by Megatron Bridge from `model.*`; mbridge pads with
    /// `model.make_vocab_size_divisible_by` and TP.
    #[default = 1]
    pub make_vocab_size_divisible_by: usize,
    #[default = 1]
    pub tensor_model_parallel_size: usize,
    pub rank: usize,
    pub hf_tokenizer_kwargs: toml::Table,
    pub sp_tokenizer_kwargs: toml::Table,
    pub tokenizer_prompt_format: Option<String>,
}
