//! Megatron `.bin`/`.idx` indexed datasets (see `spec/indexed-dataset.md`).
//!
//! [`IndexedDataset`] memory-maps both files and decodes tokens on access (the `.idx` arrays
//! start at byte 34, so they are not aligned for a zero-copy cast). [`IndexedDatasetBuilder`]
//! reproduces `IndexedDatasetBuilder` / `_IndexWriter` byte for byte.
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;

/// The 9-byte magic at the start of every `.idx` file.
pub const IDX_MAGIC: &[u8; 9] = b"MMIDIDX\0\0";
/// The only `.idx` version Megatron writes and reads.
pub const IDX_VERSION: u64 = 1;
const HEADER_LEN: usize = 34;

/// Token dtypes of Megatron's `DType` enum; the discriminant is the on-disk code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    /// numpy uint8
    U8 = 1,
    /// numpy int8
    I8 = 2,
    /// numpy int16
    I16 = 3,
    /// numpy int32
    I32 = 4,
    /// numpy int64
    I64 = 5,
    /// numpy float64
    F64 = 6,
    /// numpy float32
    F32 = 7,
    /// numpy uint16
    U16 = 8,
}

impl DType {
    /// Decode an on-disk dtype code.
    pub fn from_code(code: u8) -> Option<DType> {
        Some(match code {
            1 => DType::U8,
            2 => DType::I8,
            3 => DType::I16,
            4 => DType::I32,
            5 => DType::I64,
            6 => DType::F64,
            7 => DType::F32,
            8 => DType::U16,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// `DType.optimal_dtype(vocab_size)`: uint16 below 65500 (Megatron's threshold), else int32.
    pub fn optimal(vocab_size: Option<usize>) -> DType {
        match vocab_size {
            Some(v) if v < 65500 => DType::U16,
            _ => DType::I32,
        }
    }

    /// Decode one little-endian element to i64 (floats truncate, as numpy's astype does).
    fn decode(self, b: &[u8]) -> i64 {
        match self {
            DType::U8 => b[0] as i64,
            DType::I8 => b[0] as i8 as i64,
            DType::I16 => i16::from_le_bytes([b[0], b[1]]) as i64,
            DType::U16 => u16::from_le_bytes([b[0], b[1]]) as i64,
            DType::I32 => i32::from_le_bytes(b[..4].try_into().unwrap()) as i64,
            DType::I64 => i64::from_le_bytes(b[..8].try_into().unwrap()),
            DType::F32 => f32::from_le_bytes(b[..4].try_into().unwrap()) as i64,
            DType::F64 => f64::from_le_bytes(b[..8].try_into().unwrap()) as i64,
        }
    }

    /// Encode one token, failing when it does not fit (numpy would silently wrap; we refuse).
    fn encode(self, v: i64, out: &mut Vec<u8>) -> Result<()> {
        let fits = |lo: i64, hi: i64| -> Result<()> {
            ensure!(v >= lo && v <= hi, "token id {v} does not fit dtype {self:?}");
            Ok(())
        };
        match self {
            DType::U8 => {
                fits(0, u8::MAX as i64)?;
                out.push(v as u8)
            }
            DType::I8 => {
                fits(i8::MIN as i64, i8::MAX as i64)?;
                out.push(v as i8 as u8)
            }
            DType::I16 => {
                fits(i16::MIN as i64, i16::MAX as i64)?;
                out.extend_from_slice(&(v as i16).to_le_bytes())
            }
            DType::U16 => {
                fits(0, u16::MAX as i64)?;
                out.extend_from_slice(&(v as u16).to_le_bytes())
            }
            DType::I32 => {
                fits(i32::MIN as i64, i32::MAX as i64)?;
                out.extend_from_slice(&(v as i32).to_le_bytes())
            }
            DType::I64 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&(v as f64).to_le_bytes()),
        }
        Ok(())
    }
}

/// `PREFIX.idx`
pub fn idx_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".idx");
    PathBuf::from(s)
}

/// `PREFIX.bin`
pub fn bin_path(prefix: &Path) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".bin");
    PathBuf::from(s)
}

