//! PEFT export (`export-hf --adapter-only` / `--merge-lora`): Megatron adapter tensors →
//! the HF PEFT adapter format (hf-mapping.md §9), or base + adapters merged into full
//! Megatron weights that the ordinary HF export then writes.

use super::canonical::Split;
use super::lora::Adapter;
use crate::bridge::mapping::megatron_to_hf_tensors;
use crate::bridge::output::{prepare_output, publish_output};
use crate::bridge::ExportOptions;
use crate::ckpt;
use crate::config::peft::{PeftConfig, PeftScheme};
use crate::config::ConfigContainer;
use crate::model::GptArch;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const LINEAR_IN: &str = ".adapter.linear_in.weight";
const LINEAR_OUT: &str = ".adapter.linear_out.weight";
const MAGNITUDE: &str = ".adapter.weight_magnitude";
/// Canonical LoRA's per-part adapters: `<module>.adapter.adapter_q.linear_in.weight`, ...
const CANONICAL: &str = ".adapter.adapter_";

/// Canonical LoRA: every fused layer with per-part adapters and how it splits, sorted.
fn canonical_modules(
    adapters: &HashMap<String, Tensor>,
    arch: &GptArch,
) -> Result<Vec<(String, Split)>> {
    let set: BTreeSet<&str> =
        adapters.keys().filter_map(|k| k.split_once(CANONICAL).map(|(m, _)| m)).collect();
    set.into_iter()
        .map(|m| {
            let split = if m.ends_with("linear_qkv") {
                Split::Qkv { heads: arch.heads, groups: arch.groups, head_dim: arch.head_dim }
            } else if m.ends_with("linear_fc1") && arch.gated {
                Split::GateUp { ffn: arch.ffn }
            } else {
                bail!("canonical LoRA adapters on `{m}`, which has no parts")
            };
            Ok((m.to_string(), split))
        })
        .collect()
}

/// `(A, B)` of every part of a canonical module (None where the part has no adapter).
fn canonical_parts<'a>(
    adapters: &'a HashMap<String, Tensor>,
    module: &str,
    split: Split,
) -> Result<Vec<Option<(&'a Tensor, &'a Tensor)>>> {
    split
        .parts()
        .iter()
        .map(|(key, _)| {
            let name = |x: &str| format!("{module}.adapter.{key}.linear_{x}.weight");
            match (adapters.get(&name("in")), adapters.get(&name("out"))) {
                (Some(a), Some(b)) => Ok(Some((a, b))),
                (None, None) => Ok(None),
                _ => bail!("PEFT checkpoint holds only half of `{module}.adapter.{key}`"),
            }
        })
        .collect()
}

/// HF PEFT tensors of a canonical module: each part is one HF projection as it is.
fn canonical_tensors(
    module: &str,
    split: Split,
    adapters: &HashMap<String, Tensor>,
    arch: &GptArch,
) -> Result<Vec<(String, Tensor)>> {
    // The HF names of the fused weight's parts (`q_proj`, ...; `gate_proj`, `up_proj`).
    let weight = format!("{module}.weight");
    let rows: usize = split.part_rows().iter().sum();
    let probe = Tensor::zeros((rows, 1), DType::F32, &candle_core::Device::Cpu)?;
    let hf: Vec<String> = megatron_to_hf_tensors(&weight, &probe, arch, arch.vocab)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut out = Vec::new();
    for ((key, _), part) in split.parts().iter().zip(canonical_parts(adapters, module, split)?) {
        let Some((a, b)) = part else { continue };
        let proj = format!("{}_proj", key.trim_start_matches("adapter_"));
        let hf_name = hf
            .iter()
            .find(|n| n.ends_with(&format!(".{proj}.weight")))
            .ok_or_else(|| anyhow!("`{weight}` has no HF `{proj}` part (HF names: {hf:?})"))?;
        let path = hf_name.strip_suffix(".weight").expect("ends with .weight");
        out.push((format!("base_model.model.{path}.lora_A.weight"), a.contiguous()?));
        out.push((format!("base_model.model.{path}.lora_B.weight"), b.contiguous()?));
    }
    Ok(out)
}

