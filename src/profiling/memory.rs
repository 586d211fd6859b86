//! `profiling.record_memory_history`: mbridge's memory report, written as JSON at the end of
//! the profiling window. It is **not** PyTorch's memory snapshot (`torch.cuda.memory._snapshot()`
//! pickled for `memory_viz`): mbridge has no allocator trace to pickle, and no pickle is
//! written. Instead it records, per step of the window, the memory in use, a timeline of the
//! memory in use where each profiling range (phase, micro-batch pass, layer forward and
//! written-out backward) opens and closes with the point where the step held the most, and
//! at the end the largest live tensors by name:
//!
//! ```json
//! {"format": "mbridge-memory-report", "version": 1,
//!  "note": "not a PyTorch memory snapshot (no pickle) ...",
//!  "rank": 0, "device": "cuda:0", "complete": true,
//!  "window": {"profile_step_start": 10, "profile_step_end": 12, "iterations": [11, 12]},
//!  "steps": [{"iteration": 11,
//!             "allocated_bytes": 1, "max_allocated_bytes": 2,   // CUDA pool; absent on CPU
//!             "reserved_bytes": 3, "max_reserved_bytes": 4,     // (max = since the run began)
//!             "rss_bytes": 5, "peak_rss_bytes": 6,              // process RSS and its peak
//!             "timeline_peak": {"bytes": 2, "at": "end layer 0 forward",
//!                               "after": "begin layer 0 forward"},
//!             "timeline": [{"at": "begin", "name": "iteration 11", "cat": "step",
//!                           "allocated_bytes": 1, "max_allocated_bytes": 2}]}],
//!                           // (on the CPU: "rss_bytes" instead of the two pool fields)
//!  "totals_bytes": {"param": 7, "main_param": 8, "exp_avg": 9, "exp_avg_sq": 9, "grad": 8},
//!  "largest_tensors": [{"name": "embedding.word_embeddings.weight", "kind": "param",
//!                       "dtype": "bf16", "shape": [128256, 2048], "bytes": 525336576}]}
//! ```
//!
//! `complete` is false when training ended inside the window. RSS comes from
//! `/proc/self/status` (`VmRSS`, `VmHWM`): on CPU it is where the tensors live; ranks run as
//! threads of one process share it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, DeviceLocation, Tensor};
use serde_json::{json, Map, Value};

use super::range::MemoryPoint;
use crate::train::memory::{device_memory, MemStats};

/// How many tensors `largest_tensors` lists.
pub const LARGEST: usize = 20;

/// One live tensor the run holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Megatron parameter name (optimizer shards: `name[start..end]`).
    pub name: String,
    /// `param`, `main_param` (fp32 master), `exp_avg`, `exp_avg_sq` or `grad`.
    pub kind: &'static str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

impl TensorEntry {
    /// The entry for tensor `t`.
    pub fn of(name: &str, kind: &'static str, t: &Tensor) -> Self {
        Self {
            name: name.to_string(),
            kind,
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
            bytes: (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        }
    }
}

/// Memory in use after one step.
#[derive(Debug, Clone, PartialEq)]
pub struct MemorySample {
    pub iteration: u64,
    /// The device pool (CUDA only).
    pub device: Option<MemStats>,
    /// `(VmRSS, VmHWM)` in bytes, when `/proc/self/status` is readable.
    pub host: Option<(u64, u64)>,
    /// Memory where each profiling range of the step opened and closed, in order.
    pub timeline: Vec<MemoryPoint>,
}

/// Samples memory after `iteration` on `device`.
pub fn sample(device: &Device, iteration: u64, timeline: Vec<MemoryPoint>) -> MemorySample {
    MemorySample { iteration, device: device_memory(device), host: host_rss().ok(), timeline }
}

/// Memory in use at one moment of a step: the device pool's bytes in use and its high-water
/// mark on a GPU, the process's resident set on the CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryNow {
    Device { allocated: u64, max_allocated: u64 },
    Host { rss: u64 },
    Unknown,
}

