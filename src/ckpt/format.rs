//! Writing and reading checkpoint directories.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layout::{assemble, Partition, ShardedParam};
use super::save::write_synced;
use super::shard_io::{open_shard, write_shard, FileInfo};
use super::state::TrainState;
use crate::io::st_read::MappedSafetensors;
use crate::io::st_write::OutTensor;
use rayon::prelude::*;

/// Megatron-LM's tracker file: the newest complete iteration, as ASCII.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";
pub(super) const LATEST_STATE: &str = "latest_train_state.json";
pub(super) const INDEX: &str = "index.json";
const FORMAT: &str = "mbridge-checkpoint";
/// Version 2 added per-file checksums.
const VERSION: u32 = 2;

/// `iter_{:07d}`.
pub fn iter_dir_name(iteration: u64) -> String {
    format!("iter_{iteration:07}")
}

/// The iteration an `iter_*` directory holds, from its name.
pub fn iteration_of(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix("iter_")?.parse().ok()
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

/// `index.json` of a tensor directory (`model/`, `optimizer/`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub version: u32,
    pub tensors: BTreeMap<String, IndexEntry>,
    /// Size and CRC-32C of every shard file, verified on load.
    pub files: BTreeMap<String, FileInfo>,
}

/// One global tensor of an index.
#[derive(Debug, Serialize, Deserialize)]
pub struct IndexEntry {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub partition: Partition,
    /// Shard files in tensor-parallel rank order.
    pub shards: Vec<String>,
}

/// One shard file to write: its tensors (with their TP partition) in file order.
pub struct ShardFile<'a> {
    pub tp_rank: usize,
    pub file: String,
    pub tensors: Vec<(OutTensor<'a>, Partition)>,
}

/// One shard file as the rank that wrote it reports it, so that another rank (rank 0) can
/// index it without reading it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WrittenShard {
    /// The tensor directory: `model` or `optimizer`.
    pub part: String,
    pub file: String,
    pub info: FileInfo,
    pub tp_rank: usize,
    /// The global rank that wrote it.
    pub rank: usize,
    /// Its tensors, in file order.
    pub tensors: Vec<TensorRecord>,
}

/// One tensor of a [`WrittenShard`], with its local (this rank's) shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorRecord {
    pub name: String,
    pub shape: Vec<usize>,
    pub partition: Partition,
    pub dtype: String,
}

/// The shard files of `sets` (one per set); the tensors share the sets' storage.
pub(super) fn shard_files(sets: &[TensorSet]) -> Vec<ShardFile<'static>> {
    sets.iter()
        .map(|set| ShardFile {
            tp_rank: set.tp_rank,
            file: set.file_name(),
            tensors: set
                .params
                .iter()
                .map(|p| (OutTensor::from_tensor(p.name.clone(), p.tensor.clone()), p.partition))
                .collect(),
        })
        .collect()
}

/// The file name of the shard of (tp, pp) ranks in a model directory.
pub fn model_shard_name(tp_rank: usize, pp_rank: usize) -> String {
    TensorSet { tp_rank, pp_rank, dp_rank: None, params: Vec::new() }.file_name()
}

/// Write shard files (several at once: each streams, so they overlap their disk waits) and
/// then `index.json` with global shapes, shard files and checksums.
pub fn write_shard_files(dir: &Path, files: Vec<ShardFile>) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let written = write_shards(dir, "", 0, files)?;
    write_index(dir, &written.iter().collect::<Vec<_>>())
}

