//! Scheduler vs megatron-core's `OptimizerParamScheduler` (fixture written by
//! `scripts/fixtures/optim_scheduler.py`), the spec's test vectors and config resolution.

use mbridge::train::scheduler::{
    LrDecayStyle, OptimizerParamScheduler, ResumePolicy, ScheduleInputs, SchedulerError,
    SchedulerParams, WdIncrStyle, WsdDecayStyle,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    increment: u64,
    args: Args,
    num_steps: Vec<u64>,
    lr: Vec<f64>,
    wd: Vec<f64>,
}

#[derive(Deserialize)]
struct Args {
    init_lr: f64,
    max_lr: f64,
    min_lr: f64,
    lr_warmup_steps: f64,
    lr_decay_steps: u64,
    lr_decay_style: LrDecayStyle,
    start_wd: f64,
    end_wd: f64,
    wd_incr_steps: u64,
    wd_incr_style: WdIncrStyle,
    wsd_decay_steps: Option<u64>,
    lr_wsd_decay_style: Option<WsdDecayStyle>,
}

/// Same libm on both sides, so values agree to the last bit in practice; allow a couple of
/// ulps for the JSON round trip.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 4.0 * f64::EPSILON * b.abs().max(a.abs())
}

#[test]
fn matches_megatron_core_for_every_style() {
    let text = std::fs::read_to_string("tests/fixtures/optim/scheduler.json").unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.cases.len() >= 16);
    for c in &fixture.cases {
        let a = &c.args;
        let mut s = OptimizerParamScheduler::new(SchedulerParams {
            init_lr: a.init_lr,
            max_lr: a.max_lr,
            min_lr: a.min_lr,
            lr_warmup_steps: a.lr_warmup_steps,
            lr_decay_steps: a.lr_decay_steps,
            lr_decay_style: a.lr_decay_style,
            start_wd: a.start_wd,
            end_wd: a.end_wd,
            wd_incr_steps: a.wd_incr_steps,
            wd_incr_style: a.wd_incr_style,
            wsd_decay_steps: a.wsd_decay_steps,
            lr_wsd_decay_style: a.lr_wsd_decay_style,
        })
        .unwrap_or_else(|e| panic!("case {}: {e}", c.name));
        for i in 0..c.num_steps.len() {
            assert_eq!(s.num_steps, c.num_steps[i], "case {}", c.name);
            let (lr, wd) = (s.get_lr(), s.get_wd());
            assert!(
                close(lr, c.lr[i]),
                "case {} step {}: lr {lr} vs {}",
                c.name,
                s.num_steps,
                c.lr[i]
            );
            assert!(
                close(wd, c.wd[i]),
                "case {} step {}: wd {wd} vs {}",
                c.name,
                s.num_steps,
                c.wd[i]
            );
            s.step(c.increment);
        }
    }
}

fn inputs() -> ScheduleInputs {
    ScheduleInputs {
        lr: 3e-4,
        min_lr: 3e-5,
        lr_warmup_init: 0.0,
        weight_decay: 0.1,
        start_weight_decay: None,
        end_weight_decay: None,
        weight_decay_incr_style: WdIncrStyle::Constant,
        lr_decay_style: LrDecayStyle::Cosine,
        lr_wsd_decay_style: WsdDecayStyle::Exponential,
        global_batch_size: 32,
        train_iters: Some(300_000),
        train_samples: None,
        max_steps: None,
        lr_decay_iters: None,
        lr_decay_samples: None,
        lr_warmup_iters: 500,
        lr_warmup_samples: 0,
        lr_warmup_fraction: None,
        lr_wsd_decay_iters: None,
        lr_wsd_decay_samples: None,
    }
}

/// config-reference.md "Test vectors": cosine 3e-4 → 3e-5, warmup 500, decay 300000 iterations.
#[test]
fn spec_vectors() {
    let mut s = OptimizerParamScheduler::from_resolved(&inputs()).unwrap();
    assert_eq!(s.params().lr_decay_steps, 300_000 * 32);
    assert_eq!(s.params().lr_warmup_steps, 500.0 * 32.0);
    // Iteration 1 runs at lr(0) = lr_warmup_init = 0.
    assert_eq!(s.get_lr(), 0.0);
    s.num_steps = 250 * 32;
    assert!(close(s.get_lr(), 1.5e-4), "{}", s.get_lr());
    s.num_steps = 150_250 * 32;
    assert!(close(s.get_lr(), 1.65e-4), "{}", s.get_lr());
    s.num_steps = 300_001 * 32;
    assert_eq!(s.get_lr(), 3e-5);

    // train_iters 1000, no lr_decay_iters, GBS 32 => 32000 decay samples.
    let mut i = inputs();
    i.train_iters = Some(1000);
    i.lr_warmup_iters = 10;
    let p = i.resolve().unwrap();
    assert_eq!(p.lr_decay_steps, 32_000);
    assert_eq!(p.wd_incr_steps, 32_000);
    assert_eq!(p.wsd_decay_steps, Some(32_000));
    assert_eq!((p.start_wd, p.end_wd), (0.1, 0.1));
}

