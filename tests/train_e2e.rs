//! Pretraining end to end on CPU: loss falls, runs are reproducible, resume is bit-identical.

mod cli_common;
mod train_common;

use assert_cmd::Command;
use cli_common::lm_losses;
use mbridge::config::{load, ConfigRequest};
use mbridge::train::trainer::{ExitReason, TrainOutcome};
use train_common::tiny_trainer;

fn run(overrides: &[String]) -> anyhow::Result<TrainOutcome> {
    tiny_trainer(overrides)?.train()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The stdout of `mbridge pretrain --recipe tiny_llama <overrides>`, which must succeed.
fn pretrain_stdout<S: AsRef<std::ffi::OsStr>>(overrides: impl IntoIterator<Item = S>) -> String {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama"])
        .args(overrides)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    String::from_utf8(out).unwrap()
}

#[test]
fn pretrain_through_the_binary_logs_and_learns() {
    let out = pretrain_stdout(["train.train_iters=30", "logger.log_interval=5"]);
    let losses = lm_losses(&out);
    assert_eq!(losses.len(), 6, "{out}");
    assert!(losses[5] < losses[0] * 0.8, "loss did not fall: {losses:?}");
    assert!(
        out.contains("iteration       30/      30 | consumed samples:          240 |"),
        "{out}"
    );
    assert!(out.contains("validation loss at iteration 30 on validation set"), "{out}");
    assert!(out.contains("on test set"), "{out}");
}

/// `model.recompute_granularity=selective` trains through the binary (the written-out layer
/// backward, also on the CPU) with the losses of the plain run, and so does forcing the
/// written-out backward on without recompute.
#[test]
fn selective_recompute_trains_like_the_plain_run() {
    let losses = |extra: &[&str], env: Option<&str>| -> Vec<f64> {
        let mut cmd = Command::cargo_bin("mbridge").unwrap();
        if let Some(v) = env {
            cmd.env("MBRIDGE_EXPLICIT_LAYERS", v);
        }
        cmd.args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=10"])
            .args(["logger.log_interval=2", "validation.eval_iters=0"])
            .args(extra);
        let out = cmd.assert().success().get_output().stdout.clone();
        lm_losses(&String::from_utf8(out).unwrap())
    };
    let plain = losses(&[], Some("0"));
    assert_eq!(plain.len(), 5);
    let selective = losses(
        &[
            "model.recompute_granularity=selective",
            "model.recompute_modules=[\"core_attn\",\"mlp\"]",
        ],
        None,
    );
    let explicit = losses(&[], Some("1"));
    for other in [&selective, &explicit] {
        for (a, b) in plain.iter().zip(other) {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{plain:?} vs {other:?}");
        }
    }
}

#[test]
fn same_seed_same_losses_bit_for_bit() {
    let a = run(&args(&["train.train_iters=6", "validation.eval_iters=0"])).unwrap();
    let b = run(&args(&["train.train_iters=6", "validation.eval_iters=0"])).unwrap();
    assert_eq!(a.losses, b.losses);
    let c = run(&args(&["train.train_iters=6", "validation.eval_iters=0", "rng.seed=7"])).unwrap();
    assert_ne!(a.losses, c.losses);
}

#[test]
fn resume_continues_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt").display().to_string();
    let base = ["train.train_iters=12", "validation.eval_iters=0"];
    let full = run(&args(&base)).unwrap();
    let mut first = args(&base);
    first.extend(args(&[
        "+train.exit_interval=5",
        &format!("+checkpoint.save={ckpt}"),
        &format!("+checkpoint.load={ckpt}"),
    ]));
    let stopped = run(&first).unwrap();
    assert_eq!(stopped.reason, ExitReason::ExitInterval);
    assert_eq!(stopped.final_step, 5);
    assert!(dir.path().join("ckpt/iter_0000005/optimizer/index.json").is_file());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ckpt/latest_checkpointed_iteration.txt")).unwrap(),
        "5"
    );
    // The same command again resumes at 6 (exit_interval removed so it runs to the end).
    let mut again = args(&base);
    again.extend(args(&[&format!("+checkpoint.save={ckpt}"), &format!("+checkpoint.load={ckpt}")]));
    let resumed = run(&again).unwrap();
    assert_eq!(resumed.losses.first().unwrap().0, 6);
    assert_eq!(&full.losses[5..], resumed.losses.as_slice());
    assert_eq!(&full.losses[..5], stopped.losses.as_slice());
    // The checkpoint's run_config.toml is itself a loadable recipe.
    let rc = dir.path().join("ckpt/iter_0000012/run_config.toml");
    let req = ConfigRequest { recipe: Some(rc.display().to_string()), ..Default::default() };
    assert_eq!(load(&req).unwrap().cfg.train.train_iters, Some(12));
}

