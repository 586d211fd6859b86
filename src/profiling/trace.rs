//! The Chrome trace (Trace Event Format, JSON) that stands in for Megatron Bridge's PyTorch
//! profiler output: one complete event (`"ph": "X"`) per training iteration, phase and layer
//! forward of the profiled window, loadable by `chrome://tracing` and ui.perfetto.dev.
//!
//! Layout (`pid` = global rank, `tid` = 0, times in microseconds from the profiler's start):
//!
//! ```json
//! {"traceEvents": [
//!   {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "mbridge rank 0"}},
//!   {"name": "iteration 3", "cat": "step", "ph": "X", "ts": 1520.5, "dur": 830.2,
//!    "pid": 0, "tid": 0, "args": {"iteration": 3}},
//!   {"name": "forward-backward", "cat": "phase", ...},
//!   {"name": "layer 0 forward", "cat": "layer", ...}],
//!  "displayTimeUnit": "ms",
//!  "otherData": {"producer": "mbridge", "profile_step_start": 2, "profile_step_end": 4, ...}}
//! ```
//!
//! Written by hand with serde_json: complete events are all it needs, and a subscriber-based
//! tracer (tracing-chrome) would also capture every unrelated `tracing` span of the process.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// One closed range.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceEvent {
    pub name: String,
    /// `step`, `phase` or `layer`.
    pub cat: &'static str,
    pub ts_us: f64,
    pub dur_us: f64,
    /// Training iteration (1-based, as logged).
    pub iteration: u64,
}

/// The trace document for `events` of global rank `rank`; `other` goes to `otherData`.
pub fn document(rank: usize, events: &[TraceEvent], other: Value) -> Value {
    let mut sorted: Vec<&TraceEvent> = events.iter().collect();
    // Start order, and at equal starts the longer (enclosing) event first, so viewers that
    // stack by order nest iterations > phases > layers.
    sorted.sort_by(|a, b| a.ts_us.total_cmp(&b.ts_us).then(b.dur_us.total_cmp(&a.dur_us)));
    let mut out = vec![
        json!({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
               "args": {"name": format!("mbridge rank {rank}")}}),
        json!({"name": "thread_name", "ph": "M", "pid": rank, "tid": 0,
               "args": {"name": "training loop"}}),
    ];
    out.extend(sorted.into_iter().map(|e| {
        json!({"name": e.name, "cat": e.cat, "ph": "X", "ts": e.ts_us, "dur": e.dur_us,
               "pid": rank, "tid": 0, "args": {"iteration": e.iteration}})
    }));
    json!({"traceEvents": out, "displayTimeUnit": "ms", "otherData": other})
}

/// Writes `doc` to `path` through a temporary file, so a crash never leaves half a trace.
pub fn write(path: &Path, doc: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(doc).context("cannot serialize the trace")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move the trace into place at `{}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, cat: &'static str, ts: f64, dur: f64) -> TraceEvent {
        TraceEvent { name: name.into(), cat, ts_us: ts, dur_us: dur, iteration: 2 }
    }

    #[test]
    fn events_are_complete_sorted_and_parents_first() {
        let doc = document(
            3,
            &[ev("layer 0 forward", "layer", 10.0, 5.0), ev("iteration 2", "step", 10.0, 50.0)],
            json!({"producer": "mbridge"}),
        );
        let evs = doc["traceEvents"].as_array().unwrap();
        assert_eq!(evs[0]["ph"], "M");
        assert_eq!(evs[0]["args"]["name"], "mbridge rank 3");
        assert_eq!(evs[2]["name"], "iteration 2");
        assert_eq!(evs[3]["name"], "layer 0 forward");
        for e in &evs[2..] {
            assert_eq!(e["ph"], "X");
            assert_eq!(e["pid"], 3);
            assert_eq!(e["args"]["iteration"], 2);
        }
        assert_eq!(doc["otherData"]["producer"], "mbridge");
    }

    #[test]
    fn write_leaves_only_the_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rank-0.json");
        write(&p, &document(0, &[], Value::Null)).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["rank-0.json"]);
        let back: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back["traceEvents"].as_array().unwrap().len(), 2);
    }
}
