//! Per-phase wall times of one iteration (forward, backward, gradient accumulation, clipping,
//! optimizer), printed at debug level (`--log-level debug`) for profiling, together with the
//! sections that model code times inside those phases ([`crate::ops::timing::section`]: each layer's forward and
//! backward, the core attention, the head), summed over the iteration.
//!
//! GPU work is asynchronous, so each mark synchronizes the device first; that costs a little
//! overlap, which is why the timer is off (no synchronization at all) unless debug logging
//! is on for this module.

use candle_core::{Device, Result};
use std::time::Instant;

/// Accumulates `(phase, milliseconds)` since the previous mark.
#[derive(Debug)]
pub struct PhaseTimer {
    device: Device,
    on: bool,
    last: Instant,
    phases: Vec<(&'static str, f64)>,
}

impl PhaseTimer {
    /// A timer for `device`, active when debug logging is enabled here.
    pub fn new(device: &Device) -> Self {
        Self::with_enabled(device, tracing::enabled!(tracing::Level::DEBUG))
    }

    /// A timer that is on or off regardless of the log level.
    pub fn with_enabled(device: &Device, on: bool) -> Self {
        Self { device: device.clone(), on, last: Instant::now(), phases: Vec::new() }
    }

    /// Ends phase `name` (added to an earlier phase of the same name, e.g. per micro-batch).
    pub fn mark(&mut self, name: &'static str) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        self.device.synchronize()?;
        let ms = self.last.elapsed().as_secs_f64() * 1e3;
        match self.phases.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += ms,
            None => self.phases.push((name, ms)),
        }
        self.last = Instant::now();
        Ok(())
    }

    /// `forward 12.3 ms | backward 20.1 ms | ...` (then `; sections: ...` when model code
    /// timed any), or None when off.
    pub fn summary(&self) -> Option<String> {
        self.on.then(|| {
            let phases =
                self.phases.iter().map(|(n, t)| format!("{n} {t:.1} ms")).collect::<Vec<_>>();
            let sections = crate::ops::timing::take_sections();
            match sections.is_empty() {
                true => phases.join(" | "),
                false => format!("{}; sections: {sections}", phases.join(" | ")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_by_name_in_first_seen_order() {
        let mut t = PhaseTimer::with_enabled(&Device::Cpu, true);
        t.mark("forward").unwrap();
        t.mark("backward").unwrap();
        t.mark("forward").unwrap();
        let s = t.summary().unwrap();
        assert!(s.starts_with("forward ") && s.contains(" | backward "), "{s}");
        assert_eq!(s.matches("forward").count(), 1);
        assert_eq!(PhaseTimer::with_enabled(&Device::Cpu, false).summary(), None);
    }
}
