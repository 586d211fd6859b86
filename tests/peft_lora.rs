//! LoRA / DoRA / canonical LoRA adapters on the GPT model: B = 0 leaves the base logits
//! unchanged, f64 finite-difference gradient checks of the adapters, the base stays frozen
//! under training, the merged weight `W + s·BA` gives the adapted model's logits, canonical
//! LoRA equals fused LoRA with the same factors split as the HF export splits them, target
//! matching errors.

mod model_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::peft::{PeftConfig, PeftScheme};
use mbridge::model::{loss_for_microbatch, ForwardOpts, GptModel, Microbatch, ParallelLayout};
use mbridge::peft::Adapter;
use model_common::{check_grads, rand_t, tiny_llama};

const SEED: u64 = 7;

fn peft(scheme: PeftScheme, dim: usize) -> PeftConfig {
    PeftConfig { dim, alpha: 6.0, ..PeftConfig::for_scheme(scheme) }
}

fn model(p: Option<&PeftConfig>) -> GptModel {
    let cfg = tiny_llama();
    GptModel::new_peft(&cfg, ParallelLayout::single(), None, p, SEED, DType::F64, &Device::Cpu)
        .unwrap()
}

fn tokens() -> Tensor {
    Tensor::new(&[[1u32, 5, 9, 3, 7, 2], [4, 4, 8, 1, 0, 6]], &Device::Cpu).unwrap()
}

fn batch() -> Microbatch {
    let rows = vec![vec![1i64, 5, 9, 3, 7, 2], vec![4, 4, 8, 1, 0, 6]];
    let labels = vec![vec![5i64, 9, 3, 7, 2, 1], vec![4, 8, 1, 0, 6, 3]];
    Microbatch::from_rows(&rows, &labels, &[vec![1.0; 6], vec![1.0; 6]], None, &Device::Cpu)
        .unwrap()
}

fn logits(m: &GptModel) -> Vec<f64> {
    m.forward(&tokens(), &ForwardOpts::default()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Gives every `linear_out` (B) a random nonzero value so the adapters matter.
fn randomize_b(m: &GptModel) {
    for (i, p) in m.params().params().iter().enumerate() {
        if p.name.contains(".adapter.") && p.name.ends_with("linear_out.weight") {
            m.params().set_full(&p.name, &rand_t(&p.global_shape, 100 + i as u64, 0.3)).unwrap();
        }
    }
}

#[test]
fn zero_b_gives_the_base_logits_exactly() {
    let base = logits(&model(None));
    assert_eq!(logits(&model(Some(&peft(PeftScheme::Lora, 4)))), base);
    assert_eq!(logits(&model(Some(&peft(PeftScheme::CanonicalLora, 4)))), base);
    let dora = model(Some(&peft(PeftScheme::Dora, 4)));
    dora.init_dora_magnitudes().unwrap();
    let d = logits(&dora);
    let err = d.iter().zip(&base).fold(0f64, |e, (a, b)| e.max((a - b).abs()));
    assert!(err < 1e-12, "DoRA at init differs from the base by {err:e}");
}

#[test]
fn adapter_names_shapes_and_frozen_base() {
    let m = model(Some(&peft(PeftScheme::Lora, 4)));
    let trainable: Vec<String> =
        m.params().trainable_named_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        trainable.len(),
        2 * 4 * 2,
        "A and B for 4 linear layers in 2 layers: {trainable:?}"
    );
    let a = m.params().get("decoder.layers.1.mlp.linear_fc1.adapter.linear_in.weight").unwrap();
    assert_eq!(a.global_shape, vec![4, 16]);
    let b = m.params().get("decoder.layers.1.mlp.linear_fc1.adapter.linear_out.weight").unwrap();
    assert_eq!(b.global_shape, vec![48, 4]);
    assert!(!m.params().get("decoder.layers.1.mlp.linear_fc1.weight").unwrap().trainable);
    // Only adapters receive gradients.
    let (sum, count) = loss_for_microbatch(&m, &batch(), None).unwrap();
    let grads = (sum / count).unwrap().backward().unwrap();
    for p in m.params().params() {
        assert_eq!(grads.get(p.var.as_tensor()).is_some(), p.trainable, "{}", p.name);
    }
}

#[test]
fn wildcard_targets_and_no_match_error() {
    let p = PeftConfig {
        target_modules: vec!["*.layers.0.*.linear_qkv".into()],
        ..peft(PeftScheme::Lora, 2)
    };
    let m = model(Some(&p));
    let names: Vec<String> =
        m.params().trainable_named_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight",
            "decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight"
        ]
    );
    let bad = PeftConfig { target_modules: vec!["linear_q".into()], ..peft(PeftScheme::Lora, 2) };
    let err = GptModel::new_peft(
        &tiny_llama(),
        ParallelLayout::single(),
        None,
        Some(&bad),
        1,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("match no linear layer") && err.contains("linear_fc2"), "{err}");
}

