//! `profiling.*` on the CPU: the Chrome trace holds exactly the window's iterations, phases and
//! layers; the memory report lists per-step RSS and the largest tensors; bad settings fail
//! with the key's name.

mod train_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use assert_cmd::Command;
use candle_core::Device;
use mbridge::config::recipes::Task;
use mbridge::config::show::{render, ShowOptions};
use mbridge::config::{finalize, load, ConfigRequest};
use mbridge::parallel::comm::LocalWorld;
use mbridge::parallel::{ProcessGroups, Topology};
use mbridge::train::trainer::Trainer;
use serde_json::Value;
use train_common::tiny_trainer;

const PHASES: [&str; 3] = ["forward-backward", "grad-reduce-and-clip", "optimizer"];
/// tiny_llama: 2 layers, GBS 8 / MBS 4 = 2 micro-batches per step on one rank.
const LAYERS: usize = 2;

fn read_json(p: &Path) -> Value {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The complete events of a trace, checked for shape.
fn complete_events(doc: &Value) -> Vec<&Value> {
    let evs: Vec<&Value> =
        doc["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").collect();
    for e in &evs {
        assert!(e["ts"].as_f64().unwrap() >= 0.0 && e["dur"].as_f64().unwrap() >= 0.0, "{e}");
        assert!(e["name"].is_string() && e["cat"].is_string(), "{e}");
    }
    evs
}

fn within(inner: &Value, outer: &Value) -> bool {
    let (a, b) = (inner["ts"].as_f64().unwrap(), outer["ts"].as_f64().unwrap());
    let (da, db) = (inner["dur"].as_f64().unwrap(), outer["dur"].as_f64().unwrap());
    // Microsecond floats: allow rounding at the edges.
    a + 1e-3 >= b && a + da <= b + db + 1e-3
}

/// Checks a trace of iterations `iters` on one rank with `micro` micro-batches per step.
fn check_trace(doc: &Value, rank: usize, iters: &[u64], micro: usize) {
    let evs = complete_events(doc);
    let it = |e: &Value| e["args"]["iteration"].as_u64().unwrap();
    assert!(evs.iter().all(|e| e["pid"] == rank), "pid must be the rank");
    let seen: BTreeSet<u64> = evs.iter().map(|e| it(e)).collect();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), iters, "iterations outside the window");
    for &i in iters {
        let of = |cat: &str| -> Vec<&Value> {
            evs.iter().copied().filter(|e| it(e) == i && e["cat"] == cat).collect()
        };
        let steps = of("step");
        assert_eq!(steps.len(), 1, "iteration {i}: {steps:?}");
        assert_eq!(steps[0]["name"], format!("iteration {i}"));
        let phases = of("phase");
        let names: Vec<&str> = phases.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, PHASES, "iteration {i}");
        assert!(phases.iter().all(|p| within(p, steps[0])), "phases outside the step");
        // Phases follow each other.
        for w in phases.windows(2) {
            let end = w[0]["ts"].as_f64().unwrap() + w[0]["dur"].as_f64().unwrap();
            assert!(w[1]["ts"].as_f64().unwrap() + 1e-3 >= end, "{w:?}");
        }
        let passes = of("microbatch");
        let names: Vec<&str> = passes.iter().map(|e| e["name"].as_str().unwrap()).collect();
        let expect: Vec<String> = (0..micro)
            .flat_map(|m| ["forward", "backward"].map(|p| format!("chunk 0 micro-batch {m} {p}")))
            .collect();
        assert_eq!(names, expect, "iteration {i}: the schedule's passes in order");
        assert!(passes.iter().all(|p| within(p, phases[0])), "passes outside forward-backward");
        let layers = of("layer");
        assert_eq!(layers.len(), LAYERS * micro, "iteration {i}: one per layer and micro-batch");
        for l in &layers {
            assert!(
                passes.iter().step_by(2).any(|p| within(l, p)),
                "layer forward outside a micro-batch's forward: {l}"
            );
        }
        let mut per_layer = BTreeMap::new();
        for l in &layers {
            *per_layer.entry(l["name"].as_str().unwrap().to_string()).or_insert(0) += 1;
        }
        let expect: BTreeMap<String, usize> =
            (0..LAYERS).map(|k| (format!("layer {k} forward"), micro)).collect();
        assert_eq!(per_layer, expect);
    }
}

