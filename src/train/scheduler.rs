//! Learning-rate and weight-decay schedule: a literal port of megatron-core's
//! `OptimizerParamScheduler` (`megatron/core/optimizer_param_scheduler.py`).
//!
//! The scheduler counts **samples**, not iterations. The training loop must follow megatron-core's
//! step semantics so a Megatron user's loss curve reproduces:
//!
//! * `num_steps` starts at 0;
//! * iteration `k` (1-based) runs its optimizer step with `lr(num_steps = (k-1)·GBS)`;
//! * after each optimizer step the loop calls [`OptimizerParamScheduler::step`] with the global
//!   batch size (`num_microbatches · MBS · DP`), so the lr printed on the log line of iteration `k`
//!   is `lr(k·GBS)`.
//!
//! With warmup and `lr_warmup_init = 0`, iteration 1 therefore runs at lr 0. Every formula below
//! mirrors the Python expression order so values agree to the last bit with megatron-core.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

// The style enums are the config's own (`scheduler.*` fields), so a resolved config feeds the
// scheduler without conversion; their Megatron spellings (serde, FromStr, Display) live here.
pub use crate::config::optimizer::{LrDecayStyle, WdIncrStyle, WsdDecayStyle};

/// Errors from building or restoring a scheduler. Messages name the offending field.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A value violates one of megatron-core's constructor invariants.
    #[error("invalid scheduler setting: {0}")]
    Invalid(String),
    /// A style string is not one of the known names.
    #[error("unknown {kind} {value:?}; expected one of {expected}")]
    UnknownStyle {
        /// Which setting was parsed (e.g. `lr_decay_style`).
        kind: &'static str,
        /// The string given.
        value: String,
        /// The accepted names.
        expected: &'static str,
    },
    /// A checkpoint value differs from the configured one and neither
    /// `use_checkpoint_opt_param_scheduler` nor `override_opt_param_scheduler` is set.
    #[error(
        "scheduler {name}: configured value {configured} and checkpoint value {checkpoint} do not \
         match (set scheduler.use_checkpoint_opt_param_scheduler or \
         scheduler.override_opt_param_scheduler)"
    )]
    CheckpointMismatch {
        /// Megatron's name of the field.
        name: &'static str,
        /// Value from the current configuration.
        configured: String,
        /// Value stored in the checkpoint.
        checkpoint: String,
    },
}

macro_rules! style_names {
    ($ty:ty, $kind:literal, $expected:literal, [$($name:literal => $variant:path),+ $(,)?]) => {
        impl FromStr for $ty {
            type Err = SchedulerError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($variant),)+
                    _ => Err(SchedulerError::UnknownStyle {
                        kind: $kind,
                        value: s.to_string(),
                        expected: $expected,
                    }),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let name = match self { $($variant => $name,)+ };
                f.write_str(name)
            }
        }
    };
}

style_names!(LrDecayStyle, "lr_decay_style", "constant, linear, cosine, inverse-square-root, WSD", [
    "constant" => LrDecayStyle::Constant,
    "linear" => LrDecayStyle::Linear,
    "cosine" => LrDecayStyle::Cosine,
    "inverse-square-root" => LrDecayStyle::InverseSquareRoot,
    "WSD" => LrDecayStyle::Wsd,
]);
style_names!(WsdDecayStyle, "lr_wsd_decay_style", "exponential, linear, cosine, minus_sqrt", [
    "exponential" => WsdDecayStyle::Exponential,
    "linear" => WsdDecayStyle::Linear,
    "cosine" => WsdDecayStyle::Cosine,
    "minus_sqrt" => WsdDecayStyle::MinusSqrt,
]);
style_names!(WdIncrStyle, "weight_decay_incr_style", "constant, linear, cosine", [
    "constant" => WdIncrStyle::Constant,
    "linear" => WdIncrStyle::Linear,
    "cosine" => WdIncrStyle::Cosine,
]);

