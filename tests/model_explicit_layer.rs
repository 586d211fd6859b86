//! Layers with a written-out backward (`model::explicit_layer`, with the explicit embedding
//! lookups and head + loss of `GptModel::forward_stage_loss`) give the loss and every
//! parameter gradient of candle's recorded autograd path, for each layer family the model
//! supports (RMSNorm/SwiGLU/GQA/partial RoPE; QK-norm, QKV bias, head_dim ≠ h/heads, sliding
//! window; LayerNorm with zero-centered gamma, GELU, biases, MQA, learned positions), and
//! every parameter's gradient really comes from the explicit path (the side store).

mod model_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::model::ModelConfig;
use mbridge::model::recompute::RecomputeGrads;
use mbridge::model::ParallelLayout;
use mbridge::model::{
    eval_loss_for_microbatch, loss_for_microbatch, loss_for_microbatch_recompute, GptModel,
    HostStats, Microbatch,
};
use mbridge::train::grads::GradAccumulator;
use model_common::{tiny_gpt, tiny_llama, tiny_qwen_window};

fn batch(cfg: &ModelConfig) -> Microbatch {
    let v = cfg.vocab_size.unwrap() as u32;
    let (b, s) = (2, 8);
    let ids: Vec<u32> = (0..(b * s + 1) as u32).map(|i| (i * 7 + 3) % v).collect();
    let dev = Device::Cpu;
    let mask: Vec<f64> = (0..b * s).map(|i| if i % 5 == 4 { 0.0 } else { 1.0 }).collect();
    Microbatch {
        tokens: Tensor::from_vec(ids[..b * s].to_vec(), (b, s), &dev).unwrap(),
        labels: Tensor::from_vec(ids[1..].to_vec(), (b, s), &dev).unwrap(),
        loss_mask: Tensor::from_vec(mask, (b, s), &dev).unwrap(),
        position_ids: None,
        attention_mask: None,
        cu_seqlens: None,
        host_stats: None,
    }
}

struct Run {
    loss: f64,
    grads: Vec<(String, Option<Tensor>)>,
    /// Parameters whose gradient arrived through the side store.
    side_names: Vec<String>,
}

fn run(cfg: &ModelConfig, explicit: bool) -> Run {
    let model = GptModel::new(cfg, ParallelLayout::single(), 11, DType::F64, &Device::Cpu).unwrap();
    run_model(model, cfg, explicit)
}

/// Loss and the gradients of the trainable parameters (all of them without PEFT).
fn run_model(mut model: GptModel, cfg: &ModelConfig, explicit: bool) -> Run {
    run_on(&mut model, cfg, explicit)
}

/// [`run_model`] on a model the caller keeps.
fn run_on(model: &mut GptModel, cfg: &ModelConfig, explicit: bool) -> Run {
    model.set_explicit_layers(explicit);
    let mb = batch(cfg);
    let params: Vec<_> = model.params().params().iter().filter(|p| p.trainable).collect();
    let vars: Vec<_> = params.iter().map(|p| p.var.clone()).collect();
    let mut acc = GradAccumulator::new(vars.clone());
    let sink = RecomputeGrads::default();
    let (sum, _) = loss_for_microbatch_recompute(model, &mb, None, &sink).unwrap();
    acc.accumulate(&sum.backward().unwrap()).unwrap();
    let side = sink.take();
    // Nothing else (frozen weights under PEFT) may receive a gradient.
    for id in side.get_ids() {
        assert!(vars.iter().any(|v| v.as_tensor().id() == *id), "a frozen tensor got a gradient");
    }
    let side_names = params
        .iter()
        .filter(|p| side.get(p.var.as_tensor()).is_some())
        .map(|p| p.name.clone())
        .collect();
    acc.add(&side).unwrap();
    let names = params.iter().map(|p| p.name.clone());
    let grads = names.zip(acc.iter().map(|(_, g)| g.cloned())).collect();
    Run { loss: sum.to_scalar::<f64>().unwrap(), grads, side_names }
}

fn check(name: &str, cfg: &ModelConfig) {
    compare(name, run(cfg, false), run(cfg, true), false);
}

