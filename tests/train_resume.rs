//! Resume through the library: bit-identical after an asynchronous save, RNG state restored
//! (or not) per `checkpoint.load_rng`, and a model with NaN weights is never saved.

mod train_common;

use candle_core::{Device, Tensor};
use mbridge::train::trainer::{ExitReason, TrainOutcome, Trainer};
use train_common::tiny_trainer;

fn trainer(overrides: &[String]) -> anyhow::Result<Trainer> {
    tiny_trainer(overrides)
}

fn run(overrides: &[String]) -> anyhow::Result<TrainOutcome> {
    trainer(overrides)?.train()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn with(base: &[&str], more: &[String]) -> Vec<String> {
    let mut v = args(base);
    v.extend(more.iter().cloned());
    v
}

#[test]
fn resume_after_async_saves_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt").display().to_string();
    let base = ["train.train_iters=10", "validation.eval_iters=0"];
    let io = [
        format!("+checkpoint.save={ckpt}"),
        format!("+checkpoint.load={ckpt}"),
        "++checkpoint.async_save=true".to_string(),
        "+checkpoint.save_interval=2".to_string(),
        "++checkpoint.most_recent_k=2".to_string(),
    ];
    let full = run(&args(&base)).unwrap();
    let mut first = io.to_vec();
    first.push("+train.exit_interval=5".into());
    let stopped = run(&with(&base, &first)).unwrap();
    assert_eq!((stopped.reason, stopped.final_step), (ExitReason::ExitInterval, 5));
    // Saves at 2 and 4 ran in the background; the exit save at 5 was waited for.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ckpt/latest_checkpointed_iteration.txt")).unwrap(),
        "5"
    );
    assert!(!dir.path().join("ckpt/iter_0000002").exists(), "most_recent_k=2 pruned 2");
    assert!(dir.path().join("ckpt/iter_0000004/optimizer/index.json").is_file());
    let resumed = run(&with(&base, &io)).unwrap();
    assert_eq!(resumed.losses.first().unwrap().0, 6);
    assert_eq!(&full.losses[5..], resumed.losses.as_slice());
    assert_eq!(&full.losses[..5], stopped.losses.as_slice());
    assert!(dir.path().join("ckpt/iter_0000010/model/index.json").is_file());
}

#[test]
fn load_rng_restores_the_dropout_seed_of_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt").display().to_string();
    // Data order is pinned by dataset.random_seed, so rng.seed drives only dropout here.
    let base = [
        "train.train_iters=6",
        "validation.eval_iters=0",
        "++model.hidden_dropout=0.2",
        "++dataset.random_seed=5",
    ];
    let save = [format!("+checkpoint.save={ckpt}")];
    let full = run(&with(&base, &args(&["rng.seed=1"]))).unwrap();
    let first =
        with(&base, &[save[0].clone(), "rng.seed=1".into(), "+train.exit_interval=3".into()]);
    run(&first).unwrap();
    let resume = |extra: &str| {
        let o = [format!("+checkpoint.load={ckpt}"), "rng.seed=2".into(), extra.to_string()];
        run(&with(&base, &o)).unwrap().losses
    };
    assert_eq!(resume("++checkpoint.load_rng=true"), full.losses[3..]);
    assert_ne!(resume("++checkpoint.load_rng=false"), full.losses[3..]);
}

#[test]
fn a_model_with_nan_weights_is_never_saved() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut t = trainer(&args(&[
        "train.train_iters=2",
        "validation.eval_iters=0",
        &format!("+checkpoint.save={}", ckpt.display()),
    ]))
    .unwrap();
    t.train().unwrap();
    assert!(ckpt.join("iter_0000002").is_dir());
    let p = t.model().params().params()[1].clone();
    let nan = Tensor::full(f32::NAN, p.var.shape(), &Device::Cpu).unwrap();
    p.var.set(&nan.to_dtype(p.var.dtype()).unwrap()).unwrap();
    let e = format!("{:#}", t.save().unwrap_err());
    assert!(e.contains(&p.name) && e.contains("NaN or Inf"), "{e}");
    // The good checkpoint of iteration 2 is still there and still the tracker's.
    assert_eq!(mbridge::ckpt::read_tracker(&ckpt).unwrap(), Some(2));
    assert!(mbridge::ckpt::load_tensors(&ckpt.join("iter_0000002"), "model").is_ok());
}
