//! Writing a checkpoint: atomically in the caller's thread ([`save_checkpoint`]) or in a
//! background thread from a detached snapshot ([`AsyncSaver`]).
//!
//! Order on disk, so that a crash (even `kill -9`) at any instant leaves only complete
//! checkpoints behind: shards and JSON into `.iter_N.tmp-<pid>/` (each fsynced, `train_state.json`
//! last) → rename to `iter_N/` → fsync the run directory → `latest_train_state.json` →
//! tracker → prune to `most_recent_k`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use rayon::prelude::*;

use super::format::{
    iter_dir_name, prune_old, write_tensor_dir, CheckpointWrite, TensorSet, LATEST_STATE, TRACKER,
};
use super::state::TrainState;

/// Write a checkpoint atomically into `save/iter_NNNNNNN`, move the tracker, then prune to the
/// `most_recent_k` newest (−1 keeps all; the new checkpoint is never pruned). Returns the
/// iteration directory. On error the temporary directory is removed and nothing that was on
/// disk before is touched.
pub fn save_checkpoint(save: &Path, w: &CheckpointWrite, most_recent_k: i64) -> Result<PathBuf> {
    save_checkpoint_with(save, w, most_recent_k, &|dir| write_tensor_dir(dir, w.model))
}

/// [`save_checkpoint`] with the `model/` directory written by `write_model` instead of from
/// `w.model` (import-hf streams shards straight from the mapped HF files through
/// [`super::format::write_shard_files`]).
pub fn save_checkpoint_with(
    save: &Path,
    w: &CheckpointWrite,
    most_recent_k: i64,
    write_model: &(dyn Fn(&Path) -> Result<()> + Sync),
) -> Result<PathBuf> {
    fs::create_dir_all(save).with_context(|| format!("cannot create `{}`", save.display()))?;
    remove_stale_temps(save)?;
    let name = iter_dir_name(w.iteration);
    let tmp = save.join(format!(".{name}.tmp-{}", std::process::id()));
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?;
    if let Err(e) = write_contents(&tmp, w, write_model) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot save checkpoint `{}`", save.join(&name).display())));
    }
    let final_dir = save.join(&name);
    if final_dir.exists() {
        // Same iteration saved again: swap; a crash between the renames leaves `.old-`, which
        // the next save restores (see `remove_stale_temps`).
        let old = save.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(&final_dir, &old)?;
        fs::rename(&tmp, &final_dir)?;
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&tmp, &final_dir)
            .with_context(|| format!("cannot move checkpoint into `{}`", final_dir.display()))?;
    }
    sync_dir(save)?;
    let state = serde_json::to_string_pretty(w.train_state)?;
    replace_file(&save.join(LATEST_STATE), state.as_bytes())?;
    replace_file(&save.join(TRACKER), w.iteration.to_string().as_bytes())?;
    if most_recent_k > 0 {
        prune_old(save, most_recent_k as usize, w.iteration)?;
    }
    Ok(final_dir)
}

fn write_contents(
    tmp: &Path,
    w: &CheckpointWrite,
    write_model: &(dyn Fn(&Path) -> Result<()> + Sync),
) -> Result<()> {
    // Model and optimizer stream to disk concurrently (each shard file also has its writer).
    let (model, optimizer) = rayon::join(
        || write_model(&tmp.join("model")),
        || match w.optimizer {
            Some(opt) => write_tensor_dir(&tmp.join("optimizer"), opt),
            None => Ok(()),
        },
    );
    model?;
    optimizer?;
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
    let state = serde_json::to_string_pretty(w.train_state)?;
    // train_state.json is written last inside the directory: its presence marks completeness.
    write_synced(&tmp.join("train_state.json"), state.as_bytes())?;
    sync_dir(&tmp.join("model"))?;
    sync_dir(tmp)
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
    handle: JoinHandle<Result<PathBuf>>,
}

/// Writes at most one checkpoint at a time in a background thread (`checkpoint.async_save`).
/// A failed save surfaces at the next [`poll`](Self::poll), [`submit`](Self::submit) or
/// [`wait`](Self::wait) as an error naming the checkpoint directory. Dropping the saver waits
/// for the pending save, so a checkpoint is never abandoned half written by an early return.
#[derive(Default)]
pub struct AsyncSaver {
    pending: Option<Pending>,
}

impl AsyncSaver {
    /// An idle saver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a save is still being written.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Start writing `ckpt` into `save`. A save still in flight is waited for first and
    /// returned (or its error).
    ///
    /// The model tensors of `ckpt` may share storage with live variables (no copy is made in
    /// the caller's thread, so the training loop barely stalls): the writer thread copies them
    /// first, and the caller must call [`wait_snapshot`](Self::wait_snapshot) before it changes
    /// those variables (the optimizer step). Optimizer tensors must be immutable snapshots.
    pub fn submit(
        &mut self,
        save: &Path,
        ckpt: OwnedCheckpoint,
        most_recent_k: i64,
    ) -> Result<Option<SavedCheckpoint>> {
        let previous = self.wait()?;
        let iteration = ckpt.iteration;
        let dir = save.join(iter_dir_name(iteration));
        let save = save.to_path_buf();
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
                save_checkpoint(&save, &ckpt.as_write(), most_recent_k)
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

    /// Block until the pending save (if any) is complete.
    pub fn wait(&mut self) -> Result<Option<SavedCheckpoint>> {
        let Some(p) = self.pending.take() else { return Ok(None) };
        let result = p
            .handle
            .join()
            .map_err(|_| anyhow!("the checkpoint writer thread panicked"))
            .and_then(|r| r);
        let dir = result.with_context(|| {
            format!("asynchronous save of checkpoint `{}` failed", p.dir.display())
        })?;
        Ok(Some(SavedCheckpoint {
            iteration: p.iteration,
            dir,
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
