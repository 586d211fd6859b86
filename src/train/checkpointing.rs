//! Saving and restoring a training run through [`crate::ckpt`]: model shards, optimizer state,
//! scheduler, train state and the resolved config.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;

use crate::bridge::import::TOKENIZER_FILES;
use crate::ckpt::{self, OwnedCheckpoint, Partition, ShardedParam, TensorSet, TrainState};
use crate::config::tokenizer::{TokenizerConfig, TokenizerType};
use crate::model::params::{shard_of, Param, TpCoord};
use crate::model::GptModel;
use crate::parallel::comm::Communicator;
use crate::train::optimizer::OptimizerState;
use crate::train::scheduler::{OptimizerParamScheduler, ResumePolicy, SchedulerState};

/// The checkpoint partition of a model parameter.
pub fn partition_of(p: &Param) -> Partition {
    Partition::from_param(p.partition_dim, p.layout)
}

/// What a run hands to [`save`].
pub struct SaveRequest<'a> {
    pub save_dir: &'a Path,
    /// This rank's model chunks (one per virtual pipeline stage).
    pub models: &'a [GptModel],
    /// Full optimizer state (`RunOptimizer::export_state`) when `checkpoint.save_optim`.
    pub optimizer: Option<OptimizerState>,
    pub scheduler: &'a OptimizerParamScheduler,
    pub state: &'a TrainState,
    pub run_config_toml: &'a str,
    /// The dropout RNG seed; written as `rng.json` when Some (`checkpoint.save_rng`).
    pub seed: Option<u64>,
    pub most_recent_k: i64,
    pub tp_rank: usize,
    pub pp_rank: usize,
    /// The tensor-parallel group when TP > 1: shards are gathered so one rank writes them all.
    pub tp: Option<&'a dyn Communicator>,
    /// The pipeline group when PP > 1: every stage's shards go to stage 0 for writing.
    pub pp: Option<&'a dyn Communicator>,
    /// Whether this rank writes (global rank 0); the others only join the gathers.
    pub write: bool,
    /// Files copied into `iter_*/tokenizer/` (see [`tokenizer_assets`]).
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

/// Write `iter_{step}` in the caller's thread (on the writing rank; None on the others).
pub fn save(req: &SaveRequest) -> Result<Option<PathBuf>> {
    match snapshot(req)? {
        Some(ckpt) => {
            ckpt::save_checkpoint(req.save_dir, &ckpt.as_write(), req.most_recent_k).map(Some)
        }
        None => Ok(None),
    }
}

/// Everything `iter_{step}` holds. The model tensors share storage with the live variables
/// (no copy): write them before the next optimizer step, or hand them to
/// [`ckpt::AsyncSaver`], which copies them first. Optimizer moments and masters are replaced,
/// not mutated, by each step, so their clones are snapshots. With TP > 1 every rank joins the
/// shard gathers and only the writing rank gets Some. With PP > 1 every stage's shards are
/// gathered to stage 0 (the last stage's tied `output_layer.weight` copy included, as
/// `import-hf --pp` writes it); any layout loads them back through the global index.
pub fn snapshot(req: &SaveRequest) -> Result<Option<OwnedCheckpoint>> {
    // Under PEFT the checkpoint holds the adapters only (the base comes from
    // `checkpoint.pretrained_checkpoint`).
    let params: Vec<&Param> =
        req.models.iter().flat_map(|m| m.params().params()).filter(|p| p.trainable).collect();
    let partitions: HashMap<&str, Partition> =
        params.iter().map(|p| (p.name.as_str(), partition_of(p))).collect();
    let model = vec![TensorSet {
        tp_rank: req.tp_rank,
        pp_rank: req.pp_rank,
        dp_rank: None,
        params: params
            .iter()
            .map(|p| ShardedParam {
                name: p.name.clone(),
                tensor: p.var.as_tensor().detach(),
                partition: partition_of(p),
            })
            .collect(),
    }];
    let mut json_docs =
        vec![("scheduler".to_string(), serde_json::to_value(req.scheduler.state())?)];
    if let Some(seed) = req.seed {
        json_docs.push(("rng".to_string(), json!({ "seed": seed })));
    }
    let optimizer = match &req.optimizer {
        Some(state) => {
            let state = state.clone();
            json_docs.push((
                "optimizer".to_string(),
                json!({ "algorithm": state.algorithm, "steps": state.steps }),
            ));
            let params = state
                .tensors
                .into_iter()
                .map(|(name, tensor)| {
                    let owner = name.rsplit_once('.').map(|(p, _)| p).unwrap_or(&name);
                    let partition = partitions.get(owner).copied().unwrap_or(Partition::Replicated);
                    ShardedParam { name, tensor, partition }
                })
                .collect();
            // Moment tensors are replaced (not mutated) by each step, so clones are snapshots.
            Some(vec![TensorSet {
                tp_rank: req.tp_rank,
                pp_rank: req.pp_rank,
                dp_rank: None,
                params,
            }])
        }
        None => None,
    };
    let model = gather_pp(gather_tp(model, req.tp)?, req.pp)?;
    let optimizer =
        optimizer.map(|sets| gather_pp(gather_tp(sets, req.tp)?, req.pp)).transpose()?;
    if !req.write {
        return Ok(None);
    }
    Ok(Some(OwnedCheckpoint {
        iteration: req.state.step,
        model,
        optimizer,
        json: json_docs,
        train_state: req.state.clone(),
        run_config_toml: req.run_config_toml.to_string(),
        tokenizer_files: req.tokenizer_files.to_vec(),
    }))
}