#[test]
fn pretrain_writes_a_chrome_trace_of_the_window_only() {
    let dir = tempfile::tempdir().unwrap();
    let tb = dir.path().join("tb");
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "train.train_iters=6",
            "validation.eval_iters=0",
            "profiling.use_pytorch_profiler=true",
            "profiling.profile_step_start=2",
            "profiling.profile_step_end=4",
        ])
        .arg(format!("++logger.tensorboard_dir={}", tb.display()))
        .assert()
        .success()
        .get_output()
        .clone();
    // Megatron Bridge's place: `{tensorboard_dir}/../torch_profile/rank-<rank>`.
    let path = dir.path().join("torch_profile/rank-0.json");
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(log.contains(&format!("written to {}", path.display())), "{log}");
    let doc = read_json(&path);
    check_trace(&doc, 0, &[3, 4], 2);
    assert_eq!(doc["otherData"]["complete"], true);
    assert_eq!(doc["otherData"]["profile_step_start"], 2);
    let names: Vec<_> = std::fs::read_dir(dir.path().join("torch_profile")).unwrap().collect();
    assert_eq!(names.len(), 1, "only the trace (no temporary file) is left");
}

/// A CPU step's memory timeline: the step's ranges open and close in order, each point has
/// the resident set, and the peak is the first point with the most.
fn check_timeline(step: &Value) {
    let iteration = step["iteration"].as_u64().unwrap();
    let points = step["timeline"].as_array().unwrap();
    let label =
        |p: &Value| format!("{} {}", p["at"].as_str().unwrap(), p["name"].as_str().unwrap());
    let labels: Vec<String> = points.iter().map(label).collect();
    assert_eq!(labels.first().unwrap(), &format!("begin iteration {iteration}"));
    assert_eq!(labels.last().unwrap(), &format!("end iteration {iteration}"));
    for wanted in [
        "begin forward-backward",
        "begin chunk 0 micro-batch 1 backward",
        "end layer 1 forward",
        "end optimizer",
    ] {
        assert!(labels.iter().any(|l| l == wanted), "no `{wanted}` in {labels:?}");
    }
    // Every range that opens closes, nested (last opened, first closed).
    let mut open = Vec::new();
    for p in points {
        match p["at"].as_str().unwrap() {
            "begin" => open.push(p["name"].as_str().unwrap()),
            "end" => assert_eq!(open.pop(), p["name"].as_str(), "{labels:?}"),
            other => panic!("point at `{other}`"),
        }
    }
    assert!(open.is_empty());
    let rss: Vec<u64> = points.iter().map(|p| p["rss_bytes"].as_u64().unwrap()).collect();
    assert!(
        rss.iter().all(|&b| b > 0) && points.iter().all(|p| p.get("allocated_bytes").is_none())
    );
    let top = *rss.iter().max().unwrap();
    let first = rss.iter().position(|&b| b == top).unwrap();
    let peak = &step["timeline_peak"];
    assert_eq!(peak["bytes"].as_u64(), Some(top));
    assert_eq!(peak["at"].as_str().unwrap(), labels[first]);
    match first {
        0 => assert!(peak["after"].is_null()),
        i => assert_eq!(peak["after"].as_str().unwrap(), labels[i - 1]),
    }
}