/// Fully resolved scheduler settings, in samples. Field names follow megatron-core's constructor.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerParams {
    /// Learning rate at step 0 (`scheduler.lr_warmup_init`).
    pub init_lr: f64,
    /// Peak learning rate (`optimizer.lr`).
    pub max_lr: f64,
    /// Floor of the decay (`optimizer.min_lr`).
    pub min_lr: f64,
    /// Warmup length in samples; fractional when it comes from `lr_warmup_fraction`.
    pub lr_warmup_steps: f64,
    /// Sample at which decay ends.
    pub lr_decay_steps: u64,
    /// Decay shape after warmup.
    pub lr_decay_style: LrDecayStyle,
    /// Weight decay at sample 0.
    pub start_wd: f64,
    /// Weight decay after `wd_incr_steps`.
    pub end_wd: f64,
    /// Samples over which weight decay moves from start to end.
    pub wd_incr_steps: u64,
    /// Weight-decay ramp shape.
    pub wd_incr_style: WdIncrStyle,
    /// Length of the WSD anneal phase in samples (required for [`LrDecayStyle::Wsd`]).
    pub wsd_decay_steps: Option<u64>,
    /// WSD anneal shape (required for [`LrDecayStyle::Wsd`]).
    pub lr_wsd_decay_style: Option<WsdDecayStyle>,
}

/// How [`OptimizerParamScheduler::load_state`] reconciles checkpoint and configured values
/// (megatron-core's `override_opt_param_scheduler` / `use_checkpoint_opt_param_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResumePolicy {
    /// Checkpoint and configuration must agree; a difference is an error (neither flag set).
    #[default]
    Strict,
    /// Take schedule values from the checkpoint (`use_checkpoint_opt_param_scheduler`).
    UseCheckpoint,
    /// Keep configured values, only restore `num_steps` (`override_opt_param_scheduler`).
    Override,
}

/// Checkpointed scheduler state, with megatron-core's `state_dict()` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerState {
    /// Peak learning rate.
    pub max_lr: f64,
    /// Warmup length in samples.
    pub lr_warmup_steps: f64,
    /// Samples consumed so far.
    pub num_steps: u64,
    /// Decay shape.
    pub lr_decay_style: LrDecayStyle,
    /// Sample at which decay ends.
    pub lr_decay_steps: u64,
    /// Decay floor.
    pub min_lr: f64,
    /// Initial weight decay.
    pub start_wd: f64,
    /// Final weight decay.
    pub end_wd: f64,
    /// Weight-decay ramp shape.
    pub wd_incr_style: WdIncrStyle,
    /// Weight-decay ramp length in samples.
    pub wd_incr_steps: u64,
}

/// Anneals learning rate and weight decay as megatron-core's `OptimizerParamScheduler` does.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerParamScheduler {
    p: SchedulerParams,
    /// Samples consumed so far; advanced by [`Self::step`].
    pub num_steps: u64,
}

impl OptimizerParamScheduler {
    /// Builds a scheduler from resolved values, checking megatron-core's invariants
    /// (`0 ≤ min_lr ≤ max_lr`, `init_lr ≤ max_lr`, `0 ≤ warmup < decay`, `0 ≤ start_wd ≤ end_wd`,
    /// WSD needs its decay steps and style, constant weight decay needs `start_wd == end_wd`).
    pub fn new(p: SchedulerParams) -> Result<Self, SchedulerError> {
        let bad = |m: String| Err(SchedulerError::Invalid(m));
        for (name, v) in [
            ("lr", p.max_lr),
            ("min_lr", p.min_lr),
            ("lr_warmup_init", p.init_lr),
            ("lr_warmup_steps", p.lr_warmup_steps),
            ("start_wd", p.start_wd),
            ("end_wd", p.end_wd),
        ] {
            if !v.is_finite() {
                return bad(format!("{name} must be a finite number, got {v}"));
            }
        }
        if p.min_lr < 0.0 {
            return bad(format!("min_lr must be >= 0, got {}", p.min_lr));
        }
        if p.max_lr < p.min_lr {
            return bad(format!("lr ({}) must be >= min_lr ({})", p.max_lr, p.min_lr));
        }
        if p.init_lr > p.max_lr {
            return bad(format!("lr_warmup_init ({}) must be <= lr ({})", p.init_lr, p.max_lr));
        }
        if p.lr_decay_steps == 0 {
            return bad("lr_decay_steps must be > 0".into());
        }
        if p.lr_warmup_steps < 0.0 || p.lr_warmup_steps >= p.lr_decay_steps as f64 {
            return bad(format!(
                "lr_warmup_steps ({}) must be in [0, lr_decay_steps = {})",
                p.lr_warmup_steps, p.lr_decay_steps
            ));
        }
        if p.lr_decay_style == LrDecayStyle::Wsd
            && (p.wsd_decay_steps.is_none() || p.lr_wsd_decay_style.is_none())
        {
            return bad("lr_decay_style WSD needs wsd_decay_steps and lr_wsd_decay_style".into());
        }
        if p.start_wd < 0.0 || p.end_wd < p.start_wd {
            return bad(format!(
                "weight decay must satisfy 0 <= start_wd ({}) <= end_wd ({})",
                p.start_wd, p.end_wd
            ));
        }
        // megatron-core asserts this lazily in get_wd; failing at construction is kinder.
        if p.wd_incr_style == WdIncrStyle::Constant && p.start_wd != p.end_wd {
            return bad(format!(
                "weight_decay_incr_style constant needs start_wd == end_wd (got {} and {})",
                p.start_wd, p.end_wd
            ));
        }
        if p.wd_incr_style != WdIncrStyle::Constant && p.wd_incr_steps == 0 {
            return bad("wd_incr_steps must be > 0 for a non-constant weight decay ramp".into());
        }
        Ok(Self { p, num_steps: 0 })
    }