#[test]
fn nan_loss_stops_with_the_iteration() {
    let e = run(&args(&["train.train_iters=3", "model.init_method_std=1e30"])).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("at iteration 1") && msg.contains("stopping"), "{msg}");
}

#[test]
fn missing_checkpoint_is_an_error_when_required() {
    let dir = tempfile::tempdir().unwrap();
    let e = run(&args(&[
        &format!("+checkpoint.load={}", dir.path().display()),
        "checkpoint.exit_on_missing_checkpoint=true",
    ]))
    .unwrap_err();
    assert!(format!("{e:#}").contains("holds no checkpoint"), "{e:#}");
}

/// Megatron Bridge fields mbridge parses but does not act on: one that would change the run is
/// refused through the binary, naming it; a pure tuning knob runs and is named in the debug log.
#[test]
fn fields_mbridge_does_not_act_on_are_refused_or_named() {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=2"])
        .args(["validation.test_mode=true", "logger.mlflow_experiment=\"exp\""])
        .args(["model.multi_latent_attention=true"])
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`validation.test_mode` = true: test mode is not implemented"), "{err}");
    assert!(err.contains("`logger.mlflow_experiment` = \"exp\": MLflow is not supported"), "{err}");
    assert!(err.contains("`model.multi_latent_attention` = true: multi-latent attention"), "{err}");
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=2"])
        .args(["validation.eval_iters=0", "dataset.num_workers=3"])
        .env("RUST_LOG", "mbridge=debug")
        .assert()
        .success()
        .get_output()
        .clone();
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("`dataset.num_workers` = 3 has no effect in mbridge"), "{log}");
}

/// `optimizer.grad_norm_skip_threshold`: a step whose gradient norm exceeds it changes no
/// weight (the losses are those of a run whose learning rate is 0), reports its norm and is
/// counted as skipped; a threshold above every norm trains as usual.
#[test]
fn grad_norm_skip_threshold_skips_the_update() {
    let base = ["train.train_iters=4", "validation.eval_iters=0"];
    let run_with = |extra: &[&str]| {
        let list: Vec<&str> = base.iter().chain(extra).copied().collect();
        run(&args(&list)).unwrap()
    };
    let losses = |o: &TrainOutcome| o.losses.iter().map(|(_, l)| *l).collect::<Vec<_>>();
    let frozen = run_with(&["optimizer.lr=0", "optimizer.min_lr=0"]);
    let skipped = run_with(&["optimizer.grad_norm_skip_threshold=1e-9"]);
    assert_eq!(losses(&skipped), losses(&frozen));
    assert!(skipped.grad_norms.iter().all(|(_, g)| g.is_some_and(|g| g > 1e-9)));
    let trained = run_with(&["optimizer.grad_norm_skip_threshold=1e9"]);
    let (t, f) = (losses(&trained), losses(&frozen));
    assert_eq!(t[0], f[0]);
    assert!(t[3] < f[3], "{t:?} vs {f:?}");
    // The log line counts the skipped iterations and still shows the norm, as Megatron's.
    let out = pretrain_stdout(
        base.iter().chain(&["logger.log_interval=2", "optimizer.grad_norm_skip_threshold=1e-9"]),
    );
    assert!(out.contains("| grad norm: "), "{out}");
    assert!(out.contains("number of skipped iterations:   2 |"), "{out}");
}

