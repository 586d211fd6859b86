//! Parameter names and layouts, seeded init, pipeline stages, bad input, masks, generation.

mod model_common;

use candle_core::{DType, Device, IndexOp, Tensor};
use mbridge::config::model::ModelConfig;
use mbridge::model::{generate, ForwardOpts, GptModel, ParallelLayout, ShardLayout};
use mbridge::ops::DropoutRng;
use model_common::{tiny_gpt, tiny_llama, tiny_qwen_window};

fn build(cfg: &ModelConfig, layout: ParallelLayout, seed: u64, dtype: DType) -> GptModel {
    GptModel::new(cfg, layout, seed, dtype, &Device::Cpu).unwrap()
}

#[test]
fn megatron_names_shapes_and_partition_dims() {
    let cfg = tiny_llama();
    let m = build(&cfg, ParallelLayout::single(), 0, DType::F32);
    let got: Vec<(String, Vec<usize>, Option<usize>)> = m
        .params()
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.global_shape.clone(), p.partition_dim))
        .collect();
    let l = |i: usize, rest: &str| format!("decoder.layers.{i}.{rest}");
    let mut want = vec![("embedding.word_embeddings.weight".to_string(), vec![32, 16], Some(0))];
    for i in 0..2 {
        want.extend([
            (l(i, "self_attention.linear_qkv.layer_norm_weight"), vec![16], None),
            // (4 + 2·2) heads × 4 channels.
            (l(i, "self_attention.linear_qkv.weight"), vec![32, 16], Some(0)),
            (l(i, "self_attention.linear_proj.weight"), vec![16, 16], Some(1)),
            (l(i, "mlp.linear_fc1.layer_norm_weight"), vec![16], None),
            (l(i, "mlp.linear_fc1.weight"), vec![48, 16], Some(0)),
            (l(i, "mlp.linear_fc2.weight"), vec![16, 24], Some(1)),
        ]);
    }
    want.push(("decoder.final_layernorm.weight".into(), vec![16], None));
    want.push(("output_layer.weight".into(), vec![32, 16], Some(0)));
    assert_eq!(got, want);
    assert_eq!(
        m.params().get("decoder.layers.0.mlp.linear_fc1.weight").unwrap().layout,
        ShardLayout::GatedHalves
    );
}

#[test]
fn optional_parameters_follow_the_config() {
    let q = build(&tiny_qwen_window(), ParallelLayout::single(), 0, DType::F32);
    let names: Vec<&str> = q.params().params().iter().map(|p| p.name.as_str()).collect();
    for n in [
        "decoder.layers.1.self_attention.linear_qkv.bias",
        "decoder.layers.1.self_attention.q_layernorm.weight",
        "decoder.layers.1.self_attention.k_layernorm.weight",
    ] {
        assert!(names.contains(&n), "missing {n}");
    }
    assert!(!names.contains(&"output_layer.weight"), "tied model has no output layer");
    assert_eq!(
        q.params().get("decoder.layers.0.self_attention.q_layernorm.weight").unwrap().global_shape,
        vec![6]
    );
    let g = build(&tiny_gpt(), ParallelLayout::single(), 0, DType::F32);
    for n in [
        "embedding.position_embeddings.weight",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
        "decoder.layers.0.self_attention.linear_proj.bias",
        "decoder.layers.0.mlp.linear_fc1.bias",
        "decoder.layers.0.mlp.linear_fc2.bias",
        "decoder.final_layernorm.bias",
    ] {
        assert!(g.params().get(n).is_some(), "missing {n}");
    }
    // Zero-centered gamma starts at zero; plain gamma at one.
    let zc = g.params().get("decoder.final_layernorm.weight").unwrap();
    assert_eq!(
        zc.var.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(),
        0.0
    );
}

