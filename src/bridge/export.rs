//! `export-hf`: any mbridge checkpoint (any TP/PP layout) → HF directory: `model.safetensors`
//! (or size-bounded shards + index), `config.json` in the source's layout (transformers-4 style
//! when the checkpoint has no source config), tokenizer files, padded vocabulary rows removed.

use super::checkpoint::{padded_rows, read_run_config, resolve_iter_dir, unpadded_vocab};
use super::hf_config::{dtype_name, to_hf_config, Family, SUPPORTED};
use super::import::candle_dtype;
use super::mapping::{megatron_params, megatron_to_hf_tensors};
use super::output::{prepare_output, publish_output};
use crate::ckpt;
use crate::config::model::DType as CfgDType;
use crate::model::GptArch;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What `export-hf` was asked to do.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Run/save directory or `iter_*` directory.
    pub checkpoint: PathBuf,
    pub out: PathBuf,
    pub iteration: Option<u64>,
    /// Cast to this dtype; None keeps the checkpoint's.
    pub dtype: Option<CfgDType>,
    /// Largest safetensors file; more weights are split into shards with an index.
    pub max_shard_bytes: u64,
    pub merge_lora: bool,
    pub adapter_only: bool,
}

/// Runs the export; returns the output directory.
pub fn export_hf(opts: &ExportOptions) -> Result<PathBuf> {
    let iter_dir = resolve_iter_dir(&opts.checkpoint, opts.iteration)?;
    let cfg = read_run_config(&iter_dir)?;
    let mut tensors: HashMap<String, Tensor> =
        ckpt::load_tensors(&iter_dir, "model")?.into_iter().map(|(k, (t, _))| (k, t)).collect();
    if opts.merge_lora || opts.adapter_only {
        let flag = if opts.merge_lora { "--merge-lora" } else { "--adapter-only" };
        let Some(peft) = cfg.peft.clone() else {
            return Err(crate::config_err!(
                "{flag}: no adapters in this checkpoint (`{}` was not trained with peft.*)",
                iter_dir.display()
            )
            .into());
        };
        if opts.adapter_only {
            return crate::peft::export::export_adapter(opts, &cfg, &peft, &tensors);
        }
        tensors = crate::peft::export::merged_tensors(&cfg, &peft, &tensors)?;
    }
    let padded = padded_rows(&tensors, &iter_dir)?;
    let hf_vocab = unpadded_vocab(&cfg, &iter_dir, padded)?;
    let mut m = cfg.model.clone();
    m.vocab_size = Some(padded);
    let arch = GptArch::from_config(&m)?;
    let base = ckpt::read_json(&iter_dir, "hf_config")?;
    let family = base
        .as_ref()
        .and_then(|b| b["architectures"][0].as_str())
        .and_then(|a| SUPPORTED.iter().find(|s| s.0 == a))
        .map(|s| s.2)
        .unwrap_or_else(|| Family::guess(&m));

    let layers: Vec<usize> = (0..arch.num_layers).collect();
    let mut hf: Vec<(String, Tensor)> = Vec::new();
    for p in megatron_params(&arch, &layers, 0, 1)? {
        let t = tensors.get(&p.name).ok_or_else(|| {
            anyhow!("checkpoint `{}` lacks `{}` (shape {:?})", iter_dir.display(), p.name, p.shape)
        })?;
        if t.dims() != p.shape.as_slice() {
            bail!(
                "checkpoint `{}`: `{}` has shape {:?}, its run config implies {:?}",
                iter_dir.display(),
                p.name,
                t.dims(),
                p.shape
            );
        }
        for (name, t) in megatron_to_hf_tensors(&p.name, t, &arch, hf_vocab)? {
            let t = match opts.dtype {
                Some(d) => t.to_dtype(candle_dtype(d))?,
                None => t,
            };
            hf.push((name, t));
        }
    }
    let known: std::collections::HashSet<String> =
        megatron_params(&arch, &layers, 0, 1)?.into_iter().map(|p| p.name).collect();
    let extra: Vec<&String> = tensors
        .keys()
        .filter(|n| {
            // A tied model's output copy (PP>1 runs) has no HF tensor: HF ties at load.
            let tied_copy = *n == "output_layer.weight" && arch.tied_embeddings;
            !known.contains(*n) && !tied_copy
        })
        .collect();
    if !extra.is_empty() {
        bail!("checkpoint `{}` holds tensors with no HF mapping: {extra:?}", iter_dir.display());
    }
    let dtype = match hf.first().map(|(_, t)| t.dtype()) {
        Some(candle_core::DType::BF16) => CfgDType::BF16,
        Some(candle_core::DType::F16) => CfgDType::F16,
        _ => CfgDType::F32,
    };
    let config = to_hf_config(&cfg.model, family, hf_vocab, dtype, base.as_ref())?;

    let tmp = prepare_output(&opts.out)?;
    let result = write_export(&tmp, &hf, &config, &iter_dir, opts.max_shard_bytes);
    match result {
        Ok(()) => publish_output(&tmp, &opts.out),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_export(
    dir: &Path,
    hf: &[(String, Tensor)],
    config: &serde_json::Value,
    iter_dir: &Path,
    max_shard_bytes: u64,
) -> Result<()> {
    // Greedy size-bounded shards in mapping order (a tensor larger than the bound gets its own).
    let mut shards: Vec<Vec<&(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for item in hf {
        let bytes = (item.1.elem_count() * item.1.dtype().size_in_bytes()) as u64;
        if size + bytes > max_shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(item);
        size += bytes;
        total += bytes;
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        // transformers checks this metadata key before loading a safetensors file.
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join(&file);
        safetensors::serialize_to_file(
            shard.iter().map(|(k, t)| (k.as_str(), t)),
            Some(meta),
            &path,
        )
        .with_context(|| format!("cannot write `{}`", path.display()))?;
        for (k, _) in shard {
            weight_map.insert(k.clone(), file.clone());
        }
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config)? + "\n")?;
    let tok = iter_dir.join("tokenizer");
    if tok.is_dir() {
        for e in std::fs::read_dir(&tok)? {
            let e = e?;
            if e.path().is_file() {
                std::fs::copy(e.path(), dir.join(e.file_name()))
                    .with_context(|| format!("cannot copy `{}`", e.path().display()))?;
            }
        }
    }
    Ok(())
}

/// `--dtype` names: bf16, fp16, fp32 (and the HF spellings).
pub fn parse_dtype(s: &str) -> Result<CfgDType> {
    serde_json::from_value(json!(s)).map_err(|_| {
        crate::config_err!(
            "unknown dtype `{s}`: expected bf16, fp16 or fp32 ({})",
            dtype_name(CfgDType::F32)
        )
        .into()
    })
}
