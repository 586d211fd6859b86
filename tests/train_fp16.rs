//! fp16 training with loss scaling (megatron-core's `DynamicGradScaler` and
//! `ConstantGradScaler`): overflowing steps are skipped while the scale backs off, the scale
//! is divided out of the update, and a resumed run continues with the saved scale.

mod train_common;

use mbridge::train::trainer::TrainOutcome;
use train_common::tiny_trainer;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const FP16: &str = "mixed_precision=\"fp16_mixed\"";

fn skipped(o: &TrainOutcome) -> usize {
    o.grad_norms.iter().filter(|(_, n)| n.is_none()).count()
}

#[test]
fn dynamic_scale_backs_off_through_overflows_then_trains() {
    let mut t =
        tiny_trainer(&args(&["train.train_iters=40", "validation.eval_iters=0", FP16])).unwrap();
    let out = t.train().unwrap();
    // 2^32 overflows fp16 at once: the first overflow only spends the hysteresis (2), each
    // later one halves the scale (the hysteresis refills only when the scale grows, after
    // 1000 clean steps), until the gradients fit.
    let n = skipped(&out);
    assert!(n > 2, "{:?}", out.grad_norms);
    assert!(out.grad_norms[..3].iter().all(|(_, g)| g.is_none()), "{:?}", out.grad_norms);
    let state = t.state().grad_scaler.expect("a dynamic scaler is checkpointed");
    assert_eq!(state.scale, 2f64.powi(32) / 2f64.powi(n as i32 - 1));
    let clean_tail = out.grad_norms.iter().rev().take_while(|(_, g)| g.is_some()).count();
    assert_eq!((state.growth_tracker, state.hysteresis_tracker), (clean_tail, 0));
    let n = out.grad_norms.iter().position(|(_, g)| g.is_some()).unwrap();
    // The update divides the scale out: the gradient norm is the unscaled one, and the loss
    // falls as in f32.
    let f32 = tiny_trainer(&args(&["train.train_iters=40", "validation.eval_iters=0"]))
        .unwrap()
        .train()
        .unwrap();
    let norm = out.grad_norms[n].1.unwrap();
    assert!(norm < 50.0, "unscaled gradient norm: {norm}");
    let (first, last) = (out.losses[0].1, out.losses.last().unwrap().1);
    let f32_last = f32.losses.last().unwrap().1;
    assert!(last < first - 1.0, "fp16 trains: {first} → {last}");
    assert!((last - f32_last).abs() / f32_last < 0.2, "fp16 {last} vs f32 {f32_last}");
}

#[test]
fn constant_scale_never_changes_and_is_divided_out() {
    let fixed = "mixed_precision={fp16 = true, params_dtype = \"fp16\", loss_scale = 1024.0}";
    let mut t =
        tiny_trainer(&args(&["train.train_iters=6", "validation.eval_iters=0", fixed])).unwrap();
    let scaled = t.train().unwrap();
    assert_eq!(skipped(&scaled), 0);
    assert_eq!(t.state().grad_scaler, None, "nothing to checkpoint for a constant scale");
    let unit = "mixed_precision={fp16 = true, params_dtype = \"fp16\", loss_scale = 1.0}";
    let plain = tiny_trainer(&args(&["train.train_iters=6", "validation.eval_iters=0", unit]))
        .unwrap()
        .train()
        .unwrap();
    // Same steps up to fp16 rounding of the scaled backward.
    for ((_, a), (_, b)) in scaled.losses.iter().zip(&plain.losses) {
        assert!((a - b).abs() / b < 2e-3, "{a} vs {b}");
    }
}

#[test]
fn resume_continues_with_the_saved_scale() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt").display().to_string();
    let base = ["train.train_iters=30", "validation.eval_iters=0", FP16];
    let full = tiny_trainer(&args(&base)).unwrap().train().unwrap();
    let mut first = args(&base);
    first.extend([format!("+checkpoint.save={ckpt}"), "+train.exit_interval=20".into()]);
    tiny_trainer(&first).unwrap().train().unwrap();
    let mut again = args(&base);
    again.push(format!("+checkpoint.load={ckpt}"));
    let mut t = tiny_trainer(&again).unwrap();
    let resumed = t.train().unwrap();
    assert_eq!(resumed.losses.first().unwrap().0, 21);
    assert_eq!(&full.grad_norms[20..], resumed.grad_norms.as_slice(), "no new overflow skips");
    assert_eq!(&full.losses[full.losses.len() - resumed.losses.len()..], resumed.losses.as_slice());
}
