//! Loading HF weights straight into a built model (`checkpoint.pretrained_checkpoint` pointing
//! at a local HF directory): converted on the fly, each rank keeping only its TP shard.

use super::hf_config::read_config;
use super::mapping::{hf_to_megatron, MegatronParam};
use super::weights::HfWeights;
use crate::ckpt::Partition;
use crate::model::{GptArch, GptModel};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Fills every parameter of `model` (any TP rank / PP stage) from the HF model in `dir`.
/// The HF config must describe the same architecture (the error lists the differences); the
/// vocabulary is zero-padded to the model's padded size.
pub fn load_hf_weights(dir: &Path, model: &GptModel) -> Result<()> {
    let hf = read_config(dir)?;
    let mut m = hf.model.clone();
    m.vocab_size = Some(model.arch().vocab);
    let want = GptArch::from_config(&m)?;
    let have = model.arch();
    let mut diffs = Vec::new();
    let mut cmp = |what: &str, a: String, b: String| {
        if a != b {
            diffs.push(format!("{what}: HF {a}, model {b}"));
        }
    };
    cmp("num_layers", want.num_layers.to_string(), have.num_layers.to_string());
    cmp("hidden_size", want.hidden.to_string(), have.hidden.to_string());
    cmp("ffn_hidden_size", want.ffn.to_string(), have.ffn.to_string());
    cmp("num_attention_heads", want.heads.to_string(), have.heads.to_string());
    cmp("num_query_groups", want.groups.to_string(), have.groups.to_string());
    cmp("kv_channels", want.head_dim.to_string(), have.head_dim.to_string());
    cmp("add_qkv_bias", want.add_qkv_bias.to_string(), have.add_qkv_bias.to_string());
    cmp("qk_layernorm", want.qk_layernorm.to_string(), have.qk_layernorm.to_string());
    cmp("tied embeddings", want.tied_embeddings.to_string(), have.tied_embeddings.to_string());
    cmp("gated_linear_unit", want.gated.to_string(), have.gated.to_string());
    cmp("layernorm_epsilon", want.eps.to_string(), have.eps.to_string());
    cmp("rotary_base", want.rotary_base.to_string(), have.rotary_base.to_string());
    cmp("rope scaling", format!("{:?}", want.rope_scaling), format!("{:?}", have.rope_scaling));
    cmp("window_size", format!("{:?}", want.window_left), format!("{:?}", have.window_left));
    if !diffs.is_empty() {
        bail!(
            "`{}` does not match the model being trained: {}",
            dir.join("config.json").display(),
            diffs.join("; ")
        );
    }
    let weights = HfWeights::open(dir)?;
    // Under PEFT only the frozen base comes from the HF model; adapters keep their init.
    for p in
        model.params().params().iter().filter(|p| !p.trainable || model.params().peft().is_none())
    {
        let param = MegatronParam {
            name: p.name.clone(),
            shape: p.global_shape.clone(),
            partition: Partition::Replicated,
        };
        let full = hf_to_megatron(&param, have, hf.vocab_size, &mut |n: &str| weights.load(n))?;
        model
            .params()
            .set_full(&p.name, &full)
            .with_context(|| format!("loading `{}` from `{}`", p.name, dir.display()))?;
    }
    Ok(())
}