#[test]
fn memory_report_lists_rss_per_step_and_the_largest_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("mem/snapshot.pickle");
    tiny_trainer(&args(&[
        "train.train_iters=5",
        "validation.eval_iters=0",
        "profiling.record_memory_history=true",
        &format!("profiling.memory_snapshot_path={}", snap.display()),
        "profiling.profile_step_start=1",
        "profiling.profile_step_end=3",
    ]))
    .unwrap()
    .train()
    .unwrap();
    // `_<rank>` before the extension, as Megatron Bridge; JSON, so not `.pickle`.
    assert!(!dir.path().join("mem/snapshot_0.pickle").exists());
    let doc = read_json(&dir.path().join("mem/snapshot_0.json"));
    assert_eq!(doc["format"], "mbridge-memory-report");
    assert!(doc["note"].as_str().unwrap().contains("not a PyTorch memory snapshot"));
    assert_eq!(doc["rank"], 0);
    assert_eq!(doc["device"], "cpu");
    assert_eq!(doc["complete"], true);
    let steps = doc["steps"].as_array().unwrap();
    let iters: Vec<u64> = steps.iter().map(|s| s["iteration"].as_u64().unwrap()).collect();
    assert_eq!(iters, [2, 3]);
    for s in steps {
        let (rss, peak) = (s["rss_bytes"].as_u64().unwrap(), s["peak_rss_bytes"].as_u64().unwrap());
        assert!(rss > 0 && peak >= rss, "{s}");
        assert!(s.get("allocated_bytes").is_none(), "no GPU pool on the CPU: {s}");
    }
    for s in steps {
        check_timeline(s);
    }
    let largest = doc["largest_tensors"].as_array().unwrap();
    assert!(!largest.is_empty() && largest.len() <= 20);
    let bytes: Vec<u64> = largest.iter().map(|t| t["bytes"].as_u64().unwrap()).collect();
    assert!(bytes.windows(2).all(|w| w[0] >= w[1]), "largest first: {bytes:?}");
    // tiny_llama's biggest tensors are the gated MLP's fc1 (2·176 × 64, f32) and its state.
    let top = &largest[0];
    assert_eq!(top["bytes"].as_u64().unwrap(), 2 * 176 * 64 * 4, "{top}");
    assert!(top["name"].as_str().unwrap().ends_with("mlp.linear_fc1.weight"), "{top}");
    assert_eq!(top["dtype"], "f32");
    let kinds: BTreeSet<&str> = largest.iter().map(|t| t["kind"].as_str().unwrap()).collect();
    for k in ["param", "exp_avg", "exp_avg_sq", "grad"] {
        assert!(kinds.contains(k), "missing {k} in {kinds:?}");
    }
    assert!(largest.iter().any(|t| t["name"] == "embedding.word_embeddings.weight"));
    let totals = &doc["totals_bytes"];
    // Adam in f32: both moments as large as the trainable parameters.
    assert_eq!(totals["exp_avg"], totals["exp_avg_sq"]);
    assert!(totals["param"].as_u64().unwrap() >= totals["exp_avg"].as_u64().unwrap());
    assert!(totals.get("main_param").is_none(), "f32 parameters are their own masters");
}

#[test]
fn a_run_ending_inside_the_window_writes_what_it_profiled() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run/ckpt");
    tiny_trainer(&args(&[
        "train.train_iters=3",
        "validation.eval_iters=0",
        "profiling.use_pytorch_profiler=true",
        "profiling.profile_step_start=2",
        "profiling.profile_step_end=6",
        &format!("+checkpoint.save={}", ckpt.display()),
    ]))
    .unwrap()
    .train()
    .unwrap();
    // Without a tensorboard_dir the trace sits beside the checkpoint folder.
    let doc = read_json(&dir.path().join("run/torch_profile/rank-0.json"));
    check_trace(&doc, 0, &[3], 2);
    assert_eq!(doc["otherData"]["complete"], false);
}

#[test]
fn only_profile_ranks_write_and_each_rank_traces_its_own_thread() {
    let dir = tempfile::tempdir().unwrap();
    let tb = dir.path().join("tb");
    let overrides = args(&[
        "train.train_iters=3",
        "validation.eval_iters=0",
        "train.micro_batch_size=2",
        "profiling.use_pytorch_profiler=true",
        "profiling.profile_step_start=1",
        "profiling.profile_step_end=2",
        "profiling.profile_ranks=[1]",
        "profiling.record_memory_history=true",
        &format!("profiling.memory_snapshot_path={}", dir.path().join("mem.pickle").display()),
        &format!("++logger.tensorboard_dir={}", tb.display()),
        "ddp.use_distributed_optimizer=true",
    ]);
    let req = ConfigRequest {
        recipe: Some("tiny_llama".into()),
        task: Some(Task::Pretrain),
        overrides,
        ..Default::default()
    };
    let loaded = load(&req).unwrap();
    let toml = render(&loaded.cfg, &loaded.raw, None, ShowOptions::default());
    LocalWorld::run(2, Duration::from_secs(120), |rank, lw| {
        let fin = finalize(loaded.cfg.clone(), Some(2), None)?;
        let topo = Topology::from_config(&fin.cfg.model, &fin.cfg.dist, 2)?;
        let groups = ProcessGroups::local(lw, topo, rank)?;
        Trainer::new_rank(fin, toml.clone(), Device::Cpu, Some(groups))?.train()
    })
    .unwrap();
    let traces = dir.path().join("torch_profile");
    assert!(!traces.join("rank-0.json").exists(), "rank 0 is not in profile_ranks");
    // GBS 8 / (MBS 2 × DP 2) = 2 micro-batches per rank: rank 0's layers must not leak in.
    check_trace(&read_json(&traces.join("rank-1.json")), 1, &[2], 2);
    assert!(!dir.path().join("mem_0.json").exists());
    let mem = read_json(&dir.path().join("mem_1.json"));
    assert_eq!(mem["rank"], 1);
    // The distributed optimizer's fp32 master shards are tensors of their own, and each rank
    // holds about half of them.
    let totals = &mem["totals_bytes"];
    let (master, params) =
        (totals["main_param"].as_u64().unwrap(), totals["param"].as_u64().unwrap());
    assert!(master > 0 && master < params, "{totals}");
    assert_eq!(totals["exp_avg"].as_u64().unwrap(), master);
}

