//! What export, generate and the trainer need from an mbridge checkpoint beyond its tensors:
//! the run config it carries (`run_config.toml`), the unpadded vocabulary, its tokenizer, and
//! the whole model loaded for single-process inference.

use crate::ckpt;
use crate::config::raw::{RawConfig, Source};
use crate::config::recipes::parse_toml;
use crate::config::tokenizer::TokenizerType;
use crate::config::ConfigContainer;
use crate::data::tokenizer::{HfTokenizer, NullTokenizer, Tokenizer};
use crate::model::{GptModel, ParallelLayout};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The checkpoint directory `path` names: an `iter_*` directory, or a run/save directory
/// (its tracker's iteration, or `iteration` when given).
pub fn resolve_iter_dir(path: &Path, iteration: Option<u64>) -> Result<PathBuf> {
    if !path.is_dir() {
        return Err(crate::config_err!("checkpoint `{}` does not exist", path.display()).into());
    }
    ckpt::find_checkpoint(path, iteration)?.ok_or_else(|| {
        crate::config_err!(
            "`{}` holds no complete mbridge checkpoint (expected iter_*/ with model/index.json and train_state.json)",
            path.display()
        )
        .into()
    })
}

/// Parses `iter_dir/run_config.toml` into the config container it was rendered from.
pub fn read_run_config(iter_dir: &Path) -> Result<ConfigContainer> {
    let path = iter_dir.join("run_config.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("checkpoint is missing `{}`", path.display()))?;
    let origin = path.display().to_string();
    let table = parse_toml(&text, &origin)?;
    let mut raw = RawConfig::default();
    raw.merge(&table, &Source::File(origin));
    Ok(raw.to_container()?)
}

/// The tokenizer a checkpoint was trained/imported with: its own `tokenizer/` copy first, then
/// `tokenizer.*` of the run config (NullTokenizer or an HF tokenizer path). `add_special`
/// makes an HF tokenizer add its special tokens (BOS) as transformers' `tokenizer(text)` does.
pub fn checkpoint_tokenizer(
    cfg: &ConfigContainer,
    iter_dir: &Path,
    add_special: bool,
) -> Result<Box<dyn Tokenizer>> {
    let own = iter_dir.join("tokenizer").join("tokenizer.json");
    let t = &cfg.tokenizer;
    match t.tokenizer_type {
        Some(TokenizerType::NullTokenizer) => {
            let v = t.vocab_size.context("run config: NullTokenizer without tokenizer.vocab_size")?;
            Ok(Box::new(NullTokenizer::new(v)))
        }
        _ if own.is_file() => Ok(Box::new(HfTokenizer::from_path(&own)?.with_special_tokens(add_special))),
        Some(TokenizerType::HuggingFaceTokenizer) => {
            let m = t.tokenizer_model.as_ref().context("run config: tokenizer.tokenizer_model unset")?;
            Ok(Box::new(HfTokenizer::from_path(m)?.with_special_tokens(add_special)))
        }
        other => bail!("checkpoint `{}`: tokenizer {other:?} is not supported here (HuggingFaceTokenizer or NullTokenizer are)", iter_dir.display()),
    }
}

/// The vocabulary before Megatron's padding: `model.vocab_size` of an imported checkpoint
/// (`should_pad_vocab`), else the tokenizer's size (what a pretraining run padded).
pub fn unpadded_vocab(cfg: &ConfigContainer, iter_dir: &Path, padded: usize) -> Result<usize> {
    let v = match cfg.model.vocab_size {
        Some(v) => v,
        None => checkpoint_tokenizer(cfg, iter_dir, false)?.vocab_size(),
    };
    if v > padded {
        bail!(
            "checkpoint `{}`: vocabulary {v} exceeds the {padded} embedding rows",
            iter_dir.display()
        );
    }
    Ok(v)
}

/// Rows of the (padded) word embedding in checkpoint tensors.
pub fn padded_rows(tensors: &HashMap<String, Tensor>, iter_dir: &Path) -> Result<usize> {
    let t = tensors
        .get("embedding.word_embeddings.weight")
        .or_else(|| tensors.get("output_layer.weight"))
        .ok_or_else(|| {
            anyhow!("checkpoint `{}` has no embedding.word_embeddings.weight", iter_dir.display())
        })?;
    Ok(t.dim(0)?)
}

/// A checkpoint loaded for inference.
pub struct LoadedCheckpoint {
    pub iter_dir: PathBuf,
    pub cfg: ConfigContainer,
    pub model: GptModel,
}

/// Loads config and weights (any TP/PP layout) into one TP=1/PP=1 model.
pub fn load_checkpoint_model(
    path: &Path,
    iteration: Option<u64>,
    dtype: DType,
    device: &Device,
) -> Result<LoadedCheckpoint> {
    let iter_dir = resolve_iter_dir(path, iteration)?;
    let cfg = read_run_config(&iter_dir)?;
    let tensors: HashMap<String, Tensor> =
        ckpt::load_tensors(&iter_dir, "model")?.into_iter().map(|(k, (t, _))| (k, t)).collect();
    let mut m = cfg.model.clone();
    if let Some(peft) = &cfg.peft {
        // A PEFT run holds adapters only: the base comes from its pretrained checkpoint.
        let pre = cfg.checkpoint.pretrained_checkpoint.as_deref().with_context(|| {
            format!("PEFT checkpoint `{}` names no pretrained_checkpoint", iter_dir.display())
        })?;
        let base_dir = ckpt::find_checkpoint(Path::new(pre), None)?.with_context(|| {
            format!("base `{pre}` of PEFT checkpoint `{}` holds no mbridge checkpoint (HF bases are not supported here)", iter_dir.display())
        })?;
        let base: HashMap<String, Tensor> =
            ckpt::load_tensors(&base_dir, "model")?.into_iter().map(|(k, (t, _))| (k, t)).collect();
        m.vocab_size = Some(padded_rows(&base, &base_dir)?);
        let model =
            GptModel::new_peft(&m, ParallelLayout::single(), None, Some(peft), 0, dtype, device)?;
        model
            .params()
            .load_full_state_where(&base, |p| !p.trainable)
            .with_context(|| format!("base `{}` does not fit", base_dir.display()))?;
        model
            .params()
            .load_full_state_where(&tensors, |p| p.trainable)
            .with_context(|| format!("adapters `{}` do not fit", iter_dir.display()))?;
        return Ok(LoadedCheckpoint { iter_dir, cfg, model });
    }
    m.vocab_size = Some(padded_rows(&tensors, &iter_dir)?);
    let model = GptModel::new(&m, ParallelLayout::single(), 0, dtype, device)?;
    let unused = model.params().load_full_state(&tensors).with_context(|| {
        format!("checkpoint `{}` does not fit its run config", iter_dir.display())
    })?;
    // A tied model's output copy (written by PP>1 runs) is the embedding itself.
    let unused: Vec<String> = unused.into_iter().filter(|n| n != "output_layer.weight").collect();
    if !unused.is_empty() {
        bail!(
            "checkpoint `{}` holds tensors the model does not have: {}",
            iter_dir.display(),
            unused.join(", ")
        );
    }
    Ok(LoadedCheckpoint { iter_dir, cfg, model })
}

/// The bridge's JSON documents of a checkpoint (`hf_source`, `hf_config`), for a training run
/// to pass on in `CheckpointWrite::json` so its own checkpoints still export with the source
/// model's config.json layout, token ids and family.
pub fn hf_docs(iter_dir: &Path) -> Result<Vec<(String, serde_json::Value)>> {
    let mut out = Vec::new();
    for name in ["hf_source", "hf_config"] {
        if let Some(doc) = ckpt::read_json(iter_dir, name)? {
            out.push((name.to_string(), doc));
        }
    }
    Ok(out)
}
