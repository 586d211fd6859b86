//! Saving and restoring a training run through [`crate::ckpt`]: model shards, optimizer state,
//! scheduler, train state and the resolved config.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;

use crate::bridge::import::TOKENIZER_FILES;
use crate::ckpt::{self, OwnedCheckpoint, Partition, ShardedParam, TensorSet, TrainState};
use crate::config::checkpoint::CheckpointConfig;
use crate::config::tokenizer::{TokenizerConfig, TokenizerType};
use crate::model::fp8_params;
use crate::model::params::{shard_of, Param, TpCoord};
use crate::model::GptModel;
use crate::train::optimizer::OptimizerState;
use crate::train::scheduler::{OptimizerParamScheduler, ResumePolicy, SchedulerState};
use crate::train::trainer::Trainer;

/// The checkpoint a run with `c` resumes: `checkpoint.load`'s (`ckpt_step`'s when set), or
/// the global non-persistent one beside it when that is newer, as Megatron's load picks.
pub fn checkpoint_to_resume(c: &CheckpointConfig) -> Result<Option<PathBuf>> {
    let Some(load) = &c.load else { return Ok(None) };
    let persistent = ckpt::find_checkpoint(&PathBuf::from(load), c.ckpt_step.map(|s| s as u64))?;
    let non_persistent = match c.non_persistent_dir(Some(load)) {
        Some(dir) if c.ckpt_step.is_none() => ckpt::find_checkpoint(&dir, None)?,
        _ => None,
    };
    let iteration = |d: &Option<PathBuf>| d.as_deref().and_then(ckpt::iteration_of);
    Ok(match (iteration(&persistent), iteration(&non_persistent)) {
        (p, Some(np)) if p.is_none_or(|p| np > p) => non_persistent,
        _ => persistent,
    })
}

/// The checkpoint partition of a model parameter.
pub fn partition_of(p: &Param) -> Partition {
    Partition::from_param(p.partition_dim, p.layout)
}

/// What a rank hands to [`snapshot`].
pub struct SaveRequest<'a> {
    /// This rank's model chunks (one per virtual pipeline stage).
    pub models: &'a [GptModel],
    /// Full optimizer state (`RunOptimizer::export_state`) when `checkpoint.save_optim`.
    pub optimizer: Option<OptimizerState>,
    pub scheduler: &'a OptimizerParamScheduler,
    pub state: &'a TrainState,
    pub run_config_toml: &'a str,
    /// The dropout RNG seed; written as `rng.json` when Some (`checkpoint.save_rng`).
    pub seed: Option<u64>,
    pub tp_rank: usize,
    pub pp_rank: usize,
    /// Whether this rank writes the model shard of its (tp, pp) position: one rank of each
    /// position (data- and context-parallel rank 0) does.
    pub writes_model: bool,
    /// Whether this rank writes the optimizer shard of its (tp, pp) position (see
    /// [`Trainer::checkpoint_snapshot`] for which rank).
    pub writes_optimizer: bool,
    /// Files copied into `iter_*/tokenizer/` (see [`tokenizer_assets`]); rank 0 copies them.
    pub tokenizer_files: &'a [PathBuf],
}