/// `optimizer.decoupled_lr`: the word embedding and the output layer follow their own peak
/// and floor on the run's schedule. At 0 they never move while the rest trains, and
/// `metrics.jsonl` records the rate each step (`decoupled-learning-rate`, Megatron Bridge's
/// TensorBoard tag), here the main rate scaled by 2 in the warm-up and at the floor at the end.
#[test]
fn decoupled_lr_drives_the_embedding_and_output_layer() {
    let weights = |t: &mbridge::train::trainer::Trainer, name: &str| {
        let p = t.model().params().get(name).unwrap();
        p.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let base = args(&["train.train_iters=3", "validation.eval_iters=0"]);
    let initial = tiny_trainer(&base).unwrap();
    let mut frozen = base.clone();
    frozen.extend(args(&["+optimizer.decoupled_lr=0.0", "+optimizer.decoupled_min_lr=0.0"]));
    let mut t = tiny_trainer(&frozen).unwrap();
    t.train().unwrap();
    for name in ["embedding.word_embeddings.weight", "output_layer.weight"] {
        assert_eq!(weights(&t, name), weights(&initial, name), "{name} moved");
    }
    let fc1 = "decoder.layers.0.mlp.linear_fc1.weight";
    assert_ne!(weights(&t, fc1), weights(&initial, fc1));

    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let mut doubled = args(&["train.train_iters=8", "validation.eval_iters=0"]);
    doubled.extend(args(&[
        "scheduler.lr_warmup_iters=4",
        "+optimizer.decoupled_lr=6e-3",
        "+optimizer.decoupled_min_lr=1e-4",
        &format!("+logger.metrics_jsonl=\"{}\"", metrics.display()),
    ]));
    run(&doubled).unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "train")
        .collect();
    assert_eq!(lines.len(), 8);
    let rate = |i: usize, key: &str| lines[i][key].as_f64().unwrap();
    for i in 0..3 {
        let (lr, dlr) = (rate(i, "learning-rate"), rate(i, "decoupled-learning-rate"));
        assert!((dlr - 2.0 * lr).abs() <= 1e-12, "step {i}: {dlr} vs {lr}");
    }
    assert!((rate(7, "decoupled-learning-rate") - 1e-4).abs() <= 1e-12);
}

/// `rerun_state_machine.check_for_spiky_loss` (rerun machine disabled, Megatron Bridge's
/// default): after the first 100 micro-batch loss sums (50 iterations of 2 micro-batches) set
/// the reference, each sum at least `spiky_loss_factor` times it is warned about and training
/// goes on. The losses fall, so a factor of 0.01 flags every later micro-batch and the default
/// 10 none.
#[test]
fn spiky_losses_are_warned_about() {
    let run = |factor: &str| {
        let out = Command::cargo_bin("mbridge")
            .unwrap()
            .args(["pretrain", "--recipe", "tiny_llama", "train.train_iters=52"])
            .args(["validation.eval_iters=0", "rerun_state_machine.check_for_spiky_loss=true"])
            .arg(format!("rerun_state_machine.spiky_loss_factor={factor}"))
            .assert()
            .success()
            .get_output()
            .clone();
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
    };
    let flagged = run("0.01");
    let warnings: Vec<&str> = flagged.lines().filter(|l| l.contains("Spiky loss")).collect();
    assert_eq!(warnings.len(), 4, "{flagged}");
    assert!(warnings[0].contains("Rank 0, node ") && warnings[0].contains("iteration 51"));
    assert!(flagged.contains("Max value for loss: "), "{flagged}");
    assert!(!run("10.0").contains("Spiky loss"));
}

/// `validation.skip_train`: a run that loads a checkpoint evaluates it without training, with
/// the validation and test losses the training run printed for the same weights, and writes
/// nothing to the checkpoint directory.
#[test]
fn skip_train_evaluates_the_loaded_checkpoint_and_saves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let pretrain = |extra: &[String]| {
        let base = ["train.train_iters=6", "logger.log_interval=1", "validation.eval_interval=100"];
        let save = format!("checkpoint.save={}", ckpt.display());
        pretrain_stdout(base.iter().map(|s| s.to_string()).chain([save]).chain(extra.to_vec()))
    };
    let trained = pretrain(&[]);
    let eval_lines = |out: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.contains("validation loss at iteration 6 on "))
            .map(String::from)
            .collect()
    };
    let want = eval_lines(&trained);
    assert_eq!(want.len(), 2, "{trained}");
    let before = cli_common::files(&ckpt);
    let load = format!("checkpoint.load={}", ckpt.display());
    let evaluated = pretrain(&[load, "validation.skip_train=true".into()]);
    assert!(evaluated.contains("skipping training (--skip-train is on) ..."), "{evaluated}");
    assert!(lm_losses(&evaluated).is_empty(), "{evaluated}");
    assert_eq!(eval_lines(&evaluated), want, "{evaluated}");
    assert_eq!(cli_common::files(&ckpt), before, "skip_train wrote to the checkpoint directory");
}

