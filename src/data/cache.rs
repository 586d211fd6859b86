//! Index cache files: NumPy `.npy` (format 1.0) arrays named `{md5}-{Class}-{split}-{what}.npy`
//! beside a `-description.txt`, as megatron-core lays them out (gpt-dataset.md §8).
//!
//! mbridge hashes its own description JSON (Megatron's embeds Python tokenizer identifiers that
//! cannot be reproduced), and reuses a cache only when the stored description is identical, so a
//! cache written by another configuration is rebuilt, never silently reused.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use md5::{Digest, Md5};
use memmap2::Mmap;

/// Element types the index caches use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<i2`
    I16,
    /// `<i4`
    I32,
    /// `<u4`
    U32,
    /// `<i8`
    I64,
}

impl NpyDtype {
    fn descr(self) -> &'static str {
        match self {
            NpyDtype::I16 => "<i2",
            NpyDtype::I32 => "<i4",
            NpyDtype::U32 => "<u4",
            NpyDtype::I64 => "<i8",
        }
    }
    fn size(self) -> usize {
        match self {
            NpyDtype::I16 => 2,
            NpyDtype::I32 | NpyDtype::U32 => 4,
            NpyDtype::I64 => 8,
        }
    }
}

/// A read-only `.npy` payload inside a memory map (shared page cache across ranks, as
/// megatron-core's `numpy.load(mmap_mode="r")`).
#[derive(Clone)]
pub struct MappedArray {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
    dtype: NpyDtype,
}

impl std::fmt::Debug for MappedArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedArray({:?} x {})", self.dtype, self.len)
    }
}

impl MappedArray {
    fn get(&self, i: usize) -> i64 {
        let sz = self.dtype.size();
        let b = &self.map[self.start + i * sz..self.start + (i + 1) * sz];
        match self.dtype {
            NpyDtype::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            NpyDtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i64,
            NpyDtype::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i64,
            NpyDtype::I64 => i64::from_le_bytes(b.try_into().unwrap()),
        }
    }
}

/// A typed index array as stored in a `.npy` cache: owned in its narrow dtype while being
/// built, memory-mapped once it is cached.
#[derive(Debug, Clone)]
pub enum IndexVec {
    /// `<i2`
    I16(Vec<i16>),
    /// `<i4`
    I32(Vec<i32>),
    /// `<u4`
    U32(Vec<u32>),
    /// `<i8`
    I64(Vec<i64>),
    /// A memory-mapped cache array.
    Mapped(MappedArray),
}

impl PartialEq for IndexVec {
    /// Equal when the values are equal, whatever the storage.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && (0..self.len()).all(|i| self.get(i) == other.get(i))
    }
}