/// `s · ΔW` of a canonical module in the fused layout: every part's `B A` in its rows.
fn canonical_delta(
    module: &str,
    split: Split,
    adapters: &HashMap<String, Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let f = |t: &Tensor| t.to_dtype(DType::F64);
    // Assembled along the output dim, which `assemble` expects last: (B A)ᵀ = Aᵀ Bᵀ.
    let parts = canonical_parts(adapters, module, split)?
        .into_iter()
        .map(|p| {
            p.map(|(a, b)| -> Result<Tensor> { Ok(f(a)?.t()?.matmul(&f(b)?.t()?)?) }).transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((split.assemble(&parts, 1)?.t()? * scale)?)
}

/// The adapted modules (e.g. `decoder.layers.0.self_attention.linear_qkv`), sorted.
fn modules(adapters: &HashMap<String, Tensor>) -> Vec<String> {
    let set: BTreeSet<String> =
        adapters.keys().filter_map(|k| k.strip_suffix(LINEAR_IN)).map(String::from).collect();
    set.into_iter().collect()
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    t.get(name).ok_or_else(|| anyhow!("PEFT checkpoint lacks `{name}`"))
}

fn arch_of(cfg: &ConfigContainer) -> Result<GptArch> {
    let mut m = cfg.model.clone();
    m.vocab_size = Some(m.vocab_size.unwrap_or(1).max(1));
    GptArch::from_config(&m)
}

/// HF PEFT tensors of one module: fused `linear_qkv` / `linear_fc1` adapters are unfused
/// (every part gets the same lora_A; lora_B and the DoRA magnitude are split like the base
/// weight's rows).
fn module_tensors(
    module: &str,
    adapters: &HashMap<String, Tensor>,
    arch: &GptArch,
) -> Result<Vec<(String, Tensor)>> {
    let a = get(adapters, &format!("{module}{LINEAR_IN}"))?;
    let b = get(adapters, &format!("{module}{LINEAR_OUT}"))?;
    let weight = format!("{module}.weight");
    let mut out = Vec::new();
    let parts = megatron_to_hf_tensors(&weight, b, arch, arch.vocab)?;
    let mags = match adapters.get(&format!("{module}{MAGNITUDE}")) {
        Some(m) => Some(megatron_to_hf_tensors(&weight, &m.unsqueeze(1)?, arch, arch.vocab)?),
        None => None,
    };
    for (i, (hf_name, b_part)) in parts.into_iter().enumerate() {
        let path = hf_name
            .strip_suffix(".weight")
            .ok_or_else(|| anyhow!("HF name `{hf_name}` of `{weight}` does not end in .weight"))?;
        out.push((format!("base_model.model.{path}.lora_A.weight"), a.contiguous()?));
        out.push((format!("base_model.model.{path}.lora_B.weight"), b_part));
        if let Some(m) = &mags {
            let v = m[i].1.squeeze(1)?.contiguous()?;
            out.push((format!("base_model.model.{path}.lora_magnitude_vector"), v));
        }
    }
    Ok(out)
}

/// `adapter_config.json` with exactly Megatron Bridge's keys.
fn adapter_config(
    cfg: &ConfigContainer,
    peft: &PeftConfig,
    tensors: &[(String, Tensor)],
) -> serde_json::Value {
    let targets: BTreeSet<String> = tensors
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight"))
        .filter_map(|p| p.rsplit('.').next())
        .map(String::from)
        .collect();
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": cfg.checkpoint.pretrained_checkpoint,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": peft.dim,
        "rank_pattern": {},
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "task_type": "CAUSAL_LM",
        "use_dora": peft.peft_scheme == PeftScheme::Dora,
        "use_rslora": false,
    })
}

