//! What a run reports: validation/test evaluation, the periodic log line, TensorBoard scalars
//! (tag names of `spec/checkpoint-and-logging.md` §6), `metrics.jsonl`, and the W&B upload hint.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::datasets::sampler_for_split;
use super::log::{perplexity, timestamp, validation_box, LogLine};
use super::loss_scale::LossScaler;
use super::run_records::runtime_report;
use super::trainer::{StepResult, Trainer, Window};
use crate::ckpt::SavedCheckpoint;
use crate::config::logger::LoggerConfig;
use crate::data::sampler::{DataSampler, PretrainingSampler};
use crate::parallel::ReduceOp;

impl Trainer {
    /// Evaluates every validation set and returns the first one's loss (None without
    /// validation data). `at` completes the box's `validation loss at ...`.
    pub(super) fn evaluate_validation(&mut self, at: &str) -> Result<Option<f64>> {
        let mut first = None;
        for set in 0..self.datasets.valid.len() {
            let loss = self.evaluate(Some(set), at)?;
            if set == 0 {
                first = loss;
            }
        }
        Ok(first)
    }

    /// Evaluates the test split over `eval_iters` global batches (None without test data).
    pub(super) fn evaluate_test(&mut self, at: &str) -> Result<Option<f64>> {
        self.evaluate(None, at)
    }

    /// Token-weighted loss of validation set `valid_set` (None: the test split): over
    /// `eval_iters` global batches of `validation.eval_global_batch_size`, or with
    /// `validation.full_validation` over every sample of the set once, in order, the last
    /// global batch padded with samples that carry no loss.
    fn evaluate(&mut self, valid_set: Option<usize>, at: &str) -> Result<Option<f64>> {
        let (ds, suffix) = match valid_set {
            Some(i) => (&self.datasets.valid[i].data, self.datasets.valid[i].suffix.as_str()),
            None => match &self.datasets.test {
                Some(ds) => (ds, ""),
                None => return Ok(None),
            },
        };
        let valid = valid_set.is_some();
        let full = valid && self.cfg.validation.full_validation;
        let egbs = self.d.eval_global_batch_size;
        let embs = self.d.eval_micro_batch_size;
        let dp = self.d.data_parallel_size;
        let mut sampler = if full {
            let whole = PretrainingSampler::new(ds.len(), 0, embs, self.dp_rank(), dp, false, true)
                .context("cannot sample the validation set")?;
            DataSampler::Single(whole)
        } else {
            let consumed = if valid { self.state.consumed_valid_samples as usize } else { 0 };
            if consumed >= ds.len() {
                return Ok(None);
            }
            sampler_for_split(
                &self.cfg,
                &self.d,
                if valid { 1 } else { 2 },
                ds,
                consumed,
                self.dp_rank(),
            )?
        };
        let batches = if full {
            ds.len().div_ceil(egbs)
        } else {
            self.cfg.validation.eval_iters.unwrap_or(0)
        };
        let (mut sum, mut count) = (0.0, 0.0);
        for _ in 0..batches {
            let mut micro = Vec::new();
            for _ in 0..egbs / (embs * dp) {
                let Some(idx) = sampler.next_micro()? else { break };
                micro.push(ds.microbatch(&idx, &self.device)?);
            }
            if !micro.is_empty() {
                // The forward-only schedule: only the last pipeline stage gets losses.
                let (micro, _) = self.context_parallel_share(micro)?;
                let (s, c) = self.pipeline().eval_batch(&micro)?;
                sum += s;
                count += c;
            }
            if valid && !full {
                self.state.consumed_valid_samples += egbs as u64;
            }
        }
        if let Some(g) = &self.groups {
            let t = Tensor::new(&[sum, count], &Device::Cpu)?;
            let t = if g.pp.size() > 1 { g.pp.all_reduce(&t, ReduceOp::Sum)? } else { t };
            let r = g.dp_cp.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?;
            (sum, count) = (r[0], r[1]);
        }
        if count == 0.0 {
            return Ok(None);
        }
        let loss = sum / count;
        let suffix = suffix.to_string();
        self.report_evaluation(valid, &suffix, at, loss)?;
        Ok(Some(loss))
    }

