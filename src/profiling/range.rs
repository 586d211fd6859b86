//! Scoped ranges (training step, phase, layer) that reach NVTX and/or the Chrome trace while
//! the profiler has switched them on for this thread, and cost one thread-local check when off.
//!
//! The switch is thread-local because every rank of an in-process multi-rank run is a thread:
//! rank 0's window must not record rank 1's layers. The trainer's own thread is the only one
//! that opens ranges.

use std::borrow::Cow;
use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;

use super::trace::TraceEvent;

/// What ranges do on this thread while the profiler has them on.
pub(super) struct Active {
    /// Push/pop NVTX ranges.
    pub(super) nvtx: bool,
    /// Record complete events here (the Chrome trace is on and the step is in the window).
    pub(super) events: Option<Vec<TraceEvent>>,
    /// Time zero of the trace.
    pub(super) origin: Instant,
    /// Synchronized before a traced range closes, so that on a GPU its duration covers the
    /// kernels it launched and not only their launch (candle's work is asynchronous).
    pub(super) device: Device,
    /// The training iteration (1-based, as logged) the events belong to.
    pub(super) iteration: u64,
    /// Record the memory in use where each range opens and closes (the memory report is on
    /// and the step is in the window).
    pub(super) memory: Option<Vec<MemoryPoint>>,
}

/// The memory in use where a range opened or closed: device pool bytes on a GPU, the
/// process's resident set on the CPU. Sampled without synchronizing: the stream-ordered
/// pool counts an allocation when it is queued, so the points follow program order.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPoint {
    /// `begin` or `end`.
    pub at: &'static str,
    pub name: String,
    pub cat: &'static str,
    pub sample: super::memory::MemoryNow,
}

thread_local! {
    static ACTIVE: RefCell<Option<Active>> = const { RefCell::new(None) };
}

/// Installs `a` as this thread's range settings (replacing any).
pub(super) fn install(a: Active) {
    ACTIVE.with(|s| *s.borrow_mut() = Some(a));
}

/// Removes this thread's range settings, handing back what they recorded.
pub(super) fn uninstall() -> Option<Active> {
    ACTIVE.with(|s| s.borrow_mut().take())
}

/// An open range; closed when dropped.
#[must_use = "a range closes when dropped: bind it with `let _r = ...`"]
pub struct Range {
    open: Option<Open>,
}

struct Open {
    nvtx: bool,
    traced: Option<Instant>,
    cat: &'static str,
    name: Cow<'static, str>,
}

impl Range {
    /// A training phase (`forward-backward`, `grad-reduce-and-clip`, `optimizer`).
    pub fn phase(name: &'static str) -> Self {
        Self::open("phase", || Cow::Borrowed(name))
    }

    /// The forward pass of transformer layer `index` of this model chunk.
    pub fn layer(index: usize) -> Self {
        Self::open("layer", || Cow::Owned(format!("layer {index} forward")))
    }

    /// The written-out backward of transformer layer `index` of this model chunk.
    pub fn layer_backward(index: usize) -> Self {
        Self::open("layer", || Cow::Owned(format!("layer {index} backward")))
    }

    /// The forward (`pass` = "forward") or backward of micro-batch `index` on model chunk
    /// `chunk` (the pipeline schedule's passes).
    pub fn microbatch(pass: &'static str, chunk: usize, index: usize) -> Self {
        Self::open("microbatch", || Cow::Owned(format!("chunk {chunk} micro-batch {index} {pass}")))
    }

    /// One training iteration (the profiler opens these itself).
    pub(super) fn step(iteration: u64) -> Self {
        Self::open("step", || Cow::Owned(format!("iteration {iteration}")))
    }

    fn open(cat: &'static str, name: impl FnOnce() -> Cow<'static, str>) -> Self {
        let open = ACTIVE.with(|s| {
            let s = s.borrow();
            let a = s.as_ref()?;
            let name = name();
            if a.nvtx {
                crate::ops::nvtx::push(&name);
            }
            Some(Open { nvtx: a.nvtx, traced: a.events.is_some().then(Instant::now), cat, name })
        });
        let range = Self { open };
        range.memory_point("begin");
        range
    }

    fn memory_point(&self, at: &'static str) {
        let Some(o) = self.open.as_ref() else { return };
        ACTIVE.with(|s| {
            let mut s = s.borrow_mut();
            let Some(Active { device, memory: Some(points), .. }) = s.as_mut() else { return };
            let sample = super::memory::MemoryNow::of(device);
            points.push(MemoryPoint { at, name: o.name.to_string(), cat: o.cat, sample });
        });
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        self.memory_point("end");
        let Some(o) = self.open.take() else { return };
        if let Some(start) = o.traced {
            ACTIVE.with(|s| {
                let mut s = s.borrow_mut();
                let Some(a) = s.as_mut() else { return };
                // A failed synchronize means the device is already broken; the step itself
                // reports that error, the profiler must not panic or hide it.
                let _ = a.device.synchronize();
                let end = Instant::now();
                let iteration = a.iteration;
                if let Some(events) = a.events.as_mut() {
                    events.push(TraceEvent {
                        name: o.name.to_string(),
                        cat: o.cat,
                        ts_us: start.saturating_duration_since(a.origin).as_secs_f64() * 1e6,
                        dur_us: end.saturating_duration_since(start).as_secs_f64() * 1e6,
                        iteration,
                    });
                }
            });
        }
        if o.nvtx {
            crate::ops::nvtx::pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_record_only_while_installed_and_nest() {
        drop(Range::phase("before"));
        install(Active {
            nvtx: false,
            events: Some(Vec::new()),
            origin: Instant::now(),
            device: Device::Cpu,
            iteration: 7,
            memory: None,
        });
        {
            let _s = Range::step(7);
            let _l = Range::layer(3);
        }
        let a = uninstall().unwrap();
        drop(Range::phase("after"));
        let ev = a.events.unwrap();
        let names: Vec<_> = ev.iter().map(|e| (e.name.as_str(), e.cat, e.iteration)).collect();
        assert_eq!(names, [("layer 3 forward", "layer", 7), ("iteration 7", "step", 7)]);
        // The layer lies inside the step.
        assert!(ev[0].ts_us >= ev[1].ts_us);
        assert!(ev[0].ts_us + ev[0].dur_us <= ev[1].ts_us + ev[1].dur_us);
    }

    #[test]
    fn nvtx_only_records_no_events() {
        install(Active {
            nvtx: true,
            events: None,
            origin: Instant::now(),
            device: Device::Cpu,
            iteration: 1,
            memory: None,
        });
        drop(Range::phase("optimizer"));
        assert!(uninstall().unwrap().events.is_none());
    }
}
