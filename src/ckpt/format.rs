//! Writing and reading checkpoint directories.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::layout::{assemble, Partition, ShardedParam};
use super::state::TrainState;

/// Megatron-LM's tracker file: the newest complete iteration, as ASCII.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";
const LATEST_STATE: &str = "latest_train_state.json";
const INDEX: &str = "index.json";
const FORMAT: &str = "mbridge-checkpoint";

/// `iter_{:07d}`.
pub fn iter_dir_name(iteration: u64) -> String {
    format!("iter_{iteration:07}")
}

/// The tensors one rank holds, with its coordinates.
#[derive(Debug, Clone)]
pub struct TensorSet {
    pub tp_rank: usize,
    pub pp_rank: usize,
    /// Set for optimizer shards of the distributed optimizer.
    pub dp_rank: Option<usize>,
    pub params: Vec<ShardedParam>,
}

impl TensorSet {
    fn file_name(&self) -> String {
        match self.dp_rank {
            None => format!("shard_tp{:02}_pp{:02}.safetensors", self.tp_rank, self.pp_rank),
            Some(dp) => {
                format!("shard_tp{:02}_pp{:02}_dp{:02}.safetensors", self.tp_rank, self.pp_rank, dp)
            }
        }
    }
}

/// Everything one checkpoint holds.
#[derive(Debug, Clone)]
pub struct CheckpointWrite<'a> {
    pub iteration: u64,
    pub model: &'a [TensorSet],
    pub optimizer: Option<&'a [TensorSet]>,
    /// Small JSON documents written as `<name>.json` (scheduler, rng, optimizer metadata).
    pub json: Vec<(String, serde_json::Value)>,
    pub train_state: &'a TrainState,
    /// The resolved config (`config show` form), so a checkpoint is self-describing.
    pub run_config_toml: &'a str,
    /// Tokenizer files to copy into `tokenizer/`.
    pub tokenizer_files: &'a [PathBuf],
}

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    format: String,
    version: u32,
    tensors: BTreeMap<String, IndexEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexEntry {
    shape: Vec<usize>,
    dtype: String,
    partition: Partition,
    /// Shard files in tensor-parallel rank order.
    shards: Vec<String>,
}

/// Write a checkpoint atomically into `save/iter_NNNNNNN`, move the tracker, then prune to the
/// `most_recent_k` newest (−1 keeps all). Returns the iteration directory.
pub fn save_checkpoint(save: &Path, w: &CheckpointWrite, most_recent_k: i64) -> Result<PathBuf> {
    fs::create_dir_all(save).with_context(|| format!("cannot create `{}`", save.display()))?;
    remove_stale_temps(save)?;
    let name = iter_dir_name(w.iteration);
    let tmp = save.join(format!(".{name}.tmp-{}", std::process::id()));
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?;
    write_tensor_dir(&tmp.join("model"), w.model)?;
    if let Some(opt) = w.optimizer {
        write_tensor_dir(&tmp.join("optimizer"), opt)?;
    }
    for (name, doc) in &w.json {
        let path = tmp.join(format!("{name}.json"));
        write_synced(&path, serde_json::to_string_pretty(doc)?.as_bytes())?;
    }
    write_synced(&tmp.join("run_config.toml"), w.run_config_toml.as_bytes())?;
    if !w.tokenizer_files.is_empty() {
        let dir = tmp.join("tokenizer");
        fs::create_dir_all(&dir)?;
        for f in w.tokenizer_files {
            let dest = dir.join(f.file_name().ok_or_else(|| anyhow!("bad tokenizer path"))?);
            fs::copy(f, &dest).with_context(|| format!("cannot copy `{}`", f.display()))?;
        }
    }
    let state = serde_json::to_string_pretty(w.train_state)?;
    // train_state.json is written last inside the directory: its presence marks completeness.
    write_synced(&tmp.join("train_state.json"), state.as_bytes())?;
    sync_dir(&tmp)?;

    let final_dir = save.join(&name);
    if final_dir.exists() {
        let old = save.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(&final_dir, &old)?;
        fs::rename(&tmp, &final_dir)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("cannot move checkpoint into `{}`", final_dir.display()))?;
    }
    sync_dir(save)?;
    replace_file(&save.join(LATEST_STATE), state.as_bytes())?;
    replace_file(&save.join(TRACKER), w.iteration.to_string().as_bytes())?;
    if most_recent_k > 0 {
        prune_old(save, most_recent_k as usize)?;
    }
    Ok(final_dir)
}

/// (tp rank, file, local shape, partition, dtype) of one written shard.
type ShardRecord = (usize, String, Vec<usize>, Partition, String);

fn write_tensor_dir(dir: &Path, sets: &[TensorSet]) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut index = Index { format: FORMAT.into(), version: 1, tensors: BTreeMap::new() };
    let mut by_name: BTreeMap<String, Vec<ShardRecord>> = BTreeMap::new();
    for set in sets {
        let file = set.file_name();
        let tensors: Vec<(String, Tensor)> =
            set.params.iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
        let path = dir.join(&file);
        candle_core::safetensors::save(&tensors.iter().cloned().collect(), &path)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
        fs::File::open(&path)?.sync_all()?;
        for p in &set.params {
            by_name.entry(p.name.clone()).or_default().push((
                set.tp_rank,
                file.clone(),
                p.tensor.dims().to_vec(),
                p.partition,
                format!("{:?}", p.tensor.dtype()),
            ));
        }
    }
    for (name, mut shards) in by_name {
        shards.sort_by_key(|s| s.0);
        let partition = shards[0].3;
        let mut shape = shards[0].2.clone();
        match partition {
            Partition::Replicated => {}
            Partition::Split(d) => shape[d] = shards.iter().map(|s| s.2[d]).sum(),
            Partition::GatedSplit => shape[0] = shards.iter().map(|s| s.2[0]).sum(),
        }
        let dtype = shards[0].4.clone();
        let files = shards.into_iter().map(|s| s.1).collect();
        index.tensors.insert(name, IndexEntry { shape, dtype, partition, shards: files });
    }
    write_synced(&dir.join(INDEX), serde_json::to_string_pretty(&index)?.as_bytes())
}

