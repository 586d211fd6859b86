//! Writing a safetensors file in one streaming pass: tensors go from their own buffers (a
//! candle tensor's CPU storage, or byte ranges of a mapped source) to the file in large
//! writes, with no serialized copy of the file in memory. The calling thread checksums
//! (CRC-32C, hardware-accelerated) and checks each chunk while a writer thread writes the
//! previous one, and the file is fsynced once at the end.

use super::dtype::{convert_into, to_st};
use super::matrix::{Matrix, Piece};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};

/// Size and checksum of one written file, as a checkpoint index records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// File length in bytes.
    pub bytes: u64,
    /// CRC-32C (Castagnoli) of the whole file.
    pub crc32c: u32,
}

/// Where a tensor's bytes come from.
pub enum Data<'a> {
    /// A candle tensor; a contiguous CPU tensor is written straight from its storage.
    Tensor(Tensor),
    /// Byte ranges of elements of type `.1`, converted to the output dtype when it differs.
    Matrix(Matrix<'a>, DType),
}

/// Called once a tensor's bytes have been consumed (e.g. to release the source's pages).
pub type DoneHook<'a> = Box<dyn Fn() + Send + Sync + 'a>;

/// One tensor of a file being written.
pub struct OutTensor<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Data<'a>,
    pub done: Option<DoneHook<'a>>,
}

impl<'a> OutTensor<'a> {
    pub fn from_tensor(name: String, t: Tensor) -> Self {
        OutTensor {
            name,
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
            data: Data::Tensor(t),
            done: None,
        }
    }

    /// Bytes this tensor occupies in the file.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// How [`write_safetensors`] treats the data.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions<'m> {
    /// Refuse NaN/Inf in float tensors (checkpoints must never carry a diverged model).
    pub check_finite: bool,
    /// `__metadata__` of the header (transformers wants `{"format": "pt"}`).
    pub metadata: Option<&'m HashMap<String, String>>,
}

/// Pieces at least this large are handed to the writer thread without copying.
const DIRECT: usize = 1 << 20;
/// Borrowed data is checksummed and written in steps of this size, so checking one step
/// overlaps writing the previous one.
const STEP: usize = 4 << 20;
/// Large pieces are checked and checksummed in blocks of this size, which stay in cache.
const CACHE_BLOCK: usize = 128 << 10;
/// Small pieces (per-row slices, converted data, zeros) are gathered into buffers this large.
const BUF: usize = 4 << 20;

enum Chunk<'a> {
    Borrowed(&'a [u8]),
    /// Bytes of a read-only map, whose pages are released once written.
    Mapped(&'a [u8], &'a memmap2::Mmap),
    Owned(Vec<u8>),
    /// Tensor `i` is fully written: its `done` hook may release the source pages (only after
    /// the write, or the writer would fault them back in).
    Done(usize),
}