#[test]
fn resolution_rules() {
    // max_steps lengthens the schedule, lr_decay_iters wins over it.
    let mut i = inputs();
    i.train_iters = Some(100);
    i.lr_warmup_iters = 0;
    i.max_steps = Some(400);
    assert_eq!(i.resolve().unwrap().lr_decay_steps, 400 * 32);
    i.lr_decay_iters = Some(200);
    assert_eq!(i.resolve().unwrap().lr_decay_steps, 200 * 32);
    i.max_steps = Some(50);
    assert!(matches!(i.resolve(), Err(SchedulerError::Invalid(m)) if m.contains("max_steps")));

    // Fraction of the decay samples, kept fractional.
    let mut i = inputs();
    i.train_iters = Some(7);
    i.global_batch_size = 11;
    i.lr_warmup_iters = 0;
    i.lr_warmup_fraction = Some(0.13);
    assert_eq!(i.resolve().unwrap().lr_warmup_steps, 0.13 * 77.0);
    i.lr_warmup_iters = 1;
    assert!(i.resolve().is_err(), "fraction and iters together");

    // Warmup longer than decay is capped to decay - 1.
    let mut i = inputs();
    i.train_iters = Some(10);
    i.lr_warmup_iters = 500;
    assert_eq!(i.resolve().unwrap().lr_warmup_steps, (10 * 32 - 1) as f64);

    // Sample-based run: samples used directly, iteration fields rejected.
    let mut i = inputs();
    i.train_iters = None;
    i.train_samples = Some(1000);
    i.lr_warmup_iters = 0;
    i.lr_warmup_samples = 100;
    let p = i.resolve().unwrap();
    assert_eq!((p.lr_decay_steps, p.wd_incr_steps, p.lr_warmup_steps), (1000, 1000, 100.0));
    i.lr_decay_iters = Some(3);
    assert!(i.resolve().is_err());

    // Neither or both of train_iters / train_samples.
    let mut i = inputs();
    i.train_samples = Some(5);
    assert!(i.resolve().is_err());
    i.train_iters = None;
    i.train_samples = None;
    assert!(i.resolve().is_err());

    // Explicit start/end weight decay win over optimizer.weight_decay.
    let mut i = inputs();
    i.start_weight_decay = Some(0.033);
    i.end_weight_decay = Some(0.033);
    let s = OptimizerParamScheduler::from_resolved(&i).unwrap();
    assert_eq!(s.get_wd(), 0.033);
}

#[test]
fn invalid_settings_are_named() {
    let base = inputs().resolve().unwrap();
    let err = |p: SchedulerParams| OptimizerParamScheduler::new(p).unwrap_err().to_string();
    assert!(err(SchedulerParams { min_lr: 1.0, ..base.clone() }).contains("min_lr"));
    assert!(err(SchedulerParams { init_lr: 1.0, ..base.clone() }).contains("lr_warmup_init"));
    assert!(err(SchedulerParams { lr_decay_steps: 0, ..base.clone() }).contains("lr_decay_steps"));
    assert!(err(SchedulerParams { start_wd: 0.0, ..base.clone() }).contains("start_wd"));
    let wsd = SchedulerParams { lr_decay_style: LrDecayStyle::Wsd, wsd_decay_steps: None, ..base };
    assert!(err(wsd).contains("WSD"));
    let e = "cosine-ish".parse::<LrDecayStyle>().unwrap_err().to_string();
    assert!(e.contains("cosine-ish") && e.contains("inverse-square-root"), "{e}");
    assert_eq!("WSD".parse::<LrDecayStyle>().unwrap(), LrDecayStyle::Wsd);
    assert_eq!(LrDecayStyle::InverseSquareRoot.to_string(), "inverse-square-root");
}

#[test]
fn state_round_trip_and_resume_policies() {
    let mut s = OptimizerParamScheduler::from_resolved(&inputs()).unwrap();
    s.step(32 * 1234);
    let json = serde_json::to_string(&s.state()).unwrap();
    // Megatron's state_dict keys and style spellings.
    for key in [
        "\"max_lr\"",
        "\"lr_warmup_steps\"",
        "\"num_steps\":39488",
        "\"cosine\"",
        "\"wd_incr_style\":\"constant\"",
    ] {
        assert!(json.contains(key), "{key} missing in {json}");
    }
    let state = serde_json::from_str(&json).unwrap();

    let mut fresh = OptimizerParamScheduler::from_resolved(&inputs()).unwrap();
    fresh.load_state(&state, ResumePolicy::Strict).unwrap();
    assert_eq!(fresh, s);

    // A changed lr: strict refuses and names the field, override keeps ours, checkpoint theirs.
    let mut changed = inputs();
    changed.lr = 1e-3;
    let mut other = OptimizerParamScheduler::from_resolved(&changed).unwrap();
    let e = other.load_state(&state, ResumePolicy::Strict).unwrap_err().to_string();
    assert!(e.contains("learning rate") && e.contains("0.001"), "{e}");
    assert_eq!(other.num_steps, 0, "failed load leaves the scheduler untouched");
    other.load_state(&state, ResumePolicy::Override).unwrap();
    assert_eq!((other.params().max_lr, other.num_steps), (1e-3, 39488));
    let mut other = OptimizerParamScheduler::from_resolved(&changed).unwrap();
    other.load_state(&state, ResumePolicy::UseCheckpoint).unwrap();
    assert_eq!(other.params().max_lr, 3e-4);
}
