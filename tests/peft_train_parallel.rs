//! LoRA and DoRA training through the trainer with TP=2 (in-process ranks) equals one process,
//! and its adapter-only checkpoint resumes at TP=1.

mod train_common;

use train_common::{tiny_config, train_ranks};

use candle_core::Device;
use mbridge::config::finalize;
use mbridge::train::trainer::{TrainOutcome, Trainer};

fn config(extra: &[String]) -> (mbridge::config::LoadedConfig, String) {
    let base =
        ["train.train_iters=8", "validation.eval_iters=0", "rng.seed=11", "optimizer.lr=1e-2"];
    let overrides: Vec<String> =
        base.iter().map(|s| s.to_string()).chain(extra.iter().cloned()).collect();
    tiny_config(&overrides)
}

fn run_ranks(world: usize, extra: &[String]) -> Vec<TrainOutcome> {
    let (loaded, toml) = config(extra);
    train_ranks(world, &loaded, &toml).unwrap()
}

fn single(extra: &[String]) -> TrainOutcome {
    let (loaded, toml) = config(extra);
    let fin = finalize(loaded.cfg, None, None).unwrap();
    Trainer::new(fin, toml, Device::Cpu).unwrap().train().unwrap()
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for ((it, x), (_, y)) in a.iter().zip(b) {
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(rel < 2e-5, "{what}: iteration {it}: {x} vs {y} (rel {rel:.2e})");
    }
}

#[test]
fn lora_tp2_matches_tp1_and_resumes_at_tp1() {
    tp2_matches_tp1_and_resumes_at_tp1("LoRA", &[]);
}

#[test]
fn dora_tp2_matches_tp1_and_resumes_at_tp1() {
    tp2_matches_tp1_and_resumes_at_tp1("DoRA", &["+peft.peft_scheme=\"dora\""]);
}

fn tp2_matches_tp1_and_resumes_at_tp1(what: &str, scheme: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    single(&[format!("+checkpoint.save={}", base.display()), "train.train_iters=2".into()]);
    let run = dir.path().join("lora");
    let mut peft = vec![
        "+peft.dim=4".to_string(),
        "+peft.alpha=8.0".into(),
        format!("checkpoint.pretrained_checkpoint={}", base.display()),
    ];
    peft.extend(scheme.iter().map(|s| s.to_string()));
    let one = single(&peft);
    assert!(one.losses.last().unwrap().1 < one.losses[0].1, "{:?}", one.losses);
    let mut tp = peft.clone();
    tp.extend([
        "model.tensor_model_parallel_size=2".to_string(),
        "+train.exit_interval=4".into(),
        format!("+checkpoint.save={}", run.display()),
    ]);
    let two = run_ranks(2, &tp);
    assert_close(&one.losses[..4], &two[0].losses, &format!("{what} TP=2 vs TP=1"));
    let mut resume = peft.clone();
    resume.extend([
        format!("+checkpoint.save={}", run.display()),
        format!("+checkpoint.load={}", run.display()),
    ]);
    let resumed = single(&resume);
    assert_eq!(resumed.losses[0].0, 5);
    assert_close(
        &one.losses[4..],
        &resumed.losses,
        &format!("{what} TP=2 checkpoint resumed at TP=1"),
    );
}

/// LoRA (dim 4) overrides on a base pretrained for 2 iterations under `dir`, and the one-process
/// LoRA run.
fn lora_on_a_pretrained_base(dir: &std::path::Path) -> (Vec<String>, TrainOutcome) {
    let base = dir.join("base");
    single(&[format!("+checkpoint.save={}", base.display()), "train.train_iters=2".into()]);
    let peft = vec![
        "+peft.dim=4".to_string(),
        "+peft.alpha=8.0".into(),
        format!("checkpoint.pretrained_checkpoint={}", base.display()),
    ];
    let one = single(&peft);
    (peft, one)
}

/// LoRA under context parallelism, through autograd and through the written-out layer
/// backward (selective recompute), equals one process.
#[test]
fn lora_with_context_parallelism_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (peft, one) = lora_on_a_pretrained_base(dir.path());
    for extra in [&[][..], &["model.recompute_granularity=\"selective\""][..]] {
        let mut cp = peft.clone();
        cp.push("model.context_parallel_size=2".into());
        cp.extend(extra.iter().map(|s| s.to_string()));
        assert_close(&one.losses, &run_ranks(2, &cp)[0].losses, &format!("LoRA CP=2 {extra:?}"));
    }
}

/// LoRA under TP in the written-out layer backward (selective recompute): the column-parallel
/// adapters' A gradients summed over TP, the row-parallel adapters' `A x` summed before B
/// (under SP added to this rank's part of the sequence only).
#[test]
fn lora_tp2_written_out_backward_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (peft, one) = lora_on_a_pretrained_base(dir.path());
    for sp in [false, true] {
        let mut tp = peft.clone();
        tp.extend([
            "model.tensor_model_parallel_size=2".to_string(),
            "model.recompute_granularity=\"selective\"".into(),
            format!("model.sequence_parallel={sp}"),
        ]);
        for r in &run_ranks(2, &tp) {
            assert_close(&one.losses, &r.losses, &format!("LoRA TP=2 (SP {sp}), written-out"));
        }
    }
}
