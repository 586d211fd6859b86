//! Checkpoint flags and logging through the binary: save_optim/load_optim, save_rng/load_rng,
//! finetune, ckpt_step, wrong shapes, corrupted shards, TensorBoard tags, metrics.jsonl, W&B.

use std::path::Path;
use std::process::Command;

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    /// `(iteration, lm loss)` of every log line (`logger.log_interval=1`).
    fn losses(&self) -> Vec<(u64, f64)> {
        self.stdout
            .lines()
            .filter(|l| l.contains(" iteration ") && l.contains("lm loss:"))
            .map(|l| {
                let it = l.split("iteration").nth(1).unwrap().split('/').next().unwrap();
                let loss = l.split("lm loss: ").nth(1).unwrap().split(' ').next().unwrap();
                (it.trim().parse().unwrap(), loss.parse().unwrap())
            })
            .collect()
    }
}

fn mbridge(extra: &[String]) -> Out {
    let out = Command::new(assert_cmd::cargo::cargo_bin("mbridge"))
        .args(["pretrain", "--recipe", "tiny_llama", "logger.log_interval=1"])
        .args(["validation.eval_iters=0"])
        .args(extra)
        .output()
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn a(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn save_load(dir: &Path) -> Vec<String> {
    vec![
        format!("++checkpoint.save={}", dir.display()),
        format!("++checkpoint.load={}", dir.display()),
    ]
}

fn with(mut v: Vec<String>, more: &[&str]) -> Vec<String> {
    v.extend(a(more));
    v
}

#[test]
fn save_optim_false_then_load_optim() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let first =
        mbridge(&with(save_load(&run), &["train.train_iters=3", "++checkpoint.save_optim=false"]));
    assert!(first.ok, "{}", first.stderr);
    assert!(run.join("iter_0000003/model/index.json").is_file());
    assert!(!run.join("iter_0000003/optimizer").exists(), "save_optim=false wrote optimizer state");
    // Default load_optim=true: a clear error that says what to do.
    let again = mbridge(&with(save_load(&run), &["train.train_iters=5"]));
    assert!(!again.ok);
    assert!(
        again.stderr.contains("no optimizer state") && again.stderr.contains("load_optim=false"),
        "{}",
        again.stderr
    );
    let fresh =
        mbridge(&with(save_load(&run), &["train.train_iters=5", "++checkpoint.load_optim=false"]));
    assert!(fresh.ok, "{}", fresh.stderr);
    assert_eq!(fresh.losses().iter().map(|l| l.0).collect::<Vec<_>>(), [4, 5]);
}

#[test]
fn save_rng_false_then_load_rng() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let first =
        mbridge(&with(save_load(&run), &["train.train_iters=2", "++checkpoint.save_rng=false"]));
    assert!(first.ok, "{}", first.stderr);
    assert!(!run.join("iter_0000002/rng.json").exists());
    let again = mbridge(&with(save_load(&run), &["train.train_iters=3"]));
    assert!(!again.ok && again.stderr.contains("load_rng=false"), "{}", again.stderr);
    let ok =
        mbridge(&with(save_load(&run), &["train.train_iters=3", "++checkpoint.load_rng=false"]));
    assert!(ok.ok, "{}", ok.stderr);
    assert_eq!(ok.losses()[0].0, 3);
    assert!(run.join("iter_0000003/rng.json").is_file(), "save_rng defaults to true");
}

#[test]
fn finetune_loads_weights_only_and_restarts_at_iteration_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let trained = mbridge(&with(save_load(&base), &["train.train_iters=20"]));
    assert!(trained.ok, "{}", trained.stderr);
    let scratch = mbridge(&a(&["train.train_iters=2"]));
    let ft_dir = tmp.path().join("ft");
    let ft = mbridge(&with(
        vec![
            format!("++checkpoint.load={}", base.display()),
            format!("++checkpoint.save={}", ft_dir.display()),
        ],
        &["train.train_iters=2", "++checkpoint.finetune=true"],
    ));
    assert!(ft.ok, "{}", ft.stderr);
    let (l, s) = (ft.losses(), scratch.losses());
    assert_eq!(l[0].0, 1, "finetune restarts at iteration 1");
    assert!(
        l[0].1 < s[0].1 * 0.95,
        "finetune did not start from the trained weights: {l:?} vs {s:?}"
    );
    assert!(ft_dir.join("iter_0000002/train_state.json").is_file());
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ft_dir.join("iter_0000002/train_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["consumed_train_samples"], 16, "train state was not reset");
}

#[test]
fn ckpt_step_picks_an_iteration_and_a_missing_one_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let first =
        mbridge(&with(save_load(&run), &["train.train_iters=4", "++checkpoint.save_interval=2"]));
    assert!(first.ok, "{}", first.stderr);
    let pick =
        mbridge(&with(save_load(&run), &["train.train_iters=4", "++checkpoint.ckpt_step=2"]));
    assert!(pick.ok, "{}", pick.stderr);
    assert_eq!(pick.losses().iter().map(|l| l.0).collect::<Vec<_>>(), [3, 4]);
    let missing =
        mbridge(&with(save_load(&run), &["train.train_iters=4", "++checkpoint.ckpt_step=3"]));
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("ckpt_step=3") && missing.stderr.contains("iter_0000003"),
        "{}",
        missing.stderr
    );
}

