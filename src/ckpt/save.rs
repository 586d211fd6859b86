//! Writing a checkpoint: every rank writes the shards it owns, in the caller's thread
//! ([`save_checkpoint_on`]) or in a background thread from a detached snapshot
//! ([`AsyncSaver`]); rank 0 indexes and commits them.
//!
//! Order on disk, so that a crash (even `kill -9` of any rank) at any instant leaves only
//! complete checkpoints behind:
//! 1. rank 0 clears what crashed saves left and creates `.iter_N.tmp-<pid of rank 0>/`; it
//!    sends the name to every rank (or its error, so nobody waits for a directory that will
//!    never exist);
//! 2. every rank writes and fsyncs its own shard files there; rank 0 also the JSON documents,
//!    `run_config.toml` and the tokenizer files;
//! 3. every rank reports its files' sizes and CRC-32Cs (or its error) to rank 0: rank 0 goes
//!    on only when every rank's files are on disk, so this is the barrier;
//! 4. rank 0 writes `model/index.json`, `optimizer/index.json` and `train_state.json` (last
//!    inside the directory), fsyncs the directories, renames the directory to `iter_N/`,
//!    fsyncs the run directory, writes `latest_train_state.json`, then the tracker, then
//!    prunes as `checkpoint.most_recent_k` and `save_retain_interval` say;
//! 5. rank 0 sends the outcome to every rank, so all return once the tracker has moved, and
//!    all fail when any rank failed.
//!
//! The messages travel on a communicator of their own (`ProcessGroups::ckpt`): an
//! asynchronous save exchanges them from its writer thread while the training thread runs its
//! collectives on the other groups.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use super::exchange::{from_rank0, to_rank0};
use super::format::{
    iter_dir_name, prune_old, shard_files, write_index, write_shards, CheckpointWrite, Retention,
    TensorSet, WrittenShard, INDEX, LATEST_STATE, TRACKER,
};
use super::state::TrainState;
use crate::parallel::comm::Communicator;

/// The tensor directories of a checkpoint.
const PARTS: [&str; 2] = ["model", "optimizer"];

/// Write a checkpoint of one process (all of `w.model` and `w.optimizer`) atomically into
/// `save/iter_NNNNNNN`, move the tracker, then prune as `retention` says (the new checkpoint is
/// never pruned). Returns the iteration directory. On error the
/// temporary directory is removed and nothing that was on disk before is touched.
pub fn save_checkpoint(
    save: &Path,
    w: &CheckpointWrite,
    retention: impl Into<Retention>,
) -> Result<PathBuf> {
    Ok(save_checkpoint_on(save, w, retention, None)?.dir)
}

/// What one rank did in a checkpoint save.
#[derive(Debug, Clone)]
pub struct RankSave {
    /// The checkpoint directory, `save/iter_NNNNNNN` (on every rank).
    pub dir: PathBuf,
    /// Whether this rank committed the checkpoint (rank 0).
    pub committed: bool,
    /// The files this rank wrote, relative to `dir` (`model/shard_tp01_pp00.safetensors`);
    /// rank 0's list also has the index, JSON, config and tokenizer files it wrote.
    pub written: Vec<String>,
    /// Bytes of this rank's shard files.
    pub bytes: u64,
}