/// `logger.log_progress`: Megatron's `progress.txt` in the checkpoint directory gets a
/// `Starting job` line per job and a line per save (iteration, throughputs, floating-point
/// operations, tokens); a resumed job appends to the same file, and asynchronous saves get a
/// line when submitted and one when on disk.
#[test]
fn log_progress_appends_megatrons_progress_lines() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let pretrain = |iters: &str, extra: &[&str]| {
        Command::cargo_bin("mbridge")
            .unwrap()
            .args(["pretrain", "--recipe", "tiny_llama", "validation.eval_iters=0"])
            .args(["logger.log_progress=true", "checkpoint.save_interval=3", iters])
            .arg(format!("checkpoint.save={}", ckpt.display()))
            .arg(format!("checkpoint.load={}", ckpt.display()))
            .args(extra)
            .assert()
            .success();
    };
    pretrain("train.train_iters=6", &[]);
    pretrain("train.train_iters=9", &["checkpoint.async_save=true"]);
    let text = std::fs::read_to_string(ckpt.join("progress.txt")).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    let events: Vec<String> = lines.iter().map(|t| t[3..t.len().min(5)].join(" ")).collect();
    assert_eq!(
        events,
        [
            "Starting job",
            "Saved checkpoint Iteration: 3",
            "Saved checkpoint Iteration: 6",
            "Starting job",
            "Saving async checkpoint Iteration: 9",
            "Saved async checkpoint Iteration: 9",
        ],
        "{text}"
    );
    for t in &lines {
        assert!(t[1].starts_with("Job ID: ") && t[2] == "# GPUs: 1", "{text}");
        assert_eq!(t[0].len(), "2026-01-01 12:00:00".len(), "{text}");
    }
    // tiny_llama's operations per iteration (Megatron's formula) times the iterations, and
    // 8 samples of 64 tokens per iteration.
    let field = |line: &[&str], i: usize| line[i].split(": ").nth(1).unwrap().to_string();
    let flops = |line: &[&str]| field(line, 7).parse::<f64>().unwrap();
    let (at3, at6, at9) = (flops(&lines[1]), flops(&lines[2]), flops(&lines[4]));
    assert!(
        at3 > 0.0 && (at6 / at3 - 2.0).abs() < 1e-2 && (at9 / at3 - 3.0).abs() < 1e-2,
        "{text}"
    );
    assert_eq!(field(&lines[2], 8), "0.00", "{text}");
    assert!(field(&lines[1], 5).ends_with(" TFLOP/s/GPU"), "{text}");
    assert!(field(&lines[4], 6).ends_with(" TFLOP/s/GPU"), "{text}");
}

/// `logger.skip_train_metrics_log`: the run trains (its final evaluation is at the last
/// iteration) without printing a training log line.
#[test]
fn skip_train_metrics_log_trains_without_training_lines() {
    let out = pretrain_stdout([
        "train.train_iters=4",
        "logger.log_interval=1",
        "logger.skip_train_metrics_log=true",
    ]);
    assert!(lm_losses(&out).is_empty(), "{out}");
    assert!(out.contains("validation loss at iteration 4 on validation set"), "{out}");
}

/// `checkpoint.also_save_hf_checkpoint`: each saved checkpoint gets an `hf/` copy equal to what
/// `mbridge export-hf` writes from it, and the checkpoint still resumes.
#[test]
fn also_save_hf_checkpoint_writes_the_export_beside_each_save() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let pretrain = |iters: &str| {
        pretrain_stdout([
            "validation.eval_iters=0".to_string(),
            iters.to_string(),
            "checkpoint.also_save_hf_checkpoint=true".into(),
            "checkpoint.save_interval=2".into(),
            format!("checkpoint.save={}", ckpt.display()),
            format!("checkpoint.load={}", ckpt.display()),
        ])
    };
    let out = pretrain("train.train_iters=4");
    assert!(
        out.contains(&format!(
            "saved Hugging Face checkpoint to {}",
            ckpt.join("iter_0000002/hf").display()
        )),
        "{out}"
    );
    for iter in ["iter_0000002", "iter_0000004"] {
        let hf = ckpt.join(iter).join("hf");
        let exported = dir.path().join(format!("export-{iter}"));
        Command::cargo_bin("mbridge")
            .unwrap()
            .args(["export-hf"])
            .args([ckpt.join(iter), exported.clone()])
            .assert()
            .success();
        let copy = cli_common::files(&hf);
        assert!(
            copy.contains_key("config.json") && copy.contains_key("model.safetensors"),
            "{copy:?}"
        );
        assert_eq!(copy, cli_common::files(&exported), "{iter}/hf differs from export-hf's output");
    }
    let resumed = pretrain("train.train_iters=5");
    assert!(resumed.contains("successfully saved checkpoint from iteration       5"), "{resumed}");
    assert!(!resumed.contains("saved checkpoint from iteration       2"), "{resumed}");
    assert!(ckpt.join("iter_0000005/hf/model.safetensors").exists());
}