#[test]
fn init_is_seeded_bit_exact_and_scaled() {
    let cfg = tiny_llama();
    let a = build(&cfg, ParallelLayout::single(), 42, DType::F32);
    let b = build(&cfg, ParallelLayout::single(), 42, DType::F32);
    let c = build(&cfg, ParallelLayout::single(), 43, DType::F32);
    for ((pa, pb), pc) in
        a.params().params().iter().zip(b.params().params()).zip(c.params().params())
    {
        let va = pa.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vb = pb.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vc = pc.var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()), "{}", pa.name);
        if pa.global_shape.len() == 2 {
            assert_ne!(va, vc, "{} must depend on the seed", pa.name);
        }
    }
    // A larger model for the statistics: std of qkv ≈ σ, of proj/fc2 ≈ σ/sqrt(2L).
    let big =
        ModelConfig { hidden_size: 64, ffn_hidden_size: Some(256), init_method_std: 0.02, ..cfg };
    let m = build(&big, ParallelLayout::single(), 1, DType::F64);
    let std_of = |n: &str| {
        let t = m.params().get(n).unwrap().var.as_tensor().flatten_all().unwrap();
        let v = t.to_vec1::<f64>().unwrap();
        (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
    };
    let q = std_of("decoder.layers.0.self_attention.linear_qkv.weight");
    let f2 = std_of("decoder.layers.1.mlp.linear_fc2.weight");
    assert!((q / 0.02 - 1.0).abs() < 0.05, "qkv std {q}");
    assert!((f2 / (0.02 / 2.0) - 1.0).abs() < 0.05, "fc2 std {f2}");
}

