//! `preprocess-data`: JSONL or plain text → Megatron `.bin/.idx` per JSON key, tokenized in
//! parallel with document order preserved (indexed-dataset.md §4).
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use super::indexed::{DType, IndexedDatasetBuilder};
use super::tokenizer::Tokenizer;

/// How input lines are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// `.txt` ⇒ Text, anything else ⇒ Jsonl.
    Auto,
    /// One JSON object per line; each key of `json_keys` is a string or a list of sentences.
    Jsonl,
    /// One document per line (the output key is the first of `json_keys`).
    Text,
}

/// Settings of one preprocessing run (Megatron's `tools/preprocess_data.py` arguments).
#[derive(Debug, Clone)]
pub struct PreprocessConfig {
    /// Input file.
    pub input: PathBuf,
    /// Input format.
    pub input_format: InputFormat,
    /// JSON keys to extract; each produces `{output_prefix}_{key}_document.bin/.idx`.
    pub json_keys: Vec<String>,
    /// Output path prefix.
    pub output_prefix: String,
    /// Append the tokenizer's EOD to every non-empty document.
    pub append_eod: bool,
    /// Tokenization threads.
    pub workers: usize,
    /// Log a progress line every this many documents (0 = never).
    pub log_interval: usize,
    /// Skip (and count) lines that fail to parse instead of failing the run.
    pub skip_bad_lines: bool,
    /// Draw an indicatif progress bar.
    pub show_progress: bool,
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessReport {
    /// Documents written (per key; the same for every key).
    pub documents: usize,
    /// Lines skipped with `skip_bad_lines`.
    pub skipped_lines: usize,
    /// Input bytes read.
    pub bytes: u64,
    /// Tokens written per key, in `json_keys` order.
    pub tokens: Vec<u64>,
    /// Output prefixes (without extension), in `json_keys` order.
    pub outputs: Vec<String>,
    /// Token dtype used.
    pub dtype: DType,
}

/// One document per key: flattened ids and sentence lengths.
type Encoded = Vec<(Vec<i64>, Vec<usize>)>;

fn encode_line(
    line: &str,
    fmt: InputFormat,
    keys: &[String],
    tok: &dyn Tokenizer,
    eod: bool,
) -> Result<Encoded> {
    let texts: Vec<Vec<String>> = match fmt {
        InputFormat::Text => vec![vec![line.to_string()]],
        _ => {
            let v: serde_json::Value = serde_json::from_str(line).context("invalid JSON")?;
            keys.iter()
                .map(|k| match v.get(k) {
                    Some(serde_json::Value::String(s)) => Ok(vec![s.clone()]),
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_str()
                                .map(str::to_string)
                                .context("sentence list holds a non-string")
                        })
                        .collect(),
                    Some(other) => bail!(
                        "key {k:?} holds {}, expected a string or a list of strings",
                        kind(other)
                    ),
                    None => bail!("key {k:?} missing"),
                })
                .collect::<Result<_>>()?
        }
    };
    texts
        .iter()
        .map(|sentences| {
            let mut ids = Vec::new();
            let mut lens = Vec::new();
            for s in sentences {
                let t = tok.encode(s)?;
                if !t.is_empty() {
                    lens.push(t.len());
                    ids.extend(t);
                }
            }
            if eod && !ids.is_empty() {
                ids.push(tok.eod());
                *lens.last_mut().expect("non-empty ids imply a sentence") += 1;
            }
            Ok((ids, lens))
        })
        .collect()
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Object(_) => "an object",
        _ => "a value",
    }
}