/// `recomputed`: full recompute, whose checkpointed segments use the side store either way.
fn compare(name: &str, plain: Run, explicit: Run, recomputed: bool) {
    assert!(recomputed || plain.side_names.is_empty(), "{name}: autograd path used the side store");
    let layer_params = plain.grads.iter().filter(|(n, _)| n.starts_with("decoder.layers."));
    for (n, _) in layer_params {
        assert!(
            explicit.side_names.contains(n),
            "{name}: {n} did not go through the explicit layer"
        );
    }
    assert!(
        (plain.loss - explicit.loss).abs() < 1e-12,
        "{name}: loss {} vs {}",
        plain.loss,
        explicit.loss
    );
    for ((n, a), (_, b)) in plain.grads.iter().zip(&explicit.grads) {
        let (Some(a), Some(b)) = (a, b) else { panic!("{name}: {n}: gradient missing") };
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-30);
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d / scale < 1e-10, "{name}: {n}: gradients differ by {d} (scale {scale})");
    }
}

#[test]
fn llama_layers_match_autograd() {
    check("llama", &tiny_llama());
}

#[test]
fn qk_norm_bias_window_layers_match_autograd() {
    check("qwen-window", &tiny_qwen_window());
}

#[test]
fn layernorm_gelu_bias_layers_match_autograd() {
    check("gpt", &tiny_gpt());
}

/// A packed batch (two examples per row: Megatron attention mask, restarting positions)
/// takes the explicit path too, with the same gradients.
#[test]
fn packed_batch_layers_match_autograd() {
    let cfg = tiny_llama();
    let pack = |mb: &mut Microbatch| {
        let (b, s) = mb.tokens.dims2().unwrap();
        let half = s / 2;
        let masked: Vec<u8> = (0..b * s * s)
            .map(|i| {
                let (q, k) = ((i / s) % s, i % s);
                u8::from(q / half != k / half)
            })
            .collect();
        mb.attention_mask = Some(Tensor::from_vec(masked, (b, 1, s, s), &Device::Cpu).unwrap());
        let pos: Vec<u32> = (0..b * s).map(|i| ((i % s) % half) as u32).collect();
        mb.position_ids = Some(Tensor::from_vec(pos, (b, s), &Device::Cpu).unwrap());
    };
    // Both representations of the packing: Megatron's dense mask, and THD offsets.
    let thd = |mb: &mut Microbatch| {
        pack(mb);
        mb.attention_mask = None;
        mb.cu_seqlens = Some(vec![0, 4, 8, 12, 16]);
    };
    type Packing<'a> = &'a dyn Fn(&mut Microbatch);
    let cases: [(bool, Packing); 4] = [(false, &pack), (true, &pack), (false, &thd), (true, &thd)];
    let losses: Vec<f64> = cases
        .iter()
        .map(|&(explicit, pack)| {
            let mut model =
                GptModel::new(&cfg, ParallelLayout::single(), 5, DType::F64, &Device::Cpu).unwrap();
            model.set_explicit_layers(explicit);
            let mut mb = batch(&cfg);
            pack(&mut mb);
            let sink = RecomputeGrads::default();
            let (sum, _) = loss_for_microbatch_recompute(&model, &mb, None, &sink).unwrap();
            let store = sum.backward().unwrap();
            let side = sink.take();
            assert_eq!(side.get_ids().count() == 0, !explicit);
            let w = &model
                .params()
                .params()
                .iter()
                .find(|p| p.name.ends_with("0.self_attention.linear_qkv.weight"))
                .unwrap()
                .var;
            let g = side.get(w.as_tensor()).or(store.get(w.as_tensor())).unwrap();
            sum.to_scalar::<f64>().unwrap()
                + g.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        })
        .collect();
    for l in &losses[1..] {
        assert!((losses[0] - l).abs() < 1e-10 * losses[0].abs(), "{losses:?}");
    }
}