#[test]
fn dropout_is_seeded_and_train_only() {
    let cfg = ModelConfig { hidden_dropout: 0.2, attention_dropout: 0.2, ..tiny_llama() };
    let m = build(&cfg, ParallelLayout::single(), 1, DType::F32);
    let tokens = Tensor::new(&[[3u32, 1, 4, 1, 5, 9]], &Device::Cpu).unwrap();
    let run = |rng: Option<&DropoutRng>| {
        let opts = ForwardOpts { dropout: rng, ..Default::default() };
        m.forward(&tokens, &opts).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let a = run(Some(&DropoutRng::new(5, 10, 0)));
    assert_eq!(a, run(Some(&DropoutRng::new(5, 10, 0))), "same stream ⇒ same masks");
    assert_ne!(a, run(Some(&DropoutRng::new(5, 11, 0))), "next iteration ⇒ new masks");
    assert_ne!(a, run(Some(&DropoutRng::new(5, 10, 1))), "next micro-batch ⇒ new masks");
    assert_eq!(run(None), run(None), "evaluation is deterministic");
    assert_ne!(a, run(None));
    // Inverted dropout keeps the expectation.
    let ones = Tensor::ones(100_000, DType::F32, &Device::Cpu).unwrap();
    let y = DropoutRng::new(0, 0, 0).dropout(&ones, 0.3).unwrap();
    let mean = y.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((mean - 1.0).abs() < 0.01, "{mean}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let cfg = tiny_llama();
    let m = build(&cfg, ParallelLayout::single(), 0, DType::F32);
    let dev = Device::Cpu;
    let long = Tensor::zeros((1, 17), DType::U32, &dev).unwrap();
    let err = m.forward(&long, &ForwardOpts::default()).unwrap_err().to_string();
    assert!(err.contains("sequence length 17") && err.contains("16"), "{err}");
    let oov = Tensor::new(&[[1u32, 32, 2]], &dev).unwrap();
    let err = m.forward(&oov, &ForwardOpts::default()).unwrap_err().to_string();
    assert!(err.contains("token id 32") && err.contains("vocabulary size 32"), "{err}");
    let no_vocab = ModelConfig { vocab_size: None, ..cfg };
    let err = GptModel::new(&no_vocab, ParallelLayout::single(), 0, DType::F32, &dev).unwrap_err();
    assert!(err.to_string().contains("vocab_size"), "{err}");
    let err = generate(&m, &[1; 10], 8, None).unwrap_err().to_string();
    assert!(err.contains("exceeds"), "{err}");
}

/// Two packed documents with a block-diagonal mask and reset positions give the same logits
/// as each document run alone.
#[test]
fn packed_documents_with_attention_mask() {
    let cfg = tiny_qwen_window();
    let m = build(&cfg, ParallelLayout::single(), 5, DType::F64);
    let dev = Device::Cpu;
    let (a, b) = (vec![3u32, 9, 4, 1, 7], vec![5u32, 2, 8, 6]);
    let packed: Vec<u32> = a.iter().chain(&b).copied().collect();
    let s = packed.len();
    let mut masked = vec![0u8; s * s];
    for i in 0..s {
        for j in 0..s {
            masked[i * s + j] = u8::from((i < a.len()) != (j < a.len()));
        }
    }
    let mask = Tensor::from_vec(masked, (1, 1, s, s), &dev).unwrap();
    let pos: Vec<u32> = (0..a.len() as u32).chain(0..b.len() as u32).collect();
    let pos = Tensor::from_vec(pos, (1, s), &dev).unwrap();
    let tokens = Tensor::from_vec(packed, (1, s), &dev).unwrap();
    let opts = ForwardOpts {
        position_ids: Some(&pos),
        attention_mask: Some(&mask),
        dropout: None,
        cu_seqlens: None,
        host_stats: None,
        no_grad: false,
    };
    let got = m.forward(&tokens, &opts).unwrap();
    let alone = m
        .forward(
            &Tensor::new(b.as_slice(), &dev).unwrap().unsqueeze(0).unwrap(),
            &ForwardOpts::default(),
        )
        .unwrap();
    let diff = (got.i((.., a.len().., ..)).unwrap() - alone).unwrap().abs().unwrap();
    assert!(diff.max_all().unwrap().to_scalar::<f64>().unwrap() < 1e-12);
}

#[test]
fn state_round_trip_between_models() {
    let cfg = tiny_gpt();
    let a = build(&cfg, ParallelLayout::single(), 1, DType::F32);
    let b = build(&cfg, ParallelLayout::single(), 2, DType::F32);
    let state: std::collections::HashMap<String, Tensor> =
        a.params().local_state().unwrap().into_iter().collect();
    assert!(b.params().load_full_state(&state).unwrap().is_empty());
    let tokens = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let la = a.forward(&tokens, &ForwardOpts::default()).unwrap();
    let lb = b.forward(&tokens, &ForwardOpts::default()).unwrap();
    assert_eq!(
        la.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        lb.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let mut partial = state.clone();
    partial.remove("decoder.final_layernorm.bias");
    let err = b.params().load_full_state(&partial).unwrap_err().to_string();
    assert!(err.contains("decoder.final_layernorm.bias"), "{err}");
}

/// Same seed and batch ⇒ bit-identical loss and gradients (the basis of reproducible curves).
#[test]
fn forward_backward_is_bit_reproducible() {
    let cfg = ModelConfig { hidden_dropout: 0.1, attention_dropout: 0.1, ..tiny_llama() };
    let run = || {
        let m = build(&cfg, ParallelLayout::single(), 21, DType::F32);
        let mb = mbridge::model::Microbatch::from_rows(
            &[vec![3, 1, 4, 1, 5, 9, 2, 6]],
            &[vec![1, 4, 1, 5, 9, 2, 6, 5]],
            &[vec![1.0; 8]],
            Some(&[(0..8).collect()]),
            &Device::Cpu,
        )
        .unwrap();
        let rng = DropoutRng::new(21, 3, 0);
        let (sum, count) = mbridge::model::loss_for_microbatch(&m, &mb, Some(&rng)).unwrap();
        let loss = (sum / count).unwrap();
        let grads = loss.backward().unwrap();
        let mut bits = vec![loss.to_scalar::<f32>().unwrap().to_bits()];
        for p in m.params().params() {
            let g = grads.get(p.var.as_tensor()).unwrap().flatten_all().unwrap();
            bits.extend(g.to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()));
        }
        bits
    };
    assert_eq!(run(), run());
}

/// bf16 parameters run (norm statistics, softmax and loss in f32) and stay close to f32.
#[test]
fn bf16_forward_tracks_f32() {
    let cfg = tiny_qwen_window();
    let tokens = Tensor::new(&[[3u32, 1, 4, 1, 5, 9]], &Device::Cpu).unwrap();
    let logits = |dt| {
        let m = build(&cfg, ParallelLayout::single(), 2, dt);
        let l = m.forward(&tokens, &ForwardOpts::default()).unwrap();
        assert_eq!(l.dtype(), dt);
        l.to_dtype(DType::F32).unwrap()
    };
    let d = (logits(DType::BF16) - logits(DType::F32)).unwrap().abs().unwrap();
    let d = d.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 0.1, "bf16 logits off by {d}");
}

#[test]
fn microbatch_from_rows_validates() {
    use mbridge::model::Microbatch;
    let dev = Device::Cpu;
    let mb = Microbatch::from_rows(
        &[vec![1, 2], vec![3, 4]],
        &[vec![2, 3], vec![4, 5]],
        &[vec![1.0, 0.0], vec![1.0, 1.0]],
        None,
        &dev,
    )
    .unwrap();
    assert_eq!(mb.tokens.to_vec2::<u32>().unwrap(), vec![vec![1, 2], vec![3, 4]]);
    assert!(Microbatch::from_rows(&[vec![1, -2]], &[vec![2, 3]], &[vec![1.0, 1.0]], None, &dev)
        .is_err());
    assert!(
        Microbatch::from_rows(&[vec![1, 2]], &[vec![2]], &[vec![1.0, 1.0]], None, &dev).is_err()
    );
}