/// Writes `tensors` (in order) as a safetensors file at `path`, fsynced; returns its size and
/// CRC-32C. Errors name the file (and the tensor for NaN/Inf or a size mismatch).
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor],
    opts: WriteOptions,
) -> Result<FileInfo> {
    let head = header(tensors, opts.metadata)?;
    // CPU, contiguous copies only where a tensor is not already so; borrowed storage below.
    let cpu: Vec<Option<Tensor>> = tensors
        .iter()
        .map(|t| match &t.data {
            Data::Tensor(x) => Ok(Some(x.to_device(&Device::Cpu)?.contiguous()?)),
            Data::Matrix(..) => Ok(None),
        })
        .collect::<Result<_>>()?;
    let guards: Vec<_> = cpu.iter().map(|t| t.as_ref().map(|t| t.storage_and_layout())).collect();
    let file =
        fs::File::create(path).with_context(|| format!("cannot write `{}`", path.display()))?;
    let write_err = || format!("cannot write `{}`", path.display());
    let (info, file) = std::thread::scope(|s| -> Result<(FileInfo, fs::File)> {
        let (tx, rx) = sync_channel::<Chunk>(3);
        let writer = s.spawn(move || -> std::io::Result<fs::File> {
            let mut file = file;
            for chunk in rx {
                match chunk {
                    Chunk::Borrowed(b) => file.write_all(b)?,
                    Chunk::Mapped(b, map) => {
                        file.write_all(b)?;
                        let offset = b.as_ptr() as usize - map.as_ptr() as usize;
                        super::mmap::release(map, offset, b.len());
                    }
                    Chunk::Owned(b) => file.write_all(&b)?,
                    Chunk::Done(i) => {
                        if let Some(done) = &tensors[i].done {
                            done();
                        }
                    }
                }
            }
            Ok(file)
        });
        let mut out = Stream { tx: Some(tx), crc: 0, bytes: 0, buf: Vec::with_capacity(BUF) };
        let mut produced = out.owned(head);
        for (i, t) in tensors.iter().enumerate() {
            if produced.is_err() {
                break;
            }
            produced = (|| -> Result<()> {
                let check = opts.check_finite && t.dtype.is_float();
                let before = out.bytes + out.buf.len() as u64;
                match (&t.data, &guards[i]) {
                    (Data::Tensor(_), Some((storage, layout))) => {
                        match cpu_bytes(storage, layout) {
                            Some(b) => out.piece(Piece::Bytes(b, None), t, check)?,
                            None => {
                                let owned =
                                    safetensors::View::data(cpu[i].as_ref().expect("cpu copy"))
                                        .into_owned();
                                finite(&owned, t, check)?;
                                out.owned(owned)?;
                            }
                        }
                    }
                    (Data::Matrix(m, from), _) if *from == t.dtype => {
                        m.for_each_piece(&mut |p| out.piece(p, t, check))?
                    }
                    (Data::Matrix(m, from), _) => {
                        m.for_each_piece(&mut |p| out.converted(p, *from, t, check))?
                    }
                    (Data::Tensor(_), None) => unreachable!("tensors have CPU copies"),
                }
                let wrote = out.bytes + out.buf.len() as u64 - before;
                if wrote != t.byte_len() as u64 {
                    bail!(
                        "tensor `{}`: {wrote} bytes of data for shape {:?} {:?}",
                        t.name,
                        t.shape,
                        t.dtype
                    );
                }
                if t.done.is_some() {
                    // Bytes still in the buffer are copies; borrowed ones were queued before.
                    out.send(Chunk::Done(i))?;
                }
                Ok(())
            })();
        }
        if produced.is_ok() {
            produced = out.flush();
        }
        let (crc, bytes) = (out.crc, out.bytes);
        drop(out);
        let file = writer.join().map_err(|_| anyhow!("writer thread panicked"))?;
        // A failed write closes the channel, so the producer's error is then only a symptom.
        let file = file.with_context(write_err)?;
        produced?;
        Ok((FileInfo { bytes, crc32c: crc }, file))
    })?;
    file.sync_all().with_context(write_err)?;
    Ok(info)
}

struct Stream<'a> {
    tx: Option<SyncSender<Chunk<'a>>>,
    crc: u32,
    bytes: u64,
    buf: Vec<u8>,
}

impl<'a> Stream<'a> {
    fn send(&mut self, c: Chunk<'a>) -> Result<()> {
        let b: &[u8] = match &c {
            Chunk::Borrowed(b) | Chunk::Mapped(b, _) => b,
            Chunk::Owned(b) => b,
            Chunk::Done(_) => &[],
        };
        self.crc = crc32c::crc32c_append(self.crc, b);
        let len = b.len();
        self.sent(c, len)
    }

    /// Queues a chunk whose bytes the caller already added to the checksum.
    fn sent(&mut self, c: Chunk<'a>, len: usize) -> Result<()> {
        self.bytes += len as u64;
        let tx = self.tx.as_ref().expect("stream open");
        tx.send(c).map_err(|_| anyhow!("the writer stopped"))
    }