    /// Prints an evaluation's box and writes its loss to the metrics file and (validation
    /// only) TensorBoard, under `lm loss validation<suffix>`.
    fn report_evaluation(&mut self, valid: bool, suffix: &str, at: &str, loss: f64) -> Result<()> {
        if self.reports() {
            println!("{}", validation_box(suffix, at, loss));
        }
        let kind = if valid { "validation" } else { "test" };
        let tag = format!("lm loss {kind}{suffix}");
        self.append_metrics(json!({
            "kind": kind,
            "iteration": self.state.step,
            "consumed_samples": self.state.consumed_train_samples,
            tag.clone(): loss,
            format!("{tag} ppl"): perplexity(loss),
        }))?;
        // An evaluation-only run (`validation.skip_train`) leaves the event files alone, as
        // Megatron's `write_to_tensorboard=not skip_train`.
        let tb = self.tb.as_mut().filter(|_| !self.cfg.validation.skip_train);
        if let (Some(tb), true) = (tb, valid) {
            let samples = self.state.consumed_train_samples as i64;
            tb.add_scalar(&tag, loss as f32, self.state.step as i64)?;
            tb.add_scalar(&format!("{tag} vs samples"), loss as f32, samples)?;
            if self.cfg.logger.log_validation_ppl_to_tensorboard {
                let ppl = perplexity(loss) as f32;
                tb.add_scalar(&format!("{tag} ppl"), ppl, self.state.step as i64)?;
                tb.add_scalar(&format!("{tag} ppl vs samples"), ppl, samples)?;
            }
            tb.flush()?;
        }
        Ok(())
    }

    /// `logger.log_params_norm`: the parameters' norm after `iteration` where a log line or
    /// TensorBoard reports it (a collective: every rank calls this).
    pub(super) fn params_norm_to_report(&self, iteration: u64) -> Result<Option<f64>> {
        let l = &self.cfg.logger;
        let logged = iteration.is_multiple_of(l.log_interval as u64);
        let tensorboard = l.tensorboard_dir.is_some()
            && iteration.is_multiple_of(l.tensorboard_log_interval.max(1) as u64);
        Ok(if l.log_params_norm && (logged || tensorboard) {
            Some(self.params_norm()?)
        } else {
            None
        })
    }

    /// Prints the log line of the iterations in `w` (on the reporting rank), with
    /// `params_norm` when it is logged.
    pub(super) fn log(
        &mut self,
        iteration: u64,
        w: &mut Window,
        flops_per_iter: f64,
        params_norm: Option<f64>,
    ) -> Result<()> {
        let iters = w.iterations.max(1) as f64;
        let secs_per_iter = w.seconds / iters;
        let mem = super::memory::device_memory(&self.device);
        let line = LogLine {
            iteration,
            train_iters: self.d.train_iters as u64,
            consumed_samples: self.state.consumed_train_samples,
            skipped_samples: self.state.skipped_train_samples,
            elapsed_ms_per_iter: secs_per_iter * 1000.0,
            tflops_per_gpu: self
                .cfg
                .logger
                .log_throughput
                .then(|| flops_per_iter / secs_per_iter / self.d.world_size as f64 / 1e12),
            mem_max_allocated_gb: mem.map(|m| m.max_allocated_gb()),
            learning_rate: w.lr,
            global_batch_size: self.d.global_batch_size,
            lm_loss: (w.advanced > 0).then(|| w.loss_sum / w.advanced as f64),
            loss_scale: self.scaler.as_ref().map_or(1.0, LossScaler::scale),
            grad_norm: w.grad_norm,
            params_norm,
            skipped_iterations: w.skipped,
            nan_iterations: w.nan,
        };
        if self.reports() {
            println!("{}", line.render(&timestamp()));
            // Megatron prints the full memory report once, after the first log interval.
            if let Some(m) = mem.filter(|_| !self.memory_reported) {
                println!("{}", m.report(iteration));
                self.memory_reported = true;
            }
        }
        *w = Window::default();
        Ok(())
    }

