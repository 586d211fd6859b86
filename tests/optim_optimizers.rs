//! Optimizers and clipping vs torch.optim trajectories (fixture written by
//! `scripts/fixtures/optim_optimizers.py`): 10 steps of AdamW, Adam + L2 and SGD with momentum
//! over Megatron-named parameters with per-step lr / weight decay, in f32 and f64, with
//! megatron-core's global-norm clipping, and bf16 model weights over fp32 masters.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use mbridge::train::clip::clip_grad_norm;
use mbridge::train::grads::{GradAccumulator, GradSource, GradSourceMut};
use mbridge::train::optimizer::{AdamConfig, Algorithm, OptimError, Optimizer, SgdConfig};
use serde_json::Value;

struct Fixture {
    tensors: HashMap<String, Tensor>,
    meta: Value,
}

fn fixture() -> Fixture {
    let dir = "tests/fixtures/optim";
    let tensors =
        candle_core::safetensors::load(format!("{dir}/optimizers.safetensors"), &Device::Cpu)
            .unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/optimizers.json")).unwrap())
            .unwrap();
    Fixture { tensors, meta }
}

impl Fixture {
    fn t(&self, key: &str) -> &Tensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("fixture has no tensor {key}"))
    }
    fn names(&self) -> Vec<String> {
        let params = self.meta["params"].as_array().unwrap();
        params.iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
    }
}

/// `|a − b| ≤ rtol·|b| + rtol·1e-2·max|b|`: relative, with a floor for entries near zero.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64) {
    assert_close_floor(what, got, want, rtol, 1e-2)
}

/// Like [`assert_close`] with the near-zero floor at `floor·rtol·max|b|`. Adam's first moment
/// is a running sum of O(1) gradients that cancels to O(1e-2): torch's FMA-based `lerp` and
/// candle's separate multiply and add round differently there, so moments are compared
/// normwise (floor 1), while parameters are compared entry by entry.
fn assert_close_floor(what: &str, got: &Tensor, want: &Tensor, rtol: f64, floor: f64) {
    let got: Vec<f64> = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f64> =
        want.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len(), "{what}: element count");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let tol = rtol * w.abs() + rtol * floor * scale;
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g:e}, torch {w:e} (tol {tol:e})");
    }
}

fn algorithm(kind: &str) -> Algorithm {
    match kind {
        "adamw" => Algorithm::Adam(AdamConfig { beta2: 0.95, ..AdamConfig::default() }),
        "adam" => {
            Algorithm::Adam(AdamConfig { decoupled_weight_decay: false, ..AdamConfig::default() })
        }
        "sgd" => Algorithm::Sgd(SgdConfig { momentum: 0.9 }),
        k => panic!("unknown kind {k}"),
    }
}

