//! Activation recompute (`model.recompute_granularity = "full"`, uniform/block): the loss and
//! every parameter's gradient equal those of the plain forward, and the recomputed layers'
//! parameters get their gradients through the side store (none is missing).

mod model_common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use mbridge::config::model::{ModelConfig, RecomputeGranularity, RecomputeMethod};
use mbridge::model::recompute::RecomputeGrads;
use mbridge::model::ParallelLayout;
use mbridge::model::{loss_for_microbatch, loss_for_microbatch_recompute, GptModel, Microbatch};
use mbridge::train::grads::GradAccumulator;
use model_common::tiny_llama;

fn batch(cfg: &ModelConfig) -> Microbatch {
    let v = cfg.vocab_size.unwrap() as u32;
    let (b, s) = (2, 8);
    let ids: Vec<u32> = (0..(b * s + 1) as u32).map(|i| (i * 5 + 1) % v).collect();
    let dev = Device::Cpu;
    Microbatch {
        tokens: Tensor::from_vec(ids[..b * s].to_vec(), (b, s), &dev).unwrap(),
        labels: Tensor::from_vec(ids[1..].to_vec(), (b, s), &dev).unwrap(),
        loss_mask: Tensor::ones((b, s), DType::F64, &dev).unwrap(),
        position_ids: None,
        attention_mask: None,
        cu_seqlens: None,
        host_stats: None,
    }
}

/// (loss, gradients summed as the trainer does) with or without the recompute path.
fn run(cfg: &ModelConfig, recompute: bool) -> (f64, Vec<(String, Option<Tensor>)>) {
    let (loss, grads, _) = run_with(cfg, recompute, None);
    (loss, grads)
}

/// [`run`] with the written-out layer backward forced on or off (`explicit`), also returning
/// how many side stores were pushed.
fn run_with(
    cfg: &ModelConfig,
    recompute: bool,
    explicit: Option<bool>,
) -> (f64, Vec<(String, Option<Tensor>)>, usize) {
    let mut model =
        GptModel::new(cfg, ParallelLayout::single(), 7, DType::F64, &Device::Cpu).unwrap();
    if let Some(on) = explicit {
        model.set_explicit_layers(on);
    }
    let mb = batch(cfg);
    let vars: Vec<_> = model.params().params().iter().map(|p| p.var.clone()).collect();
    let mut acc = GradAccumulator::new(vars);
    let sink = RecomputeGrads::default();
    let (sum, _) = if recompute {
        loss_for_microbatch_recompute(&model, &mb, None, &sink).unwrap()
    } else {
        loss_for_microbatch(&model, &mb, None).unwrap()
    };
    let store: GradStore = sum.backward().unwrap();
    acc.accumulate(&store).unwrap();
    let pushes = sink.pushes();
    let side = sink.take();
    if recompute {
        assert!(
            side.get_ids().count() > 0,
            "recompute reports its parameter gradients through the side store"
        );
    }
    acc.add(&side).unwrap();
    let names = model.params().params().iter().map(|p| p.name.clone());
    let grads = names.zip(acc.iter().map(|(_, g)| g.cloned())).collect();
    (sum.to_scalar::<f64>().unwrap(), grads, pushes)
}

fn check(method: RecomputeMethod, num_layers: usize) {
    check_with(method, num_layers, false);
}

/// Recompute (with autograd layers, or with written-out layers inside the checkpointed
/// segments) against the plain autograd forward.
fn check_with(method: RecomputeMethod, num_layers: usize, explicit: bool) {
    let mut cfg = tiny_llama();
    cfg.num_layers = 3;
    let (loss, plain) = run(&cfg, false);
    cfg.recompute_granularity = Some(RecomputeGranularity::Full);
    cfg.recompute_method = Some(method);
    cfg.recompute_num_layers = Some(num_layers);
    let (loss_r, recomputed, pushes) = run_with(&cfg, true, Some(explicit));
    if explicit {
        // One push per layer (3), the embedding and the head, besides the segments' own (2 or
        // 3 here): at least 7, at most 5 without written-out layers inside the segments.
        assert!(pushes >= 7, "written-out layers did not run inside recompute: {pushes}");
    }
    assert!((loss - loss_r).abs() < 1e-12, "loss {loss} vs {loss_r}");
    for ((name, a), (_, b)) in plain.iter().zip(&recomputed) {
        let (Some(a), Some(b)) = (a, b) else { panic!("{name}: gradient missing ({method:?})") };
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-10, "{name}: gradients differ by {d} ({method:?}, {num_layers})");
    }
}

#[test]
fn full_uniform_recompute_matches_plain_gradients() {
    check(RecomputeMethod::Uniform, 1);
    check(RecomputeMethod::Uniform, 2);
}

#[test]
fn full_recompute_of_written_out_layers_matches_plain_gradients() {
    check_with(RecomputeMethod::Uniform, 1, true);
    check_with(RecomputeMethod::Block, 2, true);
}

#[test]
fn full_block_recompute_matches_plain_gradients() {
    check(RecomputeMethod::Block, 2);
}

/// Selective recompute (core attention, MLP, both; `layernorm` is accepted and always
/// recomputed) gives the plain forward's loss and gradients.
#[test]
fn selective_recompute_matches_plain_gradients() {
    let cfg = tiny_llama();
    let (loss, plain) = run(&cfg, false);
    let layernorm_only = Some(vec!["layernorm"]);
    for modules in
        [None, Some(vec!["mlp"]), layernorm_only, Some(vec!["core_attn", "mlp", "layernorm"])]
    {
        let mut sel = cfg.clone();
        sel.recompute_granularity = Some(RecomputeGranularity::Selective);
        sel.recompute_modules = modules.clone().map(|m| m.iter().map(|s| s.to_string()).collect());
        let (loss_s, grads) = run(&sel, true);
        assert!((loss - loss_s).abs() < 1e-12, "{modules:?}: loss {loss} vs {loss_s}");
        for ((name, a), (_, b)) in plain.iter().zip(&grads) {
            let (Some(a), Some(b)) = (a, b) else { panic!("{name}: gradient missing") };
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d <= 1e-10 * scale.max(1e-30), "{modules:?}: {name} differs by {d}");
        }
    }
}

/// Selective recompute where the written-out backward does not reach is refused, as are
/// modules mbridge's models do not have.
#[test]
fn selective_recompute_refuses_what_it_cannot_do() {
    let mut cfg = tiny_llama();
    cfg.recompute_granularity = Some(RecomputeGranularity::Selective);
    let mut dropout = cfg.clone();
    dropout.hidden_dropout = 0.1;
    let err = GptModel::new(&dropout, ParallelLayout::single(), 7, DType::F64, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("selective") && err.contains("dropout"), "{err}");
    for (module, want) in [("moe", "MoE"), ("attention", "unknown module")] {
        let mut bad = cfg.clone();
        bad.recompute_modules = Some(vec![module.to_string()]);
        let err = GptModel::new(&bad, ParallelLayout::single(), 7, DType::F64, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{module}: {err}");
    }
}