    /// TFLOP/s per device for an iteration of `seconds`, when throughput is logged.
    fn tflops(&self, seconds: f64, flops_per_iter: f64) -> Option<f64> {
        let l = &self.cfg.logger;
        (l.log_throughput || l.log_throughput_to_tensorboard)
            .then(|| flops_per_iter / seconds.max(1e-12) / self.d.world_size as f64 / 1e12)
    }

    pub(super) fn tensorboard(
        &mut self,
        iteration: u64,
        s: &StepResult,
        seconds: f64,
        flops_per_iter: f64,
        params_norm: Option<f64>,
    ) -> Result<()> {
        let every = self.cfg.logger.tensorboard_log_interval.max(1) as u64;
        let tflops = self.tflops(seconds, flops_per_iter);
        let world = self.d.world_size as f64;
        let l = self.cfg.logger.clone();
        let decoupled_lr = self.decoupled_lr();
        let (train_iters, seq_length) = (self.d.train_iters as u64, self.cfg.model.seq_length);
        let started = self.started;
        let Some(tb) = self.tb.as_mut() else { return Ok(()) };
        if !iteration.is_multiple_of(every) {
            return Ok(());
        }
        let (it, samples) = (iteration as i64, self.state.consumed_train_samples as i64);
        for (tag, v) in [
            ("learning-rate", s.lr),
            ("batch-size", self.d.global_batch_size as f64),
            ("lm loss", s.loss),
        ] {
            tb.add_scalar(tag, v as f32, it)?;
            tb.add_scalar(&format!("{tag} vs samples"), v as f32, samples)?;
        }
        if let Some(d) = decoupled_lr {
            tb.add_scalar("decoupled-learning-rate", d as f32, it)?;
        }
        if self.cfg.logger.log_loss_scale_to_tensorboard {
            tb.add_scalar("loss-scale", 1.0, it)?;
        }
        if let Some(g) = s.grad_norm {
            tb.add_scalar("grad-norm", g as f32, it)?;
            tb.add_scalar("grad-norm vs samples", g as f32, samples)?;
        }
        if let Some(p) = params_norm {
            tb.add_scalar("params-norm", p as f32, it)?;
            tb.add_scalar("params-norm vs samples", p as f32, samples)?;
        }
        if l.log_runtime_to_tensorboard {
            for (tag, v) in runtime_report(
                iteration,
                train_iters,
                samples as u64,
                seq_length,
                started.elapsed().as_secs_f64(),
                &l.runtime_time_unit,
            ) {
                tb.add_scalar(tag, v as f32, it)?;
            }
        }
        let skipped = self.state.skipped_train_samples;
        tb.add_scalar("skipped-train-samples", skipped as f32, it)?;
        if l.log_timers_to_tensorboard {
            tb.add_scalar("iteration-time", seconds as f32, it)?;
        }
        if let Some(t) = tflops {
            tb.add_scalar("throughput/tflops/device", t as f32, it)?;
            tb.add_scalar("throughput/tflops", (t * world) as f32, it)?;
        }
        if l.log_world_size_to_tensorboard {
            tb.add_scalar("world-size", world as f32, it)?;
        }
        if l.log_memory_to_tensorboard {
            // A CPU run has no allocator statistics; report the process's resident memory.
            if let Some((rss, peak)) = resident_memory() {
                tb.add_scalar("mem-resident-bytes", rss as f32, it)?;
                tb.add_scalar("mem-max-resident-bytes", peak as f32, it)?;
            }
        }
        tb.flush()
    }

    /// One `metrics.jsonl` line for iteration `iteration` (keys are the TensorBoard tags).
    pub(super) fn write_metrics(
        &mut self,
        iteration: u64,
        s: &StepResult,
        seconds: f64,
        flops_per_iter: f64,
        params_norm: Option<f64>,
    ) -> Result<()> {
        if self.metrics.is_none() {
            return Ok(());
        }
        let mut line = json!({
            "kind": "train",
            "iteration": iteration,
            "consumed_samples": self.state.consumed_train_samples,
            "lm loss": finite_or_null(s.loss),
            "learning-rate": s.lr,
            "grad-norm": s.grad_norm.map(finite_or_null),
            "iteration-time": seconds,
            "skipped": s.skipped,
            "nan": s.nan,
        });
        if let Some(t) = self.tflops(seconds, flops_per_iter) {
            line["throughput/tflops/device"] = json!(t);
        }
        if let Some(p) = params_norm {
            line["params-norm"] = json!(p);
        }
        if let Some(d) = self.decoupled_lr() {
            line["decoupled-learning-rate"] = json!(d);
        }
        self.append_metrics(line)
    }