/// Replays one fixture case; `accumulate` feeds each step's gradient as two half micro-batches
/// through a [`GradAccumulator`] instead of a plain [`GradStore`].
fn replay(fx: &Fixture, case: &str, accumulate: bool) -> Optimizer {
    let meta = &fx.meta["cases"][case];
    let bf16 = meta["model_dtype"].as_str().is_some();
    let rtol = if meta["dtype"] == "torch.float64" { 1e-12 } else { 1e-6 };
    let names = fx.names();
    let vars: Vec<Var> = names
        .iter()
        .map(|n| {
            let t = fx.t(&format!("{case}.init.{n}"));
            Var::from_tensor(&if bf16 { t.to_dtype(DType::BF16).unwrap() } else { t.clone() })
                .unwrap()
        })
        .collect();
    let algo = algorithm(meta["kind"].as_str().unwrap());
    let named = names.iter().cloned().zip(vars.iter().cloned()).collect();
    let mut opt = Optimizer::new(algo, named).unwrap();
    let steps = fx.meta["steps"].as_u64().unwrap() as usize;
    let clip = meta["clip"].as_f64();
    for step in 0..steps {
        let grad = |n: &str| {
            let g = fx.t(&format!("{case}.grad.{step}.{n}"));
            if bf16 {
                g.to_dtype(DType::BF16).unwrap()
            } else {
                g.clone()
            }
        };
        let mut store = GradStore::default();
        let mut acc = GradAccumulator::new(opt.vars());
        if accumulate {
            for _ in 0..2 {
                let mut micro = GradStore::default();
                for (n, v) in names.iter().zip(&vars) {
                    micro.insert(v.as_tensor(), (grad(n) * 0.5).unwrap());
                }
                acc.accumulate(&micro).unwrap();
            }
            assert_eq!(acc.micro_batches(), 2);
        } else {
            for (n, v) in names.iter().zip(&vars) {
                store.insert(v.as_tensor(), grad(n));
            }
        }
        let grads: &mut dyn GradSourceMut = if accumulate { &mut acc } else { &mut store };
        if let Some(clip) = clip {
            let norm = clip_grad_norm(grads, vars.iter(), clip).unwrap();
            let want = meta["grad_norm"][step].as_f64().unwrap();
            assert!(
                (norm.norm - want).abs() <= 1e-6 * want,
                "{case} step {step}: norm {} vs {want}",
                norm.norm
            );
            assert_eq!(norm.coeff.is_some(), clip / (want + 1e-6) < 1.0, "{case} step {step}");
        }
        let lr = meta["lr"][step].as_f64().unwrap();
        let wd = meta["wd"][step].as_f64().unwrap();
        opt.step(&*grads, lr, wd).unwrap();
        let state = opt.export_state().unwrap();
        let by_name: HashMap<_, _> = state.tensors.iter().cloned().collect();
        for (n, v) in names.iter().zip(&vars) {
            let want = fx.t(&format!("{case}.after.{step}.{n}"));
            if bf16 {
                assert_eq!(v.dtype(), DType::BF16);
                let master = &by_name[&format!("{n}.master")];
                assert_eq!(master.dtype(), DType::F32);
                assert_close(&format!("{case} step {step} master {n}"), master, want, rtol);
                let model = fx.t(&format!("{case}.model.{step}.{n}"));
                assert_close(&format!("{case} step {step} bf16 {n}"), v.as_tensor(), model, 0.0);
            } else {
                assert_close(&format!("{case} step {step} {n}"), v.as_tensor(), want, rtol);
            }
        }
    }
    let state = opt.export_state().unwrap();
    let by_name: HashMap<_, _> = state.tensors.iter().cloned().collect();
    let prefix = format!("{case}.state.");
    let mut checked = 0;
    for (key, want) in fx.tensors.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        let name = &key[prefix.len()..];
        let got = by_name.get(name).unwrap_or_else(|| panic!("{case}: no exported state {name}"));
        assert_close_floor(&format!("{case} state {name}"), got, want, rtol, 1.0);
        checked += 1;
    }
    assert_eq!(checked, if matches!(algo, Algorithm::Sgd(_)) { 4 } else { 8 });
    opt
}

#[test]
fn adamw_matches_torch() {
    let fx = fixture();
    replay(&fx, "adamw_f32", false);
    replay(&fx, "adamw_f64", false);
}

#[test]
fn adam_coupled_l2_matches_torch() {
    let fx = fixture();
    replay(&fx, "adam_l2_f32", false);
    replay(&fx, "adam_l2_f64", false);
}

#[test]
fn sgd_momentum_matches_torch() {
    let fx = fixture();
    replay(&fx, "sgd_f32", false);
    replay(&fx, "sgd_f64", false);
}

#[test]
fn clipping_matches_megatron_formula() {
    let fx = fixture();
    replay(&fx, "adamw_clip_f32", false);
    replay(&fx, "adamw_clip_f32", true);
    replay(&fx, "sgd_noclip_f32", true);
}

#[test]
fn bf16_model_with_fp32_master_matches_torch() {
    let fx = fixture();
    replay(&fx, "adamw_bf16", true);
}

