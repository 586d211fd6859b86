//! Packed SFT files on disk, under Megatron Bridge's naming:
//! `<dataset_root>/packed/<tok>_pad_seq_to_mult<k>_sft_<fp12>/{training,validation}_<P>.idx.jsonl`
//! and `<P>_metadata.jsonl` (a JSON list, train first, then validation).
//!
//! Format (mbridge's, instead of Parquet): one JSON object per line and per bin,
//! `{"input_ids": [i64…], "loss_mask": [0|1…], "seq_start_id": [usize…]}` — the Parquet
//! columns, in the same order as Parquet rows. Files are written atomically; the directory's
//! fingerprint covers everything that changes the bins (settings and the JSONL bytes), so a
//! matching directory is reused and any change packs into a new one. Explicit paths
//! (`packed_train_data_path`, `packed_val_data_path`, `packed_metadata_path`) are the user's:
//! written when missing, otherwise read as they are, whatever the fingerprint.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::packing::{PackedBin, PackingMetadata};
use crate::data::cache::write_atomic;

/// JSON with keys sorted at every level (Python's `json.dumps(sort_keys=True)`).
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        o => o.clone(),
    }
}

/// First 12 hex digits of sha256 over the compact, key-sorted JSON of `fields`.
pub fn fingerprint(fields: &Value) -> String {
    let text = serde_json::to_string(&canonical(fields)).expect("JSON values serialize");
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// sha256 hex of a file's bytes (part of the fingerprint, so edited data is repacked).
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// The packed-data directory name: `<tok>_pad_seq_to_mult<k>_sft_<fp12>` (`/` → `--`).
pub fn packed_dir_name(tokenizer_name: &str, pad_seq_to_mult: usize, fp12: &str) -> String {
    format!("{}_pad_seq_to_mult{pad_seq_to_mult}_sft_{fp12}", tokenizer_name.replace('/', "--"))
}

/// Paths of one packing run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedPaths {
    /// `training_<P>.idx.jsonl` (or `packed_train_data_path`).
    pub train: PathBuf,
    /// `validation_<P>.idx.jsonl` (or `packed_val_data_path`).
    pub valid: PathBuf,
    /// `<P>_metadata.jsonl` (or `packed_metadata_path`).
    pub metadata: PathBuf,
}

impl PackedPaths {
    /// Default paths inside `dir`, each replaced by an explicit path when given.
    pub fn new(
        dir: &Path,
        pack_size: usize,
        train: Option<&str>,
        valid: Option<&str>,
        metadata: Option<&str>,
    ) -> Result<Self> {
        let pick = |explicit: Option<&str>, default: String| -> Result<PathBuf> {
            let Some(p) = explicit else { return Ok(dir.join(default)) };
            let lower = p.to_ascii_lowercase();
            if lower.ends_with(".parquet") || lower.ends_with(".pq") || lower.ends_with(".npy") {
                bail!(
                    "{p}: mbridge stores packed SFT data as JSONL (`*.idx.jsonl`), not Parquet/.npy; \
                     point the path at a .jsonl file (it is created when missing)"
                );
            }
            Ok(PathBuf::from(p))
        };
        Ok(PackedPaths {
            train: pick(train, format!("training_{pack_size}.idx.jsonl"))?,
            valid: pick(valid, format!("validation_{pack_size}.idx.jsonl"))?,
            metadata: pick(metadata, format!("{pack_size}_metadata.jsonl"))?,
        })
    }
}

/// Write bins atomically as JSONL.
pub fn write_bins(path: &Path, bins: &[PackedBin]) -> Result<()> {
    let mut out = String::new();
    for b in bins {
        out.push_str(&serde_json::to_string(b).expect("bins serialize"));
        out.push('\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_atomic(path, out.as_bytes())
}

/// Read bins written by [`write_bins`]; errors name the file and line.
pub fn read_bins(path: &Path) -> Result<Vec<PackedBin>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read packed data {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: expected {{\"input_ids\": [...], \"loss_mask\": [...], \"seq_start_id\": [...]}}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Write the metadata list atomically.
pub fn write_metadata(path: &Path, meta: &[PackingMetadata]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_atomic(path, serde_json::to_string(meta).expect("metadata serializes").as_bytes())
}

/// Read the metadata list.
pub fn read_metadata(path: &Path) -> Result<Vec<PackingMetadata>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read packing metadata {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("{}: expected a JSON list of packing metadata objects", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_order_independent() {
        let a = serde_json::json!({"b": 1, "a": {"y": 2, "x": [1, 2]}});
        let b = serde_json::json!({"a": {"x": [1, 2], "y": 2}, "b": 1});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 12);
        assert_ne!(fingerprint(&a), fingerprint(&serde_json::json!({"b": 2})));
        assert_eq!(
            packed_dir_name("meta-llama/Llama-3", 2, "abc"),
            "meta-llama--Llama-3_pad_seq_to_mult2_sft_abc"
        );
        assert!(PackedPaths::new(Path::new("d"), 8, Some("x.parquet"), None, None).is_err());
    }
}
