//! `finalize`: apply the mixed-precision preset, compute derived values, and check every
//! cross-field rule of Megatron Bridge once — reporting all violations, not only the first.

use super::container::ConfigContainer;
use super::dataset::{Blend, DatasetKind};
use super::error::{ConfigError, ConfigResult};
use super::mixed_precision::{self, MixedPrecision, MixedPrecisionConfig};
use super::model::DType;
use super::tokenizer::TokenizerType;

/// Values that follow from the config and the launch environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub world_size: usize,
    pub data_parallel_size: usize,
    pub global_batch_size: usize,
    pub micro_batch_size: usize,
    pub num_microbatches: usize,
    pub train_iters: usize,
    pub lr_decay_iters: usize,
    pub lr_warmup_iters: usize,
    /// The vocabulary the model is built with (padded), when known before loading a tokenizer.
    pub padded_vocab_size: Option<usize>,
    pub eval_global_batch_size: usize,
    pub eval_micro_batch_size: usize,
}

/// A finalized config: the container with derived fields filled in, plus [`Derived`].
#[derive(Debug, Clone)]
pub struct Finalized {
    pub cfg: ConfigContainer,
    pub derived: Derived,
    pub warnings: Vec<String>,
}

/// Finalize and validate. `world_size` None ⇒ TP·PP·CP (one data-parallel replica).
/// `tokenizer_vocab` is the tokenizer's vocabulary size when it has been loaded.
pub fn finalize(
    mut cfg: ConfigContainer,
    world_size: Option<usize>,
    tokenizer_vocab: Option<usize>,
) -> ConfigResult<Finalized> {
    let mut errs: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();

    // 0. Megatron Bridge v0.2's validation fields on `train`, copied as its finalize does.
    let t = &cfg.train;
    let v = &mut cfg.validation;
    for (name, set) in [
        ("eval_iters", t.eval_iters.map(|n| v.eval_iters = Some(n))),
        ("eval_interval", t.eval_interval.map(|n| v.eval_interval = Some(n))),
        ("skip_train", t.skip_train.map(|b| v.skip_train = b)),
    ] {
        if set.is_some() {
            warnings.push(format!(
                "`train.{name}` is deprecated and will be removed in a future release; use \
                 `validation.{name}` instead (copied there)"
            ));
        }
    }
    // megatron-core's dataset config carries its own copies of these two switches.
    v.full_validation |= cfg.dataset.full_validation == Some(true);
    v.multiple_validation_sets |= cfg.dataset.multiple_validation_sets == Some(true);

    // 1. Mixed precision preset → model / optimizer / ddp fields.
    if let Some(mp) = cfg.mixed_precision.clone() {
        match resolve_mixed_precision(&mp) {
            Ok(table) => apply_mixed_precision(&mut cfg, &table),
            Err(e) => errs.push(e),
        }
    }

    let m = &cfg.model;
    for (name, v) in [
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.seq_length", m.seq_length),
        ("model.tensor_model_parallel_size", m.tensor_model_parallel_size),
        ("model.pipeline_model_parallel_size", m.pipeline_model_parallel_size),
        ("model.context_parallel_size", m.context_parallel_size),
        ("model.expert_model_parallel_size", m.expert_model_parallel_size),
        ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by),
        ("logger.log_interval", cfg.logger.log_interval),
    ] {
        if v == 0 {
            errs.push(format!("`{name}` must be > 0 (got 0)"));
        }
    }
    for (name, v) in [
        ("model.num_query_groups", m.num_query_groups),
        ("model.kv_channels", m.kv_channels),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.virtual_pipeline_model_parallel_size", m.virtual_pipeline_model_parallel_size),
        ("train.micro_batch_size", cfg.train.micro_batch_size),
        ("train.global_batch_size", cfg.train.global_batch_size),
        ("train.train_iters", cfg.train.train_iters),
        ("train.train_samples", cfg.train.train_samples),
        ("checkpoint.save_interval", cfg.checkpoint.save_interval),
        ("checkpoint.non_persistent_save_interval", cfg.checkpoint.non_persistent_save_interval),
        ("validation.eval_interval", cfg.validation.eval_interval),
    ] {
        if v == Some(0) {
            errs.push(format!("`{name}` must be > 0 (got 0)"));
        }
    }

    // 2. Data-parallel size from the world.
    let (tp, pp, cp) = (
        m.tensor_model_parallel_size.max(1),
        m.pipeline_model_parallel_size.max(1),
        m.context_parallel_size.max(1),
    );
    let model_parallel = tp * pp * cp;
    let world = world_size.unwrap_or(model_parallel);
    let dp = if !world.is_multiple_of(model_parallel) {
        errs.push(format!(
            "world size {world} is not divisible by tensor_model_parallel_size ({tp}) × \
             pipeline_model_parallel_size ({pp}) × context_parallel_size ({cp}) = {model_parallel}"
        ));
        1
    } else {
        world / model_parallel
    };

    // 3. Batch sizes.
    let mbs = match cfg.train.micro_batch_size {
        Some(v) => v.max(1),
        None => {
            errs.push("`train.micro_batch_size` must be set".into());
            1
        }
    };
    let gbs = cfg.train.global_batch_size.unwrap_or(mbs * dp).max(1);
    cfg.train.global_batch_size = Some(gbs);
    if !gbs.is_multiple_of(mbs * dp) {
        errs.push(format!(
            "`train.global_batch_size` ({gbs}) must be divisible by `train.micro_batch_size` \
             ({mbs}) × data-parallel size ({dp})"
        ));
    }
    if cfg.train.rampup_batch_size.is_some() {
        errs.push("`train.rampup_batch_size` is not supported by mbridge; unset it".into());
    }

    // 4. Run length: exactly one of train_iters / train_samples / num_epochs.
    let set: Vec<&str> = [
        ("train.train_iters", cfg.train.train_iters.is_some()),
        ("train.train_samples", cfg.train.train_samples.is_some()),
        ("train.num_epochs", cfg.train.num_epochs.is_some()),
    ]
    .iter()
    .filter(|(_, s)| *s)
    .map(|(n, _)| *n)
    .collect();
    if set.len() != 1 {
        errs.push(format!(
            "exactly one of `train.train_iters`, `train.train_samples`, `train.num_epochs` must \
             be set (set: {})",
            if set.is_empty() { "none".to_string() } else { set.join(", ") }
        ));
    }
    if matches!(cfg.train.num_epochs, Some(e) if e <= 0.0) {
        errs.push("`train.num_epochs` must be > 0".into());
    }
    let sample_based = cfg.train.train_samples.is_some();
    if let Some(samples) = cfg.train.train_samples {
        cfg.train.train_iters = Some(samples / gbs);
    }
    let train_iters = cfg.train.train_iters.unwrap_or(0);

    // 5. Scheduler.
    let s = &mut cfg.scheduler;
    if sample_based
        && (s.lr_decay_iters.is_some() || s.lr_warmup_iters > 0 || s.lr_wsd_decay_iters.is_some())
    {
        errs.push("sample-based training (`train.train_samples`) cannot use `scheduler.*_iters` fields; use `*_samples`".into());
    }
    if !sample_based
        && (s.lr_decay_samples.is_some()
            || s.lr_warmup_samples > 0
            || s.lr_wsd_decay_samples.is_some())
    {
        errs.push(
            "iteration-based training cannot use `scheduler.*_samples` fields; use `*_iters`"
                .into(),
        );
    }
    if let Some(max_steps) = s.max_steps {
        if max_steps < train_iters {
            errs.push(format!(
                "`scheduler.max_steps` ({max_steps}) must be ≥ `train.train_iters` ({train_iters})"
            ));
        }
    }
    if s.lr_warmup_fraction.is_some() && (s.lr_warmup_iters > 0 || s.lr_warmup_samples > 0) {
        errs.push("set only one of `scheduler.lr_warmup_fraction` and `scheduler.lr_warmup_iters`/`lr_warmup_samples`".into());
    }
    if matches!(s.lr_warmup_fraction, Some(f) if !(0.0..=1.0).contains(&f)) {
        errs.push("`scheduler.lr_warmup_fraction` must be within [0, 1]".into());
    }
    if sample_based {
        s.lr_decay_samples = s.lr_decay_samples.or(cfg.train.train_samples);
        s.lr_wsd_decay_samples = s.lr_wsd_decay_samples.or(s.lr_decay_samples);
    } else {
        s.lr_decay_iters = s.lr_decay_iters.or(s.max_steps).or(cfg.train.train_iters);
        s.lr_wsd_decay_iters = s.lr_wsd_decay_iters.or(s.lr_decay_iters);
    }
    let lr_decay_iters = if sample_based {
        s.lr_decay_samples.unwrap_or(0) / gbs
    } else {
        s.lr_decay_iters.unwrap_or(0)
    };
    if lr_decay_iters == 0 && set.len() == 1 && cfg.train.num_epochs.is_none() {
        errs.push(
            "learning-rate decay length is 0: set `scheduler.lr_decay_iters` or a run length"
                .into(),
        );
    }
    let mut warmup = match s.lr_warmup_fraction {
        Some(f) => (f * lr_decay_iters as f64) as usize,
        None if sample_based => s.lr_warmup_samples / gbs,
        None => s.lr_warmup_iters,
    };
    if lr_decay_iters > 0 && warmup >= lr_decay_iters {
        warnings.push(format!(
            "lr warmup ({warmup} iterations) ≥ decay ({lr_decay_iters}); capped to {}",
            lr_decay_iters - 1
        ));
        warmup = lr_decay_iters - 1;
        if !sample_based && s.lr_warmup_fraction.is_none() {
            s.lr_warmup_iters = warmup;
        }
    }
    let wd = cfg.optimizer.weight_decay;
    s.start_weight_decay = s.start_weight_decay.or(Some(wd));
    s.end_weight_decay = s.end_weight_decay.or(Some(wd));
    match cfg.optimizer.lr {
        None => errs.push("`optimizer.lr` must be set".into()),
        Some(lr) if lr < 0.0 => errs.push(format!("`optimizer.lr` must be ≥ 0 (got {lr})")),
        Some(lr) => {
            if let Some(min) = cfg.optimizer.min_lr {
                if min > lr {
                    errs.push(format!(
                        "`optimizer.min_lr` ({min}) must be ≤ `optimizer.lr` ({lr})"
                    ));
                }
            }
        }
    }
    let o = &cfg.optimizer;
    match (o.decoupled_lr, o.decoupled_min_lr) {
        (None, Some(_)) => errs.push(
            "`optimizer.decoupled_min_lr` needs `optimizer.decoupled_lr` (the embedding's and \
             output layer's peak learning rate)"
                .into(),
        ),
        (Some(max), min) if max < 0.0 || min.is_some_and(|m| m < 0.0 || m > max) => {
            errs.push(format!(
                "`optimizer.decoupled_lr` ({max}) must be ≥ 0 and ≥ `optimizer.decoupled_min_lr` \
                 ({})",
                min.map_or("unset".into(), |m| m.to_string())
            ))
        }
        _ => {}
    }

    // Megatron Bridge's rule for finetuning under context parallelism.
    if cfg.model.context_parallel_size > 1
        && cfg.dataset.kind() == DatasetKind::Finetuning
        && (!cfg.model.calculate_per_token_loss || cfg.ddp.average_in_collective)
    {
        errs.push(
            "finetuning with `model.context_parallel_size` > 1 needs \
             `model.calculate_per_token_loss=true` and `ddp.average_in_collective=false`"
                .into(),
        );
    }

    // 6. Model against parallelism.
    let m = &mut cfg.model;
    let heads = m.num_attention_heads;
    let groups = m.query_groups();
    if heads > 0 && !heads.is_multiple_of(tp) {
        errs.push(format!("`model.num_attention_heads` ({heads}) must be divisible by `model.tensor_model_parallel_size` ({tp})"));
    }
    if groups > 0 && !groups.is_multiple_of(tp) {
        errs.push(format!("`model.num_query_groups` ({groups}) must be divisible by `model.tensor_model_parallel_size` ({tp})"));
    }
    if heads > 0 && groups > 0 && !heads.is_multiple_of(groups) {
        errs.push(format!("`model.num_attention_heads` ({heads}) must be divisible by `model.num_query_groups` ({groups})"));
    }
    if m.kv_channels.is_none() && heads > 0 && !m.hidden_size.is_multiple_of(heads) {
        errs.push(format!("`model.hidden_size` ({}) must be divisible by `model.num_attention_heads` ({heads}) unless `model.kv_channels` is set", m.hidden_size));
    }
    let before = errs.len();
    check_pipeline_split(m, pp, &mut errs);
    if errs.len() == before && pp > 1 {
        // The remaining rules (uneven stages with virtual pipelining or with the
        // embedding/loss accounting) are those of the layer assignment itself.
        let vp = crate::model::arch::virtual_stages(m, pp);
        let split = (0..pp)
            .flat_map(|r| (0..vp).map(move |c| (r, c)))
            .try_for_each(|(r, c)| crate::model::arch::chunk_layers(m, r, pp, c).map(|_| ()));
        if let Err(e) = split {
            errs.push(format!("pipeline split: {e}"));
        }
    }
    if let Some(experts) = m.num_moe_experts {
        let ep = m.expert_model_parallel_size.max(1);
        if experts % ep != 0 {
            errs.push(format!("`model.num_moe_experts` ({experts}) must be divisible by `model.expert_model_parallel_size` ({ep})"));
        }
    } else if m.expert_model_parallel_size > 1 {
        errs.push("`model.expert_model_parallel_size` > 1 needs `model.num_moe_experts`".into());
    }
    if cp > 1 && !m.seq_length.is_multiple_of(2 * cp) {
        errs.push(format!(
            "`model.seq_length` ({}) must be divisible by 2 × `model.context_parallel_size` ({})",
            m.seq_length,
            2 * cp
        ));
    }
    if m.sequence_parallel && tp == 1 {
        warnings.push(
            "`model.sequence_parallel` needs tensor parallelism; switched off because TP = 1"
                .into(),
        );
        m.sequence_parallel = false;
    }
    if m.fp16 && m.bf16 {
        errs.push("`model.fp16` and `model.bf16` are mutually exclusive".into());
    }
    if let Some(maxpos) = m.max_position_embeddings {
        if maxpos < m.seq_length {
            errs.push(format!(
                "`model.seq_length` ({}) exceeds `model.max_position_embeddings` ({maxpos})",
                m.seq_length
            ));
        }
    }

    // 7. Sequence length agreement.
    match cfg.dataset.seq_length {
        None => cfg.dataset.seq_length = Some(cfg.model.seq_length),
        Some(ds) if ds != cfg.model.seq_length => errs.push(format!(
            "`dataset.seq_length` ({ds}) must equal `model.seq_length` ({})",
            cfg.model.seq_length
        )),
        _ => {}
    }
    cfg.dataset.random_seed = cfg.dataset.random_seed.or(Some(cfg.rng.seed));

    // 8. Vocabulary.
    // Megatron's NullTokenizer appends its EOD id after `vocab_size` ids: V + 1 in all.
    let tok_vocab = tokenizer_vocab.or(match cfg.tokenizer.tokenizer_type {
        Some(TokenizerType::NullTokenizer) => cfg.tokenizer.vocab_size.map(|v| v + 1),
        _ => None,
    });
    if cfg.tokenizer.tokenizer_type == Some(TokenizerType::NullTokenizer)
        && cfg.tokenizer.vocab_size.is_none()
    {
        errs.push("`tokenizer.vocab_size` must be set for the NullTokenizer".into());
    }
    let padded_vocab_size = match (cfg.model.vocab_size, tok_vocab) {
        // Megatron Bridge's provider pads an explicit (HF-derived) vocab when asked to.
        (Some(mv), tv) if cfg.model.should_pad_vocab && !cfg.tokenizer.use_tokenizer_vocab_size => {
            if let Some(tv) = tv.filter(|&tv| mv < tv) {
                errs.push(format!(
                    "`model.vocab_size` ({mv}) is smaller than the tokenizer's vocabulary ({tv})"
                ));
            }
            Some(cfg.model.padded_vocab_size(mv))
        }
        (Some(mv), Some(tv)) if !cfg.tokenizer.use_tokenizer_vocab_size => {
            if mv < tv {
                errs.push(format!(
                    "`model.vocab_size` ({mv}) is smaller than the tokenizer's vocabulary ({tv})"
                ));
            }
            Some(mv)
        }
        (_, Some(tv)) => Some(cfg.model.padded_vocab_size(tv)),
        (Some(mv), None) => Some(mv),
        (None, None) => None,
    };

    // 9. Dataset kind rules, PEFT and packing.
    let d = &cfg.dataset;
    if d.blend.is_some() && d.data_path.is_some() {
        errs.push("set only one of `dataset.blend` and `dataset.data_path`".into());
    }
    if d.kind() == DatasetKind::Pretraining && d.blend_per_split.is_none() && d.split.is_none() {
        errs.push("`dataset.split` (e.g. \"969,30,1\") is required with `dataset.blend`/`dataset.data_path`".into());
    }
    if let Some(Blend::Many(items)) = d.blend.as_ref().or(d.data_path.as_ref()) {
        if let Err(e) = super::dataset::check_blend(items) {
            errs.push(e);
        }
    }
    if d.kind() == DatasetKind::Finetuning && (d.blend.is_some() || d.data_path.is_some()) {
        errs.push("`dataset.dataset_root` (finetuning) cannot be combined with `dataset.blend`/`dataset.data_path`".into());
    }
    if let Some(t) = d.dataloader_type.as_deref() {
        match t {
            "single" | "cyclic" | "batch" => {}
            "external" => errs.push(
                "`dataset.dataloader_type` = \"external\" passes a user-built Python data loader \
                 to the trainer; mbridge has none (use \"single\", \"cyclic\" or \"batch\")"
                    .into(),
            ),
            other => errs.push(format!(
                "`dataset.dataloader_type` must be \"single\", \"cyclic\" or \"batch\" (got {other:?})"
            )),
        }
    }
    if cfg.peft.is_some() && cfg.checkpoint.pretrained_checkpoint.is_none() {
        errs.push(
            "`peft` requires `checkpoint.pretrained_checkpoint` (the base model to adapt)".into(),
        );
    }
    if d.packing_enabled() && mbs != 1 {
        errs.push(format!("packed sequences (`dataset.packed_sequence_specs.packed_sequence_size` > 0) require `train.micro_batch_size` = 1 (got {mbs})"));
    }

    // 10. Evaluation batches.
    let eval_mbs = cfg.validation.eval_micro_batch_size.unwrap_or(mbs).max(1);
    let eval_gbs = cfg.validation.eval_global_batch_size.unwrap_or(gbs).max(1);
    if !eval_gbs.is_multiple_of(eval_mbs * dp) {
        errs.push(format!("`validation.eval_global_batch_size` ({eval_gbs}) must be divisible by eval micro batch ({eval_mbs}) × data-parallel size ({dp})"));
    }
    let val = &cfg.validation;
    if val.multiple_validation_sets && !val.full_validation {
        // Megatron: "--multiple-validation-sets currently requires --full-validation".
        errs.push(
            "`validation.multiple_validation_sets` requires `validation.full_validation` \
             (each set is evaluated whole)"
                .into(),
        );
    }
    if val.validation_set_names.is_some() && !val.multiple_validation_sets {
        errs.push(
            "`validation.validation_set_names` requires `validation.multiple_validation_sets`"
                .into(),
        );
    }

    // 11. Optimizer numerics, checkpoint and profiling consistency.
    if cfg.optimizer.fp16 && cfg.optimizer.bf16 {
        errs.push("`optimizer.fp16` and `optimizer.bf16` are mutually exclusive".into());
    }
    if cfg.optimizer.clip_grad.is_nan() || cfg.optimizer.clip_grad < 0.0 {
        errs.push(format!("`optimizer.clip_grad` must be ≥ 0 (got {})", cfg.optimizer.clip_grad));
    }
    if cfg.checkpoint.ckpt_step.is_some() && cfg.checkpoint.load.is_none() {
        errs.push("`checkpoint.ckpt_step` needs `checkpoint.load`".into());
    }
    if cfg.checkpoint.async_save && cfg.checkpoint.save.is_none() {
        errs.push("`checkpoint.async_save` needs `checkpoint.save`".into());
    }
    let c = &cfg.checkpoint;
    match c.non_persistent_ckpt_type.as_deref() {
        None | Some("global") => {}
        Some(kind @ ("local" | "in_memory")) => errs.push(format!(
            "`checkpoint.non_persistent_ckpt_type` = {kind:?}: mbridge writes \"global\" \
             non-persistent checkpoints only (NVRx's local and in-memory ones are not implemented)"
        )),
        Some(other) => errs.push(format!(
            "`checkpoint.non_persistent_ckpt_type` = {other:?}: expected \"global\", \"local\" or \
             \"in_memory\""
        )),
    }
    if c.non_persistent_save_interval.is_some() {
        if c.non_persistent_ckpt_type.is_none() {
            errs.push(
                "`checkpoint.non_persistent_save_interval` needs \
                 `checkpoint.non_persistent_ckpt_type` = \"global\""
                    .into(),
            );
        } else if c.non_persistent_dir(c.save.as_deref()).is_none() {
            errs.push(
                "`checkpoint.non_persistent_save_interval` needs `checkpoint.save` or \
                 `checkpoint.non_persistent_global_ckpt_dir`"
                    .into(),
            );
        }
    }
    if cfg.checkpoint.most_recent_k == 0 || cfg.checkpoint.most_recent_k < -1 {
        errs.push(format!(
            "`checkpoint.most_recent_k` must be -1 (keep all) or ≥ 1 (got {})",
            cfg.checkpoint.most_recent_k
        ));
    }
    // Megatron's checks: retained checkpoints are some of the periodic ones.
    if let Some(retain) = c.save_retain_interval {
        match c.save_interval {
            _ if retain == 0 => {
                errs.push("`checkpoint.save_retain_interval` must be > 0 (got 0)".into())
            }
            Some(every) if retain.is_multiple_of(every) => {}
            every => errs.push(format!(
                "`checkpoint.save_retain_interval` ({retain}) must be a multiple of \
                 `checkpoint.save_interval` ({})",
                every.map_or("unset".to_string(), |n| n.to_string())
            )),
        }
    }
    let unit = &cfg.logger.runtime_time_unit;
    if !super::logger::RUNTIME_TIME_UNITS.iter().any(|(n, _)| n == unit) {
        errs.push(format!(
            "`logger.runtime_time_unit` = {unit:?}: expected \"seconds\", \"minutes\", \"hours\" or \"days\""
        ));
    }
    let p = &cfg.profiling;
    if p.use_nsys_profiler && p.use_pytorch_profiler {
        errs.push(
            "enable only one of `profiling.use_nsys_profiler` and `profiling.use_pytorch_profiler`"
                .into(),
        );
    }
    if p.profile_step_end < p.profile_step_start {
        errs.push("`profiling.profile_step_end` must be ≥ `profiling.profile_step_start`".into());
    }
    // The CUDA profiler API exists only in the CUDA build: silently profiling nothing would
    // leave an nsys capture (`--capture-range=cudaProfilerApi`) empty with no hint why.
    if p.use_nsys_profiler && !cfg!(feature = "cuda") {
        errs.push(
            "`profiling.use_nsys_profiler` needs a CUDA build of mbridge (`--features cuda`); \
             this binary is CPU-only: use `profiling.use_pytorch_profiler` for a Chrome trace"
                .into(),
        );
    }
    if p.record_memory_history && p.memory_snapshot_path.trim().is_empty() {
        errs.push(
            "`profiling.record_memory_history` needs `profiling.memory_snapshot_path`".into(),
        );
    }
    let profiling_on =
        p.use_nsys_profiler || p.use_pytorch_profiler || p.record_memory_history || p.nvtx_ranges;
    if let (true, Some(world)) = (profiling_on, world_size) {
        if let Some(r) = p.profile_ranks.iter().find(|&&r| r >= world) {
            errs.push(format!(
                "`profiling.profile_ranks` names rank {r} but the run has {world} rank{}",
                if world == 1 { "" } else { "s" }
            ));
        }
    }

    // 12. Data parallelism: distributed optimizer, buckets, comm_overlap.
    super::ddp_rules::apply(&mut cfg, dp, &mut errs);
    super::optimizer_rules::apply(&cfg, &mut errs);

    if !errs.is_empty() {
        return Err(ConfigError::many(
            &format!(
                "invalid configuration ({} problem{}):",
                errs.len(),
                if errs.len() == 1 { "" } else { "s" }
            ),
            &errs,
        ));
    }
    if let Some(v) = padded_vocab_size {
        cfg.model.vocab_size = Some(v);
    }
    let derived = Derived {
        world_size: world,
        data_parallel_size: dp,
        global_batch_size: gbs,
        micro_batch_size: mbs,
        num_microbatches: gbs / (mbs * dp),
        train_iters,
        lr_decay_iters,
        lr_warmup_iters: warmup,
        padded_vocab_size,
        eval_global_batch_size: eval_gbs,
        eval_micro_batch_size: eval_mbs,
    };
    Ok(Finalized { cfg, derived, warnings })
}

