//! Megatron Bridge's `profiling.*`, made to take effect in the training loop.
//!
//! **Window.** Steps whose 0-based index `s` (iterations finished before the step) lies in
//! `[profile_step_start, profile_step_end)` — the log's iterations `start + 1 ..= end` —
//! exactly where Megatron Bridge starts nsys (`iteration == start` before the step) and stops it
//! (`iteration == end` after the step). A run resumed inside the window profiles its remaining
//! steps; one that ends inside it closes the window early (`"complete": false`).
//!
//! **Ranks.** The profilers run on `profile_ranks` (empty = every rank); the memory report
//! only on ranks listed there (empty = none): Megatron Bridge's two membership checks.
//!
//! * `use_nsys_profiler` (CUDA builds): `cuProfilerStart` before the window's first step and
//!   `cuProfilerStop` after its last, for `nsys profile --capture-range=cudaProfilerApi`, and
//!   NVTX ranges inside it: `iteration N` > `forward-backward` / `grad-reduce-and-clip` /
//!   `optimizer` > `layer i forward` (backward runs in candle's autograd, with no per-layer
//!   hook). NVTX goes through a library loaded at run time ([`crate::ops::nvtx`]); without one
//!   it says so once and training goes on. `nvtx_ranges` emits the same ranges on every step.
//! * `use_pytorch_profiler`: there is no PyTorch here; mbridge writes a Chrome trace of the same
//!   ranges ([`trace`]) to `<base>/torch_profile/rank-<rank>.json`, where `<base>` is the parent
//!   of `logger.tensorboard_dir` as in Megatron Bridge (`{tensorboard_dir}/../torch_profile`),
//!   else the parent of `checkpoint.save`, else the working directory. Plain JSON, not `.gz`.
//!   Traced ranges synchronize the device before they close, so GPU durations are real (and
//!   profiled steps a little slower).
//! * `record_memory_history`: a JSON memory report at the end of the window ([`memory`]), at
//!   `memory_snapshot_path` with `_<rank>` inserted — not PyTorch's pickle snapshot. Its
//!   timeline stands in for the snapshot's allocation trace: the memory in use where every
//!   range above (and each micro-batch's forward and backward, each written-out layer
//!   backward) opens and closes, and where the step held the most.
//! * `record_shapes` has no effect (no per-operator ranges); a run that sets it is told so.

pub mod memory;
mod range;
pub mod trace;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::json;

use crate::config::ConfigContainer;
use memory::{MemorySample, TensorEntry, WindowInfo};
use range::Active;
pub use range::Range;
use trace::TraceEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowState {
    Before,
    Open,
    Done,
}

/// One rank's profiling of a training run: the trainer calls [`Profiler::step_begin`] and
/// [`Profiler::step_end`] around every step and [`Profiler::finish`] when training ends.
pub struct Profiler {
    rank: usize,
    device: Device,
    window: WindowInfo,
    /// CUDA profiler start/stop and NVTX ranges inside the window.
    nsys: bool,
    /// NVTX ranges on every step (`nvtx_ranges`).
    nvtx_always: bool,
    trace_path: Option<PathBuf>,
    memory_path: Option<PathBuf>,
    state: WindowState,
    origin: Instant,
    events: Vec<TraceEvent>,
    samples: Vec<MemorySample>,
    /// The open `iteration N` range and its iteration, between step_begin and step_end.
    step: Option<(u64, bool, Option<Range>)>,
    last_iteration: Option<u64>,
}

/// `<base>/torch_profile`, see the module docs.
pub fn trace_dir(cfg: &ConfigContainer) -> PathBuf {
    let base = cfg
        .logger
        .tensorboard_dir
        .as_deref()
        .or(cfg.checkpoint.save.as_deref())
        .and_then(|d| Path::new(d).parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    base.join("torch_profile")
}

fn create_parent(path: &Path, key: &str) -> Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir).with_context(|| {
            format!("cannot create `{}` for {key} output (check `{key}`)", dir.display())
        }),
        None => Ok(()),
    }
}

