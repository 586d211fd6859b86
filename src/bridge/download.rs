//! Downloading a model repository from the Hugging Face Hub into the local cache with the
//! `hf-hub` crate (sync API over ureq + rustls): config.json, the safetensors weights and the
//! tokenizer files, laid out as huggingface_hub does (`models--org--name/snapshots/<sha>/`),
//! so the next import finds them offline. Pickle-only repos are refused before downloading.
//! `HF_ENDPOINT` (a mirror) and the token (`HF_TOKEN`, else the file `huggingface-cli login`
//! writes) are honoured as huggingface_hub does.
//!
//! `tests/bridge_download.rs` runs the binary against a local HTTP server that answers the
//! requests hf-hub makes (through `HF_ENDPOINT`), so the whole download path is tested without
//! network; only the TLS connection to huggingface.co itself is not.

use super::hub::HfSource;
use super::import::TOKENIZER_FILES;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// The files of a repo listing that an import needs, in download order.
pub fn select_files(repo_id: &str, files: &[String]) -> Result<Vec<String>> {
    let top: Vec<&String> = files.iter().filter(|f| !f.contains('/')).collect();
    if !top.iter().any(|f| *f == "config.json") {
        bail!("`{repo_id}` has no config.json at its top level");
    }
    let weights: Vec<&String> =
        top.iter().copied().filter(|f| f.ends_with(".safetensors")).collect();
    if weights.is_empty() {
        if top.iter().any(|f| f.ends_with(".bin")) {
            return Err(crate::config_err!(
                "`{repo_id}` holds only pickle weights (pytorch_model.bin); mbridge reads safetensors only, because loading pickle runs code from the file"
            )
            .into());
        }
        bail!("`{repo_id}` has no .safetensors weights");
    }
    let mut want = vec!["config.json".to_string()];
    if top.iter().any(|f| *f == "model.safetensors.index.json") {
        want.push("model.safetensors.index.json".into());
    }
    want.extend(weights.into_iter().cloned());
    want.extend(
        TOKENIZER_FILES.iter().filter(|t| top.iter().any(|f| f == *t)).map(|t| t.to_string()),
    );
    Ok(want)
}

/// Downloads what an import of `repo_id` needs into the cache root `cache` (`HF_TOKEN`
/// authenticates gated repos) and returns the snapshot directory.
pub fn download(repo_id: &str, cache: &Path) -> Result<HfSource> {
    // `ApiBuilder::new` reads neither HF_ENDPOINT nor HF_HOME (only `from_env` does, and it
    // ignores HF_HUB_CACHE), so both are applied here.
    let mut builder = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_token(token())
        .with_progress(true);
    if let Some(endpoint) = env("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    let api = builder.build().context("cannot set up the Hub client")?;
    let repo = api.model(repo_id.to_string());
    let info = repo.info().with_context(|| format!("cannot list the files of `{repo_id}`"))?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let mut dir = None;
    for f in select_files(repo_id, &names)? {
        let path = repo.get(&f).with_context(|| format!("cannot download `{f}` of `{repo_id}`"))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let dir = dir.context("nothing was downloaded")?;
    Ok(HfSource { dir, repo_id: Some(repo_id.to_string()), revision: Some(info.sha) })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

/// huggingface_hub's order: `HF_TOKEN`, else the file at `HF_TOKEN_PATH`, else `$HF_HOME/token`
/// (`~/.cache/huggingface/token`), which `huggingface-cli login` writes.
fn token() -> Option<String> {
    if let Some(t) = env("HF_TOKEN") {
        return Some(t);
    }
    let path = env("HF_TOKEN_PATH").map(std::path::PathBuf::from).or_else(|| {
        env("HF_HOME")
            .map(std::path::PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))
            .map(|d| d.join("token"))
    })?;
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selects_config_weights_and_tokenizer_files() {
        let files = v(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "original/consolidated.00.pth",
            "tokenizer.json",
            "tokenizer_config.json",
        ]);
        assert_eq!(
            select_files("a/b", &files).unwrap(),
            v(&[
                "config.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
            ])
        );
        let pickle = select_files("a/b", &v(&["config.json", "pytorch_model.bin"])).unwrap_err();
        assert!(format!("{pickle}").contains("pickle"), "{pickle}");
        assert!(select_files("a/b", &v(&["model.safetensors"])).is_err());
    }
}
