//! Reading HF safetensors weights one tensor at a time through mmap (`model.safetensors`, or
//! the shards a `model.safetensors.index.json` names), so import never holds the source model
//! in memory: tensors are byte ranges of the maps, released once written. Pickle checkpoints (`pytorch_model.bin`) are refused: loading them would execute
//! code from the file.

use crate::io::matrix::Matrix;
use crate::io::st_read::MappedSafetensors;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The weights of one HF model directory.
pub struct HfWeights {
    files: Vec<MappedSafetensors>,
    /// Tensor name → index of the file holding it.
    owner: BTreeMap<String, usize>,
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
        let mut maps = Vec::new();
        for f in &files {
            let one = MappedSafetensors::open(f)?;
            for name in one.names() {
                owner.insert(name.clone(), maps.len());
            }
            maps.push(one);
        }
        Ok(HfWeights { files: maps, owner })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.owner.keys().cloned().collect()
    }

    fn file(&self, name: &str) -> Result<&MappedSafetensors> {
        self.owner.get(name).map(|&i| &self.files[i]).ok_or_else(|| self.missing(name))
    }

    /// Shape of `name` from the file header, without reading the data.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let f = self.file(name)?;
        Ok(f.entry(name).expect("owner lists it").shape.clone())
    }

    /// Element type of `name` (an error names unsupported ones).
    pub fn dtype(&self, name: &str) -> Result<DType> {
        self.file(name)?.dtype(name)
    }

    /// `name` as a byte matrix borrowed from the map (no copy).
    pub fn matrix(&self, name: &str) -> Result<Matrix<'_>> {
        self.file(name)?.matrix(name)
    }

    /// Drops `name`'s pages from this process's memory once it has been written.
    pub fn release(&self, name: &str) {
        if let Ok(f) = self.file(name) {
            f.release(name);
        }
    }

    /// Reads one tensor onto the CPU in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let t = self.file(name)?.tensor(name)?;
        self.release(name);
        Ok(t)
    }

    fn missing(&self, name: &str) -> anyhow::Error {
        anyhow!("HF tensor `{name}` is missing from the safetensors files")
    }
}