fn map(path: &Path) -> Result<Option<Mmap>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if f.metadata()?.len() == 0 {
        // mmap of an empty file fails on some platforms; an empty .bin is legal.
        return Ok(None);
    }
    // Dataset files are not modified while training reads them (see `map_readonly`).
    let m = crate::io::mmap::map_readonly(&f)
        .with_context(|| format!("cannot mmap {}", path.display()))?;
    Ok(Some(m))
}

/// A memory-mapped Megatron indexed dataset.
pub struct IndexedDataset {
    prefix: PathBuf,
    dtype: DType,
    idx: Mmap,
    bin: Option<Mmap>,
    seq_count: usize,
    doc_count: usize,
    lengths: Vec<i32>,
}

impl std::fmt::Debug for IndexedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedDataset")
            .field("prefix", &self.prefix)
            .field("dtype", &self.dtype)
            .field("sequences", &self.seq_count)
            .finish()
    }
}

fn rd_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

impl IndexedDataset {
    /// Open `PREFIX.idx` and `PREFIX.bin`, validating header, sizes and invariants.
    pub fn open(prefix: impl AsRef<Path>) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        let (ip, bp) = (idx_path(&prefix), bin_path(&prefix));
        let idx = map(&ip)?.with_context(|| format!("{} is empty", ip.display()))?;
        let ctx = || format!("invalid index file {}", ip.display());
        ensure!(
            idx.len() >= HEADER_LEN,
            "{}: truncated header ({} bytes, need 34)",
            ctx(),
            idx.len()
        );
        if &idx[..9] != IDX_MAGIC {
            bail!("{}: wrong magic {:02x?}, expected MMIDIDX\\0\\0", ctx(), &idx[..9]);
        }
        let version = rd_u64(&idx, 9);
        ensure!(version == IDX_VERSION, "{}: version {version}, expected 1", ctx());
        let dtype = DType::from_code(idx[17])
            .with_context(|| format!("{}: unknown dtype code {}", ctx(), idx[17]))?;
        let seq_count = rd_u64(&idx, 18) as usize;
        let doc_count = rd_u64(&idx, 26) as usize;
        let need = (seq_count as u128) * 12 + (doc_count as u128) * 8 + HEADER_LEN as u128;
        ensure!(
            (idx.len() as u128) >= need,
            "{}: truncated: {} bytes, header promises {need} ({seq_count} sequences, {doc_count} document entries)",
            ctx(),
            idx.len()
        );
        let lengths: Vec<i32> = idx[HEADER_LEN..HEADER_LEN + 4 * seq_count]
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let bin = map(&bp)?;
        let ds = IndexedDataset { prefix, dtype, idx, bin, seq_count, doc_count, lengths };
        ensure!(doc_count >= 1, "{}: empty document index", ctx());
        let last = ds.document_index(doc_count - 1);
        ensure!(
            last as usize == seq_count,
            "{}: document_indices[-1]={last} but {seq_count} sequences",
            ctx()
        );
        let bin_len = ds.bin.as_ref().map_or(0, |m| m.len()) as u64;
        let expected: u64 =
            ds.lengths.iter().map(|&l| l as u64).sum::<u64>() * dtype.itemsize() as u64;
        if seq_count > 0 {
            let end = ds.pointer(seq_count - 1) as u64
                + ds.lengths[seq_count - 1] as u64 * dtype.itemsize() as u64;
            ensure!(
                end <= bin_len && expected == bin_len,
                "{} has {bin_len} bytes but {} expects {expected} ({:?} tokens)",
                bp.display(),
                ip.display(),
                dtype
            );
        }
        Ok(ds)
    }

    /// The path prefix (without extension).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }
    /// Token dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of sequences S.
    pub fn len(&self) -> usize {
        self.seq_count
    }
    /// True when there are no sequences.
    pub fn is_empty(&self) -> bool {
        self.seq_count == 0
    }
    /// Number of documents (`D - 1`).
    pub fn num_documents(&self) -> usize {
        self.doc_count - 1
    }
    /// Sequence lengths (copied out of the `.idx` once at open).
    pub fn sequence_lengths(&self) -> &[i32] {
        &self.lengths
    }
    /// Byte offset of sequence `i` in the `.bin`.
    pub fn pointer(&self, i: usize) -> i64 {
        let off = HEADER_LEN + 4 * self.seq_count + 8 * i;
        rd_u64(&self.idx, off) as i64
    }
    /// Entry `k` of the document-index array (length `D`).
    pub fn document_index(&self, k: usize) -> i64 {
        let off = HEADER_LEN + 12 * self.seq_count + 8 * k;
        rd_u64(&self.idx, off) as i64
    }
    /// All document-index entries.
    pub fn document_indices(&self) -> Vec<i64> {
        (0..self.doc_count).map(|k| self.document_index(k)).collect()
    }

    /// `get(idx, offset, length)`: tokens of sequence `idx` from `offset`, `length` items
    /// (to the end when None). Out-of-range requests and pointers past the `.bin` are errors.
    pub fn get(&self, idx: usize, offset: usize, length: Option<usize>) -> Result<Vec<i64>> {
        ensure!(
            idx < self.seq_count,
            "{}: sequence {idx} out of range ({} sequences)",
            self.prefix.display(),
            self.seq_count
        );
        let len = self.lengths[idx].max(0) as usize;
        let length = length.unwrap_or(len.saturating_sub(offset));
        ensure!(
            offset + length <= len,
            "{}: read of {length} tokens at offset {offset} past sequence {idx} ({len} tokens)",
            self.prefix.display()
        );
        let isz = self.dtype.itemsize();
        let start = self.pointer(idx) as usize + offset * isz;
        let bin: &[u8] = self.bin.as_deref().unwrap_or(&[]);
        let bytes = bin.get(start..start + length * isz).with_context(|| {
            format!(
                "{}: sequence {idx} points past the end of the .bin (corrupt .idx?)",
                self.prefix.display()
            )
        })?;
        Ok(bytes.chunks_exact(isz).map(|c| self.dtype.decode(c)).collect())
    }
}