#[test]
fn wrong_shape_and_corrupted_shard_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    assert!(mbridge(&with(save_load(&run), &["train.train_iters=1"])).ok);
    let wrong =
        mbridge(&with(save_load(&run), &["train.train_iters=2", "model.ffn_hidden_size=96"]));
    assert!(!wrong.ok);
    assert!(
        wrong.stderr.contains("linear_fc1.weight")
            && wrong.stderr.contains("expected global shape"),
        "{}",
        wrong.stderr
    );
    let shard = run.join("iter_0000001/model/shard_tp00_pp00.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&shard, &bytes).unwrap();
    let bad = mbridge(&with(save_load(&run), &["train.train_iters=2"]));
    assert!(!bad.ok);
    assert!(
        bad.stderr.contains("shard_tp00_pp00.safetensors") && bad.stderr.contains("corrupted"),
        "{}",
        bad.stderr
    );
}

#[test]
fn tensorboard_tags_metrics_jsonl_and_wandb_command() {
    let tmp = tempfile::tempdir().unwrap();
    let tb = tmp.path().join("tb");
    let saved_config = tmp.path().join("configs/run.yaml");
    let out = Command::new(assert_cmd::cargo::cargo_bin("mbridge"))
        .args([
            "pretrain",
            "--recipe",
            "tiny_llama",
            "train.train_iters=6",
            "logger.log_interval=2",
        ])
        .args(["validation.eval_interval=3", "validation.eval_iters=1"])
        .arg(format!("++logger.tensorboard_dir={}", tb.display()))
        .args(["++logger.log_throughput=true", "++logger.log_memory_to_tensorboard=true"])
        .args([
            "++logger.log_validation_ppl_to_tensorboard=true",
            "++logger.log_timers_to_tensorboard=true",
        ])
        .args(["++logger.wandb_project=my-proj", "++logger.wandb_entity=team"])
        .arg("logger.log_params_norm=true")
        .args(["logger.log_runtime_to_tensorboard=true", "logger.runtime_time_unit=\"seconds\""])
        .arg(format!("logger.save_config_filepath=\"{}\"", saved_config.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cmd =
        format!("wandb sync --sync-tensorboard --project my-proj --entity team {}", tb.display());
    assert!(stdout.contains(&cmd), "{stdout}");
    let event = std::fs::read_dir(&tb)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents"))
        .unwrap();
    let scalars = mbridge::train::tensorboard::read_scalars(&event).unwrap();
    let steps =
        |tag: &str| -> Vec<i64> { scalars.iter().filter(|s| s.0 == tag).map(|s| s.1).collect() };
    for tag in [
        "lm loss",
        "learning-rate",
        "grad-norm",
        "throughput/tflops/device",
        "iteration-time",
        "mem-resident-bytes",
        "params-norm",
        "time/total",
        "time/remaining_estimate",
    ] {
        assert_eq!(steps(tag), [1, 2, 3, 4, 5, 6], "{tag}");
    }
    // Megatron Bridge's runtime report: batches, samples and tokens so far, and a remaining
    // time that reaches 0 at the last iteration.
    let values =
        |tag: &str| -> Vec<f32> { scalars.iter().filter(|s| s.0 == tag).map(|s| s.2).collect() };
    assert_eq!(values("time/batches"), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(values("time/tokens")[5], 48.0 * 64.0);
    assert_eq!(values("time/remaining_estimate")[5], 0.0);
    // `logger.save_config_filepath`: the resolved config, JSON for a .yaml path.
    let copy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved_config).unwrap()).unwrap();
    assert_eq!(copy["train"]["train_iters"], 6);
    assert_eq!(copy["logger"]["runtime_time_unit"], "seconds");
    assert_eq!(steps("lm loss vs samples"), [8, 16, 24, 32, 40, 48]);
    // Validation at 3 (interval) and at the end (6).
    assert_eq!(steps("lm loss validation"), [3, 6]);
    assert_eq!(steps("lm loss validation ppl"), [3, 6]);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(tb.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(train.len(), 6);
    assert_eq!(train[5]["iteration"], 6);
    assert!(train[5]["lm loss"].as_f64().unwrap() > 0.0);
    assert!(train[0]["throughput/tflops/device"].as_f64().unwrap() > 0.0);
    // The log line's params norm (iterations 2, 4, 6) is the one TensorBoard and the metrics
    // file got.
    let logged: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.split("params norm: ").nth(1))
        .map(|r| r[..r.find(' ').unwrap()].to_string())
        .collect();
    assert_eq!(logged.len(), 3, "{stdout}");
    assert_eq!(format!("{:.3}", train[5]["params-norm"].as_f64().unwrap()), logged[2]);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "validation").count(), 2);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "test").count(), 1);
    // W&B without a TensorBoard directory: no silent fallback.
    let e = mbridge(&a(&["train.train_iters=1", "++logger.wandb_project=p"]));
    assert!(
        !e.ok && e.stderr.contains("logger.tensorboard_dir") && e.stderr.contains("wandb sync"),
        "{}",
        e.stderr
    );
}