impl Profiler {
    /// The profiling of global rank `rank` training on `device`, as `cfg.profiling` asks.
    /// Output folders are created now, so a bad path fails before the first step.
    pub fn new(cfg: &ConfigContainer, rank: usize, device: &Device) -> Result<Self> {
        let p = &cfg.profiling;
        let profiled = p.profile_ranks.is_empty() || p.profile_ranks.contains(&rank);
        let nsys = p.use_nsys_profiler && profiled;
        if nsys && !device.is_cuda() {
            bail!(
                "`profiling.use_nsys_profiler` needs a CUDA device, but rank {rank} trains on \
                 the CPU (pass `--device cuda:N`, or use `profiling.use_pytorch_profiler`)"
            );
        }
        let nvtx_always = p.nvtx_ranges && profiled;
        let trace_path = (p.use_pytorch_profiler && profiled)
            .then(|| trace_dir(cfg).join(format!("rank-{rank}.json")));
        let memory_path = (p.record_memory_history && p.profile_ranks.contains(&rank))
            .then(|| memory::report_path(&p.memory_snapshot_path, rank));
        if let Some(t) = &trace_path {
            create_parent(t, "profiling.use_pytorch_profiler (logger.tensorboard_dir)")?;
        }
        if let Some(m) = &memory_path {
            create_parent(m, "profiling.memory_snapshot_path")?;
        }
        let window = WindowInfo {
            profile_step_start: p.profile_step_start,
            profile_step_end: p.profile_step_end,
        };
        let on = nsys || nvtx_always || trace_path.is_some() || memory_path.is_some();
        if nsys || nvtx_always {
            crate::ops::nvtx::available();
        }
        if on && p.record_shapes {
            tracing::warn!(
                "`profiling.record_shapes` has no effect in mbridge: its ranges are per step, \
                 phase and layer, not per operator"
            );
        }
        if on && window.profile_step_start == window.profile_step_end {
            tracing::warn!(
                "profiling window is empty (profile_step_start = profile_step_end = {}): \
                 nothing will be profiled",
                window.profile_step_start
            );
        }
        if let Some(t) = &trace_path {
            tracing::info!(
                "rank {rank}: Chrome trace of iterations {}..={} will be written to {}",
                window.profile_step_start + 1,
                window.profile_step_end,
                t.display()
            );
        }
        if let Some(m) = &memory_path {
            tracing::info!(
                "rank {rank}: memory report (JSON, not PyTorch's pickle snapshot) of iterations \
                 {}..={} will be written to {}",
                window.profile_step_start + 1,
                window.profile_step_end,
                m.display()
            );
        }
        Ok(Self {
            rank,
            device: device.clone(),
            window,
            nsys,
            nvtx_always,
            trace_path,
            memory_path,
            state: WindowState::Before,
            origin: Instant::now(),
            events: Vec::new(),
            samples: Vec::new(),
            step: None,
            last_iteration: None,
        })
    }

    /// Whether anything here depends on reaching the window (`nvtx_ranges` does not).
    fn windowed(&self) -> bool {
        self.nsys || self.trace_path.is_some() || self.memory_path.is_some()
    }

    /// Before the step with 0-based index `step` (`TrainState::step` before it runs).
    pub fn step_begin(&mut self, step: u64) -> Result<()> {
        let iteration = step + 1;
        let (start, end) =
            (self.window.profile_step_start as u64, self.window.profile_step_end as u64);
        let in_window = self.state != WindowState::Done && (start..end).contains(&step);
        if in_window && self.state == WindowState::Before {
            self.state = WindowState::Open;
            if self.nsys {
                cuda_profiler(&self.device, true)?;
                tracing::info!(
                    "rank {}: CUDA profiler started at iteration {iteration}",
                    self.rank
                );
            }
        }
        let nvtx = self.nvtx_always || (self.nsys && in_window);
        let events =
            (in_window && self.trace_path.is_some()).then(|| std::mem::take(&mut self.events));
        let memory = (in_window && self.memory_path.is_some()).then(Vec::new);
        let range = (nvtx || events.is_some() || memory.is_some()).then(|| {
            range::install(Active {
                nvtx,
                events,
                origin: self.origin,
                device: self.device.clone(),
                iteration,
                memory,
            });
            Range::step(iteration)
        });
        self.step = Some((iteration, in_window, range));
        Ok(())
    }