/// Writer of `.bin`/`.idx` pairs with Megatron's `IndexedDatasetBuilder` semantics.
pub struct IndexedDatasetBuilder {
    bin: BufWriter<File>,
    bin_path: PathBuf,
    dtype: DType,
    lengths: Vec<i32>,
    doc_indices: Vec<i64>,
    buf: Vec<u8>,
}

impl IndexedDatasetBuilder {
    /// Create (truncate) the `.bin` file at `bin_path`.
    pub fn new(bin_path: impl AsRef<Path>, dtype: DType) -> Result<Self> {
        let bin_path = bin_path.as_ref().to_path_buf();
        let f = File::create(&bin_path)
            .with_context(|| format!("cannot create {}", bin_path.display()))?;
        Ok(Self {
            bin: BufWriter::new(f),
            bin_path,
            dtype,
            lengths: vec![],
            doc_indices: vec![0],
            buf: vec![],
        })
    }

    /// Token dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn write_tokens(&mut self, tokens: &[i64]) -> Result<()> {
        self.buf.clear();
        for &t in tokens {
            self.dtype
                .encode(t, &mut self.buf)
                .with_context(|| format!("writing {}", self.bin_path.display()))?;
        }
        self.bin
            .write_all(&self.buf)
            .with_context(|| format!("writing {}", self.bin_path.display()))
    }

    /// `add_item`: one sequence, not ending the document.
    pub fn add_item(&mut self, tokens: &[i64]) -> Result<()> {
        self.write_tokens(tokens)?;
        self.lengths.push(i32::try_from(tokens.len()).context("sequence longer than i32::MAX")?);
        Ok(())
    }

    /// `end_document`: close the current document.
    pub fn end_document(&mut self) {
        self.doc_indices.push(self.lengths.len() as i64);
    }

    /// `add_document`: all sequences of one document at once (`lengths` must sum to the token
    /// count).
    pub fn add_document(&mut self, tokens: &[i64], lengths: &[usize]) -> Result<()> {
        let total: usize = lengths.iter().sum();
        ensure!(
            total == tokens.len(),
            "add_document: lengths sum to {total} but {} tokens",
            tokens.len()
        );
        self.write_tokens(tokens)?;
        for &l in lengths {
            self.lengths.push(i32::try_from(l).context("sequence longer than i32::MAX")?);
        }
        self.end_document();
        Ok(())
    }

    /// `add_index`: append another dataset (same dtype), copying its `.bin` bytes verbatim.
    pub fn add_index(&mut self, prefix: impl AsRef<Path>) -> Result<()> {
        let other = IndexedDataset::open(prefix.as_ref())?;
        ensure!(
            other.dtype == self.dtype,
            "add_index: {} has dtype {:?}, builder has {:?}",
            prefix.as_ref().display(),
            other.dtype,
            self.dtype
        );
        let offset = self.lengths.len() as i64;
        self.lengths.extend_from_slice(other.sequence_lengths());
        self.doc_indices.extend(other.document_indices()[1..].iter().map(|d| d + offset));
        if let Some(b) = &other.bin {
            self.bin.write_all(b)?;
        }
        Ok(())
    }

    /// Flush the `.bin` and write the `.idx` at `idx_path`.
    pub fn finalize(mut self, idx_path: impl AsRef<Path>) -> Result<()> {
        self.bin.flush().with_context(|| format!("writing {}", self.bin_path.display()))?;
        let idx_path = idx_path.as_ref();
        let bytes = encode_index(self.dtype, &self.lengths, &self.doc_indices);
        std::fs::write(idx_path, bytes)
            .with_context(|| format!("cannot write {}", idx_path.display()))
    }
}

