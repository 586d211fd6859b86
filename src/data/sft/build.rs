//! Building the SFT splits from `dataset.*`: which files, tokenization, optional packing with
//! reuse of earlier packed files, sample mapping, and per-split collate.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};

use super::chat::{tokenize_chat, ChatLossMode, ChatTemplate};
use super::collate::{collate_packed, collate_unpacked, CollateParams, PackedBatch, PackedParams};
use super::legacy::LegacyTemplate;
use super::packing::{pack_examples, PackParams, PackedBin, PackingAlgorithm, PackingMetadata};
use super::prompt::{tokenize_prompt_completion, PcTokenInfo, PromptCompletionConfig};
use super::rows::{is_chat, parse_row, read_objects, Columns, SftRow};
use super::store::{self, PackedPaths};
use super::SftExample;
use crate::config::container::ConfigContainer;
use crate::config::dataset::DatasetConfig;
use crate::data::numpy_rng::RandomState;
use crate::data::sampler::Batch;
use crate::data::tokenizer::Tokenizer;
use crate::parallel::lcm;

/// What the caller knows beyond `dataset.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct SftBuildOptions {
    /// `seq_length` of the run (dataset.seq_length or model.seq_length).
    pub seq_length: usize,
    /// Tokenizer id for the packed directory name (`tokenizer_model_name` wins when set).
    pub tokenizer_name: String,
    /// `tokenizer.chat_template` override (the tokenizer's own template otherwise).
    pub chat_template: Option<String>,
    /// Pad every batch to `seq_length` (Megatron forces this when PP > 1 or EP > 1).
    pub pad_to_max_length: bool,
    /// Round unpadded batch lengths up to this multiple (GPTSFTDataset: 16).
    pub pad_seq_length_to_mult: usize,
    /// Packing assignment algorithm (Megatron Bridge: first_fit_shuffle).
    pub packing_algorithm: PackingAlgorithm,
}

impl SftBuildOptions {
    /// Megatron Bridge defaults for a run of `seq_length` with tokenizer `tokenizer_name`.
    pub fn new(seq_length: usize, tokenizer_name: impl Into<String>) -> Self {
        SftBuildOptions {
            seq_length,
            tokenizer_name: tokenizer_name.into(),
            chat_template: None,
            pad_to_max_length: false,
            pad_seq_length_to_mult: 16,
            packing_algorithm: PackingAlgorithm::FirstFitShuffle,
        }
    }

    /// Options from a resolved config: `seq_length` (dataset, else model), the tokenizer name
    /// (`tokenizer.tokenizer_model`: a local path's last component, else the HF id), the chat
    /// template override (`tokenizer.chat_template`, else the file `chat_template_path`), and
    /// `pad_to_max_length` when PP > 1 or EP > 1 (Megatron Bridge forces it there).
    pub fn from_config(cfg: &ConfigContainer) -> Result<Self> {
        let seq_length = cfg.dataset.seq_length.unwrap_or(cfg.model.seq_length);
        let name = match cfg.tokenizer.tokenizer_model.as_deref() {
            Some(m) if Path::new(m).exists() => Path::new(m)
                .canonicalize()
                .ok()
                .and_then(|p| {
                    let p = if p.is_file() { p.parent()?.to_path_buf() } else { p };
                    Some(p.file_name()?.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| m.to_string()),
            Some(m) => m.to_string(),
            None => "tokenizer".to_string(),
        };
        let chat_template = match (&cfg.tokenizer.chat_template, &cfg.tokenizer.chat_template_path)
        {
            (Some(t), _) => Some(t.clone()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("tokenizer.chat_template_path {p}: cannot read"))?,
            ),
            (None, None) => None,
        };
        let mut opts = SftBuildOptions::new(seq_length, name);
        opts.chat_template = chat_template;
        opts.pad_to_max_length =
            cfg.model.pipeline_model_parallel_size > 1 || cfg.model.expert_model_parallel_size > 1;
        // Batches padded so that context parallelism (2·CP chunks) and sequence parallelism
        // (TP·CP parts) split them evenly, as Megatron Bridge pads them.
        let (tp, cp) = (cfg.model.tensor_model_parallel_size, cfg.model.context_parallel_size);
        if cp > 1 {
            opts.pad_seq_length_to_mult = lcm(opts.pad_seq_length_to_mult, 2 * cp);
        }
        if cfg.model.sequence_parallel && tp > 1 {
            opts.pad_seq_length_to_mult = lcm(opts.pad_seq_length_to_mult, tp * cp);
        }
        Ok(opts)
    }
}

/// Tokenization settings resolved once per run.
pub struct SftTokenization<'a> {
    tok: &'a dyn Tokenizer,
    pc: PromptCompletionConfig,
    info: PcTokenInfo,
    chat: Option<ChatTemplate>,
    chat_mode: ChatLossMode,
    legacy: Option<LegacyTemplate>,
}