    fn append_metrics(&mut self, line: Value) -> Result<()> {
        match self.metrics.as_mut() {
            Some(m) => m.append(&line),
            None => Ok(()),
        }
    }
}

impl Trainer {
    /// Print finished background saves; with `wait`, block until the pending one is done.
    pub(super) fn report_saves(&mut self, wait: bool) -> Result<()> {
        let done = if wait { self.saver.wait()? } else { self.saver.poll()? };
        if let Some(done) = done {
            self.report_saved(&done)?;
        }
        Ok(())
    }

    /// A background save that finished: its line, and its progress line
    /// (`logger.log_progress`).
    pub(super) fn report_saved(&self, done: &SavedCheckpoint) -> Result<()> {
        println!(
            " successfully saved checkpoint from iteration {:7} to {} (asynchronously, {:.2} s)",
            done.iteration,
            done.dir.display(),
            done.seconds
        );
        self.save_hf_copy(&done.dir)?;
        match &self.progress {
            Some(p) => p.append(&format!("Saved async checkpoint\tIteration: {}", done.iteration)),
            None => Ok(()),
        }
    }

    /// End of a run: wait for the pending save, flush the logs, print the W&B upload command.
    pub(super) fn wrap_up(&mut self) -> Result<()> {
        self.profile_finish()?;
        self.report_saves(true)?;
        if let Some(tb) = self.tb.as_mut() {
            tb.flush()?;
        }
        if let Some(cmd) = wandb_sync_command(&self.cfg.logger)? {
            println!(" W&B: mbridge does not stream to W&B; upload this run with: {cmd}");
        }
        Ok(())
    }
}

fn finite_or_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// `(VmRSS, VmHWM)` of this process in bytes, from `/proc/self/status` (Linux only).
fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Where `metrics.jsonl` goes: `logger.metrics_jsonl`, else `<tensorboard_dir>/metrics.jsonl`.
pub fn metrics_path(l: &LoggerConfig) -> Option<PathBuf> {
    match (&l.metrics_jsonl, &l.tensorboard_dir) {
        (Some(p), _) => Some(PathBuf::from(p)),
        (None, Some(tb)) => Some(Path::new(tb).join("metrics.jsonl")),
        (None, None) => None,
    }
}

/// Appends JSON lines, flushed one by one so a killed run keeps every line it printed. A
/// resumed run appends after the lines of the run it continues (an iteration logged after the
/// last checkpoint appears twice: the later line is the one the resumed run produced).
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Open `path` for appending, creating it and its directory.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open `{}`", path.display()))?;
        Ok(MetricsWriter { file, path: path.to_path_buf() })
    }

    /// Write one object as a line.
    pub fn append(&mut self, line: &Value) -> Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .with_context(|| format!("cannot write `{}`", self.path.display()))
    }
}

/// With `logger.wandb_project` set, the exact command that uploads this run's TensorBoard
/// directory to W&B (mbridge has no W&B client; it never falls back silently). Errors when
/// `logger.tensorboard_dir` is unset, since then there would be nothing to upload.
pub fn wandb_sync_command(l: &LoggerConfig) -> Result<Option<String>> {
    let Some(project) = &l.wandb_project else { return Ok(None) };
    let Some(dir) = &l.tensorboard_dir else {
        bail!(
            "`logger.wandb_project={project}` needs `logger.tensorboard_dir`: mbridge does not \
             stream to W&B; it writes TensorBoard event files and prints the \
             `wandb sync --sync-tensorboard <dir>` command that uploads them"
        );
    };
    let mut cmd = format!("wandb sync --sync-tensorboard --project {}", shell_quote(project));
    if let Some(entity) = &l.wandb_entity {
        cmd += &format!(" --entity {}", shell_quote(entity));
    }
    Ok(Some(format!("{cmd} {}", shell_quote(dir))))
}

/// Quote for a POSIX shell when needed.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