/// The exact `.idx` bytes for the given arrays (pointers derived as Megatron does).
pub fn encode_index(dtype: DType, lengths: &[i32], doc_indices: &[i64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 12 * lengths.len() + 8 * doc_indices.len());
    out.extend_from_slice(IDX_MAGIC);
    out.extend_from_slice(&IDX_VERSION.to_le_bytes());
    out.push(dtype as u8);
    out.extend_from_slice(&(lengths.len() as u64).to_le_bytes());
    out.extend_from_slice(&(doc_indices.len() as u64).to_le_bytes());
    for l in lengths {
        out.extend_from_slice(&l.to_le_bytes());
    }
    let mut ptr: i64 = 0;
    for l in lengths {
        out.extend_from_slice(&ptr.to_le_bytes());
        ptr += *l as i64 * dtype.itemsize() as i64;
    }
    for d in doc_indices {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_test_vector() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("v");
        let mut b = IndexedDatasetBuilder::new(bin_path(&prefix), DType::U16).unwrap();
        for d in [&[10i64, 11, 0][..], &[20, 21, 22, 23, 0], &[30, 0]] {
            b.add_document(d, &[d.len()]).unwrap();
        }
        b.finalize(idx_path(&prefix)).unwrap();
        let idx = std::fs::read(idx_path(&prefix)).unwrap();
        assert_eq!(idx.len(), 102);
        assert_eq!(&idx[..18], b"MMIDIDX\0\0\x01\0\0\0\0\0\0\0\x08");
        let bin = std::fs::read(bin_path(&prefix)).unwrap();
        let want: Vec<u8> =
            [10u16, 11, 0, 20, 21, 22, 23, 0, 30, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(bin, want);
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!((ds.pointer(1), ds.pointer(2)), (6, 16));
        assert_eq!(ds.get(1, 1, Some(2)).unwrap(), vec![21, 22]);
        assert!(ds.get(1, 4, Some(2)).is_err());
        assert!(ds.get(3, 0, None).is_err());
        // Sentence-split variant: S=4, D=4, 114 bytes.
        let idx = encode_index(DType::U16, &[3, 2, 3, 2], &[0, 1, 3, 4]);
        assert_eq!(idx.len(), 114);
        assert_eq!(DType::optimal(Some(50257)), DType::U16);
        assert_eq!(DType::optimal(Some(65500)), DType::I32);
        // Tokens that do not fit the dtype are refused rather than wrapped.
        let mut b = IndexedDatasetBuilder::new(dir.path().join("w.bin"), DType::U16).unwrap();
        assert!(b.add_item(&[70000]).is_err());
    }
}