    fn owned(&mut self, v: Vec<u8>) -> Result<()> {
        self.flush()?;
        self.send(Chunk::Owned(v))
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(BUF));
        self.send(Chunk::Owned(full))
    }

    fn buffered(&mut self, b: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= BUF {
            self.flush()?;
        }
        Ok(())
    }

    fn piece(&mut self, p: Piece<'a>, t: &OutTensor, check: bool) -> Result<()> {
        match p {
            Piece::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(BUF);
                    self.buf.resize(self.buf.len() + k, 0);
                    n -= k;
                    if self.buf.len() >= BUF {
                        self.flush()?;
                    }
                }
                Ok(())
            }
            Piece::Bytes(b, map) if b.len() >= DIRECT => {
                self.flush()?;
                for step in b.chunks(STEP) {
                    // Checked and checksummed in cache-sized blocks: one pass over memory.
                    for block in step.chunks(CACHE_BLOCK) {
                        finite(block, t, check)?;
                        self.crc = crc32c::crc32c_append(self.crc, block);
                    }
                    let chunk = match map {
                        Some(map) => Chunk::Mapped(step, map),
                        None => Chunk::Borrowed(step),
                    };
                    self.sent(chunk, step.len())?;
                }
                Ok(())
            }
            Piece::Bytes(b, _) => {
                finite(b, t, check)?;
                self.buffered(b)
            }
        }
    }

    fn converted(&mut self, p: Piece<'a>, from: DType, t: &OutTensor, check: bool) -> Result<()> {
        match p {
            Piece::Zeros(n) => self.piece(
                Piece::Zeros(n / from.size_in_bytes() * t.dtype.size_in_bytes()),
                t,
                false,
            ),
            Piece::Bytes(b, map) => {
                let mut tmp = Vec::new();
                for step in b.chunks(BUF / 4 / from.size_in_bytes() * from.size_in_bytes()) {
                    tmp.clear();
                    convert_into(step, from, t.dtype, &mut tmp)
                        .with_context(|| format!("tensor `{}`", t.name))?;
                    finite(&tmp, t, check)?;
                    self.buffered(&tmp)?;
                    // Converted into a copy: the source pages are no longer needed.
                    if let (Some(map), true) = (map, step.len() >= DIRECT) {
                        let offset = step.as_ptr() as usize - map.as_ptr() as usize;
                        super::mmap::release(map, offset, step.len());
                    }
                }
                Ok(())
            }
        }
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        // Closing the channel ends the writer thread.
        self.tx.take();
    }
}

fn finite(b: &[u8], t: &OutTensor, check: bool) -> Result<()> {
    if check && !all_finite(t.dtype, b) {
        bail!("tensor `{}` holds NaN or Inf values; refusing to write it to a checkpoint", t.name);
    }
    Ok(())
}

/// The bytes of a contiguous CPU tensor, borrowed from its storage.
fn cpu_bytes<'s>(storage: &'s Storage, layout: &candle_core::Layout) -> Option<&'s [u8]> {
    let Storage::Cpu(cpu) = storage else { return None };
    let (s, e) = layout.contiguous_offsets()?;
    Some(match cpu {
        CpuStorage::U8(v) => &v[s..e],
        CpuStorage::U32(v) => bytemuck::cast_slice(&v[s..e]),
        CpuStorage::I64(v) => bytemuck::cast_slice(&v[s..e]),
        CpuStorage::BF16(v) => bytemuck::cast_slice(&v[s..e]),
        CpuStorage::F16(v) => bytemuck::cast_slice(&v[s..e]),
        CpuStorage::F32(v) => bytemuck::cast_slice(&v[s..e]),
        CpuStorage::F64(v) => bytemuck::cast_slice(&v[s..e]),
        _ => return None,
    })
}