/// Global non-persistent checkpoints (`checkpoint.non_persistent_save_interval`,
/// `non_persistent_ckpt_type = "global"`): saved into `<save>/non_persistent` where no
/// persistent one is saved, the two newest kept; a resume takes the newer of the persistent
/// and the non-persistent checkpoint and continues the curve. Other kinds are refused.
#[test]
fn global_non_persistent_checkpoints_are_kept_two_deep_and_resume_when_newer() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let np = ckpt.join("non_persistent");
    let pretrain = |iters: &str, extra: &[&str]| {
        Command::cargo_bin("mbridge")
            .unwrap()
            .args(["pretrain", "--recipe", "tiny_llama", "validation.eval_iters=0", iters])
            .args(["logger.log_interval=1", "checkpoint.save_interval=4"])
            .args([
                "checkpoint.non_persistent_save_interval=1",
                "+checkpoint.non_persistent_ckpt_type=global",
            ])
            .arg(format!("checkpoint.save={}", ckpt.display()))
            .arg(format!("checkpoint.load={}", ckpt.display()))
            .args(extra)
            .output()
            .unwrap()
    };
    let first = pretrain("train.train_iters=6", &[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let names = |d: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("iter_"))
            .collect();
        v.sort();
        v
    };
    // Persistent: the interval's 4 and the final 6; non-persistent: 1, 2, 3, 5, 6 (the last
    // iteration's too: the final persistent save comes after the loop, as in Megatron), of
    // which the two newest remain.
    assert_eq!(names(&ckpt), ["iter_0000004", "iter_0000006"]);
    assert_eq!(names(&np), ["iter_0000005", "iter_0000006"]);
    // A job that died after iteration 5's non-persistent save: nothing of 6 happened.
    for d in [&ckpt, &np] {
        std::fs::remove_dir_all(d.join("iter_0000006")).unwrap();
    }
    std::fs::write(ckpt.join("latest_checkpointed_iteration.txt"), "4").unwrap();
    std::fs::write(np.join("latest_checkpointed_iteration.txt"), "5").unwrap();
    let resumed = pretrain("train.train_iters=6", &[]);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    let want = format!("resumed from {} at iteration 5", np.join("iter_0000005").display());
    assert!(err.contains(&want), "{err}");
    let losses = |out: &std::process::Output| lm_losses(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(losses(&resumed), losses(&first)[5..], "iteration 6 after the resume");
    // Only "global" is written.
    let local = pretrain("train.train_iters=2", &["checkpoint.non_persistent_ckpt_type=local"]);
    let err = String::from_utf8_lossy(&local.stderr);
    assert!(
        !local.status.success() && err.contains("\"global\" non-persistent checkpoints only"),
        "{err}"
    );
}

/// `checkpoint.use_checkpoint_args`: a run loading a checkpoint takes the model architecture
/// from the checkpoint's config, so evaluating a 3-layer checkpoint with the 2-layer recipe
/// gives the training run's validation loss; without it the shapes do not match.
#[test]
fn use_checkpoint_args_takes_the_architecture_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let save = format!("checkpoint.save={}", ckpt.display());
    let base = ["train.train_iters=3", "validation.eval_interval=100"];
    let trained = pretrain_stdout(base.iter().map(|s| s.to_string()).chain([
        save.clone(),
        "model.num_layers=3".into(),
        "model.ffn_hidden_size=96".into(),
    ]));
    let val = |out: &str| {
        out.lines()
            .find(|l| l.contains("validation loss at iteration 3 on validation set"))
            .map(String::from)
    };
    let want = val(&trained).expect("a validation line");
    let load = format!("checkpoint.load={}", ckpt.display());
    let evaluated = pretrain_stdout(base.iter().map(|s| s.to_string()).chain([
        load.clone(),
        "validation.skip_train=true".into(),
        "checkpoint.use_checkpoint_args=true".into(),
    ]));
    assert!(evaluated.contains("model: 3 layers, hidden 64, ffn 96"), "{evaluated}");
    assert_eq!(val(&evaluated), Some(want), "{evaluated}");
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["pretrain", "--recipe", "tiny_llama", "validation.skip_train=true", &load])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the 2-layer recipe loaded a 3-layer checkpoint");
}
