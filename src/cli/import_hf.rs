//! `mbridge import-hf <repo-id|dir> <out>`: HF model → mbridge checkpoint.

use crate::bridge::export::parse_dtype;
use crate::bridge::import::{dry_run, import_hf, ImportOptions};
use std::path::PathBuf;

/// Arguments of `import-hf`.
#[derive(Debug, clap::Args)]
pub struct ImportHfArgs {
    /// Local HF model directory, or `org/name` in the local Hugging Face cache.
    pub source: String,
    /// Output directory (must not exist, or be empty).
    pub out: PathBuf,
    /// Write shards for this tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Write shards for this pipeline-parallel size.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Store weights as bf16, fp16 or fp32 (default: the source's dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Pad the vocabulary to a multiple of N × TP (default: largest power of two ≤ 128
    /// dividing the HF vocabulary, which keeps it unpadded).
    #[arg(long)]
    pub make_vocab_size_divisible_by: Option<usize>,
    /// Print the mapping table (HF → Megatron names, shapes, rules) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Run `import-hf`.
pub fn run(a: ImportHfArgs) -> anyhow::Result<()> {
    let opts = ImportOptions {
        source: a.source,
        out: a.out,
        tp: a.tp,
        pp: a.pp,
        dtype: a.dtype.as_deref().map(parse_dtype).transpose()?,
        make_vocab_size_divisible_by: a.make_vocab_size_divisible_by,
    };
    if a.dry_run {
        super::out(&dry_run(&opts)?);
        return Ok(());
    }
    let out = import_hf(&opts)?;
    super::out(&format!("imported {} → {}\n", opts.source, out.display()));
    Ok(())
}
