//! `export-hf`: any mbridge checkpoint (any TP/PP layout) → HF directory: `model.safetensors`
//! (or size-bounded shards + index), `config.json` in the source's layout (transformers-4 style
//! when the checkpoint has no source config), tokenizer files, padded vocabulary rows removed.

use super::checkpoint::{padded_rows, read_run_config, resolve_iter_dir, unpadded_vocab};
use super::hf_config::{dtype_name, to_hf_config, Family, SUPPORTED};
use super::import::candle_dtype;
use super::mapping::{megatron_params, megatron_to_hf_tensors, MegatronParam};
use super::output::{prepare_output, publish_output};
use super::stream;
use crate::ckpt;
use crate::config::model::DType as CfgDType;
use crate::config::ConfigContainer;
use crate::io::st_read::{verify_file, MappedSafetensors};
use crate::io::st_write::{write_safetensors, Data, DoneHook, OutTensor, WriteOptions};
use crate::model::GptArch;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
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
    if opts.merge_lora || opts.adapter_only {
        return export_peft(opts, &iter_dir, &cfg);
    }
    // Plain export streams from the mapped checkpoint shards (verified against their CRC-32C)
    // into the HF files: memory stays bounded whatever the model size.
    let model_dir = iter_dir.join("model");
    let index = ckpt::read_index(&model_dir)?;
    // Checksums are verified by a second thread while the export is written (the result is
    // published only if they match): the check costs no wall time.
    let mut shards = BTreeMap::new();
    for (file, info) in &index.files {
        let path = model_dir.join(file);
        if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(info.bytes) {
            verify_file(&path, info)?; // names the missing or truncated file
        }
        let shard = MappedSafetensors::open(&path)
            .with_context(|| format!("cannot parse checkpoint shard `{}`", path.display()))?;
        shards.insert(file.clone(), shard);
    }
    let verify = || -> Result<()> {
        index.files.iter().try_for_each(|(file, info)| verify_file(&model_dir.join(file), info))
    };
    let padded = ["embedding.word_embeddings.weight", "output_layer.weight"]
        .iter()
        .find_map(|n| index.tensors.get(*n))
        .map(|e| e.shape[0])
        .ok_or_else(|| {
            anyhow!("checkpoint `{}` has no embedding.word_embeddings.weight", iter_dir.display())
        })?;
    let meta = export_meta(&cfg, &iter_dir, padded)?;
    let layers: Vec<usize> = (0..meta.arch.num_layers).collect();
    let params = megatron_params(&meta.arch, &layers, 0, 1)?;
    check_extra(index.tensors.keys(), &params, &meta.arch, &iter_dir)?;
    let bar = stream::byte_bar(0, "export");
    let mut hf: Vec<OutTensor> = Vec::new();
    for p in &params {
        let entry = index.tensors.get(&p.name).ok_or_else(|| {
            anyhow!("checkpoint `{}` lacks `{}` (shape {:?})", iter_dir.display(), p.name, p.shape)
        })?;
        check_shape(&iter_dir, &p.name, &entry.shape, &p.shape)?;
        let (full, dtype) = stream::checkpoint_matrix(&p.name, entry, &shards)?;
        let parts = stream::megatron_to_hf(&p.name, &full, &p.shape, &meta.arch, meta.hf_vocab)?;
        let n = parts.len();
        for (i, (name, shape, m)) in parts.into_iter().enumerate() {
            let out = opts.dtype.map(candle_dtype).unwrap_or(dtype);
            let bytes = (shape.iter().product::<usize>() * out.size_in_bytes()) as u64;
            let bar = bar.clone();
            // The Megatron tensor's pages are dropped after the last HF tensor cut from it.
            let release = (i + 1 == n).then(|| (&shards, p.name.clone(), entry.shards.clone()));
            let done: DoneHook = Box::new(move || {
                if let Some((shards, name, files)) = &release {
                    files.iter().filter_map(|f| shards.get(f)).for_each(|s| s.release(name));
                }
                bar.inc(bytes);
            });
            hf.push(OutTensor {
                name,
                dtype: out,
                shape,
                data: Data::Matrix(m, dtype),
                done: Some(done),
            });
        }
    }
    bar.set_length(hf.iter().map(|t| t.byte_len() as u64).sum());
    let out = finish(opts, &cfg, &meta, hf, &iter_dir, &verify);
    bar.finish_and_clear();
    out
}

/// What an export derives from the run config and checkpoint besides the tensors.
struct ExportMeta {
    arch: GptArch,
    hf_vocab: usize,
    family: Family,
    base: Option<serde_json::Value>,
}

fn export_meta(cfg: &ConfigContainer, iter_dir: &Path, padded: usize) -> Result<ExportMeta> {
    let hf_vocab = unpadded_vocab(cfg, iter_dir, padded)?;
    let mut m = cfg.model.clone();
    m.vocab_size = Some(padded);
    let arch = GptArch::from_config(&m)?;
    let base = ckpt::read_json(iter_dir, "hf_config")?;
    let family = base
        .as_ref()
        .and_then(|b| b["architectures"][0].as_str())
        .and_then(|a| SUPPORTED.iter().find(|s| s.0 == a))
        .map(|s| s.2)
        .unwrap_or_else(|| Family::guess(&m));
    Ok(ExportMeta { arch, hf_vocab, family, base })
}

