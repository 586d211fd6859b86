//! Minimal HF (Llama / Qwen2 / Qwen3 layout) → Megatron weight loader, driven by one table.
//!
//! The full bidirectional bridge (config.json, export, TP-sharded loading, PEFT) belongs in
//! `src/bridge/`; this loader exists so the model can be checked against transformers' logits
//! and should be folded into that bridge's table when it lands.

use super::gpt::GptModel;
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use std::collections::{HashMap, HashSet};

/// How one Megatron parameter is built from HF tensors (`{i}` = global layer number).
#[derive(Debug, Clone, Copy)]
pub enum HfRule {
    /// Same tensor under another name.
    Copy(&'static str),
    /// Vocabulary rows copied, padded rows `V..Vp` zero-filled (embedding, lm_head).
    PadVocab(&'static str),
    /// Fused QKV interleaved per query group (hf-mapping §2) from q, k, v (weights or biases).
    Qkv(&'static str, &'static str, &'static str),
    /// Gated MLP `cat(gate, up)` along dim 0.
    Gated(&'static str, &'static str),
}

/// Megatron name pattern → HF source (hf-mapping §1, TE layer spec names).
pub const HF_LLAMA_TABLE: &[(&str, HfRule)] = &[
    ("embedding.word_embeddings.weight", HfRule::PadVocab("model.embed_tokens.weight")),
    ("output_layer.weight", HfRule::PadVocab("lm_head.weight")),
    ("decoder.final_layernorm.weight", HfRule::Copy("model.norm.weight")),
    (
        "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
        HfRule::Copy("model.layers.{i}.input_layernorm.weight"),
    ),
    (
        "decoder.layers.{i}.self_attention.linear_qkv.weight",
        HfRule::Qkv(
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
    ),
    (
        "decoder.layers.{i}.self_attention.linear_qkv.bias",
        HfRule::Qkv(
            "model.layers.{i}.self_attn.q_proj.bias",
            "model.layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias",
        ),
    ),
    (
        "decoder.layers.{i}.self_attention.q_layernorm.weight",
        HfRule::Copy("model.layers.{i}.self_attn.q_norm.weight"),
    ),
    (
        "decoder.layers.{i}.self_attention.k_layernorm.weight",
        HfRule::Copy("model.layers.{i}.self_attn.k_norm.weight"),
    ),
    (
        "decoder.layers.{i}.self_attention.linear_proj.weight",
        HfRule::Copy("model.layers.{i}.self_attn.o_proj.weight"),
    ),
    (
        "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
        HfRule::Copy("model.layers.{i}.post_attention_layernorm.weight"),
    ),
    (
        "decoder.layers.{i}.mlp.linear_fc1.weight",
        HfRule::Gated(
            "model.layers.{i}.mlp.gate_proj.weight",
            "model.layers.{i}.mlp.up_proj.weight",
        ),
    ),
    (
        "decoder.layers.{i}.mlp.linear_fc2.weight",
        HfRule::Copy("model.layers.{i}.mlp.down_proj.weight"),
    ),
];

/// Splits `decoder.layers.7.rest` into (`decoder.layers.{i}.rest`, Some(7)).
fn pattern_of(name: &str) -> (String, Option<usize>) {
    let prefix = "decoder.layers.";
    if let Some(rest) = name.strip_prefix(prefix) {
        if let Some((num, tail)) = rest.split_once('.') {
            if let Ok(i) = num.parse::<usize>() {
                return (format!("{prefix}{{i}}.{tail}"), Some(i));
            }
        }
    }
    (name.to_string(), None)
}

/// Interleaves q `[heads·d, ...]`, k/v `[g·d, ...]` per query group into Megatron's
/// `[q_group0, k0, v0, q_group1, k1, v1, ...]` rows (works on weights and 1-D biases).
pub fn fuse_qkv(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, groups: usize) -> Result<Tensor> {
    let hpg = heads / groups;
    let d = q.dim(0)? / heads;
    let mut parts = Vec::with_capacity(3 * groups);
    for g in 0..groups {
        parts.push(q.narrow(0, g * hpg * d, hpg * d)?);
        parts.push(k.narrow(0, g * d, d)?);
        parts.push(v.narrow(0, g * d, d)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Loads HF-named tensors (e.g. from `model.safetensors`) into `model`, whose parameters must
/// all be covered. Returns the HF tensor names that were not used (e.g. `lm_head.weight` of a
/// tied checkpoint, rotary `inv_freq` buffers) so callers can decide whether that is an error.
pub fn load_from_hf_state(model: &GptModel, hf: &HashMap<String, Tensor>) -> Result<Vec<String>> {
    let table: HashMap<&str, HfRule> = HF_LLAMA_TABLE.iter().copied().collect();
    let arch = model.arch();
    let mut used = HashSet::new();
    for p in model.params().params() {
        let (pattern, layer) = pattern_of(&p.name);
        let rule = table
            .get(pattern.as_str())
            .ok_or_else(|| anyhow!("no HF mapping for parameter {}", p.name))?;
        let mut get = |src: &str| -> Result<Tensor> {
            let n = match layer {
                Some(i) => src.replace("{i}", &i.to_string()),
                None => src.to_string(),
            };
            // A tied HF checkpoint has no lm_head; Megatron's tied copy reads the embedding.
            let n = if n == "lm_head.weight" && !hf.contains_key(&n) && arch.tied_embeddings {
                "model.embed_tokens.weight".to_string()
            } else {
                n
            };
            let t = hf
                .get(&n)
                .ok_or_else(|| anyhow!("HF tensor {n} missing (needed for {})", p.name))?;
            used.insert(n);
            Ok(t.clone())
        };
        let full = match *rule {
            HfRule::Copy(src) => get(src)?,
            HfRule::PadVocab(src) => {
                let t = get(src)?;
                let (v, h) = t.dims2()?;
                if v > arch.vocab {
                    bail!(
                        "{}: HF vocabulary {v} is larger than the model's {}",
                        p.name,
                        arch.vocab
                    );
                }
                if v < arch.vocab {
                    let pad = Tensor::zeros((arch.vocab - v, h), t.dtype(), t.device())?;
                    Tensor::cat(&[&t, &pad], 0)?
                } else {
                    t
                }
            }
            HfRule::Qkv(q, k, v) => {
                fuse_qkv(&get(q)?, &get(k)?, &get(v)?, arch.heads, arch.groups)?
            }
            HfRule::Gated(g, u) => Tensor::cat(&[&get(g)?, &get(u)?], 0)?,
        };
        model.params().set_full(&p.name, &full)?;
    }
    let mut unused: Vec<String> = hf.keys().filter(|k| !used.contains(*k)).cloned().collect();
    unused.sort();
    Ok(unused)
}

/// Inverse of [`fuse_qkv`]: splits Megatron's per-group rows back into (q, k, v).
pub fn split_qkv(fused: &Tensor, heads: usize, groups: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let hpg = heads / groups;
    let d = fused.dim(0)? / (heads + 2 * groups);
    let block = (hpg + 2) * d;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..groups {
        q.push(fused.narrow(0, g * block, hpg * d)?);
        k.push(fused.narrow(0, g * block + hpg * d, d)?);
        v.push(fused.narrow(0, g * block + (hpg + 1) * d, d)?);
    }
    Ok((Tensor::cat(&q, 0)?, Tensor::cat(&k, 0)?, Tensor::cat(&v, 0)?))
}

/// Writes a TP=1 model's weights under HF names (the inverse of [`load_from_hf_state`]):
/// QKV un-interleaved, fc1 split into gate/up, vocabulary rows truncated to `hf_vocab`, no
/// `lm_head.weight` for tied models. Meant for exchanging weights with PyTorch references.
pub fn export_to_hf_state(model: &GptModel, hf_vocab: usize) -> Result<HashMap<String, Tensor>> {
    megatron_to_hf(model, hf_vocab, &model.params().local_state()?)
}

/// Renames and splits full (TP=1) tensors shaped like `model`'s parameters — weights or their
/// gradients — from Megatron names to HF names (see [`export_to_hf_state`]). Tied copies
/// (`shared_embedding`) are skipped.
pub fn megatron_to_hf(
    model: &GptModel,
    hf_vocab: usize,
    state: &[(String, Tensor)],
) -> Result<HashMap<String, Tensor>> {
    let table: HashMap<&str, HfRule> = HF_LLAMA_TABLE.iter().copied().collect();
    let arch = model.arch();
    if hf_vocab > arch.vocab {
        bail!("HF vocabulary {hf_vocab} is larger than the model's {}", arch.vocab);
    }
    let mut out = HashMap::new();
    for (mname, t) in state {
        let p = model
            .params()
            .get(mname)
            .ok_or_else(|| anyhow!("{mname} is not a parameter of this model"))?;
        if t.dims() != p.global_shape.as_slice() {
            bail!("{mname}: expected the full shape {:?}, got {:?}", p.global_shape, t.dims());
        }
        if p.shared_embedding {
            continue; // tied copy: HF ties lm_head to embed_tokens at load
        }
        let (pattern, layer) = pattern_of(mname);
        let rule = table
            .get(pattern.as_str())
            .ok_or_else(|| anyhow!("no HF mapping for parameter {mname}"))?;
        let name = |src: &str| match layer {
            Some(i) => src.replace("{i}", &i.to_string()),
            None => src.to_string(),
        };
        match *rule {
            HfRule::Copy(src) => {
                out.insert(name(src), t.clone());
            }
            HfRule::PadVocab(src) => {
                out.insert(name(src), t.narrow(0, 0, hf_vocab)?.contiguous()?);
            }
            HfRule::Qkv(q, k, v) => {
                let (tq, tk, tv) = split_qkv(t, arch.heads, arch.groups)?;
                out.insert(name(q), tq.contiguous()?);
                out.insert(name(k), tk.contiguous()?);
                out.insert(name(v), tv.contiguous()?);
            }
            HfRule::Gated(g, u) => {
                let f = t.dim(0)? / 2;
                out.insert(name(g), t.narrow(0, 0, f)?.contiguous()?);
                out.insert(name(u), t.narrow(0, f, f)?.contiguous()?);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn qkv_toy_vector_from_spec() {
        // heads 4, groups 2, d 1: fused order [q0,q1,k0,v0,q2,q3,k1,v1].
        let dev = Device::Cpu;
        let q = Tensor::new(&[0f32, 1., 2., 3.], &dev).unwrap();
        let k = Tensor::new(&[10f32, 11.], &dev).unwrap();
        let v = Tensor::new(&[20f32, 21.], &dev).unwrap();
        let f = fuse_qkv(&q, &k, &v, 4, 2).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(f, vec![0., 1., 10., 20., 2., 3., 11., 21.]);
        let fused = Tensor::new(f.as_slice(), &dev).unwrap();
        let (q2, k2, v2) = split_qkv(&fused, 4, 2).unwrap();
        assert_eq!(q2.to_vec1::<f32>().unwrap(), vec![0., 1., 2., 3.]);
        assert_eq!(k2.to_vec1::<f32>().unwrap(), vec![10., 11.]);
        assert_eq!(v2.to_vec1::<f32>().unwrap(), vec![20., 21.]);
    }
}