fn check_pipeline_split(m: &super::model::ModelConfig, pp: usize, errs: &mut Vec<String>) {
    let layers = m.num_layers;
    let first = m.num_layers_in_first_pipeline_stage;
    let last = m.num_layers_in_last_pipeline_stage;
    if pp == 1 {
        if first.is_some() || last.is_some() {
            errs.push("`model.num_layers_in_first/last_pipeline_stage` need `pipeline_model_parallel_size` > 1".into());
        }
        if m.virtual_pipeline_model_parallel_size.is_some() {
            errs.push("`model.virtual_pipeline_model_parallel_size` needs `pipeline_model_parallel_size` > 1".into());
        }
        return;
    }
    // Embedding / loss count as a layer when accounted for in the split.
    let mut total = layers
        + usize::from(m.account_for_embedding_in_pipeline_split)
        + usize::from(m.account_for_loss_in_pipeline_split);
    let mut middle_stages = pp;
    for (name, v) in [("first", first), ("last", last)] {
        if let Some(n) = v {
            if n > total {
                errs.push(format!("`model.num_layers_in_{name}_pipeline_stage` ({n}) exceeds `model.num_layers` ({layers})"));
                return;
            }
            total -= n;
            middle_stages -= 1;
        }
    }
    if middle_stages > 0 && !total.is_multiple_of(middle_stages) {
        errs.push(format!(
            "`model.num_layers` ({layers}) cannot be split evenly over `model.pipeline_model_parallel_size` ({pp}) stages{}",
            if first.is_some() || last.is_some() { " after the first/last stage layers" } else { "" }
        ));
        return;
    }
    if let Some(vp) = m.virtual_pipeline_model_parallel_size {
        let per_stage = total.checked_div(middle_stages).unwrap_or(0);
        if vp == 0 || !per_stage.is_multiple_of(vp) {
            errs.push(format!("layers per pipeline stage ({per_stage}) must be divisible by `model.virtual_pipeline_model_parallel_size` ({vp})"));
        }
    }
}

