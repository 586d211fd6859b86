//! Finding an HF model on disk: a local directory, or a repo id in the local Hugging Face cache
//! (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`, layout
//! `models--org--name/snapshots/<revision>/`, `refs/main` naming the revision).
//!
//! A repo id whose files are not all cached is downloaded into the first cache root with the
//! `hf-hub` crate ([`super::download`]) unless `HF_HUB_OFFLINE` is set; offline, or when the
//! Hub cannot be reached, the error lists the missing files and where it looked.

use anyhow::Result;
use std::path::{Path, PathBuf};

/// Where an HF model was found.
#[derive(Debug, Clone, PartialEq)]
pub struct HfSource {
    /// Directory holding config.json and the weights.
    pub dir: PathBuf,
    /// `org/name` when resolved through the cache.
    pub repo_id: Option<String>,
    /// Snapshot revision (commit hash) when resolved through the cache.
    pub revision: Option<String>,
}

/// The cache roots searched, in order.
pub fn cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(c) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        roots.push(PathBuf::from(c));
    }
    if let Some(h) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        roots.push(PathBuf::from(h).join("hub"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        roots.push(PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    roots.dedup();
    roots
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && !s.starts_with('.')
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `source`: an existing directory as is, else a repo id through the cache.
pub fn resolve(source: &str) -> Result<HfSource> {
    let path = Path::new(source);
    if path.exists() {
        if !path.is_dir() {
            return Err(crate::config_err!(
                "`{source}` is a file; expected an HF model directory (config.json + *.safetensors) or a repo id"
            )
            .into());
        }
        return Ok(HfSource { dir: path.to_path_buf(), repo_id: None, revision: None });
    }
    if !looks_like_repo_id(source) {
        return Err(crate::config_err!(
            "`{source}`: no such directory, and not a Hugging Face repo id (org/name)"
        )
        .into());
    }
    let roots = cache_roots();
    let folder = format!("models--{}", source.replace('/', "--"));
    let mut partial: Option<(PathBuf, Vec<String>)> = None;
    for root in &roots {
        let repo = root.join(&folder);
        if let Some((rev, dir)) = snapshot(&repo)? {
            let missing = missing_files(&dir)?;
            if missing.is_empty() {
                return Ok(HfSource {
                    dir,
                    repo_id: Some(source.to_string()),
                    revision: Some(rev),
                });
            }
            partial.get_or_insert((dir, missing));
        }
    }
    let looked: Vec<String> = roots.iter().map(|r| r.join(&folder).display().to_string()).collect();
    let looked = if looked.is_empty() {
        "(no cache directory: HF_HUB_CACHE, HF_HOME and HOME unset)".to_string()
    } else {
        looked.join(", ")
    };
    let missing = match &partial {
        Some((dir, files)) => format!("{} missing from {}", files.join(", "), dir.display()),
        None => "config.json and the safetensors weights".to_string(),
    };
    let advice = format!(
        "fetch it where the Hub is reachable (`huggingface-cli download {source}`) and copy the cache here, or pass a local directory"
    );
    if offline() {
        return Err(crate::config_err!(
            "`{source}` is not in the local Hugging Face cache ({missing}; looked in: {looked}) and HF_HUB_OFFLINE is set, so it is not downloaded: {advice}"
        )
        .into());
    }
    let Some(root) = roots.first() else {
        return Err(crate::config_err!("`{source}`: nowhere to download it ({looked})").into());
    };
    super::download::download(source, root).map_err(|e| {
        crate::config_err!(
            "`{source}` is not in the local Hugging Face cache ({missing}; looked in: {looked}) and downloading it failed: {e:#}. Without network: {advice}"
        )
        .into()
    })
}

/// Whether `HF_HUB_OFFLINE` forbids network access (huggingface_hub's truthy values).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Files an import needs that `dir` lacks: config.json and the weights (the single file, or
/// the index and every shard it names).
pub fn missing_files(dir: &Path) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    if !dir.join("config.json").is_file() {
        missing.push("config.json".to_string());
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| crate::config_err!("`{}` is not valid JSON ({e})", index.display()))?;
        let mut shards: Vec<&str> = doc["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        missing.extend(shards.into_iter().filter(|f| !dir.join(f).is_file()).map(String::from));
    } else if !dir.join("model.safetensors").is_file() {
        missing.push("model.safetensors (or model.safetensors.index.json and its shards)".into());
    }
    Ok(missing)
}

/// The snapshot of a cached repo: the revision `refs/main` names, else the only snapshot.
fn snapshot(repo: &Path) -> Result<Option<(String, PathBuf)>> {
    let snaps = repo.join("snapshots");
    if !snaps.is_dir() {
        return Ok(None);
    }
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let rev = rev.trim().to_string();
        let dir = snaps.join(&rev);
        if dir.is_dir() {
            return Ok(Some((rev, dir)));
        }
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(&snaps)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    all.sort();
    match all.len() {
        0 => Ok(None),
        1 => {
            let dir = all.remove(0);
            let rev = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
            Ok(Some((rev, dir)))
        }
        n => Err(crate::config_err!(
            "`{}` holds {n} snapshots and no refs/main naming one; pass the snapshot directory itself",
            snaps.display()
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        assert!(looks_like_repo_id("meta-llama/Meta-Llama-3-8B"));
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B"));
        assert!(!looks_like_repo_id("./local/dir"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("/abs"));
    }
}
