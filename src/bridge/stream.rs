//! The mapping table applied to bytes instead of tensors: a Megatron parameter (or one TP
//! rank's shard of it) described as a [`Matrix`] of byte ranges of the mapped HF files, and an
//! HF tensor as byte ranges of a checkpoint's mapped shards. Import and export stream these
//! straight into their output files, so memory stays bounded whatever the model size and no
//! element is converted unless the dtype changes. [`super::mapping`] holds the same transforms
//! on tensors (used where a model is filled in memory); the round-trip tests keep them equal.

use super::mapping::{hf_shapes, pattern_of, rule_for, subst, HfRule, MegatronParam};
use super::weights::HfWeights;
use crate::ckpt::{IndexEntry, Partition};
use crate::io::matrix::Matrix;
use crate::io::st_read::MappedSafetensors;
use crate::model::GptArch;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::DType;
use std::collections::BTreeMap;

/// A full (TP=1) Megatron parameter built from HF tensors.
pub struct GlobalParam<'a> {
    pub matrix: Matrix<'a>,
    pub dtype: DType,
    /// The HF tensors read (to release their pages once written).
    pub sources: Vec<String>,
}

/// The rule of `param`, with a tied model's output copy reading the embedding.
fn rule_of(param_name: &str, arch: &GptArch) -> Result<HfRule> {
    if param_name == "output_layer.weight" && arch.tied_embeddings {
        return Ok(HfRule::PadVocab("model.embed_tokens.weight"));
    }
    rule_for(param_name)
}

/// Fused QKV rows `[q_g, k_g, v_g]` per query group from q/k/v matrices (weights or biases).
fn fuse_qkv<'a>(
    q: &Matrix<'a>,
    k: &Matrix<'a>,
    v: &Matrix<'a>,
    heads: usize,
    groups: usize,
) -> Result<Matrix<'a>> {
    let hpg = heads / groups;
    let d = q.rows() / heads;
    let mut parts = Vec::with_capacity(3 * groups);
    for g in 0..groups {
        parts.push(q.select_rows(g * hpg * d, hpg * d)?);
        parts.push(k.select_rows(g * d, d)?);
        parts.push(v.select_rows(g * d, d)?);
    }
    Matrix::vcat(parts)
}

/// `param` (full shape) from the HF weights, checking every source's shape against the
/// config (the error names the tensor and both shapes) and that fused sources share a dtype.
pub fn hf_to_megatron<'a>(
    param: &MegatronParam,
    arch: &GptArch,
    hf_vocab: usize,
    w: &'a HfWeights,
) -> Result<GlobalParam<'a>> {
    let (_, layer) = pattern_of(&param.name);
    let rule = rule_of(&param.name, arch)?;
    if hf_vocab > arch.vocab {
        bail!("HF vocabulary {hf_vocab} is larger than the model's {}", arch.vocab);
    }
    let want = hf_shapes(rule, &param.shape, arch, hf_vocab);
    let mut parts = Vec::new();
    let mut sources = Vec::new();
    let mut dtype: Option<(DType, String)> = None;
    for (src, shape) in rule.sources().into_iter().zip(want) {
        let name = subst(src, layer);
        let have = w.shape(&name)?;
        if have != shape {
            bail!(
                "HF tensor `{name}` has shape {have:?}, but config.json implies {shape:?} (for {})",
                param.name
            );
        }
        let dt = w.dtype(&name)?;
        match &dtype {
            Some((d, first)) if *d != dt => bail!(
                "HF tensors `{first}` ({d:?}) and `{name}` ({dt:?}) are fused into {} but have different dtypes; pass --dtype to convert them",
                param.name
            ),
            Some(_) => {}
            None => dtype = Some((dt, name.clone())),
        }
        parts.push(w.matrix(&name)?);
        sources.push(name);
    }
    let dtype = dtype.map(|d| d.0).ok_or_else(|| anyhow!("{} has no HF source", param.name))?;
    let matrix = match rule {
        HfRule::Copy(_) => parts.remove(0),
        HfRule::PadVocab(_) => {
            let t = parts.remove(0);
            let pad = Matrix::zeros(arch.vocab - t.rows(), t.row_bytes());
            Matrix::vcat(vec![t, pad])?
        }
        HfRule::Qkv(..) => fuse_qkv(&parts[0], &parts[1], &parts[2], arch.heads, arch.groups)?,
        HfRule::Gated(..) => Matrix::vcat(parts)?,
    };
    Ok(GlobalParam { matrix, dtype, sources })
}

