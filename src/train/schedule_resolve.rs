//! From `train.*` / `optimizer.*` / `scheduler.*` config values to the sample counts the
//! scheduler runs on, following Megatron Bridge's `ConfigContainer._calculate_scheduler_steps`
//! and the rules of `spec/config-reference.md` §2.4.

use super::scheduler::{
    LrDecayStyle, OptimizerParamScheduler, SchedulerError, SchedulerParams, WdIncrStyle,
    WsdDecayStyle,
};

/// Config values that decide the schedule, as the user wrote them (after defaults).
///
/// Exactly one of `train_iters` (iteration-based run) and `train_samples` (sample-based run)
/// must be set; `num_epochs` must already have been turned into one of them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleInputs {
    /// `optimizer.lr`.
    pub lr: f64,
    /// `optimizer.min_lr`.
    pub min_lr: f64,
    /// `scheduler.lr_warmup_init`.
    pub lr_warmup_init: f64,
    /// `optimizer.weight_decay`: the value of both ends when start/end are not given.
    pub weight_decay: f64,
    /// `scheduler.start_weight_decay`.
    pub start_weight_decay: Option<f64>,
    /// `scheduler.end_weight_decay`.
    pub end_weight_decay: Option<f64>,
    /// `scheduler.weight_decay_incr_style`.
    pub weight_decay_incr_style: WdIncrStyle,
    /// `scheduler.lr_decay_style`.
    pub lr_decay_style: LrDecayStyle,
    /// `scheduler.lr_wsd_decay_style`.
    pub lr_wsd_decay_style: WsdDecayStyle,
    /// `train.global_batch_size`: samples per optimizer step.
    pub global_batch_size: u64,
    /// `train.train_iters` (iteration-based runs).
    pub train_iters: Option<u64>,
    /// `train.train_samples` (sample-based runs).
    pub train_samples: Option<u64>,
    /// `scheduler.max_steps` (Megatron Bridge): schedule length in iterations, ≥ `train_iters`.
    pub max_steps: Option<u64>,
    /// `scheduler.lr_decay_iters`.
    pub lr_decay_iters: Option<u64>,
    /// `scheduler.lr_decay_samples`.
    pub lr_decay_samples: Option<u64>,
    /// `scheduler.lr_warmup_iters`.
    pub lr_warmup_iters: u64,
    /// `scheduler.lr_warmup_samples`.
    pub lr_warmup_samples: u64,
    /// `scheduler.lr_warmup_fraction` (of the decay steps).
    pub lr_warmup_fraction: Option<f64>,
    /// `scheduler.lr_wsd_decay_iters`.
    pub lr_wsd_decay_iters: Option<u64>,
    /// `scheduler.lr_wsd_decay_samples`.
    pub lr_wsd_decay_samples: Option<u64>,
}

