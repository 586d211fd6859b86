//! The one HF ⇄ Megatron parameter table (hf-mapping §1–5) and the tensor transforms it names:
//! direct copies, vocabulary padding, QKV fused per query group, gated MLP `[gate; up]`.
//!
//! Adding a Llama-like family is a row in [`HF_LLAMA_TABLE`] (or a new table), not a module.
//! Every function here works on full (TP=1) tensors; TP shards are cut by the callers with the
//! partition of [`megatron_params`].

use crate::ckpt::Partition;
use crate::config::model::{Activation, Normalization, PositionEmbedding};
use crate::model::{GptArch, GptModel};
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use std::collections::{HashMap, HashSet};

/// How one Megatron parameter is built from HF tensors (`{i}` = global layer number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl HfRule {
    /// Short name of the transform, for `import-hf --dry-run`.
    pub fn kind(&self) -> &'static str {
        match self {
            HfRule::Copy(_) => "copy",
            HfRule::PadVocab(_) => "pad-vocab",
            HfRule::Qkv(..) => "fused-qkv",
            HfRule::Gated(..) => "gated-mlp",
        }
    }

    /// The HF name patterns this rule reads.
    pub fn sources(&self) -> Vec<&'static str> {
        match *self {
            HfRule::Copy(s) | HfRule::PadVocab(s) => vec![s],
            HfRule::Qkv(q, k, v) => vec![q, k, v],
            HfRule::Gated(g, u) => vec![g, u],
        }
    }
}

/// Megatron name pattern → HF source (hf-mapping §1, TE layer spec names). Shared by Llama,
/// Mistral, Qwen2 (QKV bias) and Qwen3 (QK-norm): rows a model lacks are simply not asked for.
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

/// HF tensors that are buffers, not parameters: ignored on import (hf-mapping §1).
pub fn is_hf_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Splits `decoder.layers.7.rest` into (`decoder.layers.{i}.rest`, Some(7)).
pub(crate) fn pattern_of(name: &str) -> (String, Option<usize>) {
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

/// The table row of a Megatron parameter name.
pub fn rule_for(megatron_name: &str) -> Result<HfRule> {
    let (pattern, _) = pattern_of(megatron_name);
    HF_LLAMA_TABLE
        .iter()
        .find(|(p, _)| *p == pattern)
        .map(|(_, r)| *r)
        .ok_or_else(|| anyhow!("no HF mapping for parameter {megatron_name}"))
}

/// HF names (layer number substituted) that `megatron_name` is built from.
pub fn hf_sources(megatron_name: &str) -> Result<Vec<String>> {
    let (_, layer) = pattern_of(megatron_name);
    Ok(rule_for(megatron_name)?.sources().into_iter().map(|s| subst(s, layer)).collect())
}

pub(crate) fn subst(src: &str, layer: Option<usize>) -> String {
    match layer {
        Some(i) => src.replace("{i}", &i.to_string()),
        None => src.to_string(),
    }
}

/// One Megatron parameter as a checkpoint stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct MegatronParam {
    /// Megatron name with the global layer number.
    pub name: String,
    /// Global (unsharded, padded-vocabulary) shape.
    pub shape: Vec<usize>,
    /// How TP ranks split it.
    pub partition: Partition,
}