#[test]
fn lora_and_dora_gradients_match_finite_differences() {
    for scheme in [PeftScheme::Lora, PeftScheme::Dora, PeftScheme::CanonicalLora] {
        let m = model(Some(&peft(scheme, 3)));
        m.init_dora_magnitudes().unwrap();
        randomize_b(&m);
        // DoRA detaches the weight norm (as Megatron Bridge), so its exact gradient is only
        // the autograd one for the magnitude; LoRA is checked on A and B.
        let vars: Vec<_> = m
            .params()
            .trainable_named_vars()
            .into_iter()
            .filter(|(n, _)| scheme != PeftScheme::Dora || n.ends_with("weight_magnitude"))
            .collect();
        assert!(!vars.is_empty());
        let b = batch();
        check_grads(
            &vars,
            &|| {
                let (s, c) = loss_for_microbatch(&m, &b, None).map_err(candle_core::Error::msg)?;
                s / c
            },
            4,
        );
    }
}

#[test]
fn merged_weights_give_the_adapted_logits() {
    for scheme in [PeftScheme::Lora, PeftScheme::Dora] {
        let cfg = peft(scheme, 3);
        let m = model(Some(&cfg));
        m.init_dora_magnitudes().unwrap();
        randomize_b(&m);
        if scheme == PeftScheme::Dora {
            for p in m.params().params().iter().filter(|p| p.name.ends_with("weight_magnitude")) {
                m.params()
                    .set_full(&p.name, &(rand_t(&p.global_shape, 3, 0.2) + 1.0).unwrap())
                    .unwrap();
            }
        }
        let merged = model(None);
        let get = |n: &str| m.params().get(n).unwrap().var.as_tensor().clone();
        for p in merged.params().params() {
            let Some(module) = p.name.strip_suffix(".weight") else { continue };
            let Some(a) = m.params().get(&format!("{module}.adapter.linear_in.weight")) else {
                continue;
            };
            let b = get(&format!("{module}.adapter.linear_out.weight"));
            let mag = m
                .params()
                .get(&format!("{module}.adapter.weight_magnitude"))
                .map(|q| q.var.as_tensor().clone());
            let w = Adapter::merge_full(
                &get(&p.name),
                a.var.as_tensor(),
                &b,
                cfg.alpha / 3.0,
                mag.as_ref(),
            )
            .unwrap();
            merged.params().set_full(&p.name, &w).unwrap();
        }
        let (x, y) = (logits(&m), logits(&merged));
        let err = x.iter().zip(&y).fold(0f64, |e, (a, b)| e.max((a - b).abs()));
        assert!(err < 1e-10, "{scheme:?}: merged logits differ by {err:e}");
        assert!(x != logits(&model(None)), "{scheme:?}: adapters must change the logits");
    }
}

#[test]
fn sgd_trains_adapters_and_leaves_the_base_alone() {
    let m = model(Some(&peft(PeftScheme::Lora, 4)));
    let before = m.params().local_state().unwrap();
    let vars = m.params().trainable_named_vars();
    let b = batch();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let (s, c) = loss_for_microbatch(&m, &b, None).unwrap();
        let loss = (s / c).unwrap();
        losses.push(loss.to_scalar::<f64>().unwrap());
        let grads = loss.backward().unwrap();
        for (_, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap();
            v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap()).unwrap();
        }
    }
    assert!(losses[29] < losses[0] - 0.1, "loss did not fall: {losses:?}");
    for ((name, t0), p) in before.iter().zip(m.params().params()) {
        let diff = (t0 - p.var.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        if p.trainable {
            if name.ends_with("linear_out.weight") {
                assert!(diff > 0.0, "{name} did not change");
            }
        } else {
            assert_eq!(diff, 0.0, "frozen {name} changed");
        }
    }
}