impl ScheduleInputs {
    /// Resolves the sample counts:
    ///
    /// * iteration-based: `lr_decay_iters` ⇐ `max_steps` ⇐ `train_iters`;
    ///   `lr_decay_steps = lr_decay_iters·GBS`, `wd_incr_steps = train_iters·GBS`,
    ///   `lr_warmup_steps = lr_warmup_iters·GBS`, `wsd_decay_steps = lr_wsd_decay_iters·GBS`
    ///   (⇐ `lr_decay_iters`);
    /// * sample-based: the `*_samples` fields directly, `lr_decay_samples` ⇐ `train_samples`;
    /// * `lr_warmup_fraction` gives `fraction · lr_decay_steps` (fractional samples allowed, as
    ///   in Megatron);
    /// * warmup ≥ decay is capped to `decay − 1` with a warning (Megatron Bridge);
    /// * start/end weight decay default to `optimizer.weight_decay`.
    pub fn resolve(&self) -> Result<SchedulerParams, SchedulerError> {
        let bad = |m: String| Err(SchedulerError::Invalid(m));
        if self.lr_warmup_fraction.is_some()
            && (self.lr_warmup_iters != 0 || self.lr_warmup_samples != 0)
        {
            return bad(
                "set either lr_warmup_fraction or lr_warmup_iters/lr_warmup_samples, not both"
                    .into(),
            );
        }
        let gbs = self.global_batch_size;
        if gbs == 0 {
            return bad("global_batch_size must be > 0".into());
        }
        let (lr_decay_steps, wd_incr_steps, wsd_decay_steps, explicit_warmup) =
            match (self.train_iters, self.train_samples) {
                (Some(train_iters), None) => {
                    if self.lr_decay_samples.is_some()
                        || self.lr_warmup_samples != 0
                        || self.lr_wsd_decay_samples.is_some()
                    {
                        return bad("an iteration-based run (train_iters) may not set \
                                    lr_decay_samples, lr_warmup_samples or lr_wsd_decay_samples"
                            .into());
                    }
                    if let Some(max_steps) = self.max_steps {
                        if max_steps < train_iters {
                            return bad(format!(
                                "scheduler.max_steps ({max_steps}) must be >= train_iters \
                                 ({train_iters})"
                            ));
                        }
                    }
                    let decay_iters = self.lr_decay_iters.or(self.max_steps).unwrap_or(train_iters);
                    let wsd_iters = self.lr_wsd_decay_iters.unwrap_or(decay_iters);
                    (
                        decay_iters * gbs,
                        train_iters * gbs,
                        wsd_iters * gbs,
                        (self.lr_warmup_iters * gbs) as f64,
                    )
                }
                (None, Some(train_samples)) => {
                    if self.lr_decay_iters.is_some()
                        || self.lr_warmup_iters != 0
                        || self.lr_wsd_decay_iters.is_some()
                        || self.max_steps.is_some()
                    {
                        return bad("a sample-based run (train_samples) may not set \
                                    lr_decay_iters, lr_warmup_iters, lr_wsd_decay_iters or \
                                    max_steps"
                            .into());
                    }
                    let decay = self.lr_decay_samples.unwrap_or(train_samples);
                    let wsd = self.lr_wsd_decay_samples.unwrap_or(decay);
                    (decay, train_samples, wsd, self.lr_warmup_samples as f64)
                }
                _ => return bad("exactly one of train_iters and train_samples must be set".into()),
            };
        if lr_decay_steps == 0 {
            return bad("lr_decay_steps must be > 0: increase train_iters/train_samples or \
                        lr_decay_iters/lr_decay_samples"
                .into());
        }
        let mut lr_warmup_steps = match self.lr_warmup_fraction {
            Some(fraction) => fraction * lr_decay_steps as f64,
            None => explicit_warmup,
        };
        if lr_warmup_steps >= lr_decay_steps as f64 {
            let capped = (lr_decay_steps - 1) as f64;
            tracing::warn!(
                "lr_warmup_steps ({lr_warmup_steps}) >= lr_decay_steps ({lr_decay_steps}); \
                 capping lr_warmup_steps to {capped}. Reduce lr_warmup_iters (or \
                 lr_warmup_samples) for short training runs."
            );
            lr_warmup_steps = capped;
        }
        Ok(SchedulerParams {
            init_lr: self.lr_warmup_init,
            max_lr: self.lr,
            min_lr: self.min_lr,
            lr_warmup_steps,
            lr_decay_steps,
            lr_decay_style: self.lr_decay_style,
            start_wd: self.start_weight_decay.unwrap_or(self.weight_decay),
            end_wd: self.end_weight_decay.unwrap_or(self.weight_decay),
            wd_incr_steps,
            wd_incr_style: self.weight_decay_incr_style,
            wsd_decay_steps: Some(wsd_decay_steps),
            lr_wsd_decay_style: Some(self.lr_wsd_decay_style),
        })
    }
}

