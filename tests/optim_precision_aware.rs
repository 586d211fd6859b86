//! The precision-aware optimizer's state storage:
//! - `optimizer.store_param_remainders`: fp32 masters kept as the bf16 parameter plus a 16-bit
//!   remainder follow the f32-copy optimizer bit for bit, and round trip through checkpoints;
//! - bf16 moments (`optimizer.exp_avg_dtype` / `exp_avg_sq_dtype` = bf16): each step reads
//!   the stored moments into f32, updates the parameter with the new f32 moments and stores
//!   them rounded to nearest even, as Transformer Engine's FusedAdam does. The reference is the
//!   f32-moment optimizer whose moments are rounded to bf16 between steps (through the
//!   checkpoint state, the public API).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use mbridge::ops::param_remainder::split_bits;
use mbridge::train::optimizer::{
    default_groups, AdamConfig, Algorithm, Master, MasterStorage, Optimizer, OptimizerState,
    StateStorage,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPES: [&[usize]; 3] = [&[48, 33], &[33], &[7, 5]];
const NAMES: [&str; 3] = ["decoder.w.weight", "decoder.norm.weight", "decoder.unused.weight"];

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() - 0.5) * 2.0 * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Optimizers over bf16 copies of the same initial weights, one per storage.
fn build(storage: impl Into<StateStorage>) -> (Optimizer, Vec<Var>) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
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

