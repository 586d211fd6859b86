//! Reading safetensors files through a read-only map: the header is parsed (and validated by
//! the `safetensors` crate), tensors are byte ranges of the map, and pages a streaming reader
//! is done with are released so RSS stays bounded whatever the file size.

use super::dtype::from_st;
use super::matrix::Matrix;
use super::mmap::{map_readonly, release};
use super::st_write::FileInfo;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One tensor's header entry, with absolute byte offsets into the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A mapped safetensors file.
pub struct MappedSafetensors {
    path: PathBuf,
    map: Mmap,
    entries: BTreeMap<String, Entry>,
}

/// Bytes read per step while verifying a checksum.
const VERIFY_CHUNK: usize = 8 << 20;

impl MappedSafetensors {
    /// Maps `path` and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open `{}`", path.display()))?;
        let map =
            map_readonly(&file).with_context(|| format!("cannot map `{}`", path.display()))?;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
            anyhow!(
                "`{}` is not a valid safetensors file ({e}); expected an 8-byte header length, a JSON header and the tensor data (truncated or corrupt?)",
                path.display()
            )
        })?;
        let base = 8 + n;
        let entries = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (s, e) = info.data_offsets;
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + s,
                    end: base + e,
                };
                (name, entry)
            })
            .collect();
        Ok(MappedSafetensors { path: path.to_path_buf(), map, entries })
    }

    /// Maps a checkpoint shard after checking its length and CRC-32C against the index.
    pub fn open_verified(path: &Path, expected: &FileInfo) -> Result<Self> {
        verify_file(path, expected)?;
        Self::open(path)
            .with_context(|| format!("cannot parse checkpoint shard `{}`", path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    fn get(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| anyhow!("`{}` has no tensor `{name}`", self.path.display()))
    }

    /// The candle type of `name`, or an error naming the file, tensor and type.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let e = self.get(name)?;
        from_st(e.dtype).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` in `{}` has dtype {:?}, which mbridge does not support (BF16, F16, F32, F64, U8, U32, I64 are)",
                self.path.display(),
                e.dtype
            )
        })
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.get(name)?;
        Ok(&self.map[e.start..e.end])
    }

    /// `name` as a byte matrix (rows = its first dimension).
    pub fn matrix(&self, name: &str) -> Result<Matrix<'_>> {
        let e = self.get(name)?;
        Matrix::of_mapped(self.bytes(name)?, &self.map, &e.shape, e.dtype.bitsize() / 8)
            .with_context(|| format!("tensor `{name}` in `{}`", self.path.display()))
    }

    /// `name` copied into a CPU tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let dtype = self.dtype(name)?;
        let e = self.get(name)?;
        Tensor::from_raw_buffer(self.bytes(name)?, dtype, &e.shape, &Device::Cpu)
            .with_context(|| format!("cannot read tensor `{name}` from `{}`", self.path.display()))
    }

    /// Drops `name`'s pages from RSS (see [`release`]).
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            release(&self.map, e.start, e.end - e.start);
        }
    }

    /// Drops all of the file's pages from RSS.
    pub fn release_all(&self) {
        release(&self.map, 0, self.map.len());
    }
}

/// Checks a checkpoint shard's length and CRC-32C against the index (one sequential read).
pub fn verify_file(path: &Path, expected: &FileInfo) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read checkpoint shard `{}`", path.display()))?
        .len();
    if len != expected.bytes {
        bail!(
            "checkpoint shard `{}` has {len} bytes, the index records {} (truncated or overwritten)",
            path.display(),
            expected.bytes
        );
    }
    // Plain reads into one buffer: cheaper than faulting a map in and out again.
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot read checkpoint shard `{}`", path.display()))?;
    let mut buf = vec![0u8; VERIFY_CHUNK];
    let mut crc = 0;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)
            .with_context(|| format!("cannot read checkpoint shard `{}`", path.display()))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
    if crc != expected.crc32c {
        bail!(
            "checkpoint shard `{}` is corrupted: its CRC-32C is {crc:#010x}, the index records {:#010x}",
            path.display(),
            expected.crc32c
        );
    }
    Ok(())
}