#[test]
fn lora_dropout_pre_and_post_train_only_and_gradients() {
    for pos in ["pre", "post"] {
        let cfg =
            PeftConfig { dropout: 0.3, dropout_position: pos.into(), ..peft(PeftScheme::Lora, 3) };
        let m = model(Some(&cfg));
        randomize_b(&m);
        let rng = || mbridge::ops::DropoutRng::new(3, 1, 0);
        let eval = logits(&m);
        let train: Vec<f64> = {
            let r = rng();
            let opts = ForwardOpts { dropout: Some(&r), ..Default::default() };
            m.forward(&tokens(), &opts).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_ne!(eval, train, "{pos}: dropout changed nothing in training");
        let vars = m.params().trainable_named_vars();
        let b = batch();
        check_grads(
            &vars,
            &|| {
                let r = rng();
                let (s, c) =
                    loss_for_microbatch(&m, &b, Some(&r)).map_err(candle_core::Error::msg)?;
                s / c
            },
            3,
        );
    }
    let bad = PeftConfig { dropout: 0.1, ..peft(PeftScheme::Dora, 2) };
    let err = GptModel::new_peft(
        &tiny_llama(),
        ParallelLayout::single(),
        None,
        Some(&bad),
        1,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("DoRA with peft.dropout"), "{err}");
}

/// Canonical LoRA: one adapter per HF projection under Megatron Bridge's names, only the
/// targeted parts, and the fused names refused.
#[test]
fn canonical_lora_adapts_each_part_under_its_own_name() {
    let m = model(Some(&peft(PeftScheme::CanonicalLora, 4)));
    let names: Vec<String> =
        m.params().trainable_named_vars().into_iter().map(|(n, _)| n).collect();
    // Per layer: q, k, v, gate, up, proj, fc2 — A and B each.
    assert_eq!(names.len(), 2 * 7 * 2, "{names:?}");
    let shape = |n: &str| m.params().get(n).unwrap().global_shape.clone();
    let qkv = "decoder.layers.0.self_attention.linear_qkv.adapter";
    let arch = m.arch().clone();
    let (q_rows, kv_rows) = (arch.heads * arch.head_dim, arch.groups * arch.head_dim);
    assert_eq!(shape(&format!("{qkv}.adapter_q.linear_out.weight")), vec![q_rows, 4]);
    assert_eq!(shape(&format!("{qkv}.adapter_k.linear_out.weight")), vec![kv_rows, 4]);
    assert_eq!(shape(&format!("{qkv}.adapter_v.linear_in.weight")), vec![4, arch.hidden]);
    let fc1 = "decoder.layers.1.mlp.linear_fc1.adapter";
    assert_eq!(shape(&format!("{fc1}.adapter_gate.linear_out.weight")), vec![arch.ffn, 4]);
    assert!(m.params().get("decoder.layers.1.mlp.linear_fc2.adapter.linear_in.weight").is_some());

    let some = PeftConfig {
        target_modules: vec!["linear_q".into(), "*.layers.1.*.linear_fc1_up".into()],
        ..peft(PeftScheme::CanonicalLora, 2)
    };
    let names: Vec<String> =
        model(Some(&some)).params().trainable_named_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "decoder.layers.0.self_attention.linear_qkv.adapter.adapter_q.linear_in.weight",
            "decoder.layers.0.self_attention.linear_qkv.adapter.adapter_q.linear_out.weight",
            "decoder.layers.1.self_attention.linear_qkv.adapter.adapter_q.linear_in.weight",
            "decoder.layers.1.self_attention.linear_qkv.adapter.adapter_q.linear_out.weight",
            "decoder.layers.1.mlp.linear_fc1.adapter.adapter_up.linear_in.weight",
            "decoder.layers.1.mlp.linear_fc1.adapter.adapter_up.linear_out.weight",
        ]
    );
    let fused = PeftConfig {
        target_modules: vec!["linear_qkv".into()],
        ..peft(PeftScheme::CanonicalLora, 2)
    };
    let err = GptModel::new_peft(
        &tiny_llama(),
        ParallelLayout::single(),
        None,
        Some(&fused),
        1,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("linear_q / linear_k / linear_v"), "{err}");
}

/// Canonical LoRA whose parts share fused LoRA's A and take the rows of its B that the HF
/// export gives each projection (`bridge::mapping`, an independent split of the fused
/// layout) computes fused LoRA's logits.
#[test]
fn canonical_lora_equals_fused_lora_with_split_factors() {
    use mbridge::bridge::mapping::megatron_to_hf_tensors;
    let targets = ["linear_qkv", "linear_fc1"].map(String::from).to_vec();
    let fused = model(Some(&PeftConfig { target_modules: targets, ..peft(PeftScheme::Lora, 3) }));
    randomize_b(&fused);
    let parts = ["linear_q", "linear_k", "linear_v", "linear_fc1_gate", "linear_fc1_up"];
    let canon = model(Some(&PeftConfig {
        target_modules: parts.map(String::from).to_vec(),
        ..peft(PeftScheme::CanonicalLora, 3)
    }));
    let arch = fused.arch().clone();
    let full = |m: &GptModel, n: &str| m.params().get(n).unwrap().var.as_tensor().clone();
    let mut set = 0;
    for layer in 0..2 {
        for (module, keys) in [
            (format!("decoder.layers.{layer}.self_attention.linear_qkv"), vec!["q", "k", "v"]),
            (format!("decoder.layers.{layer}.mlp.linear_fc1"), vec!["gate", "up"]),
        ] {
            let a = full(&fused, &format!("{module}.adapter.linear_in.weight"));
            let b = full(&fused, &format!("{module}.adapter.linear_out.weight"));
            let hf =
                megatron_to_hf_tensors(&format!("{module}.weight"), &b, &arch, arch.vocab).unwrap();
            for key in keys {
                let (_, b_part) =
                    hf.iter().find(|(n, _)| n.ends_with(&format!(".{key}_proj.weight"))).unwrap();
                let prefix = format!("{module}.adapter.adapter_{key}");
                canon.params().set_full(&format!("{prefix}.linear_in.weight"), &a).unwrap();
                canon.params().set_full(&format!("{prefix}.linear_out.weight"), b_part).unwrap();
                set += 1;
            }
        }
    }
    assert_eq!(set, 10);
    let (want, got) = (logits(&fused), logits(&canon));
    let err = want.iter().zip(&got).fold(0f64, |e, (a, b)| e.max((a - b).abs()));
    assert!(err < 1e-12, "canonical LoRA differs from fused LoRA by {err:e}");
    assert_ne!(want, logits(&model(None)), "the adapters must change the logits");
}