impl OptimizerParamScheduler {
    /// Builds the scheduler of a run from its config values; see [`ScheduleInputs::resolve`].
    ///
    /// The loop then uses it as megatron-core does: iteration `k` runs with
    /// `lr(num_steps = (k-1)·GBS)` and calls `step(GBS)` after each optimizer step.
    pub fn from_resolved(inputs: &ScheduleInputs) -> Result<Self, SchedulerError> {
        Self::new(inputs.resolve()?)
    }
}

impl ScheduleInputs {
    /// The scheduler inputs of a finalized run (`optimizer.*`, `scheduler.*`, batch sizes).
    pub fn from_config(cfg: &crate::config::ConfigContainer, d: &crate::config::Derived) -> Self {
        let s = &cfg.scheduler;
        ScheduleInputs {
            lr: cfg.optimizer.lr.unwrap_or(0.0),
            min_lr: cfg.optimizer.min_lr.unwrap_or(0.0),
            lr_warmup_init: s.lr_warmup_init,
            weight_decay: cfg.optimizer.weight_decay,
            start_weight_decay: s.start_weight_decay,
            end_weight_decay: s.end_weight_decay,
            weight_decay_incr_style: s.weight_decay_incr_style,
            lr_decay_style: s.lr_decay_style,
            lr_wsd_decay_style: s.lr_wsd_decay_style,
            global_batch_size: d.global_batch_size as u64,
            train_iters: cfg.train.train_samples.is_none().then_some(d.train_iters as u64),
            train_samples: cfg.train.train_samples.map(|v| v as u64),
            max_steps: s.max_steps.map(|v| v as u64),
            lr_decay_iters: s.lr_decay_iters.map(|v| v as u64),
            lr_decay_samples: s.lr_decay_samples.map(|v| v as u64),
            lr_warmup_iters: s.lr_warmup_iters as u64,
            lr_warmup_samples: s.lr_warmup_samples as u64,
            lr_warmup_fraction: s.lr_warmup_fraction,
            lr_wsd_decay_iters: s.lr_wsd_decay_iters.map(|v| v as u64),
            lr_wsd_decay_samples: s.lr_wsd_decay_samples.map(|v| v as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(style: LrDecayStyle) -> ScheduleInputs {
        ScheduleInputs {
            lr: 1.0,
            min_lr: 0.0,
            lr_warmup_init: 0.0,
            weight_decay: 0.1,
            start_weight_decay: None,
            end_weight_decay: None,
            weight_decay_incr_style: WdIncrStyle::Constant,
            lr_decay_style: style,
            lr_wsd_decay_style: WsdDecayStyle::Linear,
            global_batch_size: 4,
            train_iters: Some(6),
            train_samples: None,
            max_steps: None,
            lr_decay_iters: None,
            lr_decay_samples: None,
            lr_warmup_iters: 2,
            lr_warmup_samples: 0,
            lr_warmup_fraction: None,
            lr_wsd_decay_iters: Some(2),
            lr_wsd_decay_samples: None,
        }
    }

    /// The loop contract: iteration k steps with lr((k-1)·GBS), then advances by GBS; the log
    /// line of iteration k shows lr(k·GBS).
    #[test]
    fn iteration_semantics() {
        let mut s = OptimizerParamScheduler::from_resolved(&tiny(LrDecayStyle::Linear)).unwrap();
        let (mut used, mut logged) = (vec![], vec![]);
        for _iteration in 1..=7 {
            used.push(s.get_lr());
            s.step(4);
            logged.push(s.get_lr());
        }
        // warmup 8 samples, decay to 0 at 24 samples, min_lr after.
        assert_eq!(used, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(&logged[..6], &used[1..]);
        assert_eq!(s.get_wd(), 0.1);
    }

    #[test]
    fn wsd_holds_then_anneals() {
        let mut s = OptimizerParamScheduler::from_resolved(&tiny(LrDecayStyle::Wsd)).unwrap();
        let mut used = vec![];
        for _ in 1..=7 {
            used.push(s.get_lr());
            s.step(4);
        }
        // Stable until 24 - 8 = 16 samples, then linear over the last 8.
        assert_eq!(used, vec![0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0]);
    }
}