/// Rank `rank` of `size`'s shard of a full parameter of `shape` (the model's slicing rule,
/// `model::params::shard_of`), with its local shape.
pub fn shard_matrix<'a>(
    full: &Matrix<'a>,
    shape: &[usize],
    elem: usize,
    partition: Partition,
    rank: usize,
    size: usize,
) -> Result<(Matrix<'a>, Vec<usize>)> {
    let mut local = shape.to_vec();
    if size == 1 {
        return Ok((full.clone(), local));
    }
    let split = |n: usize, by: usize| -> Result<usize> {
        if !n.is_multiple_of(by) {
            bail!("dimension of size {n} of shape {shape:?} is not divisible by {by}");
        }
        Ok(n / by)
    };
    let m = match partition {
        Partition::Replicated => full.clone(),
        Partition::Split(0) => {
            let c = split(shape[0], size)?;
            local[0] = c;
            full.select_rows(rank * c, c)?
        }
        Partition::Split(1) if shape.len() == 2 => {
            let c = split(shape[1], size)?;
            local[1] = c;
            full.select_cols(rank * c * elem, c * elem)?
        }
        Partition::Split(d) => bail!("cannot split a tensor of shape {shape:?} along dim {d}"),
        Partition::GatedSplit => {
            let c = split(shape[0], 2 * size)?;
            local[0] = 2 * c;
            let half = shape[0] / 2;
            Matrix::vcat(vec![
                full.select_rows(rank * c, c)?,
                full.select_rows(half + rank * c, c)?,
            ])?
        }
    };
    Ok((m, local))
}

/// A checkpoint tensor (global) as a matrix over its TP shards' mapped bytes.
pub fn checkpoint_matrix<'a>(
    name: &str,
    entry: &IndexEntry,
    shards: &'a BTreeMap<String, MappedSafetensors>,
) -> Result<(Matrix<'a>, DType)> {
    let mut mats = Vec::new();
    let mut dtype = None;
    for file in &entry.shards {
        let shard = shards.get(file).ok_or_else(|| anyhow!("shard `{file}` is not open"))?;
        if shard.entry(name).is_none() {
            bail!("shard `{}` lacks tensor `{name}` listed in the index", shard.path().display());
        }
        let dt = shard.dtype(name)?;
        if dtype.is_some_and(|d| d != dt) {
            bail!(
                "tensor `{name}` has different dtypes in its shards ({:?} and {dt:?})",
                dtype.unwrap()
            );
        }
        dtype = Some(dt);
        mats.push(shard.matrix(name)?);
    }
    let dtype = dtype.ok_or_else(|| anyhow!("tensor `{name}` lists no shard files"))?;
    let m = match entry.partition {
        Partition::Replicated => mats.remove(0),
        Partition::Split(0) => Matrix::vcat(mats)?,
        Partition::Split(1) => Matrix::hcat(mats)?,
        Partition::Split(d) => bail!("tensor `{name}`: split along dim {d} is not supported"),
        Partition::GatedSplit => {
            let mut gates = Vec::new();
            let mut ups = Vec::new();
            for m in mats {
                let half = m.rows() / 2;
                gates.push(m.select_rows(0, half)?);
                ups.push(m.select_rows(half, half)?);
            }
            gates.extend(ups);
            Matrix::vcat(gates)?
        }
    };
    let expect = entry.shape.iter().product::<usize>() * dtype.size_in_bytes();
    if m.len() != expect {
        bail!(
            "tensor `{name}`: its shards hold {} bytes, the index shape {:?} needs {expect}",
            m.len(),
            entry.shape
        );
    }
    Ok((m, dtype))
}

/// The HF tensors (name, shape, matrix) of a full Megatron parameter (inverse of
/// [`hf_to_megatron`]); a tied model's output copy gives none.
pub fn megatron_to_hf<'a>(
    name: &str,
    full: &Matrix<'a>,
    shape: &[usize],
    arch: &GptArch,
    hf_vocab: usize,
) -> Result<Vec<(String, Vec<usize>, Matrix<'a>)>> {
    if name == "output_layer.weight" && arch.tied_embeddings {
        return Ok(Vec::new());
    }
    if hf_vocab > arch.vocab {
        bail!("HF vocabulary {hf_vocab} is larger than the model's {}", arch.vocab);
    }
    let (_, layer) = pattern_of(name);
    let rows = |n: usize| [&[n][..], &shape[1..]].concat();
    let sel =
        |a: usize, n: usize| full.select_rows(a, n).with_context(|| format!("tensor `{name}`"));
    Ok(match rule_for(name)? {
        HfRule::Copy(src) => vec![(subst(src, layer), shape.to_vec(), full.clone())],
        HfRule::PadVocab(src) => vec![(subst(src, layer), rows(hf_vocab), sel(0, hf_vocab)?)],
        HfRule::Qkv(q, k, v) => {
            let (heads, groups) = (arch.heads, arch.groups);
            let hpg = heads / groups;
            let d = shape[0] / (heads + 2 * groups);
            let block = (hpg + 2) * d;
            let (mut mq, mut mk, mut mv) = (Vec::new(), Vec::new(), Vec::new());
            for g in 0..groups {
                mq.push(sel(g * block, hpg * d)?);
                mk.push(sel(g * block + hpg * d, d)?);
                mv.push(sel(g * block + (hpg + 1) * d, d)?);
            }
            vec![
                (subst(q, layer), rows(heads * d), Matrix::vcat(mq)?),
                (subst(k, layer), rows(groups * d), Matrix::vcat(mk)?),
                (subst(v, layer), rows(groups * d), Matrix::vcat(mv)?),
            ]
        }
        HfRule::Gated(g, u) => {
            let f = shape[0] / 2;
            vec![(subst(g, layer), rows(f), sel(0, f)?), (subst(u, layer), rows(f), sel(f, f)?)]
        }
    })
}

/// A progress bar over `total` bytes with throughput (stderr; hidden when not a terminal).
pub fn byte_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}