fn resolve_mixed_precision(mp: &MixedPrecision) -> Result<MixedPrecisionConfig, String> {
    let table = match mp {
        MixedPrecision::Table(t) => t.clone(),
        MixedPrecision::Preset(name) => mixed_precision::preset(name).ok_or_else(|| {
            format!(
                "unknown `mixed_precision` preset `{name}`; known: {}",
                mixed_precision::PRESETS.join(", ")
            )
        })?,
    };
    if table.fp16 && table.bf16 {
        return Err(
            "`mixed_precision.fp16` and `mixed_precision.bf16` are mutually exclusive".into()
        );
    }
    if table.fp8.is_some() && table.fp4.is_some() {
        return Err("`mixed_precision.fp8` and `mixed_precision.fp4` are mutually exclusive".into());
    }
    Ok(table)
}

/// Megatron Bridge's `MixedPrecisionConfig.setup()`: copy each field onto same-named fields.
fn apply_mixed_precision(cfg: &mut ConfigContainer, mp: &MixedPrecisionConfig) {
    let m = &mut cfg.model;
    m.fp16 = mp.fp16;
    m.bf16 = mp.bf16;
    let params = mp.params_dtype.unwrap_or(DType::F32);
    m.params_dtype = params;
    m.pipeline_dtype = mp.pipeline_dtype;
    m.autocast_dtype = mp.autocast_dtype;
    m.fp8 = mp.fp8.clone();
    m.fp8_recipe = mp.fp8.as_ref().and(mp.fp8_recipe.clone());
    // Megatron Bridge keeps the two in sync (setting either sets both; an unset
    // `fp8_param` follows `fp8_param_gather`): an explicit `fp8_param` decides.
    m.fp8_param = match (mp.fp8_param, mp.fp8_param_gather) {
        (None, false) => None,
        (param, gather) => Some(param.unwrap_or(gather)),
    };
    m.fp8_wgrad = mp.fp8_wgrad;
    m.fp4 = mp.fp4.clone();
    m.first_last_layers_bf16 = mp.first_last_layers_bf16;
    m.num_layers_at_start_in_bf16 = mp.num_layers_at_start_in_bf16;
    m.num_layers_at_end_in_bf16 = mp.num_layers_at_end_in_bf16;
    let o = &mut cfg.optimizer;
    o.fp16 = mp.fp16;
    o.bf16 = mp.bf16;
    o.params_dtype = params;
    o.loss_scale = mp.loss_scale;
    o.initial_loss_scale = mp.initial_loss_scale;
    o.min_loss_scale = mp.min_loss_scale;
    o.loss_scale_window = mp.loss_scale_window;
    o.hysteresis = mp.hysteresis;
    cfg.ddp.grad_reduce_in_fp32 = mp.grad_reduce_in_fp32;
    cfg.ddp.fp8_param_gather = mp.fp8_param.unwrap_or(mp.fp8_param_gather);
}