/// Writes `adapter_config.json` + `adapter_model.safetensors` under `opts.out`.
pub fn export_adapter(
    opts: &ExportOptions,
    cfg: &ConfigContainer,
    peft: &PeftConfig,
    adapters: &HashMap<String, Tensor>,
) -> Result<PathBuf> {
    let arch = arch_of(cfg)?;
    let (mods, canonical) = (modules(adapters), canonical_modules(adapters, &arch)?);
    if mods.is_empty() && canonical.is_empty() {
        bail!("--adapter-only: the checkpoint holds no `*{LINEAR_IN}` tensors");
    }
    let mut hf = Vec::new();
    for m in &mods {
        hf.extend(module_tensors(m, adapters, &arch)?);
    }
    for (m, split) in &canonical {
        hf.extend(canonical_tensors(m, *split, adapters, &arch)?);
    }
    if let Some(d) = opts.dtype {
        hf = hf
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(crate::bridge::import::candle_dtype(d))?)))
            .collect::<Result<_>>()?;
    }
    let config = adapter_config(cfg, peft, &hf);
    let tmp = prepare_output(&opts.out)?;
    let write = |dir: &Path| -> Result<()> {
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = dir.join("adapter_model.safetensors");
        safetensors::serialize_to_file(hf.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), &path)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)? + "\n",
        )?;
        Ok(())
    };
    match write(&tmp) {
        Ok(()) => publish_output(&tmp, &opts.out),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Base weights from `checkpoint.pretrained_checkpoint` (an mbridge checkpoint) with every
/// adapted weight replaced by `W + alpha/dim · B A` (DoRA: rows rescaled to the magnitude),
/// keyed by Megatron name, in the base weight's dtype.
pub fn merged_tensors(
    cfg: &ConfigContainer,
    peft: &PeftConfig,
    adapters: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let pre = cfg.checkpoint.pretrained_checkpoint.as_deref().ok_or_else(|| {
        anyhow!("--merge-lora: the run config has no checkpoint.pretrained_checkpoint (the base)")
    })?;
    let pre_path = PathBuf::from(pre);
    if pre_path.join("config.json").is_file() {
        bail!("--merge-lora: the base `{pre}` is a Hugging Face directory; merging onto it is not implemented in this build (import it with `mbridge import-hf` and finetune from that, or use --adapter-only)");
    }
    let dir = ckpt::find_checkpoint(&pre_path, None)?
        .with_context(|| format!("--merge-lora: base `{pre}` holds no mbridge checkpoint"))?;
    let mut base: HashMap<String, Tensor> =
        ckpt::load_tensors(&dir, "model")?.into_iter().map(|(k, (t, _))| (k, t)).collect();
    let scale = peft.alpha / peft.dim as f64;
    let mut merged: BTreeMap<String, Tensor> = modules(adapters)
        .into_iter()
        .map(|m| {
            let name = format!("{m}.weight");
            let w = get(&base, &name).with_context(|| format!("base `{}`", dir.display()))?;
            let f = |t: &Tensor| t.to_dtype(DType::F64);
            let a = f(get(adapters, &format!("{m}{LINEAR_IN}"))?)?;
            let b = f(get(adapters, &format!("{m}{LINEAR_OUT}"))?)?;
            let mag = adapters.get(&format!("{m}{MAGNITUDE}")).map(f).transpose()?;
            let out = Adapter::merge_full(&f(w)?, &a, &b, scale, mag.as_ref())?;
            Ok((name, out.to_dtype(w.dtype())?))
        })
        .collect::<Result<_>>()?;
    for (m, split) in canonical_modules(adapters, &arch_of(cfg)?)? {
        let name = format!("{m}.weight");
        let w = get(&base, &name).with_context(|| format!("base `{}`", dir.display()))?;
        let delta = canonical_delta(&m, split, adapters, scale)?;
        merged.insert(name, (w.to_dtype(DType::F64)? + delta)?.to_dtype(w.dtype())?);
    }
    base.extend(merged);
    Ok(base)
}