    /// After the step opened by [`Self::step_begin`]; `tensors` lists the run's live tensors
    /// (called only when the window closes with a memory report due).
    pub fn step_end(&mut self, tensors: impl FnOnce() -> Vec<TensorEntry>) -> Result<()> {
        let Some((iteration, in_window, range)) = self.step.take() else {
            bail!("profiler: step_end without step_begin");
        };
        drop(range);
        let mut timeline = Vec::new();
        if let Some(a) = range::uninstall() {
            if let Some(ev) = a.events {
                self.events = ev;
            }
            timeline = a.memory.unwrap_or_default();
        }
        self.last_iteration = Some(iteration);
        if !in_window {
            return Ok(());
        }
        if self.memory_path.is_some() {
            self.samples.push(memory::sample(&self.device, iteration, timeline));
        }
        if iteration == self.window.profile_step_end as u64 {
            self.close(true, tensors)?;
        }
        Ok(())
    }

    /// When training ends: closes a window the run ended inside, and says so when the run
    /// never reached it.
    pub fn finish(&mut self, tensors: impl FnOnce() -> Vec<TensorEntry>) -> Result<()> {
        match self.state {
            WindowState::Open => {
                tracing::warn!(
                    "rank {}: training ended at iteration {} inside the profiling window \
                     (iterations {}..={}): writing what was profiled",
                    self.rank,
                    self.last_iteration.unwrap_or(0),
                    self.window.profile_step_start + 1,
                    self.window.profile_step_end
                );
                self.close(false, tensors)
            }
            WindowState::Before if self.windowed() => {
                tracing::warn!(
                    "rank {}: this run did not reach the profiling window (iterations {}..={}){}: \
                     nothing was profiled",
                    self.rank,
                    self.window.profile_step_start + 1,
                    self.window.profile_step_end,
                    match self.last_iteration {
                        Some(i) => format!(" (the last iteration run was {i})"),
                        None => " (no iteration ran)".to_string(),
                    }
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn close(&mut self, complete: bool, tensors: impl FnOnce() -> Vec<TensorEntry>) -> Result<()> {
        self.state = WindowState::Done;
        let last = self.last_iteration.unwrap_or(0);
        if self.nsys {
            cuda_profiler(&self.device, false)?;
            tracing::info!("rank {}: CUDA profiler stopped after iteration {last}", self.rank);
        }
        if let Some(path) = &self.trace_path {
            let other = json!({
                "producer": "mbridge",
                "version": env!("CARGO_PKG_VERSION"),
                "rank": self.rank,
                "profile_step_start": self.window.profile_step_start,
                "profile_step_end": self.window.profile_step_end,
                "complete": complete,
                "note": "host wall-clock ranges; on a GPU each range synchronizes the device \
                         before it closes",
            });
            let doc = trace::document(self.rank, &self.events, other);
            trace::write(path, &doc)?;
            tracing::info!(
                "rank {}: Chrome trace of iterations {}..={last} written to {} (open it in \
                 chrome://tracing or ui.perfetto.dev)",
                self.rank,
                self.window.profile_step_start + 1,
                path.display()
            );
            self.events.clear();
        }
        if let Some(path) = &self.memory_path {
            let doc = memory::report(
                self.rank,
                &self.device,
                self.window,
                &self.samples,
                &tensors(),
                complete,
            );
            memory::write(path, &doc)?;
            tracing::info!(
                "rank {}: memory report written to {} (mbridge's JSON report, not PyTorch's \
                 pickle snapshot)",
                self.rank,
                path.display()
            );
        }
        Ok(())
    }
}

/// `cuProfilerStart`/`cuProfilerStop` on `device`'s context. The device is synchronized
/// first, so the capture range holds exactly the window's kernels (none of the step before,
/// all of the last one).
#[cfg(feature = "cuda")]
fn cuda_profiler(device: &Device, on: bool) -> Result<()> {
    let Device::Cuda(dev) = device else {
        bail!("the CUDA profiler needs a CUDA device");
    };
    device.synchronize()?;
    // The profiler API acts on the calling thread's current context.
    dev.cuda_stream().context().bind_to_thread().context("cannot bind the CUDA context")?;
    let r = if on { cudarc::driver::profiler_start() } else { cudarc::driver::profiler_stop() };
    r.with_context(|| format!("cuProfiler{} failed", if on { "Start" } else { "Stop" }))
}

#[cfg(not(feature = "cuda"))]
fn cuda_profiler(_device: &Device, _on: bool) -> Result<()> {
    bail!("`profiling.use_nsys_profiler` needs a CUDA build of mbridge (`--features cuda`)")
}