impl<'a> SftTokenization<'a> {
    /// Resolve `dataset.preprocessing` against `tok` (chat template: `override_template`, else
    /// the tokenizer's).
    pub fn new(
        cfg: &DatasetConfig,
        tok: &'a dyn Tokenizer,
        override_template: Option<&str>,
    ) -> Result<Self> {
        let pc = PromptCompletionConfig::resolve(&cfg.preprocessing)?;
        let chat_mode = ChatLossMode::parse(cfg.preprocessing.loss_mode.as_deref())?;
        let chat = match override_template.or(tok.chat_template()) {
            Some(src) => Some(ChatTemplate::new(src, tok)?),
            None => None,
        };
        let legacy = LegacyTemplate::from_kwargs(cfg.dataset_kwargs.as_ref())?;
        Ok(SftTokenization { tok, info: PcTokenInfo::new(tok)?, pc, chat, chat_mode, legacy })
    }

    /// Tokenize one row to at most `max_length` tokens (chat rows: `max_length + 1`).
    pub fn tokenize(&self, row: &SftRow, max_length: usize) -> Result<SftExample> {
        match row {
            SftRow::PromptCompletion { prompt, completion } => tokenize_prompt_completion(
                prompt, completion, &self.pc, &self.info, self.tok, max_length,
            ),
            SftRow::Chat { messages, tools, kwargs } => {
                let tmpl = self.chat.as_ref().context(
                    "chat row, but the tokenizer has no chat_template (set tokenizer.chat_template \
                     or use a tokenizer whose tokenizer_config.json has one)",
                )?;
                tokenize_chat(
                    messages,
                    tools.as_ref(),
                    kwargs,
                    tmpl,
                    self.tok,
                    self.chat_mode,
                    max_length,
                )
            }
        }
    }

    /// Read and tokenize every row of a JSONL file; errors name the file and line. With
    /// `dataset_kwargs.prompt_template`, non-chat rows go through the legacy template path.
    pub fn tokenize_file(&self, path: &Path, max_length: usize) -> Result<Vec<SftExample>> {
        let cols = Columns {
            prompt: self.pc.prompt_column.clone(),
            completion: self.pc.completion_column.clone(),
        };
        let rows = read_objects(path)?;
        ensure!(!rows.is_empty(), "{} has no rows", path.display());
        rows.iter()
            .map(|(line, obj)| {
                match &self.legacy {
                    Some(l) if !is_chat(obj) => l.process(obj, self.tok, &self.info, max_length),
                    _ => parse_row(obj, &cols).and_then(|row| self.tokenize(&row, max_length)),
                }
                .with_context(|| format!("{}:{line}", path.display()))
            })
            .collect()
    }
}

/// Tokenized rows of an unpacked split.
#[derive(Debug, Clone)]
pub struct SftDataset {
    /// The source file.
    pub path: PathBuf,
    /// Rows in file order.
    pub examples: Vec<SftExample>,
    /// `max_train_samples` mapping (index → row), if any.
    pub mapping: Option<Vec<usize>>,
    /// Collate settings.
    pub params: CollateParams,
}

/// Bins of a packed split.
#[derive(Debug, Clone)]
pub struct PackedSftDataset {
    /// The packed file.
    pub path: PathBuf,
    /// Bins in file order.
    pub bins: Vec<PackedBin>,
    /// The whole metadata list (train, then validation), as the reference collate uses it.
    pub metadata: Vec<PackingMetadata>,
    /// `max_train_samples` mapping (index → bin), if any.
    pub mapping: Option<Vec<usize>>,
    /// Collate settings.
    pub params: PackedParams,
}

