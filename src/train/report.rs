//! What a run reports: validation/test evaluation, the periodic log line and TensorBoard.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::log::{perplexity, timestamp, validation_box, LogLine};
use super::trainer::{to_microbatch, StepResult, Trainer, Window};
use crate::data::sampler::{collate, PretrainingSampler};
use crate::model::loss_for_microbatch;
use crate::parallel::ReduceOp;

impl Trainer {
    /// Token-weighted loss over `eval_iters` batches of split `split` (1 valid, 2 test).
    pub(super) fn evaluate(&mut self, split: usize, prefix: &str) -> Result<Option<f64>> {
        let Some(ds) = self.datasets[split].as_ref() else { return Ok(None) };
        let eval_iters = self.cfg.validation.eval_iters.unwrap_or(0);
        let egbs = self.d.eval_global_batch_size;
        let embs = self.d.eval_micro_batch_size;
        let consumed = if split == 1 { self.state.consumed_valid_samples as usize } else { 0 };
        if consumed >= ds.len() {
            return Ok(None);
        }
        let mut sampler = PretrainingSampler::new(
            ds.len(),
            consumed,
            embs,
            self.dp_rank(),
            self.d.data_parallel_size,
            true,
            false,
        )?;
        let (mut sum, mut count) = (0.0, 0.0);
        for _ in 0..eval_iters {
            for _ in 0..egbs / (embs * self.d.data_parallel_size) {
                let Some(idx) = sampler.next() else { break };
                let mb = to_microbatch(&collate(ds, &idx)?, &self.device)?;
                let (s, c) = loss_for_microbatch(&self.model, &mb, None)?;
                sum += s.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                count += c;
            }
            if split == 1 {
                self.state.consumed_valid_samples += egbs as u64;
            }
        }
        if let Some(g) = &self.groups {
            let t = Tensor::new(&[sum, count], &Device::Cpu)?;
            let r = g.dp.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f64>()?;
            (sum, count) = (r[0], r[1]);
        }
        if count == 0.0 {
            return Ok(None);
        }
        let loss = sum / count;
        if self.reports() {
            println!("{}", validation_box(prefix, loss));
        }
        if let (Some(tb), 1) = (self.tb.as_mut(), split) {
            let samples = self.state.consumed_train_samples as i64;
            tb.add_scalar("lm loss validation", loss as f32, self.state.step as i64)?;
            tb.add_scalar("lm loss validation vs samples", loss as f32, samples)?;
            if self.cfg.logger.log_validation_ppl_to_tensorboard {
                tb.add_scalar(
                    "lm loss validation ppl",
                    perplexity(loss) as f32,
                    self.state.step as i64,
                )?;
            }
            tb.flush()?;
        }
        Ok(Some(loss))
    }

    pub(super) fn log(
        &mut self,
        iteration: u64,
        w: &mut Window,
        flops_per_iter: f64,
    ) -> Result<()> {
        let iters = w.iterations.max(1) as f64;
        let secs_per_iter = w.seconds / iters;
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
            learning_rate: w.lr,
            global_batch_size: self.d.global_batch_size,
            lm_loss: (w.advanced > 0).then(|| w.loss_sum / w.advanced as f64),
            loss_scale: 1.0,
            grad_norm: w.grad_norm,
            skipped_iterations: w.skipped,
            nan_iterations: w.nan,
        };
        if self.reports() {
            println!("{}", line.render(&timestamp()));
        }
        *w = Window::default();
        Ok(())
    }

    pub(super) fn tensorboard(&mut self, iteration: u64, s: &StepResult) -> Result<()> {
        let every = self.cfg.logger.tensorboard_log_interval.max(1) as u64;
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
        if self.cfg.logger.log_loss_scale_to_tensorboard {
            tb.add_scalar("loss-scale", 1.0, it)?;
        }
        if let Some(g) = s.grad_norm {
            tb.add_scalar("grad-norm", g as f32, it)?;
            tb.add_scalar("grad-norm vs samples", g as f32, samples)?;
        }
        tb.flush()
    }
}
