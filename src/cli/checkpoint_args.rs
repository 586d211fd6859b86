//! `checkpoint.use_checkpoint_args`: the model architecture of the checkpoint that
//! `checkpoint.load` resumes (its `run_config.toml`) replaces the config's, as Megatron's
//! `load_args_from_checkpoint` overrides the command line's. Only the architecture comes from
//! the checkpoint (the fields below); parallelism, precision, recompute, fusions and dropout
//! stay the run's own. Without a checkpoint there, the config is used as it is, as Megatron
//! does.

use crate::config::raw::{get, Source};
use crate::config::recipes::parse_toml;
use crate::config::{schema, ConfigResult, LoadedConfig};
use crate::config_err;
use crate::train::checkpointing::checkpoint_to_resume;
use serde_json::Value;
use std::path::PathBuf;

/// The `model.*` fields that describe the trained network (what its weights' shapes and
/// meaning depend on).
pub const ARCHITECTURE: &[&str] = &[
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "make_vocab_size_divisible_by",
    "should_pad_vocab",
    "seq_length",
    "max_position_embeddings",
    "normalization",
    "layernorm_epsilon",
    "layernorm_zero_centered_gamma",
    "gated_linear_unit",
    "activation_func",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "rope_scaling",
    "rope_scaling_factor",
    "seq_len_interpolation_factor",
    "window_size",
    "apply_residual_connection_post_layernorm",
    "hf_model_id",
];

/// `loaded` with the architecture of the checkpoint it resumes when
/// `checkpoint.use_checkpoint_args` is set; the checkpoint's directory when it was applied.
pub fn apply(mut loaded: LoadedConfig) -> ConfigResult<(LoadedConfig, Option<PathBuf>)> {
    let c = &loaded.cfg.checkpoint;
    if !c.use_checkpoint_args {
        return Ok((loaded, None));
    }
    if c.load.is_none() {
        return Err(config_err!("`checkpoint.use_checkpoint_args` needs `checkpoint.load`"));
    }
    // The checkpoint the run will resume, a newer non-persistent one included.
    let found = checkpoint_to_resume(c)
        .map_err(|e| config_err!("`checkpoint.use_checkpoint_args`: {e:#}"))?;
    let Some(dir) = found else { return Ok((loaded, None)) };
    let path = dir.join("run_config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        config_err!("`checkpoint.use_checkpoint_args`: cannot read `{}`: {e}", path.display())
    })?;
    let origin = format!("{} (checkpoint.use_checkpoint_args)", path.display());
    let table = parse_toml(&text, &origin)?;
    let Some(Value::Object(model)) = table.get("model") else {
        return Err(config_err!("`{}` has no [model] table", path.display()));
    };
    for &field in ARCHITECTURE {
        // A field the checkpoint's config leaves out has its default there.
        let value = match model.get(field) {
            Some(v) => v.clone(),
            None => get(&schema::defaults(), &["model", field]).cloned().unwrap_or(Value::Null),
        };
        loaded.raw.set(&["model", field], value, Source::File(origin.clone()));
    }
    loaded.cfg = loaded.raw.to_container()?;
    Ok((loaded, Some(dir)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every listed field is a `model.*` field of the schema.
    #[test]
    fn the_architecture_fields_exist() {
        for field in ARCHITECTURE {
            assert!(schema::lookup(&["model", field]).is_some(), "model.{field}");
        }
    }
}
