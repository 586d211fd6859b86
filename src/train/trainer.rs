//! The pretraining loop: build the run from a finalized config, train with Megatron's step
//! semantics, evaluate, log, checkpoint and decide when to exit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::datasets::{sampler_for_split, RunSplits};
use super::loss_scale::LossScaler;
use super::optimizer::GradAccumulator;
use super::phase_timer::PhaseTimer;
use super::pipeline::{Pipeline, TrainHooks};
use super::report::MetricsWriter;
use super::run_optimizer::RunOptimizer;
use super::scheduler::OptimizerParamScheduler;
use super::tensorboard::SummaryWriter;
use crate::ckpt::{self, AsyncSaver, TrainState};
use crate::config::{ConfigContainer, Derived};
use crate::model::flops::num_floating_point_operations;
use crate::model::{GptModel, Microbatch};
use crate::ops::DropoutRng;
use crate::parallel::context::split_microbatch;
use crate::parallel::ddp::GradReducer;
use crate::parallel::pipeline::PipelineP2p;
use crate::parallel::{ProcessGroups, ReduceOp};
use crate::profiling::{Profiler, Range};

/// Why training stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    Finished,
    ExitInterval,
    ExitDuration,
    Signal,
}

/// What a finished (or stopped) run reports back.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub reason: ExitReason,
    pub final_step: u64,
    /// `lm loss` of every iteration this process ran, in order.
    pub losses: Vec<(u64, f64)>,
    /// Gradient norm (before clipping) of every iteration, as the log line shows it; `None`
    /// where none was computed (fp16 overflow, `train.iterations_to_skip`, a NaN loss).
    pub grad_norms: Vec<(u64, Option<f64>)>,
    /// Learning rate of every iteration as the log line shows it: after the scheduler advanced.
    pub lrs: Vec<(u64, f64)>,
    /// The parameters' L2 norm after each iteration that the log line or TensorBoard reports
    /// (`logger.log_params_norm`).
    pub params_norms: Vec<(u64, f64)>,
    pub last_validation_loss: Option<f64>,
}

/// Everything a running job holds.
pub struct Trainer {
    pub(super) cfg: ConfigContainer,
    pub(super) d: Derived,
    pub(super) run_config_toml: String,
    /// This rank's model chunks: its pipeline stage, one chunk per virtual pipeline stage.
    pub(super) chunks: Vec<GptModel>,
    /// Transfers to the neighbouring pipeline stages (PP > 1).
    pub(super) p2p: Option<PipelineP2p>,
    /// `model.microbatch_group_size_per_vp_stage`, resolved.
    pub(super) microbatch_group_size: usize,
    pub(super) optimizer: RunOptimizer,
    /// Bucketed data-parallel gradient reduction when the run has process groups.
    pub(super) reducer: Option<GradReducer>,
    pub(super) scheduler: OptimizerParamScheduler,
    pub(super) acc: GradAccumulator,
    pub(super) datasets: RunSplits,
    pub(super) state: TrainState,
    pub(super) device: Device,
    pub(super) tb: Option<SummaryWriter>,
    /// `metrics.jsonl`: one JSON object per iteration and evaluation, for scripts.
    pub(super) metrics: Option<MetricsWriter>,
    pub(super) stop: Arc<AtomicBool>,
    /// This rank's process groups when the run has more than one rank.
    pub(super) groups: Option<ProcessGroups>,
    /// Background checkpoint writer (`checkpoint.async_save`).
    pub(super) saver: AsyncSaver,
    /// Seed of the dropout RNG: the config's, or the checkpoint's when `load_rng`.
    pub(super) rng_seed: u64,
    /// Whether the one-time GPU memory report has been printed.
    pub(super) memory_reported: bool,
    /// `rerun_state_machine.check_for_spiky_loss`: the micro-batch loss sums seen so far.
    pub(super) spiky_loss: Option<super::spiky_loss::SpikyLoss>,
    /// When this job's set-up began (`logger.log_runtime_to_tensorboard`'s start time).
    pub(super) started: Instant,
    /// `profiling.*`: nsys window, NVTX ranges, Chrome trace, memory report.
    pub(super) profiler: Profiler,
    /// fp16 runs: the loss scale (None for bf16 and f32).
    pub(super) scaler: Option<LossScaler>,
    /// `logger.log_progress`: `progress.txt` in the checkpoint directory (rank 0 of a run that
    /// saves).
    pub(super) progress: Option<super::progress_log::ProgressLog>,
}