/// Steps `first..last` (1-based) with seeded gradients (none for the last parameter) and a
/// clipping coefficient on odd steps.
fn steps(opt: &mut Optimizer, vars: &[Var], first: u64, last: u64) {
    for step in first..=last {
        let mut rng = ChaCha8Rng::seed_from_u64(100 + step);
        let mut grads = GradStore::default();
        for (v, sh) in vars.iter().zip(SHAPES).take(2) {
            grads.insert(v.as_tensor(), randn(&mut rng, sh, 0.02));
        }
        let clip = (step % 2 == 1).then_some(0.7);
        opt.step_scaled(&grads, 3e-2, 0.1, clip).unwrap();
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    f32s(t).into_iter().map(f32::to_bits).collect()
}

#[test]
fn remainders_keep_the_f32_masters_bit_for_bit() {
    let (mut copy, copy_vars) = build(MasterStorage::Copy);
    let (mut rem, rem_vars) = build(MasterStorage::Remainders);
    let initial: Vec<Vec<f32>> = copy_vars.iter().map(|v| f32s(v.as_tensor())).collect();
    steps(&mut copy, &copy_vars, 1, 12);
    steps(&mut rem, &rem_vars, 1, 12);
    let mut ties = 0;
    for ((c, r), init) in copy.params().iter().zip(rem.params()).zip(&initial) {
        assert!(matches!(c.master, Master::Copy(_)), "{}", c.name);
        let Master::Remainder(stored) = &r.master else { panic!("{}: no remainder", r.name) };
        assert_eq!(stored.dtype(), DType::I16, "2 bytes per parameter beside the bf16 one");
        let master = bits(&c.master_value().unwrap());
        assert_eq!(master, bits(&r.master_value().unwrap()), "{}: masters", c.name);
        assert_eq!(bits(&c.exp_avg), bits(&r.exp_avg), "{}: exp_avg", c.name);
        let (cv, rv) = (c.exp_avg_sq.as_ref().unwrap(), r.exp_avg_sq.as_ref().unwrap());
        assert_eq!(bits(cv), bits(rv), "{}: exp_avg_sq", c.name);
        // The copy's parameter is the master rounded half to even, the remainder's half away
        // from zero: they differ only where the master lies exactly between two bf16 values.
        let (cp, rp) = (f32s(c.var.as_tensor()), f32s(r.var.as_tensor()));
        // Every parameter moved (the one without a gradient by weight decay).
        assert_ne!(init, &cp, "{}", c.name);
        for ((m, c), r) in master.iter().zip(cp).zip(rp) {
            let m = f32::from_bits(*m);
            assert_eq!(c, bf16::from_f32(m).to_f32());
            assert_eq!(r, bf16::from_bits(split_bits(m).0).to_f32());
            ties += usize::from(c != r);
        }
    }
    assert!(ties < 20, "{ties} ties in ~1.6k parameters × 12 steps");
}

#[test]
fn a_checkpoint_of_remainders_resumes_either_storage_exactly() {
    let (mut whole, whole_vars) = build(MasterStorage::Remainders);
    steps(&mut whole, &whole_vars, 1, 8);
    let (mut first, first_vars) = build(MasterStorage::Remainders);
    steps(&mut first, &first_vars, 1, 5);
    let state = first.export_state().unwrap();
    // Masters are written as f32, the format a copy-storage run writes.
    let masters: Vec<_> = state.tensors.iter().filter(|(n, _)| n.ends_with(".master")).collect();
    assert_eq!(masters.len(), 3);
    assert!(masters.iter().all(|(_, t)| t.dtype() == DType::F32));
    for storage in [MasterStorage::Remainders, MasterStorage::Copy] {
        // A fresh optimizer whose model weights were loaded from the checkpoint.
        let (mut resumed, vars) = build(storage);
        for (v, w) in vars.iter().zip(&first_vars) {
            v.set(w.as_tensor()).unwrap();
        }
        resumed.import_state(&state).unwrap();
        steps(&mut resumed, &vars, 6, 8);
        for (a, b) in whole.params().iter().zip(resumed.params()) {
            let (ma, mb) = (a.master_value().unwrap(), b.master_value().unwrap());
            assert_eq!(bits(&ma), bits(&mb), "{storage:?} {}: masters", a.name);
            assert_eq!(bits(&a.exp_avg), bits(&b.exp_avg), "{storage:?} {}", a.name);
        }
    }
}

#[test]
fn reloading_weights_without_state_zeroes_the_remainders() {
    let (mut opt, vars) = build(MasterStorage::Remainders);
    steps(&mut opt, &vars, 1, 3);
    let loaded: Vec<Tensor> =
        vars.iter().map(|v| v.as_tensor().affine(0.5, 0.0).unwrap()).collect();
    for (v, t) in vars.iter().zip(&loaded) {
        v.set(t).unwrap();
    }
    opt.sync_master_from_model().unwrap();
    for (p, t) in opt.params().iter().zip(&loaded) {
        assert_eq!(bits(&p.master_value().unwrap()), bits(t), "{}", p.name);
    }
}

fn bf16_moments(masters: MasterStorage) -> StateStorage {
    StateStorage { masters, exp_avg: DType::BF16, exp_avg_sq: DType::BF16 }
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

#[test]
fn bf16_moments_are_f32_moments_rounded_after_each_step() {
    for masters in [MasterStorage::Copy, MasterStorage::Remainders] {
        let (mut narrow, narrow_vars) = build(bf16_moments(masters));
        let (mut wide, wide_vars) = build(masters);
        for p in narrow.params() {
            assert_eq!(p.exp_avg.dtype(), DType::BF16, "{}", p.name);
            assert_eq!(p.exp_avg_sq.as_ref().unwrap().dtype(), DType::BF16, "{}", p.name);
        }
        for t in 1..=10 {
            steps(&mut narrow, &narrow_vars, t, t);
            steps(&mut wide, &wide_vars, t, t);
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
    steps(&mut narrow, &vars, 1, 1);
    let (mut wide, wide_vars) = build(MasterStorage::Copy);
    steps(&mut wide, &wide_vars, 1, 1);
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
    steps(&mut whole, &whole_vars, 1, 7);
    let (mut first, first_vars) = build(storage);
    steps(&mut first, &first_vars, 1, 4);
    let state = first.export_state().unwrap();
    assert!(state.tensors.iter().all(|(_, t)| t.dtype() == DType::F32));
    // bf16 again: the same run as without the checkpoint.
    let (mut resumed, vars) = build(storage);
    for (v, w) in vars.iter().zip(&first_vars) {
        v.set(w.as_tensor()).unwrap();
    }
    resumed.import_state(&state).unwrap();
    assert_eq!(resumed.params()[0].exp_avg.dtype(), DType::BF16);
    steps(&mut resumed, &vars, 5, 7);
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
    let (mut widened, wvars) = build(MasterStorage::Remainders);
    for (v, w) in wvars.iter().zip(&first_vars) {
        v.set(w.as_tensor()).unwrap();
    }
    widened.import_state(&state).unwrap();
    for (a, b) in first.params().iter().zip(widened.params()) {
        assert_eq!(b.exp_avg.dtype(), DType::F32);
        assert_eq!(bits(&a.exp_avg), bits(&b.exp_avg), "{}", a.name);
    }
    steps(&mut widened, &wvars, 5, 5);
}