impl MemoryNow {
    /// Memory in use now on `device`.
    pub fn of(device: &Device) -> Self {
        match device_memory(device) {
            Some(m) => Self::Device { allocated: m.allocated, max_allocated: m.max_allocated },
            None => host_rss().map_or(Self::Unknown, |(rss, _)| Self::Host { rss }),
        }
    }

    /// The bytes in use (pool or resident set).
    fn in_use(&self) -> Option<u64> {
        match *self {
            Self::Device { allocated, .. } => Some(allocated),
            Self::Host { rss } => Some(rss),
            Self::Unknown => None,
        }
    }

    fn insert_into(&self, m: &mut Map<String, Value>) {
        match *self {
            Self::Device { allocated, max_allocated } => {
                m.insert("allocated_bytes".into(), json!(allocated));
                m.insert("max_allocated_bytes".into(), json!(max_allocated));
            }
            Self::Host { rss } => {
                m.insert("rss_bytes".into(), json!(rss));
            }
            Self::Unknown => {}
        }
    }
}

/// A step's timeline as JSON, and where it held the most memory: the point with the largest
/// bytes in use, with the point before it (the peak lies between the two).
fn timeline_json(points: &[MemoryPoint]) -> (Vec<Value>, Option<Value>) {
    let label = |p: &MemoryPoint| format!("{} {}", p.at, p.name);
    let rows = points
        .iter()
        .map(|p| {
            let mut m = Map::new();
            m.insert("at".into(), json!(p.at));
            m.insert("name".into(), json!(p.name));
            m.insert("cat".into(), json!(p.cat));
            p.sample.insert_into(&mut m);
            Value::Object(m)
        })
        .collect();
    // The first of equal maxima (where the step first got there): `max_by_key` keeps the
    // last, so the points go in reverse.
    let most = points
        .iter()
        .enumerate()
        .rev()
        .filter_map(|(i, p)| p.sample.in_use().map(|b| (i, b)))
        .max_by_key(|&(_, b)| b);
    let peak = most.map(|(i, bytes)| {
        json!({"bytes": bytes, "at": label(&points[i]),
               "after": i.checked_sub(1).map(|j| label(&points[j]))})
    });
    (rows, peak)
}

/// `(VmRSS, VmHWM)` of this process in bytes.
pub fn host_rss() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status (process memory is reported on Linux only)")?;
    parse_status(&s)
}