fn check_shape(iter_dir: &Path, name: &str, have: &[usize], want: &[usize]) -> Result<()> {
    if have != want {
        bail!(
            "checkpoint `{}`: `{name}` has shape {have:?}, its run config implies {want:?}",
            iter_dir.display()
        );
    }
    Ok(())
}

/// Refuses checkpoint tensors that have no HF counterpart.
fn check_extra<'n>(
    names: impl Iterator<Item = &'n String>,
    params: &[MegatronParam],
    arch: &GptArch,
    iter_dir: &Path,
) -> Result<()> {
    let known: HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    let extra: Vec<&String> = names
        .filter(|n| {
            // A tied model's output copy (PP>1 runs) has no HF tensor: HF ties at load.
            let tied_copy = *n == "output_layer.weight" && arch.tied_embeddings;
            !known.contains(n.as_str()) && !tied_copy
        })
        .collect();
    if !extra.is_empty() {
        bail!("checkpoint `{}` holds tensors with no HF mapping: {extra:?}", iter_dir.display());
    }
    Ok(())
}

/// `--merge-lora` / `--adapter-only`: adapters need the whole (small) model in memory.
fn export_peft(opts: &ExportOptions, iter_dir: &Path, cfg: &ConfigContainer) -> Result<PathBuf> {
    let tensors: HashMap<String, Tensor> =
        ckpt::load_tensors(iter_dir, "model")?.into_iter().map(|(k, (t, _))| (k, t)).collect();
    let flag = if opts.merge_lora { "--merge-lora" } else { "--adapter-only" };
    let Some(peft) = cfg.peft.clone() else {
        return Err(crate::config_err!(
            "{flag}: no adapters in this checkpoint (`{}` was not trained with peft.*)",
            iter_dir.display()
        )
        .into());
    };
    if opts.adapter_only {
        return crate::peft::export::export_adapter(opts, cfg, &peft, &tensors);
    }
    let tensors = crate::peft::export::merged_tensors(cfg, &peft, &tensors)?;
    let padded = padded_rows(&tensors, iter_dir)?;
    let meta = export_meta(cfg, iter_dir, padded)?;
    let layers: Vec<usize> = (0..meta.arch.num_layers).collect();
    let params = megatron_params(&meta.arch, &layers, 0, 1)?;
    check_extra(tensors.keys(), &params, &meta.arch, iter_dir)?;
    let mut hf = Vec::new();
    for p in &params {
        let t = tensors.get(&p.name).ok_or_else(|| {
            anyhow!("checkpoint `{}` lacks `{}` (shape {:?})", iter_dir.display(), p.name, p.shape)
        })?;
        check_shape(iter_dir, &p.name, t.dims(), &p.shape)?;
        for (name, t) in megatron_to_hf_tensors(&p.name, t, &meta.arch, meta.hf_vocab)? {
            let t = match opts.dtype {
                Some(d) => t.to_dtype(candle_dtype(d))?,
                None => t,
            };
            hf.push(OutTensor::from_tensor(name, t));
        }
    }
    // `load_tensors` verified the shards already.
    finish(opts, cfg, &meta, hf, iter_dir, &|| Ok(()))
}

/// Writes the HF directory (weights, config.json, tokenizer files) under a temporary name and
/// moves it onto `opts.out` only when complete.
fn finish(
    opts: &ExportOptions,
    cfg: &ConfigContainer,
    meta: &ExportMeta,
    hf: Vec<OutTensor>,
    iter_dir: &Path,
    verify: &(dyn Fn() -> Result<()> + Sync),
) -> Result<PathBuf> {
    let dtype = match hf.first().map(|t| t.dtype) {
        Some(candle_core::DType::BF16) => CfgDType::BF16,
        Some(candle_core::DType::F16) => CfgDType::F16,
        _ => CfgDType::F32,
    };
    let config = to_hf_config(&cfg.model, meta.family, meta.hf_vocab, dtype, meta.base.as_ref())?;
    let tmp = prepare_output(&opts.out)?;
    let (written, verified) = std::thread::scope(|s| {
        let check = s.spawn(verify);
        let written = write_export(&tmp, hf, &config, iter_dir, opts.max_shard_bytes);
        (written, check.join().unwrap_or_else(|_| Err(anyhow!("checksum thread panicked"))))
    });
    let result = verified.and(written);
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
    hf: Vec<OutTensor>,
    config: &serde_json::Value,
    iter_dir: &Path,
    max_shard_bytes: u64,
) -> Result<()> {
    // Greedy size-bounded shards in mapping order (a tensor larger than the bound gets its own).
    let mut shards: Vec<Vec<OutTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    let mut total = 0u64;
    for item in hf {
        let bytes = item.byte_len() as u64;
        if size + bytes > max_shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(item);
        size += bytes;
        total += bytes;
    }
    let n = shards.len();
    let name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        }
    };
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        for t in shard {
            weight_map.insert(t.name.clone(), name(i));
        }
    }
    // transformers checks this metadata key before loading a safetensors file.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let opts = WriteOptions { check_finite: false, metadata: Some(&meta) };
    shards.into_par_iter().enumerate().try_for_each(|(i, shard)| -> Result<()> {
        let path = dir.join(name(i));
        write_safetensors(&path, &shard, opts)?;
        Ok(())
    })?;
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