    /// The resolved settings.
    pub fn params(&self) -> &SchedulerParams {
        &self.p
    }

    /// Advances by `increment` samples (the global batch size after each optimizer step).
    pub fn step(&mut self, increment: u64) {
        self.num_steps += increment;
    }

    /// Learning rate at the current `num_steps` with the scheduler's own `max_lr` / `min_lr`.
    pub fn get_lr(&self) -> f64 {
        self.get_lr_with(self.p.max_lr, self.p.min_lr)
    }

    /// Learning rate for a parameter group that overrides `max_lr` / `min_lr` (megatron-core reads
    /// them from the param group, e.g. for a decoupled embedding lr).
    pub fn get_lr_with(&self, max_lr: f64, min_lr: f64) -> f64 {
        let p = &self.p;
        let n = self.num_steps as f64;
        // Linear warmup for the initial part.
        if p.lr_warmup_steps > 0.0 && n <= p.lr_warmup_steps {
            return p.init_lr + (max_lr - p.init_lr) * n / p.lr_warmup_steps;
        }
        if p.lr_decay_style == LrDecayStyle::Constant {
            return max_lr;
        }
        if self.num_steps > p.lr_decay_steps {
            return min_lr;
        }
        if p.lr_decay_style == LrDecayStyle::InverseSquareRoot {
            let warmup_steps = p.lr_warmup_steps.max(1.0);
            let num_steps = n.max(1.0);
            // Python's `x**0.5` is pow(x, 0.5); keep it for bit equality.
            let lr = max_lr * warmup_steps.powf(0.5) / num_steps.powf(0.5);
            return min_lr.max(lr);
        }
        let decay_ratio = (n - p.lr_warmup_steps) / (p.lr_decay_steps as f64 - p.lr_warmup_steps);
        let delta_lr = max_lr - min_lr;
        let coeff = match p.lr_decay_style {
            LrDecayStyle::Linear => 1.0 - decay_ratio,
            LrDecayStyle::Cosine => 0.5 * ((std::f64::consts::PI * decay_ratio).cos() + 1.0),
            LrDecayStyle::Wsd => {
                // Both unwraps were checked in `new`.
                let wsd_decay_steps = p.wsd_decay_steps.unwrap_or(0);
                let anneal_start = p.lr_decay_steps as i128 - wsd_decay_steps as i128;
                if (self.num_steps as i128) <= anneal_start {
                    1.0
                } else {
                    let wsd_steps = (self.num_steps as i128 - anneal_start) as f64;
                    let r = wsd_steps / wsd_decay_steps as f64;
                    match p.lr_wsd_decay_style.unwrap_or(WsdDecayStyle::Exponential) {
                        WsdDecayStyle::Linear => 1.0 - r,
                        WsdDecayStyle::Cosine => 0.5 * ((std::f64::consts::PI * r).cos() + 1.0),
                        WsdDecayStyle::Exponential => (2.0 * 0.5f64.powf(r)) - 1.0,
                        WsdDecayStyle::MinusSqrt => 1.0 - r.sqrt(),
                    }
                }
            }
            LrDecayStyle::Constant | LrDecayStyle::InverseSquareRoot => unreachable!(),
        };
        min_lr + coeff * delta_lr
    }