#[test]
fn state_export_import_resumes_exactly() {
    let fx = fixture();
    for case in ["adamw_bf16", "sgd_f32"] {
        let opt = replay(&fx, case, false);
        let state = opt.export_state().unwrap();
        // A second optimizer over copies of the trained weights, restored from the state.
        let copies: Vec<(String, Var)> = opt
            .params()
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Var::from_tensor(&p.var.as_detached_tensor().copy().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut resumed = Optimizer::new(*opt.algorithm(), copies.clone()).unwrap();
        resumed.import_state(&state).unwrap();
        assert_eq!(resumed.steps(), 10);
        let mut original = opt;
        let mut g1 = GradStore::default();
        let mut g2 = GradStore::default();
        for (p, (_, v)) in original.params().iter().zip(&copies) {
            let g = Tensor::ones(p.var.shape(), p.var.dtype(), &Device::Cpu).unwrap();
            g1.insert(p.var.as_tensor(), g.clone());
            g2.insert(v.as_tensor(), g);
        }
        original.step(&g1, 1e-3, 0.1).unwrap();
        resumed.step(&g2, 1e-3, 0.1).unwrap();
        for (p, (_, v)) in original.params().iter().zip(&copies) {
            assert_close(
                &format!("{case} resumed {}", p.name),
                v.as_tensor(),
                p.var.as_tensor(),
                0.0,
            );
        }
    }
}

#[test]
fn state_import_names_the_problem() {
    let fx = fixture();
    let opt = replay(&fx, "adamw_f32", false);
    let state = opt.export_state().unwrap();
    let fresh = || {
        let params = opt
            .params()
            .iter()
            .map(|p| (p.name.clone(), Var::from_tensor(p.var.as_tensor()).unwrap()));
        Optimizer::new(*opt.algorithm(), params.collect()).unwrap()
    };
    let key = "decoder.layers.0.mlp.linear_fc1.weight.exp_avg_sq";

    let mut missing = state.clone();
    missing.tensors.retain(|(n, _)| n != key);
    let e = fresh().import_state(&missing).unwrap_err();
    assert!(matches!(&e, OptimError::MissingStateTensor(n) if n == key), "{e}");

    let mut misshaped = state.clone();
    for (n, t) in misshaped.tensors.iter_mut() {
        if n == key {
            *t = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        }
    }
    let e = fresh().import_state(&misshaped).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("[3, 4]") && e.contains("[4, 3]"), "{e}");

    let mut extra = state.clone();
    extra.tensors.push((
        "output_layer.weight.exp_avg".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    let mut target = fresh();
    let e = target.import_state(&extra).unwrap_err().to_string();
    assert!(e.contains("output_layer.weight.exp_avg"), "{e}");
    assert_eq!(target.steps(), 0, "a failed import changes nothing");

    let mut sgd_state = state.clone();
    sgd_state.algorithm = "sgd".into();
    assert!(matches!(fresh().import_state(&sgd_state), Err(OptimError::AlgorithmMismatch { .. })));
}

#[test]
fn default_groups_and_missing_grads() {
    use mbridge::train::optimizer::default_wd_mult;
    assert_eq!(default_wd_mult("decoder.layers.0.self_attention.linear_qkv.bias", 1), 0.0);
    assert_eq!(default_wd_mult("decoder.layers.0.input_layernorm.weight", 1), 0.0);
    assert_eq!(default_wd_mult("decoder.layers.0.self_attention.linear_qkv.weight", 2), 1.0);

    // A parameter with no gradient still gets weight decay (megatron-core's zero main_grad).
    let w = Var::from_tensor(&Tensor::new(&[[1.0f32, -2.0]], &Device::Cpu).unwrap()).unwrap();
    let mut opt = Optimizer::new(
        Algorithm::Adam(AdamConfig::default()),
        vec![("w.weight".into(), w.clone())],
    )
    .unwrap();
    let empty = GradStore::default();
    assert_eq!(opt.params_without_grad(&empty), vec!["w.weight"]);
    opt.step(&empty, 0.5, 0.1).unwrap();
    let got: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, vec![1.0 * (1.0 - 0.05), -2.0 * (1.0 - 0.05)]);

    // A gradient of the wrong shape is named.
    let mut bad = GradStore::default();
    bad.insert(w.as_tensor(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap());
    let e = opt.step(&bad, 0.5, 0.1).unwrap_err().to_string();
    assert!(e.contains("w.weight") && e.contains("[3]"), "{e}");
    assert_eq!(opt.steps(), 1, "a rejected step changes nothing");

    // Accumulated gradients are summed in f32 even for bf16 micro-batch gradients.
    let b = Var::from_tensor(&Tensor::zeros(2, DType::BF16, &Device::Cpu).unwrap()).unwrap();
    let mut acc = GradAccumulator::new(vec![b.clone()]);
    for _ in 0..3 {
        let mut s = GradStore::default();
        s.insert(
            b.as_tensor(),
            Tensor::new(&[1.0f32, 1.0 / 256.0], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        );
        acc.accumulate(&s).unwrap();
    }
    let g = acc.grad_of(&b).unwrap();
    assert_eq!(g.dtype(), DType::F32);
    // In bf16, 1 + 1/256 rounds back to 1; in f32 the sum is exact.
    assert_eq!(g.to_vec1::<f32>().unwrap(), vec![3.0, 3.0 / 256.0]);
    acc.scale(0.5).unwrap();
    assert_eq!(acc.grad_of(&b).unwrap().to_vec1::<f32>().unwrap(), vec![1.5, 1.5 / 256.0]);
    acc.clear();
    assert!(acc.grad_of(&b).is_none());
}

/// `step_scaled_each` reports every parameter once, in order, after its update (its master
/// value is already the new one; matrix `b` has no gradient and moves by weight decay alone),
/// and steps exactly like `step_scaled`.
#[test]
fn step_scaled_each_reports_each_updated_parameter_in_order() {
    let make = || {
        let params = ["a.weight", "b.weight", "c.weight"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let t = Tensor::new(&[[1.0f32 + i as f32, -2.0, 0.5]], &Device::Cpu).unwrap();
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        Optimizer::new(Algorithm::Adam(AdamConfig::default()), params).unwrap()
    };
    let (mut each, mut plain) = (make(), make());
    let mut grads = GradStore::default();
    for p in each.params().iter().chain(plain.params()).filter(|p| p.name != "b.weight") {
        let g = Tensor::new(&[[0.3f32, -0.1, 0.2]], &Device::Cpu).unwrap();
        grads.insert(p.var.as_tensor(), g);
    }
    let before: Vec<Tensor> =
        each.params().iter().map(|p| p.master_value().unwrap().copy().unwrap()).collect();
    let mut seen = Vec::new();
    each.step_scaled_each(&grads, 1e-2, 0.1, Some(0.5), &mut |i, p| {
        let changed = (p.master_value()? - &before[i])?.abs()?.sum_all()?.to_scalar::<f32>()?;
        seen.push((i, p.name.clone(), changed > 0.0));
        Ok(())
    })
    .unwrap();
    let names = ["a.weight", "b.weight", "c.weight"];
    let want: Vec<(usize, String, bool)> =
        names.iter().enumerate().map(|(i, n)| (i, n.to_string(), true)).collect();
    assert_eq!(seen, want);
    plain.step_scaled(&grads, 1e-2, 0.1, Some(0.5)).unwrap();
    for (a, b) in each.params().iter().zip(plain.params()) {
        assert_eq!(
            a.var.as_tensor().to_vec2::<f32>().unwrap(),
            b.var.as_tensor().to_vec2::<f32>().unwrap(),
            "{}",
            a.name
        );
    }
}

/// `optimizer.decoupled_lr`: the word embedding and the output layer (megatron-core's
/// `is_embedding_or_output_parameter`, also as a distributed optimizer's slice of them) step
/// with their own learning rate, the others with the scheduler's. SGD without momentum makes
/// the update `lr · g` exactly.
#[test]
fn decoupled_lr_steps_the_embedding_and_output_layer() {
    use mbridge::train::optimizer::is_embedding_or_output;
    assert!(is_embedding_or_output("embedding.word_embeddings.weight"));
    assert!(is_embedding_or_output("output_layer.weight[0..4096]"));
    assert!(!is_embedding_or_output("decoder.final_layernorm.weight"));
    assert!(!is_embedding_or_output("embedding.position_embeddings.weight"));
    let names = ["embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight"];
    let vars: Vec<Var> = names
        .iter()
        .map(|_| Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap())
        .collect();
    let mut grads = GradStore::default();
    for v in &vars {
        grads.insert(v.as_tensor(), Tensor::new(&[1.0f32, -2.0, 4.0], &Device::Cpu).unwrap());
    }
    let sgd = Algorithm::Sgd(SgdConfig { momentum: 0.0 });
    let params = names.iter().zip(&vars).map(|(n, v)| (n.to_string(), v.clone())).collect();
    let mut opt = Optimizer::new(sgd, params).unwrap();
    opt.set_decoupled_lr(Some(0.5));
    opt.step(&grads, 0.25, 0.0).unwrap();
    let values = |v: &Var| v.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(values(&vars[0]), vec![-0.5, 1.0, -2.0]);
    assert_eq!(values(&vars[1]), vec![-0.25, 0.5, -1.0]);
    // Unset, every parameter takes the scheduler's rate.
    opt.set_decoupled_lr(None);
    opt.step(&grads, 0.25, 0.0).unwrap();
    assert_eq!(values(&vars[0]), vec![-0.75, 1.5, -3.0]);
}