/// The header: 8-byte length, then `{"__metadata__"?, name: {dtype, shape, data_offsets}}`
/// in tensor order, space-padded so the data starts 8-byte aligned.
fn header(tensors: &[OutTensor], metadata: Option<&HashMap<String, String>>) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    if let Some(m) = metadata {
        let sorted: std::collections::BTreeMap<_, _> = m.iter().collect();
        map.insert("__metadata__".into(), serde_json::to_value(sorted)?);
    }
    let mut offset = 0usize;
    for t in tensors {
        let len = t.byte_len();
        let dtype: Dtype = to_st(t.dtype).with_context(|| format!("tensor `{}`", t.name))?;
        let entry = serde_json::json!({
            "dtype": serde_json::to_value(dtype)?,
            "shape": t.shape,
            "data_offsets": [offset, offset + len],
        });
        if map.insert(t.name.clone(), entry).is_some() {
            bail!("tensor `{}` appears twice in one file", t.name);
        }
        offset += len;
    }
    let mut head = serde_json::to_vec(&map)?;
    while (head.len() + 8) % 8 != 0 {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    Ok(out)
}

/// Whether every element of a little-endian float buffer is finite (integers always are).
/// Works on 64-bit words (SWAR): a lane is NaN/Inf when its exponent bits are all ones.
pub fn all_finite(dtype: DType, data: &[u8]) -> bool {
    // (exponent mask per lane, lane width in bytes)
    let (exp, width) = match dtype {
        DType::F64 => (0x7FF0_0000_0000_0000u64, 8),
        DType::F32 => (0x7F80_0000, 4),
        DType::BF16 => (0x7F80, 2),
        DType::F16 => (0x7C00, 2),
        _ => return true,
    };
    let bits = 8 * width;
    let (mut mask, mut ones, mut highs) = (0u64, 0u64, 0u64);
    for lane in 0..8 / width {
        mask |= exp << (lane * bits);
        ones |= 1 << (lane * bits);
        highs |= 1 << (lane * bits + bits - 1);
    }
    // x has a zero lane exactly where a lane's exponent is all ones (the sign bit of each
    // lane of x is clear, so the classic has-zero-lane test is exact). Flags are OR-ed over
    // the aligned words without branching: a tight loop even in unoptimised builds.
    let (head, words, tail) = bytemuck::pod_align_to::<u8, u64>(data);
    if head.len() % width != 0 {
        // Not element-aligned in memory (never the case for tensor buffers): lane by lane.
        return data.chunks_exact(width).all(|c| {
            let mut lane = [0u8; 8];
            lane[..width].copy_from_slice(c);
            u64::from_le_bytes(lane) & exp != exp
        });
    }
    let mut flags = 0u64;
    for &w in words {
        let x = (u64::from_le(w) & mask) ^ mask;
        flags |= x.wrapping_sub(ones) & !x & highs;
    }
    if flags != 0 {
        return false;
    }
    // Unaligned ends, lane by lane (the head is a whole number of lanes: tensors start at
    // element boundaries of an element-aligned buffer).
    [head, tail].iter().all(|part| {
        part.chunks_exact(width).all(|c| {
            let mut lane = [0u8; 8];
            lane[..width].copy_from_slice(c);
            u64::from_le_bytes(lane) & exp != exp
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::st_read::MappedSafetensors;

    #[test]
    fn finite_checks_every_float_width() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(all_finite(DType::F32, &f32s[..4]));
        assert!(!all_finite(DType::F32, &f32s));
        let inf = f64::INFINITY.to_le_bytes();
        assert!(!all_finite(DType::F64, &inf));
        assert!(all_finite(DType::F64, &1e300f64.to_le_bytes()));
        let b = half::bf16::from_f32(f32::NEG_INFINITY).to_bits().to_le_bytes();
        assert!(!all_finite(DType::BF16, &b));
        let h = half::f16::from_f32(65504.0).to_bits().to_le_bytes();
        assert!(all_finite(DType::F16, &h));
        assert!(!all_finite(DType::F16, &half::f16::NAN.to_bits().to_le_bytes()));
        // Every lane position of a word, and the tail after the last whole word.
        for n in [4usize, 5, 9] {
            for bad in 0..n {
                let v: Vec<u8> = (0..n)
                    .flat_map(|i| {
                        let x = if i == bad { f32::INFINITY } else { -3.3e38 };
                        half::bf16::from_f32(x).to_bits().to_le_bytes()
                    })
                    .collect();
                assert!(!all_finite(DType::BF16, &v), "n={n} bad={bad}");
                let f: Vec<u8> = (0..n)
                    .flat_map(|i| if i == bad { f32::NAN } else { f32::MAX }.to_le_bytes())
                    .collect();
                assert!(!all_finite(DType::F32, &f), "n={n} bad={bad}");
            }
            let ok: Vec<u8> = (0..n).flat_map(|i| (-(i as f32) * 1e30).to_le_bytes()).collect();
            assert!(all_finite(DType::F32, &ok));
            // Data at any address: the aligned middle and both ends are checked.
            for (bad, pad) in (0..n).flat_map(|b| (0..8).map(move |p| (b, p))) {
                let mut buf = vec![0u8; pad];
                buf.extend((0..n + 8).flat_map(|i| {
                    if i == bad + 4 {
                        f32::INFINITY.to_le_bytes()
                    } else {
                        [0u8; 4]
                    }
                }));
                assert!(!all_finite(DType::F32, &buf[pad..]), "pad {pad} n={n} bad={bad}");
                assert!(all_finite(DType::F32, &buf[pad..pad + 4 * (bad + 4)]), "pad {pad}");
            }
        }
    }

    #[test]
    fn streamed_file_equals_the_safetensors_crate_and_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (300, 7), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., (3, 5), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        // A non-contiguous view, a large tensor written without a copy, a matrix with zeros
        // and a converted matrix.
        let big = Tensor::randn(0f32, 1., (1024, 512), &dev).unwrap();
        let at = a.t().unwrap();
        let src: Vec<u8> = b
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let m =
            Matrix::vcat(vec![Matrix::of_tensor(&src, &[3, 5], 2).unwrap(), Matrix::zeros(2, 10)])
                .unwrap();
        let tensors = vec![
            OutTensor::from_tensor("a_t".into(), at.clone()),
            OutTensor::from_tensor("big".into(), big.clone()),
            OutTensor {
                name: "padded".into(),
                dtype: DType::BF16,
                shape: vec![5, 5],
                data: Data::Matrix(m.clone(), DType::BF16),
                done: None,
            },
            OutTensor {
                name: "as_f32".into(),
                dtype: DType::F32,
                shape: vec![5, 5],
                data: Data::Matrix(m, DType::BF16),
                done: None,
            },
        ];
        let path = dir.path().join("x.safetensors");
        let info = write_safetensors(&path, &tensors, WriteOptions::default()).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(info, FileInfo { bytes: bytes.len() as u64, crc32c: crc32c::crc32c(&bytes) });
        let back = MappedSafetensors::open_verified(&path, &info).unwrap();
        let eq = |x: &Tensor, y: &Tensor| {
            let d = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap()).unwrap();
            d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
                == 0.0
        };
        assert!(eq(&back.tensor("a_t").unwrap(), &at));
        assert!(eq(&back.tensor("big").unwrap(), &big));
        let padded =
            Tensor::cat(&[&b, &Tensor::zeros((2, 5), DType::BF16, &dev).unwrap()], 0).unwrap();
        assert!(eq(&back.tensor("padded").unwrap(), &padded));
        assert_eq!(back.dtype("as_f32").unwrap(), DType::F32);
        assert!(eq(&back.tensor("as_f32").unwrap(), &padded));
        // The safetensors crate reads it too.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("big").unwrap().shape(), &[1024, 512]);
        // NaN refused when asked, naming the tensor; a corrupted file fails verification.
        let nan = Tensor::new(&[1f32, f32::NAN], &dev).unwrap();
        let opts = WriteOptions { check_finite: true, metadata: None };
        let err =
            write_safetensors(&path, &[OutTensor::from_tensor("w".into(), nan)], opts).unwrap_err();
        assert!(format!("{err:#}").contains("tensor `w` holds NaN"), "{err:#}");
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        fs::write(&path, &bad).unwrap();
        let err = MappedSafetensors::open_verified(&path, &info).err().unwrap();
        assert!(format!("{err:#}").contains("is corrupted"), "{err:#}");
    }
}
