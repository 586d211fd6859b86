//! Reading HF safetensors weights one tensor at a time through mmap (`model.safetensors`, or
//! the shards a `model.safetensors.index.json` names), so import never holds the source model
//! in memory. Pickle checkpoints (`pytorch_model.bin`) are refused: loading them would execute
//! code from the file.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The weights of one HF model directory.
pub struct HfWeights {
    files: MmapedSafetensors,
    /// Tensor name → file holding it.
    owner: BTreeMap<String, PathBuf>,
}

const INDEX: &str = "model.safetensors.index.json";

impl HfWeights {
    /// Opens `dir/model.safetensors` or the shards of `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join(INDEX);
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read `{}`", index.display()))?;
            let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                anyhow!(
                    "`{}` is not valid JSON ({e}); expected {{\"weight_map\": {{name: file}}}}",
                    index.display()
                )
            })?;
            let map = doc.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                anyhow!(
                    "`{}`: expected a `weight_map` object of tensor name → shard file",
                    index.display()
                )
            })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!("`{}`: weight_map[{name:?}] must be a file name", index.display())
                })?;
                let path = dir.join(file);
                if !path.is_file() {
                    bail!(
                        "`{}` names shard `{file}` (for `{name}`), which does not exist",
                        index.display()
                    );
                }
                if !files.contains(&path) {
                    files.push(path);
                }
            }
            files
        } else if single.is_file() {
            vec![single]
        } else if dir.join("pytorch_model.bin").is_file()
            || dir.join("pytorch_model.bin.index.json").is_file()
        {
            return Err(crate::config_err!(
                "`{}` holds only pickle weights (pytorch_model.bin); mbridge reads safetensors only, because loading pickle runs code from the file — convert them with transformers' save_pretrained(safe_serialization=True)",
                dir.display()
            )
            .into());
        } else {
            bail!("`{}` has no model.safetensors or {INDEX}", dir.display());
        };
        let mut owner = BTreeMap::new();
        for f in &files {
            // SAFETY: the mapping is read-only and lives as long as `HfWeights`; a file changed
            // under us while importing can only corrupt the values read, as with any reader.
            let one = unsafe { MmapedSafetensors::new(f) }.with_context(|| {
                format!("`{}` is not a valid safetensors file (truncated or corrupt?)", f.display())
            })?;
            for (name, _) in one.tensors() {
                owner.insert(name, f.clone());
            }
        }
        // SAFETY: as above.
        let files = unsafe { MmapedSafetensors::multi(&files) }
            .context("cannot map the safetensors shards")?;
        Ok(HfWeights { files, owner })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.owner.keys().cloned().collect()
    }

    /// Shape of `name` from the file header, without reading the data.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let view = self.files.get(name).map_err(|_| self.missing(name))?;
        Ok(view.shape().to_vec())
    }

    /// Reads one tensor onto the CPU in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        if !self.owner.contains_key(name) {
            return Err(self.missing(name));
        }
        self.files.load(name, &Device::Cpu).with_context(|| {
            format!("cannot read tensor `{name}` from `{}`", self.owner[name].display())
        })
    }

    fn missing(&self, name: &str) -> anyhow::Error {
        anyhow!("HF tensor `{name}` is missing from the safetensors files")
    }
}