/// LoRA on every linear layer (B randomized so A's gradient is not zero): the adapters'
/// gradients of the written-out path equal autograd's and the frozen base gets none, also
/// under full recompute (where the frozen embedding leaves the layers' input untracked and
/// the checkpointed segments must still run their backward) and selective recompute.
#[test]
fn lora_layers_match_autograd_and_leave_the_base_frozen() {
    use mbridge::config::model::{RecomputeGranularity, RecomputeMethod};
    use mbridge::config::peft::{PeftConfig, PeftScheme};
    let peft = PeftConfig { dim: 3, alpha: 6.0, ..PeftConfig::for_scheme(PeftScheme::Lora) };
    let model = |cfg: &ModelConfig, peft: &PeftConfig| {
        let m = GptModel::new_peft(
            cfg,
            ParallelLayout::single(),
            None,
            Some(peft),
            11,
            DType::F64,
            &Device::Cpu,
        )?;
        for (i, p) in m.params().params().iter().enumerate() {
            if p.name.ends_with("adapter.linear_out.weight") {
                let n: usize = p.global_shape.iter().product();
                let v: Vec<f64> =
                    (0..n).map(|j| ((j * 37 + i * 11) % 17) as f64 / 40.0 - 0.2).collect();
                let t = Tensor::from_vec(v, p.global_shape.as_slice(), &Device::Cpu).unwrap();
                m.params().set_full(&p.name, &t).unwrap();
            }
        }
        anyhow::Ok(m)
    };
    let base = tiny_llama();
    let reference = || run_model(model(&base, &peft).unwrap(), &base, false);
    let r = reference();
    assert_eq!(r.grads.len(), 2 * 4 * base.num_layers, "only the adapters train");
    compare("lora", reference(), run_model(model(&base, &peft).unwrap(), &base, true), false);
    for (name, granularity) in
        [("full", RecomputeGranularity::Full), ("selective", RecomputeGranularity::Selective)]
    {
        let mut cfg = base.clone();
        cfg.recompute_granularity = Some(granularity);
        if granularity == RecomputeGranularity::Full {
            cfg.recompute_method = Some(RecomputeMethod::Uniform);
            cfg.recompute_num_layers = Some(1);
            // The autograd layers inside checkpointed segments too.
            let autograd = run_model(model(&cfg, &peft).unwrap(), &cfg, false);
            compare("lora, full recompute, autograd", reference(), autograd, true);
        }
        let explicit = run_model(model(&cfg, &peft).unwrap(), &cfg, true);
        compare(&format!("lora, {name} recompute"), reference(), explicit, true);
    }
    // DoRA's weight norm is not in the written-out path, so selective recompute refuses it.
    let mut cfg = base.clone();
    cfg.recompute_granularity = Some(RecomputeGranularity::Selective);
    let dora = PeftConfig { dim: 3, ..PeftConfig::for_scheme(PeftScheme::Dora) };
    let err = model(&cfg, &dora).unwrap_err().to_string();
    assert!(err.contains("DoRA"), "{err}");
}

/// The model and the explicit head take the ids' maxima and the mask's sum from the host
/// when the batch builder knows them: the same loss and count as reading them back from the
/// device, and an id outside the vocabulary is still refused by name.
#[test]
fn host_known_stats_match_the_device_read_back() {
    let cfg = tiny_llama();
    let mut model =
        GptModel::new(&cfg, ParallelLayout::single(), 11, DType::F64, &Device::Cpu).unwrap();
    model.set_explicit_layers(true);
    let loss = |mb: &Microbatch| {
        let sink = RecomputeGrads::default();
        loss_for_microbatch_recompute(&model, mb, None, &sink)
    };
    let device_read = batch(&cfg);
    assert!(device_read.host_stats.is_none());
    let ids = |t: &Tensor| -> Vec<u32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let mask: Vec<f32> = device_read
        .loss_mask
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let stats = HostStats::of(&ids(&device_read.tokens), None, &ids(&device_read.labels), &mask);
    assert_eq!(stats.mask_sum, 13.0, "16 positions, every fifth masked out");
    let host = Microbatch { host_stats: Some(stats), ..device_read.clone() };
    let (a, ca) = loss(&device_read).unwrap();
    let (b, cb) = loss(&host).unwrap();
    assert_eq!(ca, cb);
    assert_eq!(a.to_scalar::<f64>().unwrap(), b.to_scalar::<f64>().unwrap());

    // The host's values are the ones checked: out of range there, refused.
    let vocab = cfg.vocab_size.unwrap() as u32;
    let refused = |stats: HostStats, what: &str| {
        let mb = Microbatch { host_stats: Some(stats), ..device_read.clone() };
        let err = format!("{:#}", loss(&mb).unwrap_err());
        assert!(err.contains(&format!("{what} {vocab}")), "{err}");
    };
    refused(HostStats { max_label: vocab, ..stats }, "label id");
    refused(HostStats { max_token: vocab, ..stats }, "token id");
}