impl Trainer {
    /// The finalized config of this run.
    pub fn config(&self) -> &ConfigContainer {
        &self.cfg
    }

    /// Progress so far.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The model being trained: this rank's first model chunk (its whole pipeline stage
    /// without virtual pipelining).
    pub fn model(&self) -> &GptModel {
        &self.chunks[0]
    }

    /// Every model chunk of this rank, in virtual-stage order.
    pub fn model_chunks(&self) -> &[GptModel] {
        &self.chunks
    }

    /// The pipeline view of this rank's chunks that the schedules run.
    pub(super) fn pipeline(&self) -> Pipeline<'_> {
        Pipeline {
            chunks: &self.chunks,
            p2p: self.p2p.as_ref(),
            microbatch_group_size: self.microbatch_group_size,
        }
    }

    /// Run until `train_iters` or an exit condition; evaluate and save as configured.
    pub fn train(&mut self) -> Result<TrainOutcome> {
        // bf16 gradients end to end where Megatron keeps a bf16 `main_grad`.
        let _main_grads =
            crate::ops::main_grads::bf16_main_grads(!self.cfg.ddp.grad_reduce_in_fp32);
        let train_iters = self.d.train_iters as u64;
        let gbs = self.d.global_batch_size;
        let train_ds = self.datasets.train.take().context("no training dataset was built")?;
        let mut sampler = sampler_for_split(
            &self.cfg,
            &self.d,
            0,
            &train_ds,
            self.state.consumed_train_samples as usize,
            self.dp_rank(),
        )?;
        let start = Instant::now();
        let mut losses = Vec::new();
        let mut grad_norms = Vec::new();
        let mut lrs = Vec::new();
        let mut params_norms = Vec::new();
        let mut last_val = None;
        let mut window = Window::default();
        let flops_per_iter =
            num_floating_point_operations(&self.cfg.model, gbs, self.cfg.model.seq_length as f64);
        let mut reason = ExitReason::Finished;
        let mut saved_at = None;
        let start_step = self.state.step;
        // `validation.skip_train`: evaluate the loaded (or initial) weights, train nothing.
        let skip_train = self.cfg.validation.skip_train;
        if skip_train && self.reports() {
            println!("skipping training (--skip-train is on) ...");
        }
        crate::parallel::watchdog::arm();
        while !skip_train && self.state.step < train_iters {
            // A background save that failed surfaces here, at the next step.
            self.report_saves(false)?;
            let iteration = self.state.step + 1;
            let t0 = Instant::now();
            let mut micro = Vec::with_capacity(self.d.num_microbatches);
            for _ in 0..self.d.num_microbatches {
                let idx = sampler.next_micro()?.context("training data ran out")?;
                micro.push(train_ds.microbatch(&idx, &self.device)?);
            }
            // Megatron's `batch-generator` timer: sample fetch, collation and the copy to the
            // device (to show that data loading does not stall the step).
            tracing::debug!(
                "iteration {iteration} batch-generator {:.2} ms",
                t0.elapsed().as_secs_f64() * 1e3
            );
            let skip = self.cfg.train.iterations_to_skip.contains(&(iteration as usize));
            self.profiler.step_begin(self.state.step)?;
            let (micro, whole_tokens) = self.context_parallel_share(micro)?;
            let step = self.train_step(iteration, &micro, whole_tokens.as_deref(), skip)?;
            self.profile_step_end()?;
            self.check_weight_replicas(iteration)?;
            crate::parallel::watchdog::beat();
            self.state.step = iteration;
            self.state.consumed_train_samples += gbs as u64;
            if skip {
                self.state.skipped_train_samples += gbs as u64;
            }
            self.state.floating_point_operations_so_far += flops_per_iter;
            losses.push((iteration, step.loss));
            grad_norms.push((iteration, step.grad_norm));
            lrs.push((iteration, step.lr));
            let seconds = t0.elapsed().as_secs_f64();
            window.add(&step, seconds);
            // `logger.skip_train_metrics_log`: no training metrics to any backend (console,
            // TensorBoard, the metrics file), as Megatron Bridge skips `training_log`.
            if !self.cfg.logger.skip_train_metrics_log {
                let params_norm = self.params_norm_to_report(iteration)?;
                if let Some(norm) = params_norm {
                    params_norms.push((iteration, norm));
                }
                self.write_metrics(iteration, &step, seconds, flops_per_iter, params_norm)?;
                if iteration.is_multiple_of(self.cfg.logger.log_interval as u64) {
                    self.log(iteration, &mut window, flops_per_iter, params_norm)?;
                }
                self.tensorboard(iteration, &step, seconds, flops_per_iter, params_norm)?;
            }
            if let Some(every) = self.cfg.validation.eval_interval {
                if self.eval_enabled()
                    && iteration.is_multiple_of(every as u64)
                    && iteration < train_iters
                {
                    last_val = self
                        .evaluate_validation(&format!("iteration {iteration} on validation set"))?;
                }
            }
            // Exit decisions in Megatron Bridge's order: signal, periodic save, duration, interval.
            // Every rank must take the same exit decision, or the ones that go on would wait
            // forever in the next collective: agree on the signal and the elapsed time (MAX).
            let (signalled, minutes) = self.agree_on_exit(start.elapsed().as_secs_f64() / 60.0)?;
            if signalled {
                reason = ExitReason::Signal;
            }
            if let Some(every) = self.cfg.checkpoint.save_interval {
                if iteration.is_multiple_of(every as u64) && reason == ExitReason::Finished {
                    self.save()?;
                    saved_at = Some(iteration);
                }
            }
            // A non-persistent checkpoint where no persistent one was just saved (Megatron's
            // `elif`).
            if let Some(every) = self.cfg.checkpoint.non_persistent_save_interval {
                if iteration.is_multiple_of(every as u64)
                    && reason == ExitReason::Finished
                    && saved_at != Some(iteration)
                {
                    self.save_non_persistent()?;
                }
            }
            if let Some(mins) = self.cfg.train.exit_duration_in_mins {
                if minutes > mins as f64 {
                    reason = ExitReason::ExitDuration;
                }
            }
            if let Some(every) = self.cfg.train.exit_interval {
                if iteration.is_multiple_of(every as u64) {
                    reason = ExitReason::ExitInterval;
                }
            }
            if reason != ExitReason::Finished {
                if saved_at != Some(iteration) {
                    self.save()?;
                }
                self.wrap_up()?;
                tracing::info!("exiting at iteration {iteration} ({reason:?})");
                return Ok(TrainOutcome {
                    reason,
                    final_step: iteration,
                    losses,
                    grad_norms,
                    lrs,
                    params_norms,
                    last_validation_loss: last_val,
                });
            }
        }
        // A final save unless the last step was just saved or this process trained nothing
        // (then the checkpoint it resumed from is already the final one).
        if saved_at != Some(self.state.step) && self.state.step > start_step {
            self.save()?;
        }
        self.wrap_up()?;
        if self.eval_enabled() {
            let step = self.state.step;
            last_val = self
                .evaluate_validation(&format!("iteration {step} on validation set"))?
                .or(last_val);
            self.evaluate_test(&format!("iteration {step} on test set"))?;
        }
        Ok(TrainOutcome {
            reason,
            final_step: self.state.step,
            losses,
            grad_norms,
            lrs,
            params_norms,
            last_validation_loss: last_val,
        })
    }

    /// Whether the run evaluates: `validation.eval_iters` > 0, or `full_validation` (which
    /// sizes its evaluations by the data), as Megatron's `do_valid`.
    fn eval_enabled(&self) -> bool {
        let v = &self.cfg.validation;
        v.full_validation || v.eval_iters.unwrap_or(0) > 0
    }

    /// One iteration: accumulate micro-batch gradients, normalise them as megatron-core does
    /// (see below), clip, step with `lr((k-1)·GBS)`, then advance the scheduler by GBS.
    ///
    /// Gradient normalisation follows `model.calculate_per_token_loss` like megatron-core's
    /// `forward_step_calc_loss` / `finalize_model_grads`: when false (the default) each
    /// micro-batch back-propagates its own token mean divided by the number of micro-batches
    /// (a mean of micro-batch means); when true the gradients of Σ CE are summed and divided by
    /// the global batch's loss-token count. The two agree when every micro-batch has the same
    /// number of loss tokens. The reported loss is always Σ CE / Σ tokens of the global batch.
    ///
    /// Under context parallelism `micro` holds this rank's chunks and `whole_tokens` the
    /// loss-token count of each whole micro-batch: the mean divides by it and multiplies by CP,
    /// as megatron-core all-reduces `[sum, count]` over the CP group and scales the loss by
    /// the CP size, so gradients averaged over DP × CP equal CP=1's.
    fn train_step(
        &mut self,
        iteration: u64,
        micro: &[Microbatch],
        whole_tokens: Option<&[f64]>,
        skip: bool,
    ) -> Result<StepResult> {
        self.acc.clear();
        let mut timer = PhaseTimer::new(&self.device);
        let dropout_on =
            self.cfg.model.hidden_dropout > 0.0 || self.cfg.model.attention_dropout > 0.0;
        let per_token = self.cfg.model.calculate_per_token_loss;
        let num_micro = micro.len() as f64;
        let (dp, dp_rank, seed) = (self.d.data_parallel_size, self.dp_rank(), self.rng_seed);
        let (cp, cp_rank) = self.groups.as_ref().map_or((1, 0), |g| (g.topology.cp(), g.coords.cp));
        let (pp_size, pp_rank) = self.p2p.as_ref().map_or((1, 0), |p| (p.size(), p.rank()));
        // Key dropout by the micro-batch's place in the global batch, so DP=2 draws what
        // DP=1 draws for the same samples; each virtual pipeline stage past the first draws
        // its own stream (PP > 1 drops other elements than PP=1, as in Megatron).
        let dropout = |chunk: usize, i: usize| {
            let global_mb = (i * dp + dp_rank) as u64;
            let stage = (chunk * pp_size + pp_rank) as u64;
            // Context-parallel ranks hold other chunks of the sequence: their own streams.
            let key = global_mb | (stage << 40) | ((cp_rank as u64) << 56);
            dropout_on.then(|| DropoutRng::new(seed, iteration, key))
        };
        // fp16: the backward runs on the loss times the loss scale.
        let loss_scale = self.scaler.as_ref().map_or(1.0, LossScaler::scale);
        let objective = |i: usize, sum: Tensor, count: f64| -> Result<Tensor> {
            let count = whole_tokens.map_or(count, |t| t[i] / cp as f64);
            Ok(if per_token {
                if loss_scale == 1.0 {
                    sum
                } else {
                    sum.affine(loss_scale, 0.0)?
                }
            } else {
                // `output_tensor /= clamp(num_tokens, min=1); output_tensor /= num_microbatches`
                sum.affine(loss_scale / (count.max(1.0) * num_micro), 0.0)?
            })
        };
        let overlap = self.reducer.as_ref().and_then(|r| r.overlap()).filter(|_| !skip);
        if let Some(o) = overlap {
            o.begin_step(micro.len())?;
        }
        let hooks = TrainHooks { dropout: &dropout, objective: &objective, overlap };
        let acc = (!skip).then_some(&mut self.acc);
        let pipeline = Pipeline {
            chunks: &self.chunks,
            p2p: self.p2p.as_ref(),
            microbatch_group_size: self.microbatch_group_size,
        };
        let phase = Range::phase("forward-backward");
        // The weights stay as they are until the optimizer step: the FP8 layers quantize
        // them once for all micro-batches and recomputed forwards (the hold ends before the
        // update). With one forward per layer nothing would be reused, and the cache would
        // only keep the forward's row-major FP8 weights alive through the backward.
        let reuses = micro.len() > 1 || self.cfg.model.recompute_granularity.is_some();
        let fp8_hold: Vec<_> = if reuses {
            self.chunks.iter().filter_map(GptModel::hold_fp8_weights).collect()
        } else {
            Vec::new()
        };
        let (micro_sums, mut tokens) = pipeline.train_batch(micro, &hooks, acc)?;
        // Added on the host in micro-batch order, as they were one by one before.
        let mut loss_sum: f64 = micro_sums.iter().sum();
        if let Some(spiky) = &mut self.spiky_loss {
            spiky.check_all(&micro_sums, iteration, self.groups.as_ref().map_or(0, |g| g.rank));
        }
        drop(fp8_hold);
        timer.mark("forward-backward")?;
        drop(phase);
        let phase = Range::phase("grad-reduce-and-clip");
        if let Some(g) = &self.groups {
            let t = Tensor::new(&[loss_sum, tokens], &Device::Cpu)?;
            // Only the last pipeline stage computes the loss: every stage gets its sums.
            let t = if pp_size > 1 { g.pp.all_reduce(&t, ReduceOp::Sum)? } else { t };
            // Σ CE and Σ tokens over the data (× context) parallel group, as Megatron reduces
            // `[sum, count]`.
            let r = g.dp_cp.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?;
            (loss_sum, tokens) = (r[0], r[1]);
        }
        let loss = if tokens > 0.0 { loss_sum / tokens } else { 0.0 };
        let nan_loss = !loss.is_finite();
        if nan_loss && self.cfg.rerun_state_machine.check_for_nan_in_loss {
            bail!("loss is {loss} at iteration {iteration} (rank 0); stopping (set rerun_state_machine.check_for_nan_in_loss=false to skip such steps)");
        }
        if skip || nan_loss {
            return Ok(StepResult {
                loss,
                grad_norm: None,
                skipped: true,
                nan: nan_loss,
                lr: self.scheduler.get_lr(),
            });
        }
        // Per-token: Σ grads / global tokens. Otherwise each rank holds the mean of its
        // micro-batch means and DP averages them (megatron-core's finalize_model_grads).
        let reduced = self.reduce_grads(per_token.then_some(tokens))?;
        let norm = self.clip_grads(&reduced, loss_scale)?;
        if !norm.is_finite() {
            // fp16: the scaled gradients overflowed. Skip the step (the scheduler does not
            // advance either) and let the scaler back off, as megatron-core's optimizer does.
            if self.scaler.is_some() {
                self.update_loss_scale(true);
                return Ok(StepResult {
                    loss,
                    grad_norm: None,
                    skipped: true,
                    nan: false,
                    lr: self.scheduler.get_lr(),
                });
            }
            if self.cfg.rerun_state_machine.check_for_nan_in_loss
                || self.cfg.ddp.check_for_nan_in_grad
            {
                bail!("gradient norm is {} at iteration {iteration} (rank 0); stopping", norm.norm);
            }
            return Ok(StepResult {
                loss,
                grad_norm: Some(norm.norm),
                skipped: true,
                nan: true,
                lr: self.scheduler.get_lr(),
            });
        }
        timer.mark("grad-reduce-and-clip")?;
        // `optimizer.grad_norm_skip_threshold`: megatron-core's optimizer skips the update (and
        // the scheduler does not advance); the loss scale has already seen a finite step.
        if let Some(threshold) = self.cfg.optimizer.grad_norm_skip_threshold {
            if threshold.is_finite() && norm.norm > threshold {
                tracing::info!("skipping grad norm because it's too large {}", norm.norm);
                self.update_loss_scale(false);
                return Ok(StepResult {
                    loss,
                    grad_norm: Some(norm.norm),
                    skipped: true,
                    nan: false,
                    lr: self.scheduler.get_lr(),
                });
            }
        }
        drop(phase);
        let _phase = Range::phase("optimizer");
        // A background save must hold its own copy of the weights before they change.
        self.saver.wait_snapshot();
        // The optimizer divides the loss scale out with the clipping coefficient.
        let grad_scale = match norm.coeff {
            None if loss_scale == 1.0 => None,
            c => Some(c.unwrap_or(1.0) / loss_scale),
        };
        self.apply_update(reduced, grad_scale)?;
        self.update_loss_scale(false);
        timer.mark("optimizer")?;
        if let Some(s) = timer.summary() {
            tracing::debug!("iteration {iteration} phases: {s}");
        }
        self.scheduler.step(self.d.global_batch_size as u64);
        Ok(StepResult {
            loss,
            grad_norm: Some(norm.norm),
            skipped: false,
            nan: false,
            lr: self.scheduler.get_lr(),
        })
    }

    /// fp16: moves the loss scale on after a step (`found_inf`: it overflowed and was skipped)
    /// and keeps the train state's copy, which checkpoints save, in step.
    fn update_loss_scale(&mut self, found_inf: bool) {
        if let Some(scaler) = &mut self.scaler {
            scaler.update(found_inf);
            self.state.grad_scaler = scaler.state();
        }
    }

    /// Save a checkpoint of the current state when `checkpoint.save` is set: in this thread,
    /// or with `checkpoint.async_save` from a detached snapshot in the background (a save still
    /// in flight is finished first). Every rank writes its own shards; rank 0 commits.
    pub fn save(&mut self) -> Result<()> {
        let c = &self.cfg.checkpoint;
        let Some(dir) = c.save.clone() else { return Ok(()) };
        let retention = ckpt::Retention {
            most_recent_k: c.most_recent_k,
            retain_interval: c.save_retain_interval.map(|n| n as u64),
        };
        self.save_into(PathBuf::from(dir), retention)
    }

    /// A global non-persistent checkpoint (`checkpoint.non_persistent_save_interval`) into
    /// [`crate::config::checkpoint::CheckpointConfig::non_persistent_dir`], where the two
    /// newest are kept (Megatron removes all but the newest before each such save).
    fn save_non_persistent(&mut self) -> Result<()> {
        let c = &self.cfg.checkpoint;
        let Some(dir) = c.non_persistent_dir(c.save.as_deref()) else { return Ok(()) };
        self.save_into(dir, 2.into())
    }

    /// [`Self::save`] into `dir`, keeping its `k` newest checkpoints (-1: all).
    fn save_into(&mut self, dir: PathBuf, k: ckpt::Retention) -> Result<()> {
        let t0 = Instant::now();
        let snapshot = self.checkpoint_snapshot()?;
        if self.cfg.checkpoint.async_save {
            if let Some(done) = self.saver.submit(&dir, snapshot, k)? {
                self.report_saved(&done)?;
            }
            if self.groups.as_ref().is_none_or(|g| g.rank == 0) {
                tracing::info!(
                    "asynchronous save of iteration {} started (training stalled {:.1} ms)",
                    self.state.step,
                    t0.elapsed().as_secs_f64() * 1e3
                );
            }
            return self.progress_of_save("Saving async checkpoint");
        }
        // Returns on every rank only once rank 0 has moved the tracker (its outcome is the
        // save's last message), so nobody reads or exits past a save before it is on disk.
        let world = self.groups.as_ref().map(|g| &*g.ckpt);
        let saved = ckpt::save_checkpoint_on(&dir, &snapshot.as_write(), k, world)?;
        if saved.committed {
            println!(
                " successfully saved checkpoint from iteration {:7} to {}",
                self.state.step,
                saved.dir.display()
            );
            self.save_hf_copy(&saved.dir)?;
        }
        self.progress_of_save("Saved checkpoint")
    }

    /// `checkpoint.also_save_hf_checkpoint`: the committed checkpoint `iter_dir` exported to
    /// `iter_dir/hf` as `mbridge export-hf` writes it (Megatron Bridge's layout). Synchronous,
    /// on the rank that committed it, as Megatron Bridge's.
    pub(super) fn save_hf_copy(&self, iter_dir: &std::path::Path) -> Result<()> {
        let c = &self.cfg.checkpoint;
        // Not for non-persistent checkpoints, which are only for resuming.
        let non_persistent = c.non_persistent_dir(c.save.as_deref());
        if !c.also_save_hf_checkpoint || iter_dir.parent() == non_persistent.as_deref() {
            return Ok(());
        }
        let t0 = Instant::now();
        let opts = crate::bridge::export::ExportOptions {
            checkpoint: iter_dir.to_path_buf(),
            out: iter_dir.join("hf"),
            iteration: None,
            dtype: None,
            max_shard_bytes: 5_000_000_000,
            merge_lora: false,
            adapter_only: false,
        };
        let out = crate::bridge::export::export_hf(&opts)
            .with_context(|| format!("cannot save the HF copy of {}", iter_dir.display()))?;
        println!(
            " saved Hugging Face checkpoint to {} ({:.1} s)",
            out.display(),
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// `logger.log_progress`: the progress line of the save just made or submitted.
    fn progress_of_save(&self, prefix: &str) -> Result<()> {
        let Some(progress) = &self.progress else { return Ok(()) };
        let s = &self.state;
        let tokens = s.consumed_train_samples as f64 * self.cfg.model.seq_length as f64;
        progress.checkpoint(prefix, s.step, s.floating_point_operations_so_far, tokens)
    }

    /// (any rank signalled, max elapsed minutes over ranks); local values on one process.
    fn agree_on_exit(&self, minutes: f64) -> Result<(bool, f64)> {
        let signalled = self.stop.load(Ordering::Relaxed);
        let Some(g) = &self.groups else { return Ok((signalled, minutes)) };
        let t = Tensor::new(&[f64::from(u8::from(signalled)), minutes], &Device::Cpu)?;
        let r = g.world.all_reduce(&t, ReduceOp::Max)?.to_vec1::<f64>()?;
        Ok((r[0] > 0.0, r[1]))
    }

    /// Under context parallelism: this rank's chunks of each micro-batch and the loss-token
    /// count of each whole micro-batch; the micro-batches as they are (and None) otherwise.
    pub(super) fn context_parallel_share(
        &self,
        micro: Vec<Microbatch>,
    ) -> Result<(Vec<Microbatch>, Option<Vec<f64>>)> {
        let Some(g) = self.groups.as_ref().filter(|g| g.topology.cp() > 1) else {
            return Ok((micro, None));
        };
        let (rank, size) = (g.coords.cp, g.topology.cp());
        let mut whole = Vec::with_capacity(micro.len());
        let mut local = Vec::with_capacity(micro.len());
        for mb in &micro {
            whole.push(match mb.host_stats {
                Some(t) => t.mask_sum,
                None => mb.loss_mask.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            });
            local.push(split_microbatch(mb, rank, size)?);
        }
        Ok((local, Some(whole)))
    }

    /// This rank's data-parallel index.
    pub(super) fn dp_rank(&self) -> usize {
        self.groups.as_ref().map_or(0, |g| g.coords.dp)
    }

    /// Whether this rank prints the log line and validation (see [`reports_on`]).
    pub(super) fn reports(&self) -> bool {
        reports_on(self.groups.as_ref())
    }
}

/// Whether the rank of `groups` reports (log line, validation, TensorBoard, metrics): as
/// Megatron, the last pipeline stage's rank 0 of TP, CP and DP; the only rank without groups.
pub(super) fn reports_on(groups: Option<&ProcessGroups>) -> bool {
    groups.is_none_or(|g| {
        g.coords.tp == 0
            && g.coords.cp == 0
            && g.coords.dp == 0
            && g.coords.pp + 1 == g.topology.pp()
    })
}

/// Result of one iteration.
#[derive(Debug, Clone)]
pub(super) struct StepResult {
    pub(super) loss: f64,
    pub(super) grad_norm: Option<f64>,
    pub(super) skipped: bool,
    pub(super) nan: bool,
    pub(super) lr: f64,
}

/// Accumulates what the next log line averages.
#[derive(Debug, Default)]
pub(super) struct Window {
    pub(super) iterations: u64,
    pub(super) advanced: u64,
    pub(super) seconds: f64,
    pub(super) loss_sum: f64,
    pub(super) lr: f64,
    pub(super) grad_norm: Option<f64>,
    pub(super) skipped: u64,
    pub(super) nan: u64,
}

impl Window {
    fn add(&mut self, s: &StepResult, seconds: f64) {
        self.iterations += 1;
        self.seconds += seconds;
        self.lr = s.lr;
        if s.nan {
            self.nan += 1;
        }
        // A skipped step's norm is still shown (it is why a threshold skipped it).
        if s.grad_norm.is_some() {
            self.grad_norm = s.grad_norm;
        }
        if s.skipped {
            self.skipped += 1;
        } else {
            self.advanced += 1;
            self.loss_sum += s.loss;
        }
    }
}