    /// Weight decay at the current `num_steps` (before a group's `wd_mult`; groups without
    /// decay multiply by 0).
    pub fn get_wd(&self) -> f64 {
        let p = &self.p;
        if self.num_steps > p.wd_incr_steps {
            return p.end_wd;
        }
        let incr_ratio = self.num_steps as f64 / p.wd_incr_steps as f64;
        let delta_wd = p.end_wd - p.start_wd;
        let coeff = match p.wd_incr_style {
            WdIncrStyle::Constant => return p.end_wd,
            WdIncrStyle::Linear => incr_ratio,
            WdIncrStyle::Cosine => 0.5 * ((std::f64::consts::PI * (1.0 - incr_ratio)).cos() + 1.0),
        };
        p.start_wd + coeff * delta_wd
    }

    /// State for a checkpoint (megatron-core's `state_dict()`).
    pub fn state(&self) -> SchedulerState {
        let p = &self.p;
        SchedulerState {
            max_lr: p.max_lr,
            lr_warmup_steps: p.lr_warmup_steps,
            num_steps: self.num_steps,
            lr_decay_style: p.lr_decay_style,
            lr_decay_steps: p.lr_decay_steps,
            min_lr: p.min_lr,
            start_wd: p.start_wd,
            end_wd: p.end_wd,
            wd_incr_style: p.wd_incr_style,
            wd_incr_steps: p.wd_incr_steps,
        }
    }

    /// Restores a checkpointed state (megatron-core's `load_state_dict()`): each schedule value
    /// is reconciled per `policy`, then `num_steps` is set to the checkpoint's. megatron-core
    /// *adds* the checkpoint's count to its own, which is the same thing for a freshly built
    /// scheduler, the only case it supports.
    pub fn load_state(
        &mut self,
        s: &SchedulerState,
        policy: ResumePolicy,
    ) -> Result<(), SchedulerError> {
        fn pick<T: PartialEq + fmt::Display + Copy>(
            policy: ResumePolicy,
            name: &'static str,
            configured: T,
            checkpoint: T,
        ) -> Result<T, SchedulerError> {
            match policy {
                ResumePolicy::Override => Ok(configured),
                ResumePolicy::UseCheckpoint => Ok(checkpoint),
                ResumePolicy::Strict if configured == checkpoint => Ok(checkpoint),
                ResumePolicy::Strict => Err(SchedulerError::CheckpointMismatch {
                    name,
                    configured: configured.to_string(),
                    checkpoint: checkpoint.to_string(),
                }),
            }
        }
        let mut p = self.p.clone();
        p.max_lr = pick(policy, "learning rate", p.max_lr, s.max_lr)?;
        p.min_lr = pick(policy, "minimum learning rate", p.min_lr, s.min_lr)?;
        p.lr_warmup_steps =
            pick(policy, "warmup iterations", p.lr_warmup_steps, s.lr_warmup_steps)?;
        p.lr_decay_steps =
            pick(policy, "total number of iterations", p.lr_decay_steps, s.lr_decay_steps)?;
        p.lr_decay_style =
            pick(policy, "learning rate decay style", p.lr_decay_style, s.lr_decay_style)?;
        p.start_wd = pick(policy, "start weight decay", p.start_wd, s.start_wd)?;
        p.end_wd = pick(policy, "end weight decay", p.end_wd, s.end_wd)?;
        p.wd_incr_steps = pick(
            policy,
            "total number of weight decay iterations",
            p.wd_incr_steps,
            s.wd_incr_steps,
        )?;
        p.wd_incr_style =
            pick(policy, "weight decay incr style", p.wd_incr_style, s.wd_incr_style)?;
        // Re-check invariants: checkpoint values may not fit this run's other settings.
        let mut restored = Self::new(p)?;
        restored.num_steps = s.num_steps;
        *self = restored;
        Ok(())
    }
}

pub use super::schedule_resolve::ScheduleInputs;