/// [`Microbatch::from_rows`] records the summaries the model would otherwise read back.
#[test]
fn from_rows_records_the_host_stats() {
    let rows = |v: &[i64]| vec![v.to_vec()];
    let mb = Microbatch::from_rows(
        &rows(&[1, 7, 3]),
        &rows(&[2, 9, 4]),
        &[vec![1.0, 0.0, 0.5]],
        Some(&rows(&[0, 5, 2])),
        &Device::Cpu,
    )
    .unwrap();
    let want = HostStats { max_token: 7, max_position: Some(5), max_label: 9, mask_sum: 1.5 };
    assert_eq!(mb.host_stats, Some(want));
}

/// FP8 linear layers (`model.fp8`, CPU reference quantization) still give every parameter a
/// gradient through the side store, near the unquantized one, and the GEMMs' weights a
/// different one (the quantization is really applied).
#[test]
fn fp8_layers_give_every_parameter_a_gradient_near_the_unquantized_one() {
    let mut cfg = tiny_llama();
    let model = |cfg: &ModelConfig| {
        GptModel::new(cfg, ParallelLayout::single(), 11, DType::F64, &Device::Cpu).unwrap()
    };
    let exact = run_model(model(&cfg), &cfg, true);
    cfg.fp8 = Some("hybrid".into());
    let fp8 = run_model(model(&cfg), &cfg, true);
    assert!((exact.loss - fp8.loss).abs() / exact.loss < 1e-2, "{} vs {}", exact.loss, fp8.loss);
    let linear =
        ["linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight"];
    let mut checked = 0;
    for ((name, e), (_, f)) in exact.grads.iter().zip(&fp8.grads) {
        let f = f.as_ref().unwrap_or_else(|| panic!("{name}: no gradient with FP8"));
        if !name.starts_with("decoder.layers.") {
            continue;
        }
        assert!(fp8.side_names.contains(name), "{name}: not from the written-out backward");
        let e = e.as_ref().unwrap();
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let rel = (norm(&(e - f).unwrap()) / norm(e)).sqrt();
        // E5M2 output gradients keep 2 mantissa bits: in this 64-wide model the layers'
        // gradients come out about 20% (RMS) from the unquantized ones.
        assert!(rel < 0.5, "{name}: FP8 gradient {rel} away from the unquantized one");
        if linear.iter().any(|l| name.ends_with(l)) {
            assert!(rel > 1e-4, "{name}: FP8 changed nothing ({rel})");
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * cfg.num_layers);
}

/// FP8 layers keep their quantized inputs and weights for the backward; recomputing them
/// instead (full recompute, every selective module, `fp8_wgrad = false`'s high-precision weight
/// gradient aside) quantizes the same values again: the same loss and gradients.
#[test]
fn fp8_kept_operands_equal_recomputed_ones() {
    use mbridge::config::model::{RecomputeGranularity, RecomputeMethod};
    let mut base = tiny_llama();
    base.fp8 = Some("hybrid".into());
    let model = |cfg: &ModelConfig| {
        GptModel::new(cfg, ParallelLayout::single(), 11, DType::F64, &Device::Cpu).unwrap()
    };
    let kept = || run_model(model(&base), &base, true);
    let mut full = base.clone();
    full.recompute_granularity = Some(RecomputeGranularity::Full);
    full.recompute_method = Some(RecomputeMethod::Uniform);
    full.recompute_num_layers = Some(1);
    compare("fp8, full recompute", kept(), run_model(model(&full), &full, true), true);
    for modules in [vec!["mlp"], vec!["core_attn"], vec!["layernorm"], vec!["core_attn", "mlp"]] {
        let mut cfg = base.clone();
        cfg.recompute_granularity = Some(RecomputeGranularity::Selective);
        cfg.recompute_modules = Some(modules.iter().map(|m| m.to_string()).collect());
        let name = format!("fp8, selective {modules:?}");
        compare(&name, kept(), run_model(model(&cfg), &cfg, true), true);
    }
}

/// The FP8 weights quantized once and held across the micro-batches (and recomputed forwards)
/// of a step give the loss and gradients of quantizing them at every GEMM, and the hold keeps
/// one quantization per FP8 linear layer (four per block), used again by the next pass.
#[test]
fn fp8_weights_held_across_micro_batches_equal_fresh_ones() {
    use mbridge::config::model::{RecomputeGranularity, RecomputeMethod};
    let mut plain = tiny_llama();
    plain.fp8 = Some("hybrid".into());
    let mut full = plain.clone();
    full.recompute_granularity = Some(RecomputeGranularity::Full);
    full.recompute_method = Some(RecomputeMethod::Uniform);
    full.recompute_num_layers = Some(1);
    for (name, cfg) in [("fp8", plain), ("fp8, full recompute", full)] {
        let model =
            || GptModel::new(&cfg, ParallelLayout::single(), 11, DType::F64, &Device::Cpu).unwrap();
        let mut held = model();
        let hold = held.hold_fp8_weights().expect("an FP8 model holds its weights");
        let first = run_on(&mut held, &cfg, true);
        assert_eq!(held.held_fp8_weights(), 4 * cfg.num_layers, "{name}");
        compare(&format!("{name}, held weights"), run_model(model(), &cfg, true), first, true);
        // The second micro-batch of the step: the held weights again, the same results.
        let again = run_on(&mut held, &cfg, true);
        assert_eq!(held.held_fp8_weights(), 4 * cfg.num_layers, "{name}");
        let name = format!("{name}, held weights reused");
        compare(&name, run_model(model(), &cfg, true), again, true);
        drop(hold);
        assert_eq!(held.held_fp8_weights(), 0, "{name}: the hold kept its weights");
    }
}

/// Evaluation runs the written-out layers forward only: the loss of the recorded layers, and
/// nothing of the layers stays in candle's graph (their activations are freed layer by layer,
/// so no backward can reach their weights).
#[test]
fn evaluation_runs_the_written_out_layers_forward_only() {
    for (name, cfg) in [("llama", tiny_llama()), ("gpt", tiny_gpt())] {
        let mut model =
            GptModel::new(&cfg, ParallelLayout::single(), 11, DType::F64, &Device::Cpu).unwrap();
        let mb = batch(&cfg);
        let loss = |(sum, count): (Tensor, f64)| sum.to_scalar::<f64>().unwrap() / count;
        model.set_explicit_layers(false);
        let recorded = loss(loss_for_microbatch(&model, &mb, None).unwrap());
        model.set_explicit_layers(true);
        let (sum, count) = eval_loss_for_microbatch(&model, &mb).unwrap();
        let evaluated = sum.to_scalar::<f64>().unwrap() / count;
        assert!(
            (evaluated - recorded).abs() < 1e-12 * recorded,
            "{name}: {evaluated} vs {recorded}"
        );
        let grads = sum.backward().unwrap();
        for p in model.params().params().iter().filter(|p| p.name.starts_with("decoder.layers.")) {
            let kept = grads.get(p.var.as_tensor()).is_some();
            assert!(!kept, "{name}: {} is reachable from the evaluation loss", p.name);
        }
        // Without `no_grad` a caller's backward still reaches every weight (recorded layers).
        let (sum, _) = loss_for_microbatch(&model, &mb, None).unwrap();
        let grads = sum.backward().unwrap();
        assert!(model.params().params().iter().all(|p| grads.get(p.var.as_tensor()).is_some()));
    }
}

/// Evaluation runs the FP8 GEMMs too (megatron-core's FP8 context covers every forward of the
/// blocks): a forward-only pass of an FP8 model gives the training forward's loss, not the
/// unquantized model's.
#[test]
fn fp8_evaluation_forward_equals_the_training_forward() {
    let mut cfg = tiny_llama();
    let model = |cfg: &ModelConfig| {
        GptModel::new(cfg, ParallelLayout::single(), 11, DType::F64, &Device::Cpu).unwrap()
    };
    let mb = batch(&cfg);
    let loss = |(sum, count): (Tensor, f64)| sum.to_scalar::<f64>().unwrap() / count;
    let plain = loss(loss_for_microbatch(&model(&cfg), &mb, None).unwrap());
    cfg.fp8 = Some("hybrid".into());
    let fp8 = model(&cfg);
    let evaluated = loss(eval_loss_for_microbatch(&fp8, &mb).unwrap());
    let sink = RecomputeGrads::default();
    let trained = loss(loss_for_microbatch_recompute(&fp8, &mb, None, &sink).unwrap());
    assert!((evaluated - trained).abs() < 1e-12 * trained, "{evaluated} vs {trained}");
    assert!((evaluated - plain).abs() > 1e-6 * plain, "FP8 changed nothing: {evaluated}");
}
