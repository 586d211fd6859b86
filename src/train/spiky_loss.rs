//! `rerun_state_machine.check_for_spiky_loss` with the rerun state machine disabled (Megatron
//! Bridge's default `rerun_mode`): megatron-core's `is_unexpectedly_large` over each
//! micro-batch's summed loss. The first 100 values set the largest one seen; from then on a
//! value at least `spiky_loss_factor` times it is reported as a warning, and training goes
//! on (`fatal=False`), as Megatron Bridge's loss function asks.

/// Values that set the reference maximum before any is judged (megatron-core's `num_samples`).
const SAMPLES: usize = 100;

/// The state of the check over a run.
#[derive(Debug, Clone)]
pub struct SpikyLoss {
    factor: f64,
    seen: usize,
    max: f64,
}

impl SpikyLoss {
    pub fn new(factor: f64) -> Self {
        Self { factor, seen: 0, max: 0.0 }
    }

    /// Whether `value` is unexpectedly large; NaN and infinities are left to the NaN check.
    pub fn is_spiky(&mut self, value: f64) -> bool {
        let value = value.abs();
        if !value.is_finite() {
            return false;
        }
        if self.seen < SAMPLES {
            self.seen += 1;
            self.max = self.max.max(value);
            if self.seen == SAMPLES {
                tracing::warn!("Max value for loss: {}", self.max);
            }
            return false;
        }
        value >= self.max * self.factor
    }

    /// Checks a step's micro-batch loss sums (this rank's, in order) and warns about each
    /// spiky one in megatron-core's words.
    pub fn check_all(&mut self, sums: &[f64], iteration: u64, rank: usize) {
        for &s in sums {
            if self.is_spiky(s) {
                tracing::warn!(
                    "Rank {rank}, node {}, iteration {iteration}: Unexpected result {s} \
                     (message='Spiky loss')",
                    hostname()
                );
            }
        }
    }
}

/// This machine's name, as the warning names the node.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_beyond_the_factor_of_the_first_hundred_are_spiky() {
        let mut s = SpikyLoss::new(10.0);
        // The first 100 only set the maximum, however large.
        for i in 0..SAMPLES {
            assert!(!s.is_spiky(if i == 50 { 8.0 } else { 1.0 }));
        }
        assert!(!s.is_spiky(79.9));
        assert!(s.is_spiky(80.0));
        assert!(s.is_spiky(-80.0), "magnitudes count");
        assert!(!s.is_spiky(f64::NAN) && !s.is_spiky(f64::INFINITY));
    }
}
