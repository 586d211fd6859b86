//! `mbridge generate <checkpoint> --prompt TEXT`: greedy decoding with the KV cache.

use super::pretrain::parse_device;
use crate::bridge::checkpoint::{checkpoint_tokenizer, load_checkpoint_model};
use crate::model::generate;
use candle_core::DType;
use std::path::PathBuf;

/// Arguments of `generate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
pub struct GenerateArgs {
    /// A run/save directory (latest checkpoint) or an `iter_*` directory.
    pub checkpoint: PathBuf,
    /// Prompt text, tokenized with the checkpoint's tokenizer (NullTokenizer: ids separated by
    /// spaces).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as token ids separated by spaces (bypasses the tokenizer).
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Tokenize `--prompt` without the tokenizer's special tokens (by default they are added,
    /// e.g. Llama's BOS, as transformers' `tokenizer(text)` does).
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Keep generating after the tokenizer's end-of-document token.
    #[arg(long)]
    pub ignore_eod: bool,
    /// Use `iter_{N}` instead of the latest checkpoint.
    #[arg(long)]
    pub iteration: Option<u64>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Run `generate`: prints the decoded continuation on stdout.
pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    let loaded = load_checkpoint_model(&a.checkpoint, a.iteration, DType::F32, &device)?;
    let tok = checkpoint_tokenizer(&loaded.cfg, &loaded.iter_dir, !a.no_special_tokens)?;
    let ids: Vec<i64> = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => ids
            .split_whitespace()
            .map(|w| {
                w.parse::<i64>()
                    .map_err(|_| crate::config_err!("--prompt-ids: `{w}` is not a token id"))
            })
            .collect::<Result<_, _>>()?,
        (None, Some(text)) => tok.encode(text)?,
        (None, None) => unreachable!("clap requires --prompt or --prompt-ids"),
    };
    let vocab = loaded.model.arch().vocab;
    let prompt: Vec<u32> = ids
        .iter()
        .map(|&i| {
            u32::try_from(i).ok().filter(|&i| (i as usize) < vocab).ok_or_else(|| {
                crate::config_err!(
                    "prompt token id {i} is outside the model's vocabulary of {vocab}"
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let eod = (!a.ignore_eod).then(|| tok.eod() as u32);
    let new = generate(&loaded.model, &prompt, a.max_new_tokens, eod)?;
    let ids: Vec<i64> = new.iter().map(|&i| i as i64).collect();
    super::out(&format!("{}\n", tok.decode(&ids)?));
    Ok(())
}
