//! `import-hf`: HF directory or cached repo → mbridge checkpoint `out/iter_0000000` (+ tracker),
//! optionally pre-sharded for a TP/PP layout, with the model config, tokenizer files and the
//! source config.json recorded so export and finetuning need nothing else.

use super::hf_config::{read_config, vocab_divisor, HfConfig};
use super::hub::{self, HfSource};
use super::mapping::{hf_sources, is_hf_buffer, megatron_params, rule_for};
use super::output::{prepare_output, publish_output};
use super::stream;
use super::weights::HfWeights;
use crate::ckpt::{
    self, model_shard_name, write_shard_files, CheckpointWrite, ShardFile, TrainState,
};
use crate::config::model::DType as CfgDType;
use crate::config::raw::RawConfig;
use crate::config::show::{render, ShowOptions};
use crate::config::tokenizer::TokenizerType;
use crate::config::ConfigContainer;
use crate::io::st_write::{Data, DoneHook, OutTensor};
use crate::model::{stage_layers, GptArch};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::collections::HashSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Files copied from the HF directory into the checkpoint's `tokenizer/`.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// What `import-hf` was asked to do.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Local HF directory or repo id in the local cache.
    pub source: String,
    /// Output directory (must not exist or be empty).
    pub out: PathBuf,
    pub tp: usize,
    pub pp: usize,
    /// Cast weights to this dtype; None keeps the source dtype.
    pub dtype: Option<CfgDType>,
    /// Override the padding divisor (default: largest power of two ≤ 128 dividing V).
    pub make_vocab_size_divisible_by: Option<usize>,
}

/// The resolved plan of an import.
pub struct ImportPlan {
    pub source: HfSource,
    pub hf: HfConfig,
    /// Full run config whose `model.*` came from config.json.
    pub cfg: ConfigContainer,
    pub arch: GptArch,
    pub padded_vocab: usize,
}

/// Resolves the source and builds the model config and architecture of the import.
pub fn plan(opts: &ImportOptions) -> Result<ImportPlan> {
    if opts.tp == 0 || opts.pp == 0 {
        return Err(crate::config_err!("--tp and --pp must be ≥ 1").into());
    }
    let source = hub::resolve(&opts.source)?;
    let hf = read_config(&source.dir)?;
    let mut m = hf.model.clone();
    m.tensor_model_parallel_size = opts.tp;
    m.pipeline_model_parallel_size = opts.pp;
    m.should_pad_vocab = true;
    m.make_vocab_size_divisible_by =
        opts.make_vocab_size_divisible_by.unwrap_or_else(|| vocab_divisor(hf.vocab_size));
    m.hf_model_id = Some(source.repo_id.clone().unwrap_or_else(|| abs(&source.dir)));
    let padded_vocab = m.padded_vocab_size(hf.vocab_size);
    let mut built = m.clone();
    built.vocab_size = Some(padded_vocab);
    let arch = GptArch::from_config(&built)?;
    arch.check_tp(opts.tp).map_err(|e| crate::config_err!("--tp {}: {e}", opts.tp))?;
    for r in 0..opts.pp {
        stage_layers(&m, r, opts.pp).map_err(|e| crate::config_err!("--pp {}: {e}", opts.pp))?;
    }
    let mut cfg = ConfigContainer::default();
    if let Some(d) = opts.dtype {
        m.params_dtype = d;
        m.bf16 = d == CfgDType::BF16;
        m.fp16 = d == CfgDType::F16;
    }
    cfg.model = m;
    Ok(ImportPlan { source, hf, cfg, arch, padded_vocab })
}

/// The `--dry-run` table: every Megatron parameter with its HF sources, shapes and rule.
pub fn dry_run(opts: &ImportOptions) -> Result<String> {
    let p = plan(opts)?;
    let w = HfWeights::open(&p.source.dir)?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "source: {} ({:?}, {} layers, vocab {} → padded {})",
        p.source.dir.display(),
        p.hf.family,
        p.arch.num_layers,
        p.hf.vocab_size,
        p.padded_vocab
    );
    let _ = writeln!(
        s,
        "layout: TP {} × PP {}; would write {}",
        opts.tp,
        opts.pp,
        opts.out.join("iter_0000000").display()
    );
    for pp in 0..opts.pp {
        let layers = stage_layers(&p.cfg.model, pp, opts.pp)?;
        for param in megatron_params(&p.arch, &layers, pp, opts.pp)? {
            let mut srcs = hf_sources(&param.name)?;
            if param.name == "output_layer.weight" && p.arch.tied_embeddings {
                srcs = vec!["model.embed_tokens.weight".into()];
            }
            let hf: Vec<String> =
                srcs.iter().map(|n| Ok(format!("{n} {:?}", w.shape(n)?))).collect::<Result<_>>()?;
            let _ = writeln!(
                s,
                "pp{pp} {:<58} {:<14} {:<10} {:?} ← {}",
                param.name,
                format!("{:?}", param.shape),
                rule_for(&param.name)?.kind(),
                param.partition,
                hf.join(" + ")
            );
        }
    }
    Ok(s)
}

