//! The written-out layer backward (`model::explicit_layer`) on the GPU in bf16 against the
//! recorded autograd path of the same model (same weights, same batch, fused kernels in both):
//! the loss and every parameter gradient.

use super::{compare, Check, CheckFn, Measure};
use crate::config::model::{AttnBackend, ModelConfig};
use crate::config::peft::{PeftConfig, PeftScheme};
use crate::model::recompute::RecomputeGrads;
use crate::model::{loss_for_microbatch_recompute, GptModel, ParallelLayout};
use crate::ops::cuda::flash_attn::selftest::next_token_batch;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// Both paths round to bf16 at different points (GEMM outputs, summed gradients).
const TOL: f64 = 3e-2;

pub(super) fn checks() -> Vec<Check> {
    vec![Check { name: "explicit_layer", run: CheckFn::Measures(explicit_layer) }]
}

fn explicit_layer(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let base = crate::ops::cuda::flash_attn::selftest::gpu_model_config(256);
    // LoRA on every linear layer: the adapters' low-rank terms accumulated into the GEMM
    // outputs in place (`ops::cuda::gemm::add_matmul_in_place`), the base frozen.
    let lora = PeftConfig { dim: 16, alpha: 32.0, ..PeftConfig::for_scheme(PeftScheme::Lora) };
    let configs = [
        ("llama d64", base.clone(), None),
        // Tied: the lookup's gradient is added into the output layer's in place.
        (
            "llama d64 tied",
            ModelConfig { share_embeddings_and_output_weights: true, ..base.clone() },
            None,
        ),
        ("llama d64 lora", base.clone(), Some(lora)),
        // mbridge's flash kernels read q as the grouped view of the fused QKV (cuDNN, the
        // default, reads it from a dense buffer of its own).
        (
            "llama d64 own flash kernels",
            ModelConfig { attention_backend: AttnBackend::Flash, ..base.clone() },
            None,
        ),
        (
            "qwen3 d128 qk-norm bias",
            ModelConfig { kv_channels: Some(128), qk_layernorm: true, add_qkv_bias: true, ..base },
            None,
        ),
    ];
    let mut ms = Vec::new();
    for (name, cfg, peft) in configs {
        let mb = next_token_batch(2, cfg.seq_length, seed, dev)?;
        let run = |explicit: bool| -> Result<(Tensor, Vec<(String, Tensor)>)> {
            let layout = ParallelLayout::single();
            let mut model =
                GptModel::new_peft(&cfg, layout, None, peft.as_ref(), 7, DType::BF16, dev)?;
            model.set_explicit_layers(explicit);
            // B starts at zero, which would leave A without a gradient to compare.
            for p in model.params().params().iter().filter(|p| p.trainable) {
                if p.name.ends_with("adapter.linear_out.weight") {
                    let n: usize = p.global_shape.iter().product();
                    let v: Vec<f32> =
                        (0..n).map(|j| ((j * 37 + 11) % 23) as f32 / 220.0 - 0.05).collect();
                    let t = Tensor::from_vec(v, p.global_shape.as_slice(), &Device::Cpu)?;
                    model.params().set_full(&p.name, &t)?;
                }
            }
            let sink = RecomputeGrads::default();
            let (sum, count) = loss_for_microbatch_recompute(&model, &mb, None, &sink)?;
            let loss = (sum / count)?;
            let store = loss.backward()?;
            let side = sink.take();
            let side_count = side.get_ids().count();
            if (side_count == 0) == explicit {
                anyhow::bail!("explicit = {explicit}, but {side_count} side gradients");
            }
            let grads = model
                .params()
                .params()
                .iter()
                .filter(|p| p.trainable)
                .map(|p| {
                    // A tied embedding gets parts from the lookup and from the output layer.
                    let t = p.var.as_tensor();
                    let mut total: Option<Tensor> = None;
                    for g in [side.get(t), store.get(t)].into_iter().flatten() {
                        let g = g.to_dtype(DType::F32)?;
                        total = Some(match total {
                            Some(a) => (a + g)?,
                            None => g,
                        });
                    }
                    total
                        .map(|g| (p.name.clone(), g))
                        .ok_or_else(|| anyhow::anyhow!("{name}: {}: no gradient", p.name))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((loss, grads))
        };
        let (want_loss, want) = run(false)?;
        let (got_loss, got) = run(true)?;
        ms.push(compare(&format!("{name} loss"), &got_loss, &want_loss, 1e-3)?);
        for ((n, g), (_, w)) in got.iter().zip(&want) {
            ms.push(compare(&format!("{name} d{n}"), g, w, TOL)?);
        }
    }
    Ok(ms)
}