impl IndexVec {
    /// An empty array of `dtype` with room for `cap` items.
    pub fn with_capacity(dtype: NpyDtype, cap: usize) -> Self {
        match dtype {
            NpyDtype::I16 => IndexVec::I16(Vec::with_capacity(cap)),
            NpyDtype::I32 => IndexVec::I32(Vec::with_capacity(cap)),
            NpyDtype::U32 => IndexVec::U32(Vec::with_capacity(cap)),
            NpyDtype::I64 => IndexVec::I64(Vec::with_capacity(cap)),
        }
    }
    /// Append (the caller picked a dtype wide enough, as megatron-core does).
    pub fn push(&mut self, v: i64) {
        match self {
            IndexVec::I16(x) => x.push(v as i16),
            IndexVec::I32(x) => x.push(v as i32),
            IndexVec::U32(x) => x.push(v as u32),
            IndexVec::I64(x) => x.push(v),
            // Only freshly built (owned) arrays are appended to.
            IndexVec::Mapped(_) => unreachable!("push on a memory-mapped cache array"),
        }
    }
    /// Element `i` widened to i64.
    pub fn get(&self, i: usize) -> i64 {
        match self {
            IndexVec::I16(x) => x[i] as i64,
            IndexVec::I32(x) => x[i] as i64,
            IndexVec::U32(x) => x[i] as i64,
            IndexVec::I64(x) => x[i],
            IndexVec::Mapped(m) => m.get(i),
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            IndexVec::I16(x) => x.len(),
            IndexVec::I32(x) => x.len(),
            IndexVec::U32(x) => x.len(),
            IndexVec::I64(x) => x.len(),
            IndexVec::Mapped(m) => m.len,
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All elements widened to i64.
    pub fn to_i64(&self) -> Vec<i64> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
    /// The element dtype.
    pub fn dtype(&self) -> NpyDtype {
        match self {
            IndexVec::I16(_) => NpyDtype::I16,
            IndexVec::I32(_) => NpyDtype::I32,
            IndexVec::U32(_) => NpyDtype::U32,
            IndexVec::I64(_) => NpyDtype::I64,
            IndexVec::Mapped(m) => m.dtype,
        }
    }
}

/// Serialize a C-order array of `shape` as `.npy` v1.0 bytes (same header text and 64-byte
/// alignment as `numpy.save`).
pub fn npy_bytes(values: &IndexVec, shape: &[usize]) -> Vec<u8> {
    let dtype = values.dtype();
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header =
        format!("{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}", dtype.descr(), shape_s);
    let pad = 64 - ((10 + header.len() + 1) % 64);
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + values.len() * dtype.size());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match values {
        IndexVec::I16(x) => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        IndexVec::I32(x) => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        IndexVec::U32(x) => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        IndexVec::I64(x) => x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        IndexVec::Mapped(m) => {
            out.extend_from_slice(&m.map[m.start..m.start + m.len * dtype.size()]);
        }
    }
    out
}

/// Parse a `.npy` header: dtype, shape and the byte offset of the data (checked for size).
fn parse_npy(b: &[u8], path: &Path) -> Result<(NpyDtype, Vec<usize>, usize)> {
    ensure!(b.len() >= 10 && &b[..6] == b"\x93NUMPY", "{} is not a .npy file", path.display());
    let (hlen, hstart) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            ensure!(b.len() >= 12, "{}: truncated header", path.display());
            (u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize, 12)
        }
        v => bail!("{}: unsupported .npy version {v}", path.display()),
    };
    ensure!(b.len() >= hstart + hlen, "{}: truncated header", path.display());
    let header = std::str::from_utf8(&b[hstart..hstart + hlen]).context("npy header not UTF-8")?;
    let dtype = [NpyDtype::I16, NpyDtype::I32, NpyDtype::U32, NpyDtype::I64]
        .into_iter()
        .find(|d| header.contains(&format!("'descr': '{}'", d.descr())))
        .with_context(|| format!("{}: unsupported dtype in header {header}", path.display()))?;
    ensure!(
        header.contains("'fortran_order': False"),
        "{}: Fortran order unsupported",
        path.display()
    );
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .with_context(|| format!("{}: no shape in header", path.display()))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{}: bad shape {shape_txt}", path.display()))?;
    let count: usize = shape.iter().product();
    let data = b.len() - hstart - hlen;
    ensure!(
        data == count * dtype.size(),
        "{}: {data} data bytes, shape {shape:?} needs {}",
        path.display(),
        count * dtype.size()
    );
    Ok((dtype, shape, hstart + hlen))
}

