//! `checkpoint.use_checkpoint_args`: the model architecture of the checkpoint that
//! `checkpoint.load` resumes (its `run_config.toml`) replaces the config's, as Megatron's
//! `load_args_from_checkpoint` overrides the command line's. The architecture comes from the
//! checkpoint (the fields below), and by default its tokenizer
//! (`use_tokenizer_model_from_checkpoint_args`); the model parallelism only with
//! `use_mp_args_from_checkpoint_args`; precision, recompute, fusions and dropout stay the
//! run's own. Without a checkpoint there, the config is used as it is, as Megatron
//! does.

use crate::config::raw::Source;
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
    "yarn_rotary_scaling_factor",
    "yarn_original_max_position_embeddings",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_mscale",
    "yarn_mscale_all_dim",
    "yarn_correction_range_round_to_int",
    "window_size",
    "apply_residual_connection_post_layernorm",
    "hf_model_id",
];

/// The model parallelism `checkpoint.use_mp_args_from_checkpoint_args` also takes (Megatron's
/// list).
pub const MODEL_PARALLELISM: &[&str] = &[
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
];

/// The tokenizer fields `checkpoint.use_tokenizer_model_from_checkpoint_args` (on by default)
/// also takes.
pub const TOKENIZER: &[&str] = &["tokenizer_type", "tokenizer_model"];

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
    if !matches!(table.get("model"), Some(Value::Object(_))) {
        return Err(config_err!("`{}` has no [model] table", path.display()));
    }
    let mut fields: Vec<(&str, &str)> = ARCHITECTURE.iter().map(|&f| ("model", f)).collect();
    if c.use_mp_args_from_checkpoint_args {
        fields.extend(MODEL_PARALLELISM.iter().map(|&f| ("model", f)));
    }
    if c.use_tokenizer_model_from_checkpoint_args {
        fields.extend(TOKENIZER.iter().map(|&f| ("tokenizer", f)));
    }
    for (section, field) in fields {
        // A field the checkpoint's config leaves out has its default there.
        let value = match table.get(section).and_then(|t| t.get(field)) {
            Some(v) => v.clone(),
            None => schema::lookup(&[section, field]).cloned().unwrap_or(Value::Null),
        };
        loaded.raw.set(&[section, field], value, Source::File(origin.clone()));
    }
    loaded.cfg = loaded.raw.to_container()?;
    Ok((loaded, Some(dir)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::recipes::Task;
    use crate::config::{load, ConfigRequest};

    /// A complete-looking checkpoint at iteration 5 whose run config holds `run_config`.
    fn fake_checkpoint(run_config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let it = dir.path().join("iter_0000005");
        std::fs::create_dir_all(it.join("model")).unwrap();
        std::fs::write(it.join("model/index.json"), "{}").unwrap();
        std::fs::write(it.join("train_state.json"), "{}").unwrap();
        std::fs::write(it.join("run_config.toml"), run_config).unwrap();
        std::fs::write(dir.path().join("latest_checkpointed_iteration.txt"), "5").unwrap();
        dir
    }

    fn applied(dir: &std::path::Path, extra: &[&str]) -> LoadedConfig {
        let mut overrides = vec![
            format!("+checkpoint.load={}", dir.display()),
            "checkpoint.use_checkpoint_args=true".to_string(),
        ];
        overrides.extend(extra.iter().map(|s| s.to_string()));
        let req = ConfigRequest {
            recipe: Some("tiny_llama".into()),
            task: Some(Task::Pretrain),
            overrides,
            ..Default::default()
        };
        let (loaded, from) = apply(load(&req).unwrap()).unwrap();
        assert!(from.is_some());
        loaded
    }

    /// The tokenizer comes along by default, the model parallelism only when asked for.
    #[test]
    fn tokenizer_and_model_parallelism_follow_their_switches() {
        let dir = fake_checkpoint(
            "[model]\nnum_layers = 3\ntensor_model_parallel_size = 2\n\
             pipeline_model_parallel_size = 2\n[tokenizer]\n\
             tokenizer_type = \"HuggingFaceTokenizer\"\ntokenizer_model = \"/ckpt/tok\"\n",
        );
        let cfg = applied(dir.path(), &[]).cfg;
        assert_eq!(cfg.model.num_layers, 3);
        assert_eq!(cfg.tokenizer.tokenizer_model.as_deref(), Some("/ckpt/tok"));
        assert_eq!(cfg.model.tensor_model_parallel_size, 1);
        let cfg = applied(
            dir.path(),
            &[
                "checkpoint.use_mp_args_from_checkpoint_args=true",
                "checkpoint.use_tokenizer_model_from_checkpoint_args=false",
            ],
        )
        .cfg;
        assert_eq!(cfg.model.tensor_model_parallel_size, 2);
        assert_eq!(cfg.model.pipeline_model_parallel_size, 2);
        assert_eq!(cfg.tokenizer.tokenizer_model, None);
    }

    /// Every listed field is a field of the schema.
    #[test]
    fn the_listed_fields_exist() {
        for field in ARCHITECTURE.iter().chain(MODEL_PARALLELISM) {
            assert!(schema::lookup(&["model", field]).is_some(), "model.{field}");
        }
        for field in TOKENIZER {
            assert!(schema::lookup(&["tokenizer", field]).is_some(), "tokenizer.{field}");
        }
    }
}