/// One split: tokenized rows or packed bins.
#[derive(Debug, Clone)]
pub enum SftSplit {
    /// Padded per micro-batch.
    Unpacked(SftDataset),
    /// One bin per micro-batch row.
    Packed(PackedSftDataset),
}

/// A collated SFT micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub enum SftBatch {
    /// Padded rows with causal attention.
    Unpacked(Batch),
    /// Packed rows with THD boundaries.
    Packed(PackedBatch),
}

impl SftBatch {
    /// The flat tokens / labels / loss_mask / position_ids.
    pub fn batch(&self) -> &Batch {
        match self {
            SftBatch::Unpacked(b) => b,
            SftBatch::Packed(p) => &p.batch,
        }
    }
    /// The attention mask the model needs beyond causal: block-diagonal for packed batches
    /// (the dense equivalent of [`Self::cu_seqlens`]).
    pub fn attention_mask(&self, device: &Device) -> Result<Option<Tensor>> {
        match self {
            SftBatch::Unpacked(_) => Ok(None),
            SftBatch::Packed(p) => p.attention_mask(device).map(Some),
        }
    }
    /// THD offsets of packed batches for `Microbatch::cu_seqlens` (see
    /// [`PackedBatch::thd_cu_seqlens`]); None for unpacked ones (plain causal attention).
    pub fn cu_seqlens(&self) -> Result<Option<Vec<u32>>> {
        match self {
            SftBatch::Unpacked(_) => Ok(None),
            SftBatch::Packed(p) => p.thd_cu_seqlens().map(Some),
        }
    }
}

fn map_index(mapping: &Option<Vec<usize>>, i: usize) -> usize {
    mapping.as_ref().map_or(i, |m| m[i])
}

impl SftSplit {
    /// Samples (rows or bins; `max_train_samples` when set).
    pub fn len(&self) -> usize {
        match self {
            SftSplit::Unpacked(d) => d.mapping.as_ref().map_or(d.examples.len(), Vec::len),
            SftSplit::Packed(d) => d.mapping.as_ref().map_or(d.bins.len(), Vec::len),
        }
    }
    /// True when the split has no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Collate the samples of one micro-batch (`None` ⇒ a padding sample with zero loss), as
    /// [`crate::data::sampler::PretrainingSampler`] yields them.
    pub fn collate(&self, indices: &[Option<usize>]) -> Result<SftBatch> {
        let n = self.len();
        for i in indices.iter().flatten() {
            ensure!(*i < n, "sample index {i} out of range for a split of {n}");
        }
        match self {
            SftSplit::Unpacked(d) => {
                let rows: Vec<(&SftExample, bool)> = indices
                    .iter()
                    .map(|i| (&d.examples[i.map_or(0, |i| map_index(&d.mapping, i))], i.is_some()))
                    .collect();
                Ok(SftBatch::Unpacked(collate_unpacked(&rows, &d.params)?))
            }
            SftSplit::Packed(d) => {
                let bins: Vec<(&PackedBin, bool)> = indices
                    .iter()
                    .map(|i| (&d.bins[i.map_or(0, |i| map_index(&d.mapping, i))], i.is_some()))
                    .collect();
                Ok(SftBatch::Packed(collate_packed(&bins, &d.metadata, &d.params)?))
            }
        }
    }
}

/// The splits of a run; disabled splits are None.
#[derive(Debug, Clone)]
pub struct SftDatasets {
    /// `training.jsonl` (packed when packing is on).
    pub train: SftSplit,
    /// `validation.jsonl` when `do_validation`.
    pub valid: Option<SftSplit>,
    /// `test.jsonl` when `do_test` (never packed).
    pub test: Option<SftSplit>,
    /// The packed directory, when packing is on.
    pub packed_dir: Option<PathBuf>,
}

