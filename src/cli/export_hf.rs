//! `mbridge export-hf <checkpoint-or-run-dir> <out>`: mbridge checkpoint → HF model directory.

use crate::bridge::export::{export_hf, parse_dtype, ExportOptions};
use std::path::PathBuf;

/// Arguments of `export-hf`.
#[derive(Debug, clap::Args)]
pub struct ExportHfArgs {
    /// A run/save directory (latest checkpoint) or an `iter_*` directory.
    pub checkpoint: PathBuf,
    /// Output directory (must not exist, or be empty).
    pub out: PathBuf,
    /// Export `iter_{N}` instead of the latest.
    #[arg(long)]
    pub iteration: Option<u64>,
    /// Write weights as bf16, fp16 or fp32 (default: the checkpoint's dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Largest safetensors file in GB before sharding with an index.
    #[arg(long, default_value_t = 5.0)]
    pub max_shard_size_gb: f64,
    /// Merge LoRA adapters into the base weights.
    #[arg(long, conflicts_with = "adapter_only")]
    pub merge_lora: bool,
    /// Export only the adapters in HF PEFT format.
    #[arg(long)]
    pub adapter_only: bool,
}

/// Run `export-hf`.
pub fn run(a: ExportHfArgs) -> anyhow::Result<()> {
    if a.max_shard_size_gb.is_nan() || a.max_shard_size_gb <= 0.0 {
        return Err(crate::config_err!("--max-shard-size-gb must be > 0").into());
    }
    let opts = ExportOptions {
        checkpoint: a.checkpoint,
        out: a.out,
        iteration: a.iteration,
        dtype: a.dtype.as_deref().map(parse_dtype).transpose()?,
        max_shard_bytes: (a.max_shard_size_gb * 1e9) as u64,
        merge_lora: a.merge_lora,
        adapter_only: a.adapter_only,
    };
    let out = export_hf(&opts)?;
    super::out(&format!("exported {} → {}\n", opts.checkpoint.display(), out.display()));
    Ok(())
}
