//! Loss scaling for fp16 training, as megatron-core's `ConstantGradScaler` and
//! `DynamicGradScaler` (`megatron/core/optimizer/grad_scaler.py`).
//!
//! The objective is multiplied by the scale before the backward, so small fp16 gradients do
//! not flush to zero; the optimizer divides it out again (folded into its gradient factor,
//! with the clipping coefficient). A non-finite gradient norm means the scaled gradients
//! overflowed: the step is skipped and the dynamic scaler backs off. Megatron's defaults:
//! growth ×2 after `loss_scale_window` clean steps, back-off ×0.5 once `hysteresis`
//! overflows have been seen, never below `min_loss_scale`.

pub use crate::ckpt::GradScalerState;
use crate::config::optimizer::OptimizerConfig;

const GROWTH_FACTOR: f64 = 2.0;
const BACKOFF_FACTOR: f64 = 0.5;

/// The loss scale of an fp16 run.
#[derive(Debug, Clone, PartialEq)]
pub enum LossScaler {
    /// `mixed_precision.loss_scale` set: that scale, always.
    Constant(f64),
    /// Otherwise: starts at `initial_loss_scale`, adapts to overflows.
    Dynamic { state: GradScalerState, min_scale: f64, window: usize, hysteresis: usize },
}

impl LossScaler {
    /// The scaler an fp16 run uses (`optimizer.fp16`, which the `mixed_precision` presets
    /// set); None for bf16 and f32 runs (no scaling).
    pub fn from_config(mp: &OptimizerConfig) -> Option<Self> {
        if !mp.fp16 {
            return None;
        }
        Some(match mp.loss_scale {
            Some(s) => Self::Constant(s),
            None => Self::Dynamic {
                state: GradScalerState {
                    scale: mp.initial_loss_scale,
                    growth_tracker: 0,
                    hysteresis_tracker: mp.hysteresis,
                },
                min_scale: mp.min_loss_scale,
                window: mp.loss_scale_window,
                hysteresis: mp.hysteresis,
            },
        })
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        match self {
            Self::Constant(s) => *s,
            Self::Dynamic { state, .. } => state.scale,
        }
    }

    /// After a step: `found_inf` when the scaled gradients overflowed (the step was skipped).
    pub fn update(&mut self, found_inf: bool) {
        let Self::Dynamic { state, min_scale, window, hysteresis } = self else { return };
        if found_inf {
            state.growth_tracker = 0;
            state.hysteresis_tracker = state.hysteresis_tracker.saturating_sub(1);
            if state.hysteresis_tracker == 0 {
                state.scale = (state.scale * BACKOFF_FACTOR).max(*min_scale);
            }
        } else {
            state.growth_tracker += 1;
            if state.growth_tracker == *window {
                state.growth_tracker = 0;
                state.hysteresis_tracker = *hysteresis;
                state.scale *= GROWTH_FACTOR;
            }
        }
    }

    /// The state a checkpoint keeps (None for a constant scale).
    pub fn state(&self) -> Option<GradScalerState> {
        match self {
            Self::Constant(_) => None,
            Self::Dynamic { state, .. } => Some(*state),
        }
    }

    /// Continues from a checkpoint's state (a constant scale ignores it).
    pub fn restore(&mut self, saved: GradScalerState) {
        if let Self::Dynamic { state, .. } = self {
            *state = saved;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(initial: f64, window: usize, hysteresis: usize) -> LossScaler {
        let mp = OptimizerConfig {
            fp16: true,
            initial_loss_scale: initial,
            min_loss_scale: 1.0,
            loss_scale_window: window,
            hysteresis,
            ..Default::default()
        };
        LossScaler::from_config(&mp).unwrap()
    }

    #[test]
    fn backs_off_after_hysteresis_overflows_and_grows_after_a_window() {
        let mut s = dynamic(1024.0, 3, 2);
        s.update(true); // first overflow: hysteresis 2 → 1, scale kept
        assert_eq!(s.scale(), 1024.0);
        s.update(true); // second: back off
        assert_eq!(s.scale(), 512.0);
        s.update(true); // hysteresis stays spent: every further overflow backs off
        assert_eq!(s.scale(), 256.0);
        for _ in 0..2 {
            s.update(false);
        }
        assert_eq!(s.scale(), 256.0);
        s.update(false); // third clean step: grow, hysteresis refilled
        assert_eq!(s.scale(), 512.0);
        assert_eq!(
            s.state(),
            Some(GradScalerState { scale: 512.0, growth_tracker: 0, hysteresis_tracker: 2 })
        );
        s.update(true);
        assert_eq!(s.scale(), 512.0, "hysteresis again absorbs one overflow");
    }

    #[test]
    fn never_below_the_minimum_and_constant_scales_stay() {
        let mut s = dynamic(2.0, 1000, 1);
        for _ in 0..5 {
            s.update(true);
        }
        assert_eq!(s.scale(), 1.0);
        let mp = OptimizerConfig { fp16: true, loss_scale: Some(128.0), ..Default::default() };
        let mut c = LossScaler::from_config(&mp).unwrap();
        c.update(true);
        assert_eq!((c.scale(), c.state()), (128.0, None));
        let bf16 = OptimizerConfig { bf16: true, ..Default::default() };
        assert!(LossScaler::from_config(&bf16).is_none());
    }
}