/// `max_train_samples` mapping: per-epoch `RandomState(seed)` shuffles of `0..n`, concatenated
/// and cut to `max` (the packed reference's scheme, seeded).
fn sample_mapping(n: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rng = RandomState::new(seed as u32);
    let mut out = Vec::with_capacity(max);
    while out.len() < max {
        let mut epoch: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut epoch);
        out.extend(epoch);
    }
    out.truncate(max);
    out
}

/// `dataset_kwargs.pad_to_max_length` (GPTSFTDataset's kwarg).
fn kwargs_pad_to_max(cfg: &DatasetConfig) -> Result<bool> {
    match cfg.dataset_kwargs.as_ref().and_then(|k| k.get("pad_to_max_length")) {
        None => Ok(false),
        Some(toml::Value::Boolean(b)) => Ok(*b),
        Some(v) => bail!("dataset.dataset_kwargs.pad_to_max_length must be a boolean, got {v}"),
    }
}

/// Build train / validation / test from `dataset.*` with tokenizer `tok`.
pub fn build_sft_datasets(
    cfg: &DatasetConfig,
    tok: &dyn Tokenizer,
    opts: &SftBuildOptions,
) -> Result<SftDatasets> {
    let root =
        PathBuf::from(cfg.dataset_root.as_deref().context("dataset.dataset_root is not set")?);
    ensure!(root.is_dir(), "dataset.dataset_root {} is not a directory", root.display());
    let train_path = root.join("training.jsonl");
    ensure!(
        train_path.is_file(),
        "{} not found: dataset_root must hold training.jsonl (and validation.jsonl / test.jsonl)",
        train_path.display()
    );
    let split_file = |on: bool, name: &str, flag: &str| -> Result<Option<PathBuf>> {
        if !on {
            return Ok(None);
        }
        let p = root.join(name);
        ensure!(
            p.is_file(),
            "{} not found (set dataset.{flag}=false to run without it)",
            p.display()
        );
        Ok(Some(p))
    };
    let valid_path = split_file(cfg.do_validation, "validation.jsonl", "do_validation")?;
    let test_path = split_file(cfg.do_test, "test.jsonl", "do_test")?;
    let tz = SftTokenization::new(cfg, tok, opts.chat_template.as_deref())?;
    let pad_to_max_length = opts.pad_to_max_length || kwargs_pad_to_max(cfg)?;
    let collate = CollateParams {
        max_seq_length: opts.seq_length,
        pad_to_max_length,
        pad_seq_length_to_mult: opts.pad_seq_length_to_mult,
        eos_id: tok.eod(),
    };
    let unpacked = |path: PathBuf| -> Result<SftSplit> {
        let examples = tz.tokenize_file(&path, opts.seq_length)?;
        Ok(SftSplit::Unpacked(SftDataset { path, examples, mapping: None, params: collate }))
    };
    let test = test_path.map(unpacked).transpose()?;
    let (mut train, valid, packed_dir) = if cfg.packing_enabled() {
        let (t, v, d) = build_packed(cfg, &tz, opts, &root, &train_path, valid_path.as_deref())?;
        (t, v, Some(d))
    } else {
        (unpacked(train_path)?, valid_path.map(unpacked).transpose()?, None)
    };
    if let Some(max) = cfg.max_train_samples {
        ensure!(max > 0, "dataset.max_train_samples must be positive");
        match &mut train {
            SftSplit::Unpacked(d) => {
                d.mapping = Some(sample_mapping(d.examples.len(), max, cfg.seed))
            }
            SftSplit::Packed(d) => d.mapping = Some(sample_mapping(d.bins.len(), max, cfg.seed)),
        }
    }
    Ok(SftDatasets { train, valid, test, packed_dir })
}