/// Load every tensor of `iter_dir/<part>` (part = "model" or "optimizer") as global tensors,
/// whatever TP layout wrote them, with their partitioning.
pub fn load_tensors(iter_dir: &Path, part: &str) -> Result<BTreeMap<String, (Tensor, Partition)>> {
    let dir = iter_dir.join(part);
    let index_path = dir.join(INDEX);
    let text = fs::read_to_string(&index_path)
        .with_context(|| format!("checkpoint is missing `{}`", index_path.display()))?;
    let index: Index = serde_json::from_str(&text)
        .with_context(|| format!("`{}` is not a valid checkpoint index", index_path.display()))?;
    if index.format != FORMAT {
        bail!("`{}` has format `{}`, expected `{FORMAT}`", index_path.display(), index.format);
    }
    let mut files: BTreeMap<String, std::collections::HashMap<String, Tensor>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (name, entry) in index.tensors {
        let mut shards = Vec::new();
        for file in &entry.shards {
            if !files.contains_key(file) {
                let path = dir.join(file);
                let loaded =
                    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| {
                        format!("cannot read checkpoint shard `{}` (truncated?)", path.display())
                    })?;
                files.insert(file.clone(), loaded);
            }
            let t = files[file].get(&name).ok_or_else(|| {
                anyhow!(
                    "shard `{}` lacks tensor `{name}` listed in the index",
                    dir.join(file).display()
                )
            })?;
            shards.push(t.clone());
        }
        let global = assemble(&shards, entry.partition)?;
        if global.dims() != entry.shape.as_slice() {
            bail!(
                "tensor `{name}` in `{}` has shape {:?}, the index says {:?}",
                dir.display(),
                global.dims(),
                entry.shape
            );
        }
        out.insert(name, (global, entry.partition));
    }
    Ok(out)
}

/// Read `<name>.json` of a checkpoint directory; None when the checkpoint has no such file.
pub fn read_json(iter_dir: &Path, name: &str) -> Result<Option<serde_json::Value>> {
    let path = iter_dir.join(format!("{name}.json"));
    match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("`{}` is not valid JSON", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read `{}`", path.display())),
    }
}

/// The iteration in `save/latest_checkpointed_iteration.txt`, if any.
pub fn read_tracker(save: &Path) -> Result<Option<u64>> {
    let path = save.join(TRACKER);
    match fs::read_to_string(&path) {
        Ok(t) => t.trim().parse().map(Some).with_context(|| {
            format!("`{}` should hold an iteration number, found {:?}", path.display(), t.trim())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read `{}`", path.display())),
    }
}

/// The checkpoint directory to resume from: `load` itself if it is an `iter_*` directory,
/// `iter_{ckpt_step}` when given, the tracker's iteration, or the newest complete `iter_*`.
pub fn find_checkpoint(load: &Path, ckpt_step: Option<u64>) -> Result<Option<PathBuf>> {
    if is_complete(load) {
        return Ok(Some(load.to_path_buf()));
    }
    if let Some(step) = ckpt_step {
        let dir = load.join(iter_dir_name(step));
        if !is_complete(&dir) {
            bail!(
                "`checkpoint.ckpt_step={step}` but `{}` is not a complete checkpoint",
                dir.display()
            );
        }
        return Ok(Some(dir));
    }
    if let Some(step) = read_tracker(load)? {
        let dir = load.join(iter_dir_name(step));
        if is_complete(&dir) {
            return Ok(Some(dir));
        }
        tracing::warn!(
            "tracker in `{}` names iteration {step}, which is not complete; using the newest complete checkpoint",
            load.display()
        );
    }
    Ok(complete_iterations(load)?.last().map(|(_, p)| p.clone()))
}

fn is_complete(dir: &Path) -> bool {
    dir.join("train_state.json").is_file() && dir.join("model").join(INDEX).is_file()
}

fn complete_iterations(save: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(save) else { return Ok(out) };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("iter_").and_then(|n| n.parse::<u64>().ok()) {
            if is_complete(&e.path()) {
                out.push((n, e.path()));
            }
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// Keep the `k` newest complete checkpoints (the newest is never deleted).
pub fn prune_old(save: &Path, k: usize) -> Result<()> {
    let all = complete_iterations(save)?;
    let k = k.max(1);
    if all.len() > k {
        for (_, dir) in &all[..all.len() - k] {
            fs::remove_dir_all(dir).with_context(|| format!("cannot prune `{}`", dir.display()))?;
        }
    }
    Ok(())
}

fn remove_stale_temps(save: &Path) -> Result<()> {
    for e in fs::read_dir(save)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".iter_") && (name.contains(".tmp-") || name.contains(".old-")) {
            fs::remove_dir_all(e.path())?;
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot write `{}`", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Replace a file atomically (write a sibling, fsync, rename).
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}