#[test]
fn bad_profiling_settings_fail_with_the_key() {
    let e = tiny_trainer(&args(&[
        "profiling.use_pytorch_profiler=true",
        "profiling.profile_ranks=[1]",
    ]))
    .err()
    .expect("rank 1 does not exist in a one-rank run")
    .to_string();
    assert!(e.contains("`profiling.profile_ranks` names rank 1 but the run has 1 rank"), "{e}");
    let e = tiny_trainer(&args(&[
        "profiling.record_memory_history=true",
        "profiling.memory_snapshot_path=\"\"",
    ]))
    .err()
    .expect("an empty path")
    .to_string();
    assert!(e.contains("`profiling.memory_snapshot_path`"), "{e}");
    // nsys needs the CUDA profiler API: a CPU-only binary refuses it at validation, a CUDA
    // binary on the CPU device when the trainer is built.
    let e = tiny_trainer(&args(&["profiling.use_nsys_profiler=true"]))
        .err()
        .expect("nsys on the CPU")
        .to_string();
    if cfg!(feature = "cuda") {
        assert!(e.contains("needs a CUDA device"), "{e}");
    } else {
        assert!(e.contains("`profiling.use_nsys_profiler` needs a CUDA build"), "{e}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn nsys_on_a_cpu_build_fails_through_the_binary() {
    Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "profiling.use_nsys_profiler=true"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("needs a CUDA build of mbridge"));
}

/// `optimizer.use_precision_aware_optimizer` (with `store_param_remainders`, its default) keeps
/// each bf16 parameter's fp32 master in 2 bytes beside it instead of 4, and with
/// `exp_avg_dtype` / `exp_avg_sq_dtype` = bf16 its moments in 2 bytes each, through the binary.
#[test]
fn the_precision_aware_optimizer_halves_the_masters_of_bf16_parameters() {
    let dir = tempfile::tempdir().unwrap();
    // Bytes of the masters and of each moment per parameter byte.
    let per_param = |extra: &[&str]| -> [f64; 3] {
        let snap = dir.path().join("mem.pickle");
        Command::cargo_bin("mbridge")
            .unwrap()
            .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=2"])
            .args(["validation.eval_iters=0", "mixed_precision=bf16_mixed"])
            .args(["profiling.record_memory_history=true", "profiling.profile_step_start=1"])
            .arg(format!("profiling.memory_snapshot_path={}", snap.display()))
            .args(extra)
            .assert()
            .success();
        let totals = read_json(&dir.path().join("mem_0.json"))["totals_bytes"].clone();
        let bytes = |k: &str| totals[k].as_u64().unwrap_or_else(|| panic!("{k}: {totals}")) as f64;
        ["main_param", "exp_avg", "exp_avg_sq"].map(|k| bytes(k) / bytes("param"))
    };
    // Every parameter is bf16: an f32 copy is twice its bytes, a remainder as many.
    assert_eq!(per_param(&[]), [2.0, 2.0, 2.0]);
    let aware =
        ["optimizer.use_precision_aware_optimizer=true", "ddp.use_distributed_optimizer=true"];
    assert_eq!(per_param(&aware), [1.0, 2.0, 2.0]);
    assert_eq!(
        per_param(&[&aware[..], &["optimizer.store_param_remainders=false"]].concat()),
        [2.0, 2.0, 2.0]
    );
    let bf16_moments = ["optimizer.exp_avg_dtype=bf16", "optimizer.exp_avg_sq_dtype=bf16"];
    assert_eq!(per_param(&[&aware[..], &bf16_moments].concat()), [1.0, 1.0, 1.0]);
    // fp16 moments (scaled in Transformer Engine) are refused, not ignored.
    Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "optimizer.exp_avg_dtype=fp16"])
        .args(aware)
        .assert()
        .failure()
        .stderr(predicates::str::contains("`optimizer.exp_avg_dtype` = F16"));
    Command::cargo_bin("mbridge")
        .unwrap()
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "optimizer.use_precision_aware_optimizer=true",
        ])
        .assert()
        .failure()
        .stderr(predicates::str::contains("only supported with the distributed optimizer"));
}