/// The tokenizer files a run uses, for `checkpoint.save_tokenizer_assets`: an HF tokenizer's
/// `tokenizer.json` with the configs beside it (the import's list: tokenizer_config.json,
/// special_tokens_map.json, generation_config.json), GPT-2 BPE's vocab and merges files, a
/// SentencePiece model; nothing for the null tokenizer. Only files that exist are listed.
pub fn tokenizer_assets(tok: &TokenizerConfig) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    match tok.tokenizer_type {
        Some(TokenizerType::NullTokenizer) => {}
        Some(TokenizerType::GPT2BPETokenizer) => {
            files.extend(tok.vocab_file.iter().chain(&tok.merge_file).map(PathBuf::from));
        }
        _ => {
            if let Some(model) = tok.tokenizer_model.as_deref().map(Path::new) {
                let dir = if model.is_dir() { Some(model) } else { model.parent() };
                let is_hf =
                    model.is_dir() || model.file_name().is_some_and(|n| n == "tokenizer.json");
                if model.is_file() {
                    files.push(model.to_path_buf());
                }
                if let (Some(dir), true) = (dir, is_hf) {
                    files.extend(TOKENIZER_FILES.iter().map(|f| dir.join(f)));
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| f.is_file() && seen.insert(f.file_name().map(|n| n.to_owned())));
    files
}

/// What this rank writes of `iter_{step}`: its own model and optimizer shards (none when it
/// owns none) and the small documents rank 0 writes. The model tensors share storage with
/// the live variables (no copy): write them before the next optimizer step, or hand them to
/// [`ckpt::AsyncSaver`], which copies them first. Optimizer moments and masters are replaced,
/// not mutated, by each step, so their clones are snapshots. Each (tp, pp) position's shards
/// are written by one rank of that position ([`ckpt::save_checkpoint_on`]); with PP > 1 the
/// last stage's shard holds the tied `output_layer.weight` copy (as `import-hf --pp` writes
/// it); any layout loads them back through the global index.
pub fn snapshot(req: &SaveRequest) -> Result<OwnedCheckpoint> {
    // Under PEFT the checkpoint holds the adapters only (the base comes from
    // `checkpoint.pretrained_checkpoint`).
    let params: Vec<&Param> =
        req.models.iter().flat_map(|m| m.params().params()).filter(|p| p.trainable).collect();
    let partitions: HashMap<&str, Partition> =
        params.iter().map(|p| (p.name.as_str(), partition_of(p))).collect();
    let mut model = Vec::new();
    let model_dtype = req.models.first().map_or(candle_core::DType::BF16, |m| m.params().dtype());
    if req.writes_model {
        model.push(TensorSet {
            tp_rank: req.tp_rank,
            pp_rank: req.pp_rank,
            dp_rank: None,
            params: params
                .iter()
                .map(|p| {
                    // An FP8 primary weight is saved as the values it stands for, in the
                    // model's dtype, which `export-hf` and every loader read.
                    let t = p.var.as_tensor();
                    let tensor = match fp8_params::is_stored(t) {
                        true => fp8_params::value_as(t, model_dtype)?,
                        false => t.detach(),
                    };
                    Ok(ShardedParam { name: p.name.clone(), tensor, partition: partition_of(p) })
                })
                .collect::<Result<_>>()?,
        });
    }
    let mut json_docs =
        vec![("scheduler".to_string(), serde_json::to_value(req.scheduler.state())?)];
    if let Some(seed) = req.seed {
        json_docs.push(("rng".to_string(), json!({ "seed": seed })));
    }
    let optimizer = match &req.optimizer {
        Some(state) => {
            json_docs.push((
                "optimizer".to_string(),
                json!({ "algorithm": state.algorithm, "steps": state.steps }),
            ));
            let mut sets = Vec::new();
            if req.writes_optimizer {
                // Moment tensors are replaced (not mutated) by each step: clones are snapshots.
                let params = state
                    .tensors
                    .iter()
                    .map(|(name, tensor)| {
                        let owner = name.rsplit_once('.').map(|(p, _)| p).unwrap_or(name);
                        let partition =
                            partitions.get(owner).copied().unwrap_or(Partition::Replicated);
                        ShardedParam { name: name.clone(), tensor: tensor.clone(), partition }
                    })
                    .collect();
                sets.push(TensorSet {
                    tp_rank: req.tp_rank,
                    pp_rank: req.pp_rank,
                    dp_rank: None,
                    params,
                });
            }
            Some(sets)
        }
        None => None,
    };
    Ok(OwnedCheckpoint {
        iteration: req.state.step,
        model,
        optimizer,
        json: json_docs,
        train_state: req.state.clone(),
        run_config_toml: req.run_config_toml.to_string(),
        tokenizer_files: req.tokenizer_files.to_vec(),
    })
}

impl Trainer {
    /// This rank's part of a checkpoint of the current state (see [`snapshot`]); every rank
    /// must call it at the same step (the distributed optimizer gathers its state over DP).
    ///
    /// Model shards: data- and context-parallel rank 0 of each (tp, pp) position. Optimizer
    /// shards: data-parallel rank 1 when DP > 1 (every DP rank holds the gathered state), so
    /// the two largest files of a position are written by two processes at once.
    pub fn checkpoint_snapshot(&self) -> Result<OwnedCheckpoint> {
        let c = &self.cfg.checkpoint;
        let tokenizer_files = if c.save_tokenizer_assets {
            tokenizer_assets(&self.cfg.tokenizer)
        } else {
            Vec::new()
        };
        let (writes_model, writes_optimizer) = match &self.groups {
            None => (true, true),
            Some(g) => {
                let optimizer_dp = usize::from(g.topology.dp() > 1);
                (
                    g.coords.cp == 0 && g.coords.dp == 0,
                    g.coords.cp == 0 && g.coords.dp == optimizer_dp,
                )
            }
        };
        snapshot(&SaveRequest {
            models: &self.chunks,
            optimizer: if c.save_optim { Some(self.optimizer_state_for_save()?) } else { None },
            scheduler: &self.scheduler,
            state: &self.state,
            run_config_toml: &self.run_config_toml,
            seed: c.save_rng.then_some(self.rng_seed),
            tp_rank: self.groups.as_ref().map_or(0, |g| g.coords.tp),
            pp_rank: self.groups.as_ref().map_or(0, |g| g.coords.pp),
            writes_model,
            writes_optimizer,
            tokenizer_files: &tokenizer_files,
        })
    }
}

/// Which parameters [`load_model_part`] restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPart {
    /// Every parameter (no PEFT).
    All,
    /// The frozen base weights (PEFT: from `checkpoint.pretrained_checkpoint`).
    Base,
    /// The trainable parameters (PEFT: adapters from an adapter-only checkpoint).
    Trainable,
}

/// Load model weights (any TP/PP layout) into this rank's model chunks: everything without
/// PEFT, the adapters (what PEFT checkpoints hold) with PEFT.
pub fn load_model(iter_dir: &Path, models: &[GptModel]) -> Result<()> {
    let peft = models.first().is_some_and(|m| m.params().peft().is_some());
    let part = if peft { LoadPart::Trainable } else { LoadPart::All };
    load_model_part(iter_dir, models, part)
}

/// The name of the tied embedding's last-stage copy and of its original.
const TIED_COPY: (&str, &str) = ("output_layer.weight", "embedding.word_embeddings.weight");

/// Load the `part` of the weights of `models` (any TP/PP layout) from `iter_dir`.
pub fn load_model_part(iter_dir: &Path, models: &[GptModel], part: LoadPart) -> Result<()> {
    let whole: usize = models.iter().map(|m| m.layer_numbers().len()).sum();
    let holds_all = models.first().is_some_and(|m| whole == m.arch().num_layers);
    let needed: HashSet<&str> =
        models.iter().flat_map(|m| m.params().params()).map(|p| p.name.as_str()).collect();
    let want = wanted(iter_dir, "model", |n| needed.contains(n))?;
    // A rank holding every layer reads everything, to name parameters the model lacks; a
    // pipeline stage reads only the shards of its own parameters.
    let loaded = if holds_all {
        ckpt::load_tensors(iter_dir, "model")?
    } else {
        ckpt::load_tensors_where(iter_dir, "model", &want)?
    };
    let mut tensors: HashMap<String, Tensor> =
        loaded.into_iter().map(|(k, (t, _))| (k, t)).collect();
    // A checkpoint written without pipelining has no last-stage copy of tied embeddings:
    // the copy is the embedding itself.
    if !tensors.contains_key(TIED_COPY.0) {
        if let Some(t) = tensors.get(TIED_COPY.1).cloned() {
            if models
                .iter()
                .any(|m| m.params().get(TIED_COPY.0).is_some_and(|p| p.shared_embedding))
            {
                tensors.insert(TIED_COPY.0.to_string(), t);
            }
        }
    }
    let mut unused: Option<Vec<String>> = None;
    for m in models {
        let left = m
            .params()
            .load_full_state_where(&tensors, |p| match part {
                LoadPart::All => true,
                LoadPart::Base => !p.trainable,
                LoadPart::Trainable => p.trainable,
            })
            .with_context(|| {
                format!("checkpoint `{}` does not fit this model", iter_dir.display())
            })?;
        // A name is unused when no chunk took it.
        unused = Some(match unused {
            None => left,
            Some(prev) => prev.into_iter().filter(|n| left.contains(n)).collect(),
        });
    }
    let tied = models.first().is_some_and(|m| m.arch().tied_embeddings);
    let mut unused = unused.unwrap_or_default();
    // A pipelined checkpoint of a tied model also holds the last stage's copy.
    unused.retain(|n| !(tied && n == TIED_COPY.0));
    if !unused.is_empty() && holds_all {
        bail!(
            "checkpoint `{}` holds parameters this model does not have: {}",
            iter_dir.display(),
            unused.join(", ")
        );
    }
    Ok(())
}

/// The optimizer state of `iter_dir` for the parameters in `owned` (this rank's pipeline
/// stage), cut to this rank's TP slice (whatever TP, PP, DP and optimizer kind saved it):
/// what either optimizer imports.
pub fn read_optimizer_state(
    iter_dir: &Path,
    tp: TpCoord,
    owned: &std::collections::HashSet<String>,
) -> Result<OptimizerState> {
    let meta = ckpt::read_json(iter_dir, "optimizer")?.with_context(|| {
        format!(
            "`{}` has no optimizer state (saved with checkpoint.save_optim=false?); \
             resume with checkpoint.load_optim=false to start a fresh optimizer",
            iter_dir.display()
        )
    })?;
    let owner_of = |name: &str| name.rsplit_once('.').map_or(name, |(p, _)| p).to_string();
    let want = wanted(iter_dir, "optimizer", |n| owned.contains(&owner_of(n)))?;
    let mut global = ckpt::load_tensors_where(iter_dir, "optimizer", &want)?;
    // The tied copy's state equals the embedding's (same gradients, same steps) when the
    // checkpoint was written without pipelining.
    if owned.contains(TIED_COPY.0) {
        let copies: Vec<(String, (Tensor, ckpt::Partition))> = global
            .iter()
            .filter_map(|(n, v)| {
                let suffix = n.strip_prefix(TIED_COPY.1)?;
                let copy = format!("{}{suffix}", TIED_COPY.0);
                (!global.contains_key(&copy)).then(|| (copy, v.clone()))
            })
            .collect();
        global.extend(copies);
    }
    let mut tensors = Vec::new();
    for (name, (t, partition)) in global {
        // Other pipeline stages' parameters belong to other ranks.
        let owner = name.rsplit_once('.').map_or(name.as_str(), |(p, _)| p);
        if !owned.contains(owner) {
            continue;
        }
        let (dim, layout) = partition.to_param();
        tensors.push((name, shard_of(&t, dim, layout, tp)?));
    }
    Ok(OptimizerState {
        algorithm: meta["algorithm"].as_str().unwrap_or_default().to_string(),
        steps: meta["steps"].as_u64().unwrap_or(0),
        tensors,
    })
}

/// Which tensors of `iter_dir/<part>` a rank reads: those `own` selects, plus the
/// embedding's (weight or optimizer state) when this rank owns the tied output copy and the
/// checkpoint, written without pipelining, has none: the copy is then loaded from it.
fn wanted(
    iter_dir: &Path,
    part: &str,
    own: impl Fn(&str) -> bool,
) -> Result<impl Fn(&str) -> bool> {
    let index = ckpt::read_index(&iter_dir.join(part))?;
    let copy_of = |name: &str| -> Option<String> {
        let suffix = name.strip_prefix(TIED_COPY.1)?;
        (suffix.is_empty() || suffix.starts_with('.')).then(|| format!("{}{suffix}", TIED_COPY.0))
    };
    let mut extra = HashSet::new();
    for name in index.tensors.keys() {
        if let Some(copy) = copy_of(name) {
            if own(&copy) && !index.tensors.contains_key(&copy) {
                extra.insert(name.clone());
            }
        }
    }
    let selected: HashSet<String> =
        index.tensors.keys().filter(|n| own(n) || extra.contains(*n)).cloned().collect();
    Ok(move |n: &str| selected.contains(n))
}

/// The dropout RNG seed saved in `rng.json`.
pub fn load_rng_seed(iter_dir: &Path) -> Result<u64> {
    let doc = ckpt::read_json(iter_dir, "rng")?.with_context(|| {
        format!(
            "`{}` has no RNG state (saved with checkpoint.save_rng=false?); resume with \
             checkpoint.load_rng=false to use the config's rng.seed",
            iter_dir.display()
        )
    })?;
    doc["seed"]
        .as_u64()
        .with_context(|| format!("`{}/rng.json` has no integer `seed`", iter_dir.display()))
}

/// Restore the LR/WD scheduler.
pub fn load_scheduler(iter_dir: &Path, scheduler: &mut OptimizerParamScheduler) -> Result<()> {
    let doc = ckpt::read_json(iter_dir, "scheduler")?
        .with_context(|| format!("`{}` has no scheduler state", iter_dir.display()))?;
    let state: SchedulerState = serde_json::from_value(doc)
        .with_context(|| format!("bad scheduler state in `{}`", iter_dir.display()))?;
    scheduler
        .load_state(&state, ResumePolicy::UseCheckpoint)
        .with_context(|| format!("scheduler state in `{}` does not fit", iter_dir.display()))?;
    Ok(())
}

/// Read `train_state.json`.
pub fn load_train_state(iter_dir: &Path) -> Result<TrainState> {
    let path = iter_dir.join("train_state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("`{}` is not a train state", path.display()))
}