/// Write shard files into `dir` (each fsynced; `dir` is created when there are any) and
/// return what an index needs of each, tagged with `part` and the writing `rank`.
pub(super) fn write_shards(
    dir: &Path,
    part: &str,
    rank: usize,
    files: Vec<ShardFile>,
) -> Result<Vec<WrittenShard>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    files
        .into_par_iter()
        .map(|f| {
            let tensors = f
                .tensors
                .iter()
                .map(|(t, partition)| TensorRecord {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    partition: *partition,
                    dtype: format!("{:?}", t.dtype),
                })
                .collect();
            let out = f.tensors.into_iter().map(|(t, _)| t).collect();
            let info = write_shard(&dir.join(&f.file), out)?;
            Ok(WrittenShard {
                part: part.to_string(),
                file: f.file,
                info,
                tp_rank: f.tp_rank,
                rank,
                tensors,
            })
        })
        .collect()
}

/// Write `dir/index.json` for the shards of `written` (global shapes, shard files in TP rank
/// order, sizes and checksums). Every TP rank's file holds every tensor of its pipeline stage
/// (replicated ones too), so a tensor must have one shard per TP rank of the directory.
/// Refuses a file reported twice (two ranks wrote one shard) and a tensor without exactly
/// those shards (a rank did not write its own): either would index a checkpoint that does
/// not load back as it was saved.
pub(super) fn write_index(dir: &Path, written: &[&WrittenShard]) -> Result<()> {
    let mut index = Index {
        format: FORMAT.into(),
        version: VERSION,
        tensors: BTreeMap::new(),
        files: BTreeMap::new(),
    };
    let mut writers: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_name: BTreeMap<&str, Vec<(usize, &str, &TensorRecord)>> = BTreeMap::new();
    for w in written {
        if let Some(other) = writers.insert(&w.file, w.rank) {
            bail!(
                "shard `{}` was written by both rank {other} and rank {}",
                dir.join(&w.file).display(),
                w.rank
            );
        }
        index.files.insert(w.file.clone(), w.info);
        for t in &w.tensors {
            by_name.entry(&t.name).or_default().push((w.tp_rank, &w.file, t));
        }
    }
    let tp_size = written.iter().map(|w| w.tp_rank + 1).max().unwrap_or(0);
    for (name, mut shards) in by_name {
        shards.sort_by_key(|s| s.0);
        if shards.len() != tp_size || shards.iter().enumerate().any(|(i, s)| s.0 != i) {
            let ranks: Vec<usize> = shards.iter().map(|s| s.0).collect();
            bail!(
                "tensor `{name}` in `{}` has shards of TP ranks {ranks:?}, expected 0..{tp_size}",
                dir.display()
            );
        }
        let first = shards[0].2;
        let mut shape = first.shape.clone();
        match first.partition {
            Partition::Replicated => {}
            Partition::Split(d) => shape[d] = shards.iter().map(|s| s.2.shape[d]).sum(),
            Partition::GatedSplit => shape[0] = shards.iter().map(|s| s.2.shape[0]).sum(),
        }
        let entry = IndexEntry {
            shape,
            dtype: first.dtype.clone(),
            partition: first.partition,
            shards: shards.iter().map(|s| s.1.to_string()).collect(),
        };
        index.tensors.insert(name.to_string(), entry);
    }
    write_synced(&dir.join(INDEX), serde_json::to_string_pretty(&index)?.as_bytes())
}

/// Reads and checks `dir/index.json` (format and version).
pub fn read_index(dir: &Path) -> Result<Index> {
    let index_path = dir.join(INDEX);
    let text = fs::read_to_string(&index_path)
        .with_context(|| format!("checkpoint is missing `{}`", index_path.display()))?;
    let index: Index = serde_json::from_str(&text)
        .with_context(|| format!("`{}` is not a valid checkpoint index", index_path.display()))?;
    if index.format != FORMAT || index.version != VERSION {
        bail!(
            "`{}` has format `{}` version {}, expected `{FORMAT}` version {VERSION}",
            index_path.display(),
            index.format,
            index.version
        );
    }
    Ok(index)
}