/// The parameters of pipeline stage `pp_rank` of `pp_size` holding `layers`, in the order the
/// model creates them, without building the model (import must not allocate a random copy of
/// an 8B model). `tests` keep this equal to [`GptModel`]'s own registry.
pub fn megatron_params(
    arch: &GptArch,
    layers: &[usize],
    pp_rank: usize,
    pp_size: usize,
) -> Result<Vec<MegatronParam>> {
    if arch.normalization != Normalization::RMSNorm
        || !arch.gated
        || arch.add_bias_linear
        || !matches!(arch.position_embedding, PositionEmbedding::Rope | PositionEmbedding::Yarn)
        || arch.activation != Activation::Silu
        || arch.zero_centered_gamma
    {
        bail!(
            "the HF bridge maps Llama-style models only (RMSNorm without zero-centered gamma, \
             gated SiLU MLP, RoPE or YaRN, no linear biases)"
        );
    }
    let (h, d) = (arch.hidden, arch.head_dim);
    let p = |name: String, shape: Vec<usize>, partition| MegatronParam { name, shape, partition };
    let mut out = Vec::new();
    if pp_rank == 0 {
        out.push(p(
            "embedding.word_embeddings.weight".into(),
            vec![arch.vocab, h],
            Partition::Split(0),
        ));
    }
    for &l in layers {
        let a = format!("decoder.layers.{l}.self_attention");
        let m = format!("decoder.layers.{l}.mlp");
        out.push(p(format!("{a}.linear_qkv.layer_norm_weight"), vec![h], Partition::Replicated));
        out.push(p(
            format!("{a}.linear_qkv.weight"),
            vec![arch.qkv_rows(), h],
            Partition::Split(0),
        ));
        if arch.add_qkv_bias {
            out.push(p(format!("{a}.linear_qkv.bias"), vec![arch.qkv_rows()], Partition::Split(0)));
        }
        if arch.qk_layernorm {
            out.push(p(format!("{a}.q_layernorm.weight"), vec![d], Partition::Replicated));
            out.push(p(format!("{a}.k_layernorm.weight"), vec![d], Partition::Replicated));
        }
        out.push(p(
            format!("{a}.linear_proj.weight"),
            vec![h, arch.heads * d],
            Partition::Split(1),
        ));
        out.push(p(format!("{m}.linear_fc1.layer_norm_weight"), vec![h], Partition::Replicated));
        out.push(p(format!("{m}.linear_fc1.weight"), vec![2 * arch.ffn, h], Partition::GatedSplit));
        out.push(p(format!("{m}.linear_fc2.weight"), vec![h, arch.ffn], Partition::Split(1)));
    }
    if pp_rank + 1 == pp_size {
        out.push(p("decoder.final_layernorm.weight".into(), vec![h], Partition::Replicated));
        // A tied model keeps an output-layer copy only on a last stage without the embedding.
        if !arch.tied_embeddings || pp_size > 1 {
            out.push(p("output_layer.weight".into(), vec![arch.vocab, h], Partition::Split(0)));
        }
    }
    Ok(out)
}

/// The shapes the HF tensors of `rule` must have for a Megatron parameter of `shape`
/// (`hf_vocab` = unpadded vocabulary rows).
pub(crate) fn hf_shapes(
    rule: HfRule,
    shape: &[usize],
    arch: &GptArch,
    hf_vocab: usize,
) -> Vec<Vec<usize>> {
    let tail = &shape[1..];
    let rows = |n: usize| [&[n][..], tail].concat();
    match rule {
        HfRule::Copy(_) => vec![shape.to_vec()],
        HfRule::PadVocab(_) => vec![rows(hf_vocab)],
        HfRule::Qkv(..) => {
            let kv = rows(arch.groups * arch.head_dim);
            vec![rows(arch.heads * arch.head_dim), kv.clone(), kv]
        }
        HfRule::Gated(..) => vec![rows(shape[0] / 2); 2],
    }
}

/// Builds the full Megatron tensor `param` from HF tensors fetched by `get(hf_name)`. Each
/// fetched tensor's shape is checked against what the config implies (the error names the
/// tensor and both shapes). A tied model's `output_layer.weight` copy reads the embedding.
pub fn hf_to_megatron(
    param: &MegatronParam,
    arch: &GptArch,
    hf_vocab: usize,
    get: &mut dyn FnMut(&str) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, layer) = pattern_of(&param.name);
    let mut rule = rule_for(&param.name)?;
    if param.name == "output_layer.weight" && arch.tied_embeddings {
        rule = HfRule::PadVocab("model.embed_tokens.weight");
    }
    if hf_vocab > arch.vocab {
        bail!("HF vocabulary {hf_vocab} is larger than the model's {}", arch.vocab);
    }
    let want = hf_shapes(rule, &param.shape, arch, hf_vocab);
    let mut parts = Vec::new();
    for (src, shape) in rule.sources().into_iter().zip(want) {
        let name = subst(src, layer);
        let t = get(&name)?;
        if t.dims() != shape.as_slice() {
            bail!(
                "HF tensor `{name}` has shape {:?}, but config.json implies {:?} (for {})",
                t.dims(),
                shape,
                param.name
            );
        }
        parts.push(t);
    }
    Ok(match rule {
        HfRule::Copy(_) => parts.remove(0),
        HfRule::PadVocab(_) => {
            let t = parts.remove(0);
            let (v, h) = t.dims2()?;
            if v < arch.vocab {
                let pad = Tensor::zeros((arch.vocab - v, h), t.dtype(), t.device())?;
                Tensor::cat(&[&t, &pad], 0)?
            } else {
                t
            }
        }
        HfRule::Qkv(..) => fuse_qkv(&parts[0], &parts[1], &parts[2], arch.heads, arch.groups)?,
        HfRule::Gated(..) => Tensor::cat(&[&parts[0], &parts[1]], 0)?,
    })
}

