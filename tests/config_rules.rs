//! Config container: override grammar, validation rules, recipes and round trips (library level).

use mbridge::config::model::DType;
use mbridge::config::peft::PeftScheme;
use mbridge::config::recipes::{self, Task};
use mbridge::config::show::{render, ShowOptions};
use mbridge::config::{finalize, load, ConfigRequest, Finalized};

fn req(recipe: &str, overrides: &[&str]) -> ConfigRequest {
    ConfigRequest {
        recipe: Some(recipe.into()),
        task: Some(Task::Pretrain),
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn resolve(recipe: &str, overrides: &[&str]) -> Result<Finalized, String> {
    let loaded = load(&req(recipe, overrides)).map_err(|e| e.to_string())?;
    finalize(loaded.cfg, None, None).map_err(|e| e.to_string())
}

fn err(recipe: &str, overrides: &[&str]) -> String {
    match load(&req(recipe, overrides)) {
        Err(e) => e.to_string(),
        Ok(l) => match finalize(l.cfg, None, None) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error for {recipe} {overrides:?}"),
        },
    }
}

#[test]
fn set_existing_key() {
    let f = resolve("tiny_llama", &["train.train_iters=10", "optimizer.lr=1e-2"]).unwrap();
    assert_eq!(f.cfg.train.train_iters, Some(10));
    assert_eq!(f.cfg.optimizer.lr, Some(1e-2));
}

#[test]
fn set_unknown_key_suggests() {
    let e = err("tiny_llama", &["train.train_iter=10"]);
    assert!(e.contains("unknown key `train.train_iter`"), "{e}");
    assert!(e.contains("did you mean `train.train_iters`"), "{e}");
    let e = err("tiny_llama", &["trian.train_iters=10"]);
    assert!(e.contains("did you mean `train`"), "{e}");
}

#[test]
fn add_requires_absent_key() {
    // `+` on an unset optional key adds it.
    let f = resolve("tiny_llama", &["+train.exit_interval=5"]).unwrap();
    assert_eq!(f.cfg.train.exit_interval, Some(5));
    // `+` on a set key is refused.
    let e = err("tiny_llama", &["+train.train_iters=5"]);
    assert!(e.contains("already set") && e.contains("++train.train_iters"), "{e}");
    // `+` adds free-form keys; a plain set of a missing free-form key is refused.
    let f = resolve("tiny_llama", &["+env_vars.NCCL_DEBUG=INFO"]).unwrap();
    assert_eq!(f.cfg.env_vars.get("NCCL_DEBUG").and_then(|v| v.as_str()), Some("INFO"));
    let e = err("tiny_llama", &["env_vars.NCCL_DEBUG=INFO"]);
    assert!(e.contains("does not exist") && e.contains("+env_vars.NCCL_DEBUG"), "{e}");
    // `+` still cannot invent struct fields.
    let e = err("tiny_llama", &["+train.foo=1"]);
    assert!(e.contains("unknown key `train.foo`"), "{e}");
}

#[test]
fn force_set_adds_or_overrides() {
    let f = resolve("tiny_llama", &["++train.train_iters=7", "++train.exit_interval=3"]).unwrap();
    assert_eq!((f.cfg.train.train_iters, f.cfg.train.exit_interval), (Some(7), Some(3)));
}

#[test]
fn delete_resets_to_default() {
    let f = resolve("tiny_llama", &["logger.wandb_project=p", "~logger.wandb_project"]).unwrap();
    assert_eq!(f.cfg.logger.wandb_project, None);
    let f = resolve("tiny_llama", &["~logger.log_interval"]).unwrap();
    assert_eq!(f.cfg.logger.log_interval, 100);
    let e = err("tiny_llama", &["~logger.wandb_project"]);
    assert!(e.contains("not set") && e.contains("nothing to delete"), "{e}");
    let e = err("tiny_llama", &["~train.train_iters=3"]);
    assert!(e.contains("is 60, not 3"), "{e}");
    let f = resolve(
        "tiny_llama",
        &["~train.train_iters=60", "train.train_samples=80", "~scheduler.lr_warmup_iters"],
    )
    .unwrap();
    assert_eq!(f.cfg.train.train_iters, Some(10));
}

#[test]
fn delete_whole_section() {
    let mut r = req("tiny_llama", &["checkpoint.pretrained_checkpoint=x", "~peft"]);
    r.task = Some(Task::Peft);
    let loaded = load(&r).unwrap();
    assert!(loaded.cfg.peft.is_none());
    let mut r = req("tiny_llama", &["checkpoint.pretrained_checkpoint=x"]);
    r.task = Some(Task::Peft);
    assert_eq!(load(&r).unwrap().cfg.peft.unwrap().dim, 8);
}

#[test]
fn wrong_type_names_path_expected_and_value() {
    let e = err("tiny_llama", &["train.train_iters=abc"]);
    assert!(e.contains("`train.train_iters`"), "{e}");
    assert!(e.contains("abc") && e.contains("expected"), "{e}");
    let e = err("tiny_llama", &["model.num_layers=-2"]);
    assert!(e.contains("`model.num_layers`") && e.contains("-2"), "{e}");
    let e = err("tiny_llama", &["model.normalization=BatchNorm"]);
    assert!(e.contains("RMSNorm") && e.contains("BatchNorm"), "{e}");
}

#[test]
fn null_unsets_optional() {
    let f = resolve("tiny_llama", &["train.exit_interval=4", "train.exit_interval=null"]).unwrap();
    assert_eq!(f.cfg.train.exit_interval, None);
}

#[test]
fn setting_inside_unset_section_creates_it() {
    let f = resolve("tiny_llama", &["comm_overlap.tp_comm_overlap=true"]).unwrap();
    assert!(f.cfg.comm_overlap.unwrap().tp_comm_overlap);
}

#[test]
fn mixed_precision_preset_is_applied() {
    let f = resolve("tiny_llama", &["mixed_precision=bf16_mixed"]).unwrap();
    assert!(f.cfg.model.bf16 && f.cfg.optimizer.bf16 && f.cfg.ddp.grad_reduce_in_fp32);
    assert_eq!(f.cfg.model.params_dtype, DType::BF16);
    assert_eq!(f.cfg.model.pipeline_dtype, Some(DType::BF16));
    let f = resolve("tiny_llama", &["mixed_precision=fp16-mixed"]).unwrap();
    assert!(f.cfg.model.fp16 && !f.cfg.ddp.grad_reduce_in_fp32);
    // A field inside a preset expands the preset into its table first.
    let f = resolve(
        "tiny_llama",
        &["mixed_precision=bf16_mixed", "mixed_precision.grad_reduce_in_fp32=false"],
    )
    .unwrap();
    assert!(f.cfg.model.bf16 && !f.cfg.ddp.grad_reduce_in_fp32);
    let e = err("tiny_llama", &["mixed_precision=bf17_mixed"]);
    assert!(e.contains("unknown `mixed_precision` preset `bf17_mixed`"), "{e}");
}

#[test]
fn parallelism_test_vectors() {
    let loaded = load(&req(
        "tiny_llama",
        &[
            "model.tensor_model_parallel_size=2",
            "model.pipeline_model_parallel_size=2",
            "train.global_batch_size=512",
            "train.micro_batch_size=1",
        ],
    ))
    .unwrap();
    let f = finalize(loaded.cfg.clone(), Some(16), None).unwrap();
    assert_eq!(f.derived.data_parallel_size, 4);
    assert_eq!(f.derived.num_microbatches, 128);
    let mut bad = loaded.cfg;
    bad.train.global_batch_size = Some(510);
    let e = finalize(bad.clone(), Some(16), None).unwrap_err().to_string();
    assert!(e.contains("(510) must be divisible"), "{e}");
    let e = finalize(bad, Some(15), None).unwrap_err().to_string();
    assert!(e.contains("world size 15 is not divisible"), "{e}");
}

#[test]
fn scheduler_defaults_follow_megatron() {
    let f = resolve(
        "tiny_llama",
        &["train.train_iters=1000", "train.global_batch_size=32", "train.micro_batch_size=4"],
    )
    .unwrap();
    assert_eq!(f.cfg.scheduler.lr_decay_iters, Some(1000));
    assert_eq!(f.derived.lr_decay_iters * f.derived.global_batch_size, 32000);
    assert_eq!(f.cfg.scheduler.start_weight_decay, Some(0.01));
    let f = resolve("tiny_llama", &["+scheduler.max_steps=2000"]).unwrap();
    assert_eq!(f.derived.lr_decay_iters, 2000);
    let f = resolve("tiny_llama", &["scheduler.lr_warmup_iters=100"]).unwrap();
    assert_eq!(f.derived.lr_warmup_iters, 59, "warmup capped below decay");
    assert!(!f.warnings.is_empty());
}

#[test]
fn every_violation_is_reported_at_once() {
    let e = err(
        "tiny_llama",
        &[
            "model.num_attention_heads=6",
            "model.tensor_model_parallel_size=4",
            "model.pipeline_model_parallel_size=3",
            "+train.train_samples=100",
            "model.seq_length=100",
            "+dataset.seq_length=64",
        ],
    );
    for needle in [
        "num_attention_heads` (6) must be divisible by `model.tensor_model_parallel_size` (4)",
        "num_query_groups` (2) must be divisible by `model.tensor_model_parallel_size` (4)",
        "cannot be split evenly over `model.pipeline_model_parallel_size` (3)",
        "exactly one of `train.train_iters`, `train.train_samples`",
        "`dataset.seq_length` (64) must equal `model.seq_length` (100)",
    ] {
        assert!(e.contains(needle), "missing `{needle}` in:\n{e}");
    }
}

#[test]
fn remaining_rules() {
    let cases: &[(&[&str], &str)] = &[
        (&["model.num_layers=0"], "`model.num_layers` must be > 0"),
        (&["train.micro_batch_size=0"], "`train.micro_batch_size` must be > 0"),
        (&["~train.train_iters"], "exactly one of"),
        (&["optimizer.lr=null"], "`optimizer.lr` must be set"),
        (
            &["scheduler.lr_warmup_fraction=0.1", "scheduler.lr_warmup_iters=3"],
            "only one of `scheduler.lr_warmup_fraction`",
        ),
        (&["+scheduler.max_steps=10"], "`scheduler.max_steps` (10) must be ≥"),
        (&["model.num_query_groups=3"], "must be divisible by `model.num_query_groups` (3)"),
        (
            &["model.context_parallel_size=2", "model.seq_length=66", "+dataset.seq_length=66"],
            "divisible by 2 × `model.context_parallel_size` (4)",
        ),
        (&["model.expert_model_parallel_size=2"], "needs `model.num_moe_experts`"),
        (
            &["+model.num_moe_experts=3", "model.expert_model_parallel_size=2"],
            "num_moe_experts` (3) must be divisible",
        ),
        (
            &["+model.virtual_pipeline_model_parallel_size=2"],
            "needs `pipeline_model_parallel_size` > 1",
        ),
        (
            &[
                "model.pipeline_model_parallel_size=2",
                "+model.virtual_pipeline_model_parallel_size=2",
            ],
            "must be divisible by `model.virtual_pipeline_model_parallel_size` (2)",
        ),
        (
            &["+model.vocab_size=100"],
            "`model.vocab_size` (100) is smaller than the tokenizer's vocabulary (256)",
        ),
        (&["+peft.dim=8"], "`peft` requires `checkpoint.pretrained_checkpoint`"),
        (
            &["+dataset.packed_sequence_specs.packed_sequence_size=64"],
            "require `train.micro_batch_size` = 1",
        ),
        (
            &["+validation.eval_global_batch_size=6"],
            "`validation.eval_global_batch_size` (6) must be divisible",
        ),
        (&["model.fp16=true", "model.bf16=true"], "mutually exclusive"),
        (&["mixed_precision={fp16 = true, bf16 = true}"], "mutually exclusive"),
        (&["+dataset.blend=[\"a\"]"], "`dataset.split`"),
        (&["+dataset.blend=[0.3, \"a\", \"b\"]", "+dataset.split=\"1,0,0\""], "pairs"),
        (
            &["+dataset.blend=[\"a\"]", "+dataset.data_path=[\"b\"]", "+dataset.split=\"1,0,0\""],
            "only one of `dataset.blend` and `dataset.data_path`",
        ),
        (&["+train.rampup_batch_size=[1, 1, 8]"], "rampup_batch_size` is not supported"),
        (&["+checkpoint.ckpt_step=3"], "`checkpoint.ckpt_step` needs `checkpoint.load`"),
        (&["checkpoint.most_recent_k=0"], "most_recent_k"),
        (
            &["checkpoint.save_retain_interval=15", "checkpoint.save_interval=10"],
            "`checkpoint.save_retain_interval` (15) must be a multiple of `checkpoint.save_interval` (10)",
        ),
        (&["optimizer.decoupled_min_lr=1e-5"], "`optimizer.decoupled_min_lr` needs"),
        (
            &["optimizer.decoupled_lr=1e-5", "optimizer.decoupled_min_lr=1e-4"],
            "`optimizer.decoupled_lr` (0.00001) must be ≥ 0 and ≥ `optimizer.decoupled_min_lr`",
        ),
        (
            &["validation.multiple_validation_sets=true"],
            "`validation.multiple_validation_sets` requires `validation.full_validation`",
        ),
        (
            &["validation.validation_set_names=[\"wiki\"]"],
            "`validation.validation_set_names` requires `validation.multiple_validation_sets`",
        ),
        (&["profiling.profile_step_end=1"], "profile_step_end"),
        (&["+model.max_position_embeddings=32"], "exceeds `model.max_position_embeddings` (32)"),
        (
            &["tokenizer.vocab_size=null"],
            "`tokenizer.vocab_size` must be set for the NullTokenizer",
        ),
    ];
    for (ovs, needle) in cases {
        let e = err("tiny_llama", ovs);
        assert!(e.contains(needle), "{ovs:?}: missing `{needle}` in:\n{e}");
    }
}

/// Megatron Bridge v0.2 kept `eval_iters`, `eval_interval` and `skip_train` on `train`; a
/// value there still lands in `validation`, with a deprecation warning. megatron-core's
/// dataset copies of `full_validation` and `multiple_validation_sets` turn them on as well.
#[test]
fn deprecated_train_fields_move_to_validation() {
    let f = resolve(
        "tiny_llama",
        &["train.eval_iters=7", "train.eval_interval=5", "train.skip_train=true"],
    )
    .unwrap();
    let v = &f.cfg.validation;
    assert_eq!((v.eval_iters, v.eval_interval, v.skip_train), (Some(7), Some(5), true));
    let deprecated: Vec<_> = f.warnings.iter().filter(|w| w.contains("deprecated")).collect();
    assert_eq!(deprecated.len(), 3, "{:?}", f.warnings);
    assert!(deprecated[0].contains("use `validation.eval_iters` instead"), "{deprecated:?}");
    let f = resolve("tiny_llama", &[]).unwrap();
    assert!(!f.warnings.iter().any(|w| w.contains("deprecated")), "{:?}", f.warnings);
    let f = resolve("tiny_llama", &["dataset.full_validation=true"]).unwrap();
    assert!(f.cfg.validation.full_validation);
}

#[test]
fn sequence_parallel_without_tp_is_switched_off() {
    let f = resolve("tiny_llama", &["model.sequence_parallel=true"]).unwrap();
    assert!(!f.cfg.model.sequence_parallel);
    assert!(f.warnings.iter().any(|w| w.contains("sequence_parallel")));
}

#[test]
fn vocab_is_padded_from_tokenizer() {
    let f = resolve("tiny_llama", &["tokenizer.vocab_size=300"]).unwrap();
    assert_eq!(f.derived.padded_vocab_size, Some(320));
    assert_eq!(f.cfg.model.vocab_size, Some(320));
    let f = resolve(
        "tiny_llama",
        &[
            "tokenizer.vocab_size=300",
            "model.tensor_model_parallel_size=2",
            "model.num_query_groups=2",
        ],
    )
    .unwrap();
    assert_eq!(f.derived.padded_vocab_size, Some(384));
}

#[test]
fn peft_flag_picks_scheme_defaults() {
    let r = ConfigRequest {
        recipe: Some("tiny_llama".into()),
        task: Some(Task::Peft),
        peft: Some(PeftScheme::Dora),
        overrides: vec!["checkpoint.pretrained_checkpoint=base".into()],
        ..Default::default()
    };
    let peft = load(&r).unwrap().cfg.peft.unwrap();
    assert_eq!((peft.peft_scheme, peft.alpha), (PeftScheme::Dora, 64.0));
}

#[test]
fn every_shipped_recipe_resolves_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let all = recipes::list();
    assert!(all.len() >= 60, "only {} recipes", all.len());
    for r in all {
        let name = format!("{}/{}", r.model, r.task);
        let task = match r.task.as_str() {
            "sft" => Task::Sft,
            "peft" => Task::Peft,
            _ => Task::Pretrain,
        };
        let mut rq = req(&name, &["checkpoint.pretrained_checkpoint=base"]);
        rq.task = Some(task);
        let loaded = load(&rq).unwrap_or_else(|e| panic!("{name}: {e}"));
        let fin =
            finalize(loaded.cfg.clone(), None, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let refused = mbridge::config::engine_unsupported(&fin.cfg);
        assert!(refused.is_empty(), "{name}: the trainer would refuse it: {refused:?}");
        let shown = render(&loaded.cfg, &loaded.raw, None, ShowOptions::default());
        let path = dir.path().join(format!("{}_{}.toml", r.model, r.task));
        std::fs::write(&path, &shown).unwrap();
        let again =
            load(&ConfigRequest { recipe: Some(path.display().to_string()), ..Default::default() })
                .unwrap_or_else(|e| panic!("{name} round trip: {e}\n{shown}"));
        assert_eq!(again.cfg, loaded.cfg, "{name} does not round-trip");
    }
}

#[test]
fn required_recipes_are_shipped() {
    let names: Vec<String> =
        recipes::list().into_iter().map(|r| format!("{}/{}", r.model, r.task)).collect();
    for model in [
        "llama3_8b",
        "llama3_70b",
        "llama31_405b",
        "llama32_1b",
        "llama32_3b",
        "qwen3_600m",
        "qwen3_1p7b",
        "qwen3_4b",
        "qwen3_8b",
        "qwen3_14b",
        "qwen3_32b",
        "qwen25_500m",
        "qwen25_1p5b",
        "qwen25_7b",
        "qwen25_14b",
        "qwen25_32b",
        "qwen25_72b",
        "mistral_7b",
        "tiny_llama",
    ] {
        for task in ["pretrain", "sft", "peft"] {
            assert!(names.contains(&format!("{model}/{task}")), "missing {model}/{task}");
        }
    }
}

#[test]
fn recipe_values_match_megatron_bridge_table() {
    let f = resolve("llama3_70b", &[]).unwrap();
    let m = &f.cfg.model;
    assert_eq!((m.tensor_model_parallel_size, m.pipeline_model_parallel_size), (4, 4));
    assert_eq!((m.virtual_pipeline_model_parallel_size, m.context_parallel_size), (Some(5), 2));
    assert!(m.sequence_parallel);
    assert_eq!((m.num_layers, m.hidden_size, m.seq_length), (80, 8192, 8192));
    assert_eq!(f.cfg.train.global_batch_size, Some(512));
    assert_eq!(f.cfg.optimizer.adam_beta2, 0.95);
    let f = resolve("qwen3_8b", &[]).unwrap();
    assert!(f.cfg.model.qk_layernorm);
    assert_eq!(f.cfg.model.tensor_model_parallel_size, 4);
}

#[test]
fn dataloader_type_is_one_mbridge_runs() {
    for ok in ["single", "cyclic", "batch"] {
        resolve("tiny_llama", &[&format!("dataset.dataloader_type=\"{ok}\"")]).unwrap();
    }
    let e = err("tiny_llama", &["dataset.dataloader_type=\"external\""]);
    assert!(e.contains("external") && e.contains("Python data loader"), "{e}");
    let e = err("tiny_llama", &["dataset.dataloader_type=\"random\""]);
    assert!(e.contains("dataset.dataloader_type") && e.contains("\"random\""), "{e}");
}

#[test]
fn attention_backend_takes_megatrons_names() {
    use mbridge::config::model::AttnBackend;
    let f = resolve("tiny_llama", &[]).unwrap();
    assert_eq!(f.cfg.model.attention_backend, AttnBackend::Auto);
    for (name, want) in [
        ("flash", AttnBackend::Flash),
        ("fused", AttnBackend::Fused),
        ("unfused", AttnBackend::Unfused),
        ("local", AttnBackend::Local),
        ("auto", AttnBackend::Auto),
    ] {
        let f = resolve("tiny_llama", &[&format!("model.attention_backend={name}")]).unwrap();
        assert_eq!(f.cfg.model.attention_backend, want, "{name}");
    }
    let e = err("tiny_llama", &["model.attention_backend=cudnn"]);
    assert!(e.contains("attention_backend") && e.contains("fused"), "{e}");
}

/// A preset set after a field override inside it drops the field (overrides apply in order,
/// as Hydra's); the loader says so, and the other order keeps the field.
#[test]
fn a_preset_after_a_field_override_is_reported() {
    let fp8 = "mixed_precision=bf16_with_fp8_current_scaling_mixed";
    let field = "mixed_precision.grad_reduce_in_fp32=false";
    let lost = load(&req("tiny_llama", &[field, "train.train_iters=3", fp8])).unwrap();
    let notes = lost.raw.replaced_overrides();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains(&format!("`{fp8}`")) && notes[0].contains(&format!("`{field}`")));
    assert!(notes[0].contains("replaces all of `mixed_precision`"), "{}", notes[0]);
    let f = finalize(lost.cfg, None, None).unwrap();
    assert!(f.cfg.ddp.grad_reduce_in_fp32, "the preset's own value");
    let kept = load(&req("tiny_llama", &[fp8, field])).unwrap();
    assert!(kept.raw.replaced_overrides().is_empty());
    assert!(!finalize(kept.cfg, None, None).unwrap().cfg.ddp.grad_reduce_in_fp32);
}
