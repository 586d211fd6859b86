//! The precision-aware optimizer's bf16 moments (`optimizer.exp_avg_dtype` /
//! `exp_avg_sq_dtype` = bf16): each step reads the stored moments into f32, updates the
//! parameter with the new f32 moments and stores them rounded to nearest even, as Transformer
//! Engine's FusedAdam does. The reference is the f32-moment optimizer whose moments are
//! rounded to bf16 between steps (through the checkpoint state, the public API).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use mbridge::train::optimizer::{
    default_groups, AdamConfig, Algorithm, MasterStorage, Optimizer, OptimizerState, StateStorage,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPES: [&[usize]; 3] = [&[40, 24], &[24], &[6, 5]];
const NAMES: [&str; 3] = ["decoder.w.weight", "decoder.norm.weight", "decoder.unused.weight"];

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn build(storage: StateStorage) -> (Optimizer, Vec<Var>) {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let params: Vec<(String, Var)> = NAMES
        .iter()
        .zip(SHAPES)
        .map(|(n, sh)| {
            let t = randn(&mut rng, sh, 0.5).to_dtype(DType::BF16).unwrap();
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let vars = params.iter().map(|(_, v)| v.clone()).collect();
    let adam = Algorithm::Adam(AdamConfig { decoupled_weight_decay: true, ..Default::default() });
    (Optimizer::with_storage(adam, default_groups(params), storage).unwrap(), vars)
}

fn bf16_moments(masters: MasterStorage) -> StateStorage {
    StateStorage { masters, exp_avg: DType::BF16, exp_avg_sq: DType::BF16 }
}

/// Step `step` with seeded gradients (none for the last parameter), clipped on odd steps.
fn step(opt: &mut Optimizer, vars: &[Var], step: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(300 + step);
    let mut grads = GradStore::default();
    for (v, sh) in vars.iter().zip(SHAPES).take(2) {
        grads.insert(v.as_tensor(), randn(&mut rng, sh, 0.02));
    }
    let clip = (step % 2 == 1).then_some(0.6);
    opt.step_scaled(&grads, 2e-2, 0.1, clip).unwrap();
}

/// `state` with every moment rounded to bf16 (and kept as f32).
fn round_moments(state: &OptimizerState) -> OptimizerState {
    let mut s = state.clone();
    for (name, t) in &mut s.tensors {
        if name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq") {
            *t = t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        }
    }
    s
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

#[test]
fn bf16_moments_are_f32_moments_rounded_after_each_step() {
    for masters in [MasterStorage::Copy, MasterStorage::Remainders] {
        let (mut narrow, narrow_vars) = build(bf16_moments(masters));
        let (mut wide, wide_vars) = build(masters.into());
        for p in narrow.params() {
            assert_eq!(p.exp_avg.dtype(), DType::BF16, "{}", p.name);
            assert_eq!(p.exp_avg_sq.as_ref().unwrap().dtype(), DType::BF16, "{}", p.name);
        }
        for t in 1..=10 {
            step(&mut narrow, &narrow_vars, t);
            step(&mut wide, &wide_vars, t);
            let rounded = round_moments(&wide.export_state().unwrap());
            wide.import_state(&rounded).unwrap();
        }
        let mut moved = 0;
        for (n, w) in narrow.params().iter().zip(wide.params()) {
            let what = format!("{masters:?} {}", n.name);
            let (nm, wm) = (n.master_value().unwrap(), w.master_value().unwrap());
            assert_eq!(bits(&nm), bits(&wm), "{what}: masters");
            assert_eq!(bits(n.var.as_tensor()), bits(w.var.as_tensor()), "{what}: params");
            assert_eq!(bits(&n.exp_avg), bits(&w.exp_avg), "{what}: exp_avg");
            let (nv, wv) = (n.exp_avg_sq.as_ref().unwrap(), w.exp_avg_sq.as_ref().unwrap());
            assert_eq!(bits(nv), bits(wv), "{what}: exp_avg_sq");
            moved += bits(&n.exp_avg).iter().filter(|b| **b != 0).count();
        }
        assert!(moved > 900, "{masters:?}: only {moved} nonzero first moments");
    }
}

#[test]
fn the_step_uses_the_unrounded_moments() {
    // From zero moments the first step of both runs updates with the same f32 moments, so the
    // masters agree exactly only if the update did not read its rounded moments back; the
    // stored moments differ (rounded), which shows the rounding happened.
    let (mut narrow, vars) = build(bf16_moments(MasterStorage::Copy));
    step(&mut narrow, &vars, 1);
    let (mut wide, wide_vars) = build(MasterStorage::Copy.into());
    step(&mut wide, &wide_vars, 1);
    for (n, w) in narrow.params().iter().zip(wide.params()).take(2) {
        let (nm, wm) = (n.master_value().unwrap(), w.master_value().unwrap());
        assert_eq!(bits(&nm), bits(&wm), "{}: first step", n.name);
        assert_ne!(bits(&n.exp_avg), bits(&w.exp_avg), "{}: stored moments", n.name);
    }
}

#[test]
fn a_state_of_bf16_moments_is_written_in_f32_and_loads_into_either_dtype() {
    let storage = bf16_moments(MasterStorage::Remainders);
    let (mut whole, whole_vars) = build(storage);
    for t in 1..=7 {
        step(&mut whole, &whole_vars, t);
    }
    let (mut first, first_vars) = build(storage);
    for t in 1..=4 {
        step(&mut first, &first_vars, t);
    }
    let state = first.export_state().unwrap();
    assert!(state.tensors.iter().all(|(_, t)| t.dtype() == DType::F32));
    // bf16 again: the same run as without the checkpoint.
    let (mut resumed, vars) = build(storage);
    for (v, w) in vars.iter().zip(&first_vars) {
        v.set(w.as_tensor()).unwrap();
    }
    resumed.import_state(&state).unwrap();
    assert_eq!(resumed.params()[0].exp_avg.dtype(), DType::BF16);
    for t in 5..=7 {
        step(&mut resumed, &vars, t);
    }
    for (a, b) in whole.params().iter().zip(resumed.params()) {
        assert_eq!(
            bits(&a.master_value().unwrap()),
            bits(&b.master_value().unwrap()),
            "{}",
            a.name
        );
        assert_eq!(bits(&a.exp_avg), bits(&b.exp_avg), "{}", a.name);
    }
    // f32 moments: the values load exactly and the run goes on in f32.
    let (mut widened, wvars) = build(MasterStorage::Remainders.into());
    for (v, w) in wvars.iter().zip(&first_vars) {
        v.set(w.as_tensor()).unwrap();
    }
    widened.import_state(&state).unwrap();
    for (a, b) in first.params().iter().zip(widened.params()) {
        assert_eq!(b.exp_avg.dtype(), DType::F32);
        assert_eq!(bits(&a.exp_avg), bits(&b.exp_avg), "{}", a.name);
    }
    step(&mut widened, &wvars, 5);
}
