//! `mbridge preprocess-data`: Megatron's `tools/preprocess_data.py` flags → library call.
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::data::preprocess::{preprocess, InputFormat, PreprocessConfig};
use crate::data::tokenizer::{build_tokenizer, TokenizerSpec};

/// Arguments of `preprocess-data` (names as Megatron's `tools/preprocess_data.py`).
#[derive(Debug, Clone, clap::Args)]
pub struct PreprocessDataArgs {
    /// Input file: JSONL (one object per line) or plain text (one document per line, `.txt`).
    #[arg(long)]
    pub input: PathBuf,
    /// JSON keys to extract; each key gets its own `<prefix>_<key>_document.bin/.idx`.
    #[arg(long, num_args = 1.., default_values_t = vec!["text".to_string()])]
    pub json_keys: Vec<String>,
    /// Input format: auto (`.txt` ⇒ text, else jsonl), jsonl or text.
    #[arg(long, default_value = "auto", value_parser = ["auto", "jsonl", "text"])]
    pub input_format: String,
    /// Tokenizer type: HuggingFaceTokenizer, GPT2BPETokenizer or NullTokenizer (default:
    /// inferred from the other tokenizer flags).
    #[arg(long)]
    pub tokenizer_type: Option<String>,
    /// tokenizer.json, or a directory holding one (HF model or imported checkpoint).
    #[arg(long)]
    pub tokenizer_model: Option<PathBuf>,
    /// GPT-2 BPE vocab.json.
    #[arg(long)]
    pub vocab_file: Option<PathBuf>,
    /// GPT-2 BPE merges.txt.
    #[arg(long)]
    pub merge_file: Option<PathBuf>,
    /// Vocabulary size for NullTokenizer (EOD is this id).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Output prefix; files are `<prefix>_<key>_document.bin/.idx`.
    #[arg(long)]
    pub output_prefix: String,
    /// Append the tokenizer's end-of-document token to every document.
    #[arg(long)]
    pub append_eod: bool,
    /// Tokenization threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Log progress every this many documents.
    #[arg(long, default_value_t = 1000)]
    pub log_interval: usize,
    /// Skip lines that fail to parse (reported with their line numbers) instead of failing.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Sentence splitting (NLTK punkt in Megatron): not supported.
    #[arg(long)]
    pub split_sentences: bool,
    /// Keep newlines when splitting sentences (only meaningful with --split-sentences).
    #[arg(long)]
    pub keep_newlines: bool,
    /// Number of input partitions; only 1 is supported.
    #[arg(long, default_value_t = 1)]
    pub partitions: usize,
}

/// Run `preprocess-data`.
pub fn run(args: PreprocessDataArgs) -> Result<()> {
    if args.split_sentences {
        bail!("--split-sentences is not supported (Megatron uses NLTK punkt, which has no Rust port here); pre-split documents into a JSON list of sentences instead, which is read as sentences");
    }
    if args.partitions != 1 {
        bail!("--partitions {} is not supported; only 1 (Megatron's default) is", args.partitions);
    }
    let tok = build_tokenizer(&TokenizerSpec {
        tokenizer_type: args.tokenizer_type.clone(),
        tokenizer_model: args.tokenizer_model.clone(),
        vocab_file: args.vocab_file.clone(),
        merge_file: args.merge_file.clone(),
        vocab_size: args.vocab_size,
    })?;
    let cfg = PreprocessConfig {
        input: args.input,
        input_format: match args.input_format.as_str() {
            "jsonl" => InputFormat::Jsonl,
            "text" => InputFormat::Text,
            _ => InputFormat::Auto,
        },
        json_keys: args.json_keys,
        output_prefix: args.output_prefix,
        append_eod: args.append_eod,
        workers: args.workers,
        log_interval: args.log_interval,
        skip_bad_lines: args.skip_bad_lines,
        show_progress: std::io::stderr().is_terminal(),
    };
    let start = std::time::Instant::now();
    let r = preprocess(&cfg, tok.as_ref())?;
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    for (out, t) in r.outputs.iter().zip(&r.tokens) {
        println!("wrote {out}.bin/.idx: {} documents, {t} tokens ({:?})", r.documents, r.dtype);
    }
    if r.skipped_lines > 0 {
        println!("skipped {} bad lines", r.skipped_lines);
    }
    println!(
        "{:.1}s, {:.0} docs/s, {:.2} MB/s",
        secs,
        r.documents as f64 / secs,
        r.bytes as f64 / 1e6 / secs
    );
    Ok(())
}
