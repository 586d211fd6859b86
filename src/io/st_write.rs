//! Writing a safetensors file in one streaming pass: tensors go from their own buffers (a
//! candle tensor's CPU storage, or byte ranges of a mapped source) to the file in large
//! writes, with no serialized copy of the file in memory. The calling thread checksums
//! (CRC-32C, hardware-accelerated) and checks each chunk while a writer thread writes the
//! previous one, and the file is fsynced once at the end.
//!
//! Large files are written with `O_DIRECT` where the filesystem allows it: the calling thread
//! copies each checked block into recycled page-aligned buffers and the writer hands them to
//! the disk without the kernel's copy into the page cache. On the 2-core benchmark machine that
//! copy (`copy_folio_from_iter_atomic`) was the whole cost of a buffered save, which reached
//! 530–640 MB/s where `dd oflag=direct` writes 2.1–2.6 GB/s (README, "Conversion and
//! checkpoint I/O"). Filesystems without `O_DIRECT` (tmpfs) get buffered writes.

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
/// Files at least this large are written with `O_DIRECT` (when the filesystem takes it).
const DIRECT_MIN_FILE: u64 = 16 << 20;
/// Size and alignment of the `O_DIRECT` buffers: a multiple of any logical block size.
const ALIGNED_BUF: usize = 8 << 20;
const ALIGN: usize = 4096;
/// `O_DIRECT` buffers in flight: one being filled, one being written, one spare.
const ALIGNED_BUFS: usize = 3;