/// Read a `.npy` file of one of [`NpyDtype`] into memory; returns values and shape.
pub fn read_npy(path: &Path) -> Result<(IndexVec, Vec<usize>)> {
    let b = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (dtype, shape, off) = parse_npy(&b, path)?;
    let chunks = b[off..].chunks_exact(dtype.size());
    let vals = match dtype {
        NpyDtype::I16 => IndexVec::I16(chunks.map(|c| i16::from_le_bytes([c[0], c[1]])).collect()),
        NpyDtype::I32 => {
            IndexVec::I32(chunks.map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect())
        }
        NpyDtype::U32 => {
            IndexVec::U32(chunks.map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect())
        }
        NpyDtype::I64 => {
            IndexVec::I64(chunks.map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
        }
    };
    Ok((vals, shape))
}

/// Memory-map a `.npy` file (values are decoded on access).
pub fn map_npy(path: &Path) -> Result<(IndexVec, Vec<usize>)> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // Cache files are written once under a temporary name and renamed into place, never
    // modified afterwards (see `map_readonly`).
    let map = crate::io::mmap::map_readonly(&f)
        .with_context(|| format!("cannot mmap {}", path.display()))?;
    let (dtype, shape, start) = parse_npy(&map, path)?;
    let len = shape.iter().product();
    Ok((IndexVec::Mapped(MappedArray { map: Arc::new(map), start, len, dtype }), shape))
}

/// Write `bytes` to `path` through a temporary name and a rename, so readers never see a
/// partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().ok();
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}

/// Pretty JSON with 4-space indent, like `json.dumps(..., indent=4)`.
pub fn describe(value: &serde_json::Value) -> String {
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    serde::Serialize::serialize(value, &mut ser).expect("JSON values always serialize");
    String::from_utf8(buf).expect("serde_json writes UTF-8")
}

/// Hex md5 of a description.
pub fn md5_hex(s: &str) -> String {
    let d = Md5::digest(s.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The file names of one cached object: `{dir}/{md5}-{class}-{split}-{suffix}`.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    dir: PathBuf,
    base: String,
    description: String,
}

impl CacheEntry {
    /// A cache entry for `description` in `dir`.
    pub fn new(dir: &Path, class: &str, split: &str, description: String) -> Self {
        let base = format!("{}-{class}-{split}", md5_hex(&description));
        CacheEntry { dir: dir.to_path_buf(), base, description }
    }

    /// Full path of `{base}-{suffix}`.
    pub fn path(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}-{suffix}", self.base))
    }

    /// True when the description file exists with identical text and all `arrays` exist.
    pub fn is_valid(&self, arrays: &[&str]) -> bool {
        let Ok(text) = std::fs::read_to_string(self.path("description.txt")) else {
            return false;
        };
        text == self.description && arrays.iter().all(|a| self.path(&format!("{a}.npy")).is_file())
    }

    /// Write all arrays, then the description last (it marks the entry complete).
    pub fn store(&self, arrays: &[(&str, Vec<u8>)]) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create cache dir {}", self.dir.display()))?;
        for (name, bytes) in arrays {
            write_atomic(&self.path(&format!("{name}.npy")), bytes)?;
        }
        write_atomic(&self.path("description.txt"), self.description.as_bytes())
    }

    /// Load one array of the entry.
    pub fn load(&self, name: &str) -> Result<(IndexVec, Vec<usize>)> {
        read_npy(&self.path(&format!("{name}.npy")))
    }

    /// Memory-map one array of the entry.
    pub fn load_mapped(&self, name: &str) -> Result<(IndexVec, Vec<usize>)> {
        map_npy(&self.path(&format!("{name}.npy")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_roundtrip_and_header() {
        let v = IndexVec::I32(vec![1, 2, 3, 4, 5, 6]);
        let b = npy_bytes(&v, &[3, 2]);
        assert_eq!((b.len() - 24) % 64, 0);
        assert!(std::str::from_utf8(&b[10..74])
            .unwrap()
            .starts_with("{'descr': '<i4', 'fortran_order': False, 'shape': (3, 2), }"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_atomic(&p, &b).unwrap();
        assert_eq!(read_npy(&p).unwrap(), (v.clone(), vec![3, 2]));
        let (m, shape) = map_npy(&p).unwrap();
        assert!(matches!(m, IndexVec::Mapped(_)));
        assert_eq!((m.to_i64(), shape), (vec![1, 2, 3, 4, 5, 6], vec![3, 2]));
        assert_eq!(npy_bytes(&m, &[3, 2]), b);
        std::fs::write(&p, &b[..b.len() - 1]).unwrap();
        assert!(map_npy(&p).is_err());
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