/// Load every tensor of `iter_dir/<part>` (part = "model" or "optimizer") as global tensors,
/// whatever TP layout wrote them, with their partitioning. Shards are mapped, not read into
/// memory, after their size and CRC-32C are checked against the index.
pub fn load_tensors(iter_dir: &Path, part: &str) -> Result<BTreeMap<String, (Tensor, Partition)>> {
    load_tensors_where(iter_dir, part, &|_| true)
}

/// [`load_tensors`] for the tensors whose name passes `want` only: a shard file is opened
/// (and checksummed) only when it holds one of them, so a pipeline stage reads only the
/// shards of its own layers.
pub fn load_tensors_where(
    iter_dir: &Path,
    part: &str,
    want: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, (Tensor, Partition)>> {
    let dir = iter_dir.join(part);
    let index_path = dir.join(INDEX);
    let index = read_index(&dir)?;
    let mut files: BTreeMap<String, MappedSafetensors> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (name, entry) in index.tensors.into_iter().filter(|(n, _)| want(n)) {
        let mut shards = Vec::new();
        for file in &entry.shards {
            if !files.contains_key(file) {
                let path = dir.join(file);
                let info = index.files.get(file).ok_or_else(|| {
                    anyhow!("`{}` lists shard `{file}` without its checksum", index_path.display())
                })?;
                files.insert(file.clone(), open_shard(&path, info)?);
            }
            let shard = &files[file];
            if shard.entry(&name).is_none() {
                bail!(
                    "shard `{}` lacks tensor `{name}` listed in the index",
                    dir.join(file).display()
                );
            }
            // Copied out of the map, whose pages are dropped at once: only tensors stay resident.
            shards.push(shard.tensor(&name)?);
            shard.release(&name);
        }
        let global = assemble(&shards, entry.partition)
            .with_context(|| format!("cannot assemble tensor `{name}` from `{}`", dir.display()))?;
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

/// Whether `dir` is a finished checkpoint (`train_state.json` is written last).
pub fn is_complete(dir: &Path) -> bool {
    dir.join("train_state.json").is_file() && dir.join("model").join(INDEX).is_file()
}

fn complete_iterations(save: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(save) else { return Ok(out) };
    for e in entries {
        let e = e?;
        if let Some(n) = iteration_of(&e.path()) {
            if is_complete(&e.path()) {
                out.push((n, e.path()));
            }
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// Which checkpoints a save leaves besides the new one: the `most_recent_k` newest (−1 keeps
/// all), and with `retain_interval` (Megatron's `save_retain_interval`) every checkpoint whose
/// iteration is a multiple of it, while the others then go as soon as a newer one is
/// committed (unless `most_recent_k` keeps more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub most_recent_k: i64,
    pub retain_interval: Option<u64>,
}

impl From<i64> for Retention {
    fn from(most_recent_k: i64) -> Self {
        Retention { most_recent_k, retain_interval: None }
    }
}

impl Retention {
    /// How many of the newest checkpoints are kept whatever their iteration; None: all.
    fn newest(&self) -> Option<usize> {
        match (self.most_recent_k, self.retain_interval) {
            (k, _) if k > 0 => Some(k as usize),
            (_, Some(_)) => Some(1),
            _ => None,
        }
    }

    fn retains(&self, iteration: u64) -> bool {
        self.retain_interval.is_some_and(|every| every > 0 && iteration.is_multiple_of(every))
    }
}

/// Prune complete checkpoints as `r` says, always keeping `keep` (the one just saved, which
/// the tracker names — it may be older than a leftover `iter_*` of an earlier, longer run).
pub fn prune_old(save: &Path, r: Retention, keep: u64) -> Result<()> {
    let Some(k) = r.newest() else { return Ok(()) };
    let all = complete_iterations(save)?;
    let older = all.len().saturating_sub(k.max(1));
    for (n, dir) in &all[..older] {
        if *n != keep && !r.retains(*n) {
            fs::remove_dir_all(dir).with_context(|| format!("cannot prune `{}`", dir.display()))?;
        }
    }
    Ok(())
}