fn build_packed(
    cfg: &DatasetConfig,
    tz: &SftTokenization,
    opts: &SftBuildOptions,
    root: &Path,
    train_path: &Path,
    valid_path: Option<&Path>,
) -> Result<(SftSplit, Option<SftSplit>, PathBuf)> {
    let spec = cfg.packed_sequence_specs.clone().unwrap_or_default();
    let pack_size = spec.packed_sequence_size as usize;
    let max_seq_len = match spec.max_single_sequence_length {
        Some(m) => {
            ensure!(m > 0 && m <= pack_size, "packed_sequence_specs.max_single_sequence_length {m} must be in 1..={pack_size} (the pack size)");
            m
        }
        None => opts.seq_length.min(pack_size),
    };
    let k = spec.pad_seq_to_mult.max(1);
    let mut fp = serde_json::json!({
        "format": "mbridge-sft-packed-jsonl-v1",
        "seq_length": opts.seq_length,
        "seed": cfg.seed,
        "preprocessing_explicit": cfg.preprocessing != Default::default(),
        "preprocessing": serde_json::to_value(&cfg.preprocessing)?,
        "dataset_kwargs": serde_json::to_value(&cfg.dataset_kwargs)?,
        "max_single_sequence_length": max_seq_len,
        "packing_algorithm": serde_json::to_value(opts.packing_algorithm)?,
        "chat_template": opts.chat_template.as_deref().or(tz.tok.chat_template()),
        "vocab_size": tz.tok.vocab_size(),
        "eod": tz.tok.eod(),
        "training_sha256": store::file_sha256(train_path)?,
    });
    if let Some(v) = valid_path {
        fp["validation_sha256"] = store::file_sha256(v)?.into();
    }
    let tok_name = spec.tokenizer_model_name.clone().unwrap_or_else(|| opts.tokenizer_name.clone());
    let dir =
        root.join("packed").join(store::packed_dir_name(&tok_name, k, &store::fingerprint(&fp)));
    let paths = PackedPaths::new(
        &dir,
        pack_size,
        spec.packed_train_data_path.as_deref(),
        spec.packed_val_data_path.as_deref(),
        spec.packed_metadata_path.as_deref(),
    )?;
    let reusable = paths.train.is_file()
        && paths.metadata.is_file()
        && (valid_path.is_none() || paths.valid.is_file());
    let (train_bins, valid_bins, metadata) = if reusable {
        tracing::info!("reusing packed SFT data in {}", dir.display());
        let metadata = store::read_metadata(&paths.metadata)?;
        let valid = valid_path.map(|_| store::read_bins(&paths.valid)).transpose()?;
        (store::read_bins(&paths.train)?, valid, metadata)
    } else {
        let params = PackParams {
            pack_size,
            max_seq_len,
            pad_seq_to_mult: k,
            pad_id: tz.tok.eod(),
            seed: cfg.seed as u32,
            algorithm: opts.packing_algorithm,
        };
        let pack = |path: &Path| -> Result<(Vec<PackedBin>, PackingMetadata)> {
            let examples = tz.tokenize_file(path, max_seq_len)?;
            pack_examples(&examples, &params).with_context(|| format!("packing {}", path.display()))
        };
        let (tb, tm) = pack(train_path)?;
        let mut metadata = vec![tm];
        store::write_bins(&paths.train, &tb)?;
        let vb = match valid_path {
            Some(v) => {
                let (vb, vm) = pack(v)?;
                metadata.push(vm);
                store::write_bins(&paths.valid, &vb)?;
                Some(vb)
            }
            None => None,
        };
        // Metadata last: its presence marks a complete packing run.
        store::write_metadata(&paths.metadata, &metadata)?;
        tracing::info!("packed SFT data written to {}", dir.display());
        (tb, vb, metadata)
    };
    if train_bins.is_empty() {
        bail!("{}: no packed bins", paths.train.display());
    }
    let params = PackedParams {
        collate: CollateParams {
            max_seq_length: pack_size,
            pad_to_max_length: opts.pad_to_max_length || kwargs_pad_to_max(cfg)?,
            pad_seq_length_to_mult: opts.pad_seq_length_to_mult,
            eos_id: tz.tok.eod(),
        },
        pad_seq_to_mult: k,
        pad_cu_seqlens: spec.pad_cu_seqlens,
    };
    let split = |path: PathBuf, bins: Vec<PackedBin>| {
        SftSplit::Packed(PackedSftDataset {
            path,
            bins,
            metadata: metadata.clone(),
            mapping: None,
            params,
        })
    };
    let valid = valid_bins.map(|b| split(paths.valid.clone(), b));
    Ok((split(paths.train.clone(), train_bins), valid, dir))
}