/// Splits a full Megatron tensor into its HF tensors (inverse of [`hf_to_megatron`]): QKV
/// un-interleaved, fc1 halved, vocabulary rows truncated to `hf_vocab`. Tied models' output
/// copies give nothing (HF ties `lm_head` at load).
pub fn megatron_to_hf_tensors(
    name: &str,
    t: &Tensor,
    arch: &GptArch,
    hf_vocab: usize,
) -> Result<Vec<(String, Tensor)>> {
    if name == "output_layer.weight" && arch.tied_embeddings {
        return Ok(Vec::new());
    }
    if hf_vocab > arch.vocab {
        bail!("HF vocabulary {hf_vocab} is larger than the model's {}", arch.vocab);
    }
    let (_, layer) = pattern_of(name);
    Ok(match rule_for(name)? {
        HfRule::Copy(src) => vec![(subst(src, layer), t.clone())],
        HfRule::PadVocab(src) => vec![(subst(src, layer), t.narrow(0, 0, hf_vocab)?.contiguous()?)],
        HfRule::Qkv(q, k, v) => {
            let (tq, tk, tv) = split_qkv(t, arch.heads, arch.groups)?;
            vec![
                (subst(q, layer), tq.contiguous()?),
                (subst(k, layer), tk.contiguous()?),
                (subst(v, layer), tv.contiguous()?),
            ]
        }
        HfRule::Gated(g, u) => {
            let f = t.dim(0)? / 2;
            vec![
                (subst(g, layer), t.narrow(0, 0, f)?.contiguous()?),
                (subst(u, layer), t.narrow(0, f, f)?.contiguous()?),
            ]
        }
    })
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

/// Loads HF-named tensors (e.g. from `model.safetensors`) into `model`, whose parameters must
/// all be covered. Returns the HF tensor names that were not used (e.g. `lm_head.weight` of a
/// tied checkpoint, rotary `inv_freq` buffers) so callers can decide whether that is an error.
pub fn load_from_hf_state(model: &GptModel, hf: &HashMap<String, Tensor>) -> Result<Vec<String>> {
    let arch = model.arch();
    let mut used = HashSet::new();
    let hf_vocab = hf
        .get("model.embed_tokens.weight")
        .or_else(|| hf.get("lm_head.weight"))
        .map(|t| t.dim(0))
        .transpose()?
        .unwrap_or(arch.vocab);
    for p in model.params().params() {
        let param = MegatronParam {
            name: p.name.clone(),
            shape: p.global_shape.clone(),
            partition: Partition::Replicated,
        };
        let full = hf_to_megatron(&param, arch, hf_vocab, &mut |n: &str| {
            let t = hf
                .get(n)
                .ok_or_else(|| anyhow!("HF tensor {n} missing (needed for {})", p.name))?;
            used.insert(n.to_string());
            Ok(t.clone())
        })?;
        model.params().set_full(&p.name, &full)?;
    }
    let mut unused: Vec<String> = hf.keys().filter(|k| !used.contains(*k)).cloned().collect();
    unused.sort();
    Ok(unused)
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
    let arch = model.arch();
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
        out.extend(megatron_to_hf_tensors(mname, t, arch, hf_vocab)?);
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

    #[test]
    fn table_sources_substitute_layer_numbers() {
        assert_eq!(
            hf_sources("decoder.layers.12.mlp.linear_fc1.weight").unwrap(),
            vec!["model.layers.12.mlp.gate_proj.weight", "model.layers.12.mlp.up_proj.weight"]
        );
        assert!(rule_for("decoder.layers.0.mlp.router.weight").is_err());
    }
}