/// A page-aligned buffer for `O_DIRECT` writes, carved out of a slightly larger `Vec` (whose
/// heap block does not move when the `Vec` does), so no `unsafe` allocation is needed.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new() -> Self {
        let raw = vec![0u8; ALIGNED_BUF + ALIGN];
        let start = (ALIGN - raw.as_ptr() as usize % ALIGN) % ALIGN;
        AlignedBuf { raw, start, len: 0 }
    }

    fn space(&self) -> usize {
        ALIGNED_BUF - self.len
    }

    fn push(&mut self, b: &[u8]) {
        let at = self.start + self.len;
        self.raw[at..at + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// The filled bytes, zero-padded to a whole number of `ALIGN` blocks.
    fn padded(&mut self) -> &[u8] {
        let end = self.len.next_multiple_of(ALIGN);
        self.raw[self.start + self.len..self.start + end].fill(0);
        &self.raw[self.start..self.start + end]
    }
}

enum Chunk<'a> {
    Borrowed(&'a [u8]),
    /// Bytes of a read-only map, whose pages are released once written.
    Mapped(&'a [u8], &'a memmap2::Mmap),
    Owned(Vec<u8>),
    /// Tensor `i` is fully written: its `done` hook may release the source pages (only after
    /// the write, or the writer would fault them back in).
    Done(usize),
    /// A full `O_DIRECT` buffer; the writer returns it for reuse.
    Aligned(AlignedBuf),
    /// The last, partly filled `O_DIRECT` buffer: written padded, then the file is cut back.
    AlignedLast(AlignedBuf),
}

/// Opens `path` for writing with `O_DIRECT` when the file is large enough and the filesystem
/// accepts the flag; `Ok(None)` means: write buffered.
fn create_direct(path: &Path, size: u64, min: u64) -> std::io::Result<Option<fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    // MBRIDGE_NO_DIRECT_IO: buffered writes everywhere, for a filesystem whose O_DIRECT is
    // slow or broken, and to compare both paths.
    if size < min || std::env::var_os("MBRIDGE_NO_DIRECT_IO").is_some() {
        return Ok(None);
    }
    let flags = nix::fcntl::OFlag::O_DIRECT.bits();
    match fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        // tmpfs and some FUSE filesystems refuse the flag at open.
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a whole aligned buffer to an `O_DIRECT` file. A filesystem that accepted the flag at
/// open but refuses the write (EINVAL) gets the rest of the file buffered, from the first byte
/// not yet written.
fn write_direct(file: &mut fs::File, mut b: &[u8]) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::io::{Error, ErrorKind};
    while !b.is_empty() {
        match file.write(b) {
            Ok(0) => return Err(Error::from(ErrorKind::WriteZero)),
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                let flags = OFlag::from_bits_truncate(fcntl(&*file, FcntlArg::F_GETFL)?);
                if !flags.contains(OFlag::O_DIRECT) {
                    return Err(e);
                }
                fcntl(&*file, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `tensors` (in order) as a safetensors file at `path`, fsynced; returns its size and
/// CRC-32C. Errors name the file (and the tensor for NaN/Inf or a size mismatch).
pub fn write_safetensors(
    path: &Path,
    tensors: &[OutTensor],
    opts: WriteOptions,
) -> Result<FileInfo> {
    write_file(path, tensors, opts, DIRECT_MIN_FILE).map(|(info, _)| info)
}

/// [`write_safetensors`] with `O_DIRECT` from `direct_min` bytes on; also says whether the
/// file was opened with `O_DIRECT`.
fn write_file(
    path: &Path,
    tensors: &[OutTensor],
    opts: WriteOptions,
    direct_min: u64,
) -> Result<(FileInfo, bool)> {
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
    let write_err = || format!("cannot write `{}`", path.display());
    let size = head.len() as u64 + tensors.iter().map(|t| t.byte_len() as u64).sum::<u64>();
    let (file, direct) = match create_direct(path, size, direct_min).with_context(write_err)? {
        Some(f) => (f, true),
        None => (fs::File::create(path).with_context(write_err)?, false),
    };
    let (info, file) = std::thread::scope(|s| -> Result<(FileInfo, fs::File)> {
        let (tx, rx) = sync_channel::<Chunk>(3);
        // Emptied O_DIRECT buffers go back to the producer (recycled: a fresh 8 MiB buffer
        // per step would cost page faults and zeroing on the scale of the copy it saves).
        let (free_tx, free_rx) = std::sync::mpsc::channel::<AlignedBuf>();
        let writer = s.spawn(move || -> std::io::Result<fs::File> {
            let mut file = file;
            let mut written = 0u64;
            for chunk in rx {
                match chunk {
                    Chunk::Aligned(mut b) => {
                        write_direct(&mut file, b.padded())?;
                        written += b.len as u64;
                        b.len = 0;
                        // The producer may have finished already: a dropped buffer is fine.
                        let _ = free_tx.send(b);
                    }
                    Chunk::AlignedLast(mut b) => {
                        write_direct(&mut file, b.padded())?;
                        written += b.len as u64;
                        file.set_len(written)?;
                    }
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
        let mut out = Stream {
            tx: Some(tx),
            crc: 0,
            bytes: 0,
            buf: Vec::new(),
            direct: direct.then(|| Direct {
                cur: None,
                spare: (0..ALIGNED_BUFS).map(|_| AlignedBuf::new()).collect(),
                free: free_rx,
            }),
        };
        let mut produced = out.owned(head);
        for (i, t) in tensors.iter().enumerate() {
            if produced.is_err() {
                break;
            }
            produced = (|| -> Result<()> {
                let check = opts.check_finite && t.dtype.is_float();
                let before = out.bytes + out.pending();
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
                let wrote = out.bytes + out.pending() - before;
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
            produced = out.finish();
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
    Ok((info, direct))
}

struct Stream<'a> {
    tx: Option<SyncSender<Chunk<'a>>>,
    crc: u32,
    bytes: u64,
    buf: Vec<u8>,
    /// Set when the file is open with `O_DIRECT`: every byte then goes through [`Self::copy`].
    direct: Option<Direct>,
}

struct Direct {
    /// The buffer being filled.
    cur: Option<AlignedBuf>,
    /// Buffers not yet used.
    spare: Vec<AlignedBuf>,
    /// Buffers the writer has emptied.
    free: std::sync::mpsc::Receiver<AlignedBuf>,
}

impl<'a> Stream<'a> {
    /// `O_DIRECT` mode: checksums `b` and copies it into aligned buffers, queueing each full
    /// one. (The bytes queued count when sent, so `bytes` + pending = bytes produced.)
    fn copy(&mut self, mut b: &[u8]) -> Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        while !b.is_empty() {
            let d = self.direct.as_mut().expect("direct mode");
            let cur = match &mut d.cur {
                Some(c) => c,
                None => {
                    let next = match d.spare.pop() {
                        Some(buf) => buf,
                        None => d.free.recv().map_err(|_| anyhow!("the writer stopped"))?,
                    };
                    d.cur.insert(next)
                }
            };
            let k = b.len().min(cur.space());
            cur.push(&b[..k]);
            b = &b[k..];
            if cur.space() == 0 {
                let full = d.cur.take().expect("current buffer");
                self.sent(Chunk::Aligned(full), ALIGNED_BUF)?;
            }
        }
        Ok(())
    }

    /// Bytes produced but not yet queued (they still count toward a tensor's length).
    fn pending(&self) -> u64 {
        let aligned = self.direct.as_ref().and_then(|d| d.cur.as_ref()).map_or(0, |c| c.len);
        (self.buf.len() + aligned) as u64
    }

    /// Queues whatever is still buffered, at the end of the file.
    fn finish(&mut self) -> Result<()> {
        match self.direct.as_mut().and_then(|d| d.cur.take()) {
            Some(last) => {
                let n = last.len;
                self.sent(Chunk::AlignedLast(last), n)
            }
            None => self.flush(),
        }
    }

    fn send(&mut self, c: Chunk<'a>) -> Result<()> {
        let b: &[u8] = match &c {
            Chunk::Borrowed(b) | Chunk::Mapped(b, _) => b,
            Chunk::Owned(b) => b,
            Chunk::Done(_) => &[],
            Chunk::Aligned(_) | Chunk::AlignedLast(_) => {
                unreachable!("aligned buffers are checksummed as they are filled")
            }
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
        if self.direct.is_some() {
            return self.copy(&v);
        }
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
        if self.direct.is_some() {
            return self.copy(b);
        }
        self.buf.extend_from_slice(b);
        if self.buf.len() >= BUF {
            self.flush()?;
        }
        Ok(())
    }

    fn piece(&mut self, p: Piece<'a>, t: &OutTensor, check: bool) -> Result<()> {
        match p {
            Piece::Zeros(mut n) if self.direct.is_some() => {
                const ZEROS: [u8; 4096] = [0; 4096];
                while n > 0 {
                    let k = n.min(ZEROS.len());
                    self.copy(&ZEROS[..k])?;
                    n -= k;
                }
                Ok(())
            }
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
            Piece::Bytes(b, map) if self.direct.is_some() => {
                for step in b.chunks(STEP) {
                    // Checked, checksummed and copied block by block while the block is in
                    // cache; the source pages are not needed after the copy.
                    for block in step.chunks(CACHE_BLOCK) {
                        finite(block, t, check)?;
                        self.copy(block)?;
                    }
                    if let Some(map) = map {
                        let offset = step.as_ptr() as usize - map.as_ptr() as usize;
                        super::mmap::release(map, offset, step.len());
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

    /// The `O_DIRECT` path (aligned buffers, padded last block cut back) writes the same bytes
    /// and checksum as the buffered one, for every kind of piece and a length that is not a
    /// multiple of the block size.
    #[test]
    fn direct_io_writes_the_same_file_as_buffered_writes() {
        // Beside the sources, not in /tmp, which may be a tmpfs without O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let dev = Device::Cpu;
        // 2.5 aligned buffers of f32 (and its transpose, written from a copy), plus odd-sized
        // neighbours.
        let big = Tensor::randn(0f32, 1., (3, 1_747_629), &dev).unwrap();
        let odd = Tensor::randn(0f32, 1., (37, 3), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let rows: Vec<u8> = (0..4 * 1000 * 3).map(|i| (i % 251) as u8 & 0x3f).collect();
        let m = Matrix::vcat(vec![
            Matrix::of_tensor(&rows, &[1000, 3], 4).unwrap(),
            Matrix::zeros(700_001, 12),
        ])
        .unwrap();
        let tensors = || {
            vec![
                OutTensor::from_tensor("odd".into(), odd.clone()),
                OutTensor::from_tensor("big_t".into(), big.t().unwrap()),
                OutTensor::from_tensor("big".into(), big.clone()),
                OutTensor {
                    name: "rows_and_zeros".into(),
                    dtype: DType::F32,
                    shape: vec![701_001, 3],
                    data: Data::Matrix(m.clone(), DType::F32),
                    done: None,
                },
                OutTensor {
                    name: "converted".into(),
                    dtype: DType::BF16,
                    shape: vec![701_001, 3],
                    data: Data::Matrix(m.clone(), DType::F32),
                    done: None,
                },
            ]
        };
        let opts = WriteOptions { check_finite: true, metadata: None };
        let (a, b) = (dir.path().join("direct"), dir.path().join("buffered"));
        let (da, direct) = write_file(&a, &tensors(), opts, 0).unwrap();
        assert!(direct, "O_DIRECT not used on {}", dir.path().display());
        let (db, direct) = write_file(&b, &tensors(), opts, u64::MAX).unwrap();
        assert!(!direct);
        let (x, y) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert!(x.len() % ALIGN != 0 && x.len() > 2 * ALIGNED_BUF, "{}", x.len());
        assert!(x == y, "direct and buffered files differ");
        assert_eq!(da, db);
        assert_eq!(da, FileInfo { bytes: x.len() as u64, crc32c: crc32c::crc32c(&x) });
        // NaN is refused on the direct path too, naming the tensor.
        let mut nan = vec![1f32; ALIGNED_BUF];
        nan[ALIGNED_BUF - 1] = f32::NAN;
        let nan = Tensor::new(nan.as_slice(), &dev).unwrap();
        let err = write_file(&a, &[OutTensor::from_tensor("w".into(), nan)], opts, 0).unwrap_err();
        assert!(format!("{err:#}").contains("tensor `w` holds NaN"), "{err:#}");
    }

    /// A write that `O_DIRECT` refuses (here: a misaligned buffer, EINVAL) is redone buffered,
    /// and the file stays buffered from then on.
    #[test]
    fn refused_direct_writes_fall_back_to_buffered_writes() {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        let mut f = create_direct(&path, 1, 0).unwrap().expect("O_DIRECT refused at open");
        let data: Vec<u8> = (0..3 * ALIGN).map(|i| (i % 253) as u8).collect();
        write_direct(&mut f, &data[1..ALIGN + 101]).unwrap();
        let flags = OFlag::from_bits_truncate(fcntl(&f, FcntlArg::F_GETFL).unwrap());
        assert!(!flags.contains(OFlag::O_DIRECT));
        write_direct(&mut f, &data[ALIGN + 101..]).unwrap();
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), &data[1..]);
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