/// Output files written under temporary names; removed on drop unless committed.
struct PendingOutput {
    tmp: Vec<(PathBuf, PathBuf)>,
    committed: bool,
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if !self.committed {
            for (tmp, _) in &self.tmp {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

fn path_with(prefix: &str, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{prefix}{suffix}"))
}

/// Run preprocessing with `tok`. On any error no output file is left behind.
pub fn preprocess(cfg: &PreprocessConfig, tok: &dyn Tokenizer) -> Result<PreprocessReport> {
    ensure!(!cfg.json_keys.is_empty(), "--json-keys needs at least one key");
    ensure!(cfg.workers > 0, "--workers must be at least 1");
    let fmt = match cfg.input_format {
        InputFormat::Auto if cfg.input.extension().is_some_and(|e| e == "txt") => InputFormat::Text,
        InputFormat::Auto => InputFormat::Jsonl,
        f => f,
    };
    let keys: Vec<String> =
        if fmt == InputFormat::Text { cfg.json_keys[..1].to_vec() } else { cfg.json_keys.clone() };
    let file = File::open(&cfg.input)
        .with_context(|| format!("cannot open input {}", cfg.input.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::with_capacity(1 << 20, file);
    if let Some(dir) = Path::new(&cfg.output_prefix).parent().filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output dir {}", dir.display()))?;
    }
    let dtype = DType::optimal(Some(tok.vocab_size()));
    let outputs: Vec<String> =
        keys.iter().map(|k| format!("{}_{k}_document", cfg.output_prefix)).collect();
    let tag = format!(".tmp{}", std::process::id());
    let mut pending = PendingOutput { tmp: vec![], committed: false };
    let mut builders = Vec::new();
    for out in &outputs {
        let (bin, idx) = (path_with(out, ".bin"), path_with(out, ".idx"));
        let (tbin, tidx) =
            (path_with(out, &format!(".bin{tag}")), path_with(out, &format!(".idx{tag}")));
        pending.tmp.push((tbin.clone(), bin));
        pending.tmp.push((tidx, idx));
        builders.push(IndexedDatasetBuilder::new(&tbin, dtype)?);
    }
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(cfg.workers).build().context("thread pool")?;
    let bar = if cfg.show_progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg}")
            .expect("static template is valid"),
    );
    let start = Instant::now();
    let (mut docs, mut skipped, mut bytes, mut lineno) = (0usize, 0usize, 0u64, 0usize);
    let mut tokens = vec![0u64; keys.len()];
    let mut next_log = cfg.log_interval;
    let mut raw = Vec::new();
    loop {
        // A batch of lines, tokenized in parallel; results come back in input order.
        let mut batch: Vec<(usize, String)> = Vec::with_capacity(4096);
        let mut batch_bytes = 0usize;
        while batch.len() < 4096 && batch_bytes < (8 << 20) {
            raw.clear();
            let n = reader
                .read_until(b'\n', &mut raw)
                .with_context(|| format!("reading {}", cfg.input.display()))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            bytes += n as u64;
            batch_bytes += n;
            let text = match std::str::from_utf8(&raw) {
                Ok(s) => s.trim_end_matches(['\n', '\r']).to_string(),
                Err(e) if cfg.skip_bad_lines => {
                    tracing::warn!(
                        "{}:{lineno}: skipped: invalid UTF-8 ({e})",
                        cfg.input.display()
                    );
                    skipped += 1;
                    continue;
                }
                Err(e) => bail!("{}:{lineno}: invalid UTF-8: {e}", cfg.input.display()),
            };
            if fmt == InputFormat::Jsonl && text.trim().is_empty() {
                continue;
            }
            batch.push((lineno, text));
        }
        if batch.is_empty() {
            break;
        }
        let encoded: Vec<Result<Encoded>> = pool.install(|| {
            batch.par_iter().map(|(_, l)| encode_line(l, fmt, &keys, tok, cfg.append_eod)).collect()
        });
        for ((ln, _), enc) in batch.iter().zip(encoded) {
            let enc = match enc {
                Ok(e) => e,
                Err(e) if cfg.skip_bad_lines => {
                    tracing::warn!("{}:{ln}: skipped: {e:#}", cfg.input.display());
                    skipped += 1;
                    continue;
                }
                Err(e) => bail!(
                    "{}:{ln}: {e:#} (use --skip-bad-lines to skip such lines)",
                    cfg.input.display()
                ),
            };
            for (k, (ids, lens)) in enc.iter().enumerate() {
                builders[k].add_document(ids, lens)?;
                tokens[k] += ids.len() as u64;
            }
            docs += 1;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(bytes);
        bar.set_message(format!(
            "{docs} docs, {:.0} docs/s, {:.2} MB/s",
            docs as f64 / secs,
            bytes as f64 / 1e6 / secs
        ));
        if cfg.log_interval > 0 && docs >= next_log {
            tracing::info!(
                "processed {docs} documents ({:.0} docs/s, {:.2} MB/s)",
                docs as f64 / secs,
                bytes as f64 / 1e6 / secs
            );
            next_log = docs + cfg.log_interval;
        }
    }
    for (k, b) in builders.into_iter().enumerate() {
        b.finalize(&pending.tmp[2 * k + 1].0)?;
    }
    for (tmp, fin) in &pending.tmp {
        std::fs::rename(tmp, fin)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), fin.display()))?;
    }
    pending.committed = true;
    bar.finish_and_clear();
    Ok(PreprocessReport { documents: docs, skipped_lines: skipped, bytes, tokens, outputs, dtype })
}
