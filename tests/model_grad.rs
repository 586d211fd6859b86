//! Gradient checks (f64, CPU, central finite differences) of the attention and MLP layers and
//! of whole tiny models, plus the guard that every trainable parameter receives a gradient.

mod model_common;

use candle_core::{DType, Device, Tensor, Var};
use mbridge::config::model::ModelConfig;
use mbridge::model::attention::{AttnInputs, SelfAttention};
use mbridge::model::mlp::Mlp;
use mbridge::model::params::{ParamStore, TpCoord};
use mbridge::model::{loss_for_microbatch, GptArch, GptModel, Microbatch, ParallelLayout};
use mbridge::ops::{self, DropoutRng, RopeTable};
use model_common::{
    check_grads, project, rand_t, rand_var, tiny_gpt, tiny_llama, tiny_qwen_window,
};

/// Moves every parameter away from its structured init (ones, zeros) so that no gradient is
/// accidentally trivial.
fn jitter(store: &ParamStore, seed: u64) {
    for (i, p) in store.params().iter().enumerate() {
        let noise = rand_t(p.var.dims(), seed + i as u64, 0.2).to_dtype(p.var.dtype()).unwrap();
        p.var.set(&(p.var.as_tensor() + noise).unwrap()).unwrap();
    }
}

fn all_vars(store: &ParamStore) -> Vec<(String, Var)> {
    store.params().iter().map(|p| (p.name.clone(), p.var.clone())).collect()
}

fn batch(cfg: &ModelConfig, b: usize, s: usize, dtype: DType) -> Microbatch {
    let v = cfg.vocab_size.unwrap() as u32;
    let ids: Vec<u32> = (0..(b * s + 1) as u32).map(|i| (i * 7 + 3) % v).collect();
    let dev = Device::Cpu;
    let tokens = Tensor::from_vec(ids[..b * s].to_vec(), (b, s), &dev).unwrap();
    let labels = Tensor::from_vec(ids[1..].to_vec(), (b, s), &dev).unwrap();
    let mut mask = vec![1.0f64; b * s];
    mask[1] = 0.0;
    let loss_mask = Tensor::from_vec(mask, (b, s), &dev).unwrap().to_dtype(dtype).unwrap();
    Microbatch {
        tokens,
        labels,
        loss_mask,
        position_ids: None,
        attention_mask: None,
        cu_seqlens: None,
        host_stats: None,
    }
}

fn check_model(cfg: &ModelConfig, seed: u64) {
    check_model_dropout(cfg, seed, false);
}

/// With `dropout`, every loss evaluation replays the same masks (fresh stream, same key), so
/// finite differences see the same function autograd differentiates.
fn check_model_dropout(cfg: &ModelConfig, seed: u64, dropout: bool) {
    let model =
        GptModel::new(cfg, ParallelLayout::single(), seed, DType::F64, &Device::Cpu).unwrap();
    jitter(model.params(), seed);
    let mb = batch(cfg, 2, 6, DType::F64);
    let loss = || {
        let rng = dropout.then(|| DropoutRng::new(seed, 1, 0));
        let (sum, count) =
            loss_for_microbatch(&model, &mb, rng.as_ref()).map_err(candle_core::Error::msg)?;
        sum / count
    };
    check_grads(&all_vars(model.params()), &loss, 6);
}

#[test]
fn whole_model_llama_like() {
    check_model(&tiny_llama(), 1);
}

#[test]
fn whole_model_qwen_qknorm_bias_window_tied() {
    check_model(&tiny_qwen_window(), 2);
}

#[test]
fn whole_model_gpt_layernorm_learned_pos_gelu_mqa() {
    check_model(&tiny_gpt(), 3);
}

#[test]
fn whole_model_with_dropout() {
    let cfg = ModelConfig { hidden_dropout: 0.1, attention_dropout: 0.1, ..tiny_llama() };
    check_model_dropout(&cfg, 4, true);
}

#[test]
fn attention_layer_grad() {
    for cfg in [tiny_llama(), tiny_qwen_window(), tiny_gpt()] {
        let arch = GptArch::from_config(&cfg).unwrap();
        let tp = TpCoord { rank: 0, size: 1 };
        let mut store = ParamStore::new(tp, 5, DType::F64, Device::Cpu);
        let attn = SelfAttention::new(&mut store, &arch, 0, 1).unwrap();
        jitter(&store, 6);
        let (b, s) = (2, 5);
        let x = rand_var(&[b, s, arch.hidden], 7, 1.0);
        let table = RopeTable::new(
            arch.head_dim,
            arch.rotary_percent,
            arch.rotary_base,
            arch.rope_scaling,
            None,
        )
        .unwrap();
        let pos = Tensor::arange(0u32, s as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((b, 1))
            .unwrap();
        let rope = table.cos_sin(&pos, DType::F64).unwrap();
        let allowed =
            ops::build_attention_mask(0, s, s, arch.window_left, None, &Device::Cpu).unwrap();
        let inputs =
            AttnInputs { rope: Some(&rope), mask: ops::AttnMask::Dense(&allowed), dropout: None };
        let loss =
            || project(&attn.forward(&x, &inputs, None).map_err(candle_core::Error::msg)?, 8);
        let mut vars = all_vars(&store);
        vars.push(("x".into(), x.clone()));
        check_grads(&vars, &loss, 8);
    }
}

#[test]
fn mlp_layer_grad() {
    for cfg in [tiny_llama(), tiny_gpt()] {
        let arch = GptArch::from_config(&cfg).unwrap();
        let mut store = ParamStore::new(TpCoord { rank: 0, size: 1 }, 9, DType::F64, Device::Cpu);
        let mlp = Mlp::new(&mut store, &arch, 0).unwrap();
        jitter(&store, 10);
        let x = rand_var(&[2, 3, arch.hidden], 11, 1.0);
        let loss = || project(&mlp.forward(&x).map_err(candle_core::Error::msg)?, 12);
        let mut vars = all_vars(&store);
        vars.push(("x".into(), x.clone()));
        check_grads(&vars, &loss, 8);
    }
}

/// Fails if any trainable parameter is cut off from the loss (e.g. by a fast op without
/// backward sneaking into the forward).
#[test]
fn every_parameter_gets_a_gradient() {
    for cfg in [tiny_llama(), tiny_qwen_window(), tiny_gpt()] {
        let model =
            GptModel::new(&cfg, ParallelLayout::single(), 4, DType::F32, &Device::Cpu).unwrap();
        let mb = batch(&cfg, 2, 8, DType::F32);
        let (sum, count) = loss_for_microbatch(&model, &mb, None).unwrap();
        let grads = (sum / count).unwrap().backward().unwrap();
        for p in model.params().params() {
            let g =
                grads.get(p.var.as_tensor()).unwrap_or_else(|| panic!("{}: no gradient", p.name));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{}: gradient norm {norm}", p.name);
        }
    }
}