/// Every rank of `world` calls this with the shards it owns in `w.model` / `w.optimizer`
/// (none for a rank that owns none); rank 0's `w` also supplies the JSON documents, train
/// state, run config and tokenizer files, which the other ranks' `w` may carry but are not
/// written from. Without `world` (or with one rank) this process writes everything. Returns
/// once the checkpoint is committed (tracker moved) or has failed on every rank; on failure
/// the temporary directory is removed and nothing that was on disk before is touched.
pub fn save_checkpoint_on(
    save: &Path,
    w: &CheckpointWrite,
    retention: impl Into<Retention>,
    world: Option<&dyn Communicator>,
) -> Result<RankSave> {
    let retention = retention.into();
    let world = world.filter(|c| c.size() > 1);
    let rank = world.map_or(0, |c| c.rank());
    let final_dir = save.join(iter_dir_name(w.iteration));
    let context = || format!("cannot save checkpoint `{}`", final_dir.display());
    let t0 = Instant::now();
    let prepared = (rank == 0).then(|| prepare(save, w.iteration));
    let tmp = save.join(from_rank0(world, prepared).with_context(context)?);
    let written = write_rank(&tmp, w, rank);
    let report = written.as_ref().map(Vec::clone).map_err(|e| format!("{e:#}"));
    // The report of this rank's files is the barrier before rank 0 indexes and commits.
    let everyone = to_rank0(world, report).with_context(context)?;
    let outcome = everyone.map(|all| {
        let result = all.and_then(|all| commit(save, &tmp, &final_dir, w, &all, retention));
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    });
    // A rank that failed still takes rank 0's outcome, so no message is left unread.
    let agreed = from_rank0(world, outcome);
    let mine = written.with_context(context)?;
    agreed.with_context(context)?;
    let mut listed: Vec<String> = mine.iter().map(|f| format!("{}/{}", f.part, f.file)).collect();
    if rank == 0 {
        listed.extend(common_files(w));
        for part in PARTS {
            if final_dir.join(part).join(INDEX).is_file() {
                listed.push(format!("{part}/{INDEX}"));
            }
        }
        listed.push("train_state.json".into());
    }
    let bytes = mine.iter().map(|f| f.info.bytes).sum();
    tracing::debug!(
        "checkpoint `{}`: rank {rank} wrote {} shard files ({bytes} bytes) in {:.3} s",
        final_dir.display(),
        mine.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(RankSave { dir: final_dir, committed: rank == 0, written: listed, bytes })
}

/// [`save_checkpoint`] with the `model/` directory (shards and index) written by
/// `write_model` instead of from `w.model` (import-hf streams shards straight from the mapped
/// HF files through [`super::format::write_shard_files`]).
pub fn save_checkpoint_with(
    save: &Path,
    w: &CheckpointWrite,
    retention: impl Into<Retention>,
    write_model: &(dyn Fn(&Path) -> Result<()> + Sync),
) -> Result<PathBuf> {
    let final_dir = save.join(iter_dir_name(w.iteration));
    let context = || format!("cannot save checkpoint `{}`", final_dir.display());
    let tmp = save.join(prepare(save, w.iteration).with_context(context)?);
    let result = (|| {
        let (model, optimizer) = rayon::join(
            || write_model(&tmp.join("model")),
            || write_part(&tmp, "optimizer", 0, w.optimizer.unwrap_or_default()),
        );
        model?;
        let written = optimizer?;
        write_common(&tmp, w)?;
        commit(save, &tmp, &final_dir, w, &written, retention.into())
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.with_context(context)?;
    Ok(final_dir)
}

/// Rank 0, step 1: clear leftovers of crashed saves, create the temporary directory; returns
/// its name.
fn prepare(save: &Path, iteration: u64) -> Result<String> {
    fs::create_dir_all(save).with_context(|| format!("cannot create `{}`", save.display()))?;
    remove_stale_temps(save)?;
    let name = format!(".{}.tmp-{}", iter_dir_name(iteration), std::process::id());
    let tmp = save.join(&name);
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?;
    Ok(name)
}

/// Step 2: this rank's shard files (model and optimizer at once), and on rank 0 the small
/// files.
fn write_rank(tmp: &Path, w: &CheckpointWrite, rank: usize) -> Result<Vec<WrittenShard>> {
    let (model, optimizer) = rayon::join(
        || write_part(tmp, "model", rank, w.model),
        || write_part(tmp, "optimizer", rank, w.optimizer.unwrap_or_default()),
    );
    let mut written = model?;
    written.extend(optimizer?);
    if rank == 0 {
        write_common(tmp, w)?;
    }
    Ok(written)
}

fn write_part(
    tmp: &Path,
    part: &str,
    rank: usize,
    sets: &[TensorSet],
) -> Result<Vec<WrittenShard>> {
    write_shards(&tmp.join(part), part, rank, shard_files(sets))
}

/// The JSON documents, `run_config.toml` and the tokenizer files (not `train_state.json`,
/// which marks a finished directory and is written by [`commit`]).
fn write_common(tmp: &Path, w: &CheckpointWrite) -> Result<()> {
    for (name, doc) in &w.json {
        let path = tmp.join(format!("{name}.json"));
        write_synced(&path, serde_json::to_string_pretty(doc)?.as_bytes())?;
    }
    write_synced(&tmp.join("run_config.toml"), w.run_config_toml.as_bytes())?;
    if !w.tokenizer_files.is_empty() {
        let dir = tmp.join("tokenizer");
        fs::create_dir_all(&dir)?;
        for f in w.tokenizer_files {
            let name = f
                .file_name()
                .ok_or_else(|| anyhow!("tokenizer file `{}` has no file name", f.display()))?;
            let bytes = fs::read(f)
                .with_context(|| format!("cannot read tokenizer file `{}`", f.display()))?;
            write_synced(&dir.join(name), &bytes)?;
        }
        sync_dir(&dir)?;
    }
    Ok(())
}

/// The files [`write_common`] writes, relative to the checkpoint directory.
fn common_files(w: &CheckpointWrite) -> Vec<String> {
    let mut out: Vec<String> = w.json.iter().map(|(n, _)| format!("{n}.json")).collect();
    out.push("run_config.toml".into());
    out.extend(
        w.tokenizer_files
            .iter()
            .filter_map(|f| f.file_name())
            .map(|n| format!("tokenizer/{}", n.to_string_lossy())),
    );
    out
}

/// Rank 0, step 4: index every rank's shards, finish the directory, rename it, move the
/// tracker, prune.
fn commit(
    save: &Path,
    tmp: &Path,
    final_dir: &Path,
    w: &CheckpointWrite,
    written: &[WrittenShard],
    retention: Retention,
) -> Result<()> {
    for part in PARTS {
        let dir = tmp.join(part);
        let shards: Vec<&WrittenShard> = written.iter().filter(|s| s.part == part).collect();
        if !shards.is_empty() {
            write_index(&dir, &shards)?;
        }
        // Other ranks created entries here: fsync the directory once all of them exist.
        if dir.is_dir() {
            sync_dir(&dir)?;
        }
    }
    if !tmp.join("model").join(INDEX).is_file() {
        bail!("no rank wrote model shards into `{}`", tmp.display());
    }
    let state = serde_json::to_string_pretty(w.train_state)?;
    // train_state.json is written last inside the directory: its presence marks completeness.
    write_synced(&tmp.join("train_state.json"), state.as_bytes())?;
    sync_dir(tmp)?;
    let name = iter_dir_name(w.iteration);
    if final_dir.exists() {
        // Same iteration saved again: swap; a crash between the renames leaves `.old-`, which
        // the next save restores (see `remove_stale_temps`).
        let old = save.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(final_dir, &old)?;
        fs::rename(tmp, final_dir)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(tmp, final_dir)
            .with_context(|| format!("cannot move checkpoint into `{}`", final_dir.display()))?;
    }
    sync_dir(save)?;
    replace_file(&save.join(LATEST_STATE), state.as_bytes())?;
    replace_file(&save.join(TRACKER), w.iteration.to_string().as_bytes())?;
    prune_old(save, retention, w.iteration)?;
    Ok(())
}

/// A checkpoint that owns its (detached) tensors, so it can be written while training goes on.
#[derive(Debug, Clone)]
pub struct OwnedCheckpoint {
    pub iteration: u64,
    pub model: Vec<TensorSet>,
    pub optimizer: Option<Vec<TensorSet>>,
    pub json: Vec<(String, serde_json::Value)>,
    pub train_state: TrainState,
    pub run_config_toml: String,
    pub tokenizer_files: Vec<PathBuf>,
}

impl OwnedCheckpoint {
    /// The borrowed form [`save_checkpoint`] takes.
    pub fn as_write(&self) -> CheckpointWrite<'_> {
        CheckpointWrite {
            iteration: self.iteration,
            model: &self.model,
            optimizer: self.optimizer.as_deref(),
            json: self.json.clone(),
            train_state: &self.train_state,
            run_config_toml: &self.run_config_toml,
            tokenizer_files: &self.tokenizer_files,
        }
    }
}

/// A finished background save.
#[derive(Debug, Clone)]
pub struct SavedCheckpoint {
    pub iteration: u64,
    pub dir: PathBuf,
    /// Seconds from submission until the directory and tracker were final.
    pub seconds: f64,
}

struct Pending {
    iteration: u64,
    dir: PathBuf,
    started: Instant,
    /// Signalled (or dropped) once the writer holds its own copy of the model tensors.
    copied: Option<mpsc::Receiver<()>>,
    handle: JoinHandle<Result<RankSave>>,
}

/// Writes at most one checkpoint at a time in a background thread (`checkpoint.async_save`).
/// A failed save surfaces at the next [`poll`](Self::poll), [`submit`](Self::submit) or
/// [`wait`](Self::wait) as an error naming the checkpoint directory. Dropping the saver waits
/// for the pending save, so a checkpoint is never abandoned half written by an early return.
///
/// With several ranks every rank submits each save ([`save_checkpoint_on`]'s rules): each
/// rank's writer thread writes its own shards, and the writer threads agree among themselves
/// over the checkpoint communicator, so rank 0's thread commits the checkpoint as soon as
/// every rank's files are on disk, whatever the training threads are doing (an early return
/// on one rank still lets the others' save complete).
#[derive(Default)]
pub struct AsyncSaver {
    pending: Option<Pending>,
    /// The checkpoint communicator (all ranks) when the run has several.
    world: Option<Arc<dyn Communicator>>,
}

impl AsyncSaver {
    /// An idle saver for a single-process run.
    pub fn new() -> Self {
        Self::default()
    }

    /// An idle saver for one rank of `world`, a communicator used for nothing but
    /// checkpoints (its messages are exchanged from the writer thread).
    pub fn with_world(world: Option<Arc<dyn Communicator>>) -> Self {
        Self { pending: None, world }
    }

    /// Whether a save is still being written.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Start writing `ckpt` (this rank's shards) into `save`. A save still in flight is waited
    /// for first and returned (or its error).
    ///
    /// The model tensors of `ckpt` may share storage with live variables (no copy is made in
    /// the caller's thread, so the training loop barely stalls): the writer thread copies them
    /// first, and the caller must call [`wait_snapshot`](Self::wait_snapshot) before it changes
    /// those variables (the optimizer step). Optimizer tensors must be immutable snapshots.
    pub fn submit(
        &mut self,
        save: &Path,
        ckpt: OwnedCheckpoint,
        retention: impl Into<Retention>,
    ) -> Result<Option<SavedCheckpoint>> {
        let retention = retention.into();
        let previous = self.wait()?;
        let iteration = ckpt.iteration;
        let dir = save.join(iter_dir_name(iteration));
        let save = save.to_path_buf();
        let world = self.world.clone();
        let (copied_tx, copied) = mpsc::channel();
        let mut ckpt = ckpt;
        let handle = std::thread::Builder::new()
            .name(format!("ckpt-save-{iteration}"))
            .spawn(move || {
                // Copied on all cores: the training loop may be waiting for this snapshot.
                for set in &mut ckpt.model {
                    set.params.par_iter_mut().try_for_each(|p| -> Result<()> {
                        p.tensor = p.tensor.copy()?;
                        Ok(())
                    })?;
                }
                let _ = copied_tx.send(());
                save_checkpoint_on(&save, &ckpt.as_write(), retention, world.as_deref())
            })
            .context("cannot start the checkpoint writer thread")?;
        let copied = Some(copied);
        self.pending = Some(Pending { iteration, dir, started: Instant::now(), copied, handle });
        Ok(previous)
    }

    /// Block until the pending save holds its own copy of the model tensors, so the caller
    /// may change them. Returns at once when no save is pending or the copy is done.
    pub fn wait_snapshot(&mut self) {
        if let Some(rx) = self.pending.as_mut().and_then(|p| p.copied.take()) {
            // An error (the writer failed before signalling) surfaces at poll/wait.
            let _ = rx.recv();
        }
    }

    /// The pending save if it has finished (without blocking).
    pub fn poll(&mut self) -> Result<Option<SavedCheckpoint>> {
        match &self.pending {
            Some(p) if p.handle.is_finished() => self.wait(),
            _ => Ok(None),
        }
    }

    /// Block until the pending save (if any) is complete. Returns it on the rank that
    /// committed it (rank 0); other ranks get None once their part is done.
    pub fn wait(&mut self) -> Result<Option<SavedCheckpoint>> {
        let Some(p) = self.pending.take() else { return Ok(None) };
        let result = p
            .handle
            .join()
            .map_err(|_| anyhow!("the checkpoint writer thread panicked"))
            .and_then(|r| r);
        let saved = result.with_context(|| {
            format!("asynchronous save of checkpoint `{}` failed", p.dir.display())
        })?;
        Ok(saved.committed.then(|| SavedCheckpoint {
            iteration: p.iteration,
            dir: saved.dir,
            seconds: p.started.elapsed().as_secs_f64(),
        }))
    }
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::error!("{e:#}");
        }
    }
}

/// Remove what a crashed save left behind. A `.iter_N.old-*` whose `iter_N` is missing (a crash
/// between the two renames of a re-save) is a complete checkpoint: move it back instead.
fn remove_stale_temps(save: &Path) -> Result<()> {
    for e in fs::read_dir(save).with_context(|| format!("cannot list `{}`", save.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix('.') else { continue };
        if !rest.starts_with("iter_") {
            continue;
        }
        if let Some((iter, _)) = rest.split_once(".old-") {
            let final_dir = save.join(iter);
            if !final_dir.exists() {
                fs::rename(e.path(), &final_dir)?;
                continue;
            }
        } else if !rest.contains(".tmp-") {
            continue;
        }
        fs::remove_dir_all(e.path())
            .with_context(|| format!("cannot remove `{}`", e.path().display()))?;
    }
    Ok(())
}

/// Create `path` with `bytes` and fsync it.
pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot write `{}`", path.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write `{}`", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Replace a file atomically (write a sibling, fsync, rename).
fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).with_context(|| format!("cannot replace `{}`", path.display()))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}