/// With TP > 1, every rank contributes its shards and gets back all ranks' [`TensorSet`]s
/// (one per TP rank, in rank order), so a single rank can write the whole checkpoint.
fn gather_tp(sets: Vec<TensorSet>, tp: Option<&dyn Communicator>) -> Result<Vec<TensorSet>> {
    let Some(tp) = tp.filter(|tp| tp.size() > 1) else { return Ok(sets) };
    let n = tp.size();
    let mut out: Vec<TensorSet> = Vec::new();
    for set in sets {
        let mut per_rank: Vec<Vec<ShardedParam>> = vec![Vec::new(); n];
        for p in set.params {
            let dim = match p.partition {
                Partition::Replicated => None,
                Partition::Split(d) => Some(d),
                // Each rank holds [gate_r; up_r]; gathering along dim 0 stacks them by rank.
                Partition::GatedSplit => Some(0),
            };
            let gathered = match dim {
                None => None,
                Some(d) => Some((d, tp.all_gather(&p.tensor.contiguous()?, d)?, p.tensor.dim(d)?)),
            };
            for (r, slot) in per_rank.iter_mut().enumerate() {
                let tensor = match &gathered {
                    None => p.tensor.clone(),
                    Some((d, all, len)) => all.narrow(*d, r * len, *len)?,
                };
                slot.push(ShardedParam { name: p.name.clone(), tensor, partition: p.partition });
            }
        }
        for (r, params) in per_rank.into_iter().enumerate() {
            out.push(TensorSet { tp_rank: r, pp_rank: set.pp_rank, dp_rank: set.dp_rank, params });
        }
    }
    Ok(out)
}

/// With PP > 1, stages 1.. send their [`TensorSet`]s (after the TP gather) to stage 0, which
/// returns every stage's sets; other stages return their own (they do not write). `pp` is
/// the pipeline group of the writing rank only (others pass None and keep their sets).
fn gather_pp(sets: Vec<TensorSet>, pp: Option<&dyn Communicator>) -> Result<Vec<TensorSet>> {
    let Some(pp) = pp.filter(|pp| pp.size() > 1) else { return Ok(sets) };
    let cpu = candle_core::Device::Cpu;
    if pp.rank() != 0 {
        // Names, partitions, shapes and dtypes first (as JSON bytes), then the tensors.
        let meta: Vec<serde_json::Value> = sets
            .iter()
            .map(|set| {
                let params: Vec<serde_json::Value> = set
                    .params
                    .iter()
                    .map(|p| {
                        json!({
                            "name": p.name,
                            "partition": p.partition,
                            "dims": p.tensor.dims(),
                            "dtype": p.tensor.dtype().as_str(),
                        })
                    })
                    .collect();
                json!({ "tp_rank": set.tp_rank, "pp_rank": set.pp_rank, "dp_rank": set.dp_rank, "params": params })
            })
            .collect();
        let bytes = serde_json::to_vec(&meta)?;
        pp.send(&Tensor::new(&[bytes.len() as u32], &cpu)?, 0)?;
        pp.send(&Tensor::from_vec(bytes.clone(), (bytes.len(),), &cpu)?, 0)?;
        for set in &sets {
            for p in &set.params {
                pp.send(&p.tensor.contiguous()?, 0)?;
            }
        }
        return Ok(sets);
    }
    let mut out = sets;
    for src in 1..pp.size() {
        let len = pp.recv(src, &(1,).into(), candle_core::DType::U32, &cpu)?.to_vec1::<u32>()?[0];
        let bytes = pp.recv(src, &(len as usize,).into(), candle_core::DType::U8, &cpu)?;
        let meta: Vec<serde_json::Value> = serde_json::from_slice(&bytes.to_vec1::<u8>()?)
            .context("pipeline checkpoint gather: bad metadata from a pipeline stage")?;
        for set in meta {
            let mut params = Vec::new();
            for p in set["params"].as_array().context("pipeline checkpoint gather: no params")? {
                let dims: Vec<usize> = serde_json::from_value(p["dims"].clone())?;
                let dtype: candle_core::DType = p["dtype"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("pipeline checkpoint gather: {e}"))?;
                let tensor = pp.recv(src, &dims.into(), dtype, &cpu)?;
                params.push(ShardedParam {
                    name: p["name"].as_str().unwrap_or_default().to_string(),
                    tensor,
                    partition: serde_json::from_value(p["partition"].clone())?,
                });
            }
            out.push(TensorSet {
                tp_rank: serde_json::from_value(set["tp_rank"].clone())?,
                pp_rank: serde_json::from_value(set["pp_rank"].clone())?,
                dp_rank: serde_json::from_value(set["dp_rank"].clone())?,
                params,
            });
        }
    }
    Ok(out)
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
    let mut tensors: HashMap<String, Tensor> =
        ckpt::load_tensors(iter_dir, "model")?.into_iter().map(|(k, (t, _))| (k, t)).collect();
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
    let whole: usize = models.iter().map(|m| m.layer_numbers().len()).sum();
    let tied = models.first().is_some_and(|m| m.arch().tied_embeddings);
    let mut unused = unused.unwrap_or_default();
    // A pipelined checkpoint of a tied model also holds the last stage's copy.
    unused.retain(|n| !(tied && n == TIED_COPY.0));
    if !unused.is_empty() && models.first().is_some_and(|m| whole == m.arch().num_layers) {
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
    let mut global = ckpt::load_tensors(iter_dir, "optimizer")?;
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