/// Runs the import; returns the written checkpoint directory (`out`).
pub fn import_hf(opts: &ImportOptions) -> Result<PathBuf> {
    let p = plan(opts)?;
    let tmp = prepare_output(&opts.out)?;
    let result = write_import(opts, &p, &tmp);
    match result {
        Ok(()) => publish_output(&tmp, &opts.out),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_import(opts: &ImportOptions, p: &ImportPlan, tmp: &Path) -> Result<()> {
    let weights = HfWeights::open(&p.source.dir)?;
    // Plan every shard from the file headers first (shapes and dtypes checked, nothing
    // read), so a bad source fails before anything is written.
    let mut used = HashSet::new();
    let mut files = Vec::new();
    let mut total = 0u64;
    let bar = stream::byte_bar(0, "import");
    for pp in 0..opts.pp {
        let layers = stage_layers(&p.cfg.model, pp, opts.pp)?;
        let mut ranks: Vec<ShardFile> = (0..opts.tp)
            .map(|tp| ShardFile {
                tp_rank: tp,
                file: model_shard_name(tp, pp),
                tensors: Vec::new(),
            })
            .collect();
        for param in megatron_params(&p.arch, &layers, pp, opts.pp)? {
            let g = stream::hf_to_megatron(&param, &p.arch, p.hf.vocab_size, &weights)?;
            used.extend(g.sources.iter().cloned());
            let out_dtype = opts.dtype.map(candle_dtype).unwrap_or(g.dtype);
            for (tp, file) in ranks.iter_mut().enumerate() {
                let (m, shape) = stream::shard_matrix(
                    &g.matrix,
                    &param.shape,
                    g.dtype.size_in_bytes(),
                    param.partition,
                    tp,
                    opts.tp,
                )
                .with_context(|| format!("--tp {}: cannot shard {}", opts.tp, param.name))?;
                let bytes = (shape.iter().product::<usize>() * out_dtype.size_in_bytes()) as u64;
                total += bytes;
                let (w, srcs, bar) = (&weights, g.sources.clone(), bar.clone());
                let done: DoneHook = Box::new(move || {
                    srcs.iter().for_each(|s| w.release(s));
                    bar.inc(bytes);
                });
                let t = OutTensor {
                    name: param.name.clone(),
                    dtype: out_dtype,
                    shape,
                    data: Data::Matrix(m, g.dtype),
                    done: Some(done),
                };
                file.tensors.push((t, param.partition));
            }
        }
        files.extend(ranks);
    }
    let unused: Vec<String> = weights
        .names()
        .into_iter()
        .filter(|n| !used.contains(n) && !is_hf_buffer(n))
        .filter(|n| !(n == "lm_head.weight" && p.arch.tied_embeddings))
        .collect();
    if !unused.is_empty() {
        bail!(
            "{}: HF tensors the {:?} mapping does not use (wrong architecture or config?): {}",
            p.source.dir.display(),
            p.hf.family,
            unused.join(", ")
        );
    }

    bar.set_length(total);
    let final_out = abs(&opts.out);
    let mut cfg = p.cfg.clone();
    let tok_files: Vec<PathBuf> =
        TOKENIZER_FILES.iter().map(|f| p.source.dir.join(f)).filter(|f| f.is_file()).collect();
    if p.source.dir.join("tokenizer.json").is_file() {
        cfg.tokenizer.tokenizer_type = Some(TokenizerType::HuggingFaceTokenizer);
        cfg.tokenizer.tokenizer_model = Some(format!("{final_out}/iter_0000000/tokenizer"));
    } else {
        // No tokenizer shipped: ids in, ids out, with EOD the last id (V = vocab_size + 1).
        tracing::warn!(
            "{} has no tokenizer.json; the checkpoint uses the NullTokenizer (token ids as text)",
            p.source.dir.display()
        );
        cfg.tokenizer.tokenizer_type = Some(TokenizerType::NullTokenizer);
        cfg.tokenizer.vocab_size = Some(p.hf.vocab_size - 1);
    }
    let run_config = render(
        &cfg,
        &RawConfig::default(),
        None,
        ShowOptions { only_changed: false, no_sources: true },
    );
    // The rendered config must load back to the same model, or export would be wrong later.
    let mut raw = RawConfig::default();
    raw.merge(
        &crate::config::recipes::parse_toml(&run_config, "run_config.toml")?,
        &crate::config::raw::Source::Default,
    );
    if raw.to_container()?.model != cfg.model {
        return Err(anyhow!(
            "internal error: the rendered run config does not load back to the same model config"
        ));
    }
    let state = TrainState::default();
    let write = CheckpointWrite {
        iteration: 0,
        model: &[],
        optimizer: None,
        json: vec![
            (
                "hf_source".into(),
                json!({
                    "repo_id": p.source.repo_id,
                    "revision": p.source.revision,
                    "source_dir": abs(&p.source.dir),
                    "architecture": p.hf.family.architecture(),
                    "vocab_size": p.hf.vocab_size,
                    "padded_vocab_size": p.padded_vocab,
                }),
            ),
            ("hf_config".into(), p.hf.raw.clone()),
        ],
        train_state: &state,
        run_config_toml: &run_config,
        tokenizer_files: &tok_files,
    };
    let files = std::sync::Mutex::new(Some(files));
    ckpt::save_checkpoint_with(tmp, &write, -1, &|dir| {
        let files = files.lock().map_err(|_| anyhow!("poisoned"))?.take();
        write_shard_files(dir, files.ok_or_else(|| anyhow!("model shards written twice"))?)
    })?;
    bar.finish_and_clear();
    Ok(())
}

/// The candle dtype of a config dtype.
pub fn candle_dtype(d: CfgDType) -> candle_core::DType {
    match d {
        CfgDType::F32 => candle_core::DType::F32,
        CfgDType::BF16 => candle_core::DType::BF16,
        CfgDType::F16 => candle_core::DType::F16,
    }
}

/// `path` made absolute against the current directory (not canonicalized: it may not exist).
pub fn abs(path: &Path) -> String {
    let p = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
    };
    p.display().to_string()
}