fn parse_status(s: &str) -> Result<(u64, u64)> {
    let field = |key: &str| -> Result<u64> {
        let line = s
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("/proc/self/status has no `{key}` line"))?;
        let kb: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("unexpected /proc/self/status line `{line}`"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Where rank `rank` writes its report: Megatron Bridge inserts `_<rank>` before the
/// extension; a `.pickle`/`.pkl` extension becomes `.json`, since the file is JSON.
pub fn report_path(memory_snapshot_path: &str, rank: usize) -> PathBuf {
    let p = Path::new(memory_snapshot_path);
    let stem = p.file_stem().map_or_else(|| "snapshot".into(), |s| s.to_string_lossy());
    let ext = match p.extension().map(|e| e.to_string_lossy().to_lowercase()) {
        None => "json".to_string(),
        Some(e) if e == "pickle" || e == "pkl" => "json".to_string(),
        Some(e) => e,
    };
    p.with_file_name(format!("{stem}_{rank}.{ext}"))
}

/// Window bounds as the report states them.
#[derive(Debug, Clone, Copy)]
pub struct WindowInfo {
    pub profile_step_start: usize,
    pub profile_step_end: usize,
}

/// The report document.
pub fn report(
    rank: usize,
    device: &Device,
    window: WindowInfo,
    samples: &[MemorySample],
    tensors: &[TensorEntry],
    complete: bool,
) -> Value {
    let steps: Vec<Value> = samples
        .iter()
        .map(|s| {
            let mut m = Map::new();
            m.insert("iteration".into(), json!(s.iteration));
            if let Some(d) = &s.device {
                m.insert("allocated_bytes".into(), json!(d.allocated));
                m.insert("max_allocated_bytes".into(), json!(d.max_allocated));
                m.insert("reserved_bytes".into(), json!(d.reserved));
                m.insert("max_reserved_bytes".into(), json!(d.max_reserved));
            }
            if let Some((rss, hwm)) = s.host {
                m.insert("rss_bytes".into(), json!(rss));
                m.insert("peak_rss_bytes".into(), json!(hwm));
            }
            if !s.timeline.is_empty() {
                let (rows, peak) = timeline_json(&s.timeline);
                m.insert("timeline_peak".into(), peak.unwrap_or(Value::Null));
                m.insert("timeline".into(), Value::Array(rows));
            }
            Value::Object(m)
        })
        .collect();
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for t in tensors {
        *totals.entry(t.kind).or_default() += t.bytes;
    }
    let mut largest: Vec<&TensorEntry> = tensors.iter().collect();
    largest.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    largest.truncate(LARGEST);
    let largest: Vec<Value> = largest
        .into_iter()
        .map(|t| {
            json!({"name": t.name, "kind": t.kind, "dtype": t.dtype.as_str(),
                   "shape": t.shape, "bytes": t.bytes})
        })
        .collect();
    let device = match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    };
    let iterations: Vec<usize> =
        (window.profile_step_start + 1..=window.profile_step_end).collect();
    json!({
        "format": "mbridge-memory-report",
        "version": 1,
        "note": "mbridge's memory report, not a PyTorch memory snapshot: no pickle, no allocator \
                 trace; per-step memory in use, its timeline over the step's ranges and the \
                 largest live tensors",
        "rank": rank,
        "device": device,
        "complete": complete,
        "window": {"profile_step_start": window.profile_step_start,
                   "profile_step_end": window.profile_step_end,
                   "iterations": iterations},
        "steps": steps,
        "totals_bytes": totals,
        "largest_tensors": largest,
    })
}

/// Writes `doc` to `path` (pretty-printed: people read it) through a temporary file.
pub fn write(path: &Path, doc: &Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(doc).context("cannot serialize the memory report")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        format!("cannot move the memory report into place at `{}`", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_gets_the_rank_and_a_json_extension() {
        assert_eq!(
            report_path("/nemo_run/snapshot.pickle", 0),
            Path::new("/nemo_run/snapshot_0.json")
        );
        assert_eq!(report_path("out/mem.pkl", 3), Path::new("out/mem_3.json"));
        assert_eq!(report_path("out/mem.json", 1), Path::new("out/mem_1.json"));
        assert_eq!(report_path("mem", 2), Path::new("mem_2.json"));
    }

    #[test]
    fn status_lines_parse_to_bytes() {
        let s = "Name:\tmbridge\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status(s).unwrap(), (1024 * 1024, 2048 * 1024));
        assert!(parse_status("Name: x\n").unwrap_err().to_string().contains("VmRSS"));
        assert!(parse_status("VmRSS: lots\nVmHWM: 1 kB\n").is_err());
    }

    #[test]
    fn this_process_has_a_resident_set() {
        let (rss, hwm) = host_rss().unwrap();
        assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
    }

    #[test]
    fn report_totals_by_kind_and_lists_largest_first() {
        let t = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let tensors = vec![
            TensorEntry::of("a", "param", &t(4)),
            TensorEntry::of("b", "param", &t(8)),
            TensorEntry::of("b", "exp_avg", &t(8)),
        ];
        let samples =
            [MemorySample { iteration: 3, device: None, host: Some((10, 20)), timeline: vec![] }];
        let w = WindowInfo { profile_step_start: 2, profile_step_end: 3 };
        let doc = report(1, &Device::Cpu, w, &samples, &tensors, true);
        assert_eq!(doc["totals_bytes"]["param"], 48);
        assert_eq!(doc["totals_bytes"]["exp_avg"], 32);
        assert_eq!(doc["largest_tensors"][0]["bytes"], 32);
        assert_eq!(doc["largest_tensors"][2]["name"], "a");
        assert_eq!(doc["steps"][0]["rss_bytes"], 10);
        assert!(doc["steps"][0].get("allocated_bytes").is_none());
        assert_eq!(doc["window"]["iterations"], json!([3]));
        assert_eq!(doc["device"], "cpu");
    }
}
