//! NCCL backend (`cuda` builds): collectives and point-to-point transfers of CUDA tensors
//! through cudarc's NCCL bindings, one NCCL communicator per process group.
//!
//! The NCCL unique id is created by the group's rank 0 and handed to the other members over
//! the group's CPU transport (the TCP rendezvous). Operations run on the candle device's
//! stream, so they are ordered with the kernels that produced their inputs; a group made with
//! [`NcclGroup::on_side_stream`] runs them on a stream of its own instead, which waits for the
//! compute stream's work so far and is waited for by [`Communicator::join_compute`]. Tensors
//! on the CPU (loss sums, exit agreement, hashes) go through the CPU group, as Megatron's gloo
//! groups do.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::result as nccl_result;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp as NcclOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Device, Result, Shape, Storage, Tensor};

use super::{Communicator, CpuGroup, ReduceOp};

/// An NCCL communicator (raw pointer inside) made shareable: every use holds the lock, so
/// one NCCL call at a time enqueues on the stream, as NCCL requires per communicator.
struct SharedComm(Mutex<Comm>);

// SAFETY: the communicator is only touched under the mutex; NCCL allows a communicator to be
// used from any thread as long as calls are not concurrent.
unsafe impl Send for SharedComm {}
unsafe impl Sync for SharedComm {}

/// One process group over NCCL for CUDA tensors, over its CPU group for the rest.
pub struct NcclGroup {
    cpu: CpuGroup,
    comm: Arc<SharedComm>,
    device: CudaDevice,
    /// The stream of the communicator when it is not the device's (compute) stream.
    side: Option<Arc<CudaStream>>,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclGroup({})", self.cpu.describe())
    }
}

fn nccl_err(what: impl std::fmt::Display, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what}: {e:?}"))
}

impl NcclGroup {
    /// Creates the group's NCCL communicator on `device`: every member must call this (in the
    /// same group order); rank 0 of the group makes the id and broadcasts it over `cpu`.
    pub fn new(cpu: CpuGroup, device: &Device) -> Result<Self> {
        Self::with_stream(cpu, device, false)
    }

    /// Like [`Self::new`], with the collectives on a new stream of their own, so they run
    /// while the compute stream goes on (megatron-core's gradient reduction overlapped with
    /// backward). Each collective first waits for the compute stream's work enqueued so far;
    /// its output is ready for the compute stream after [`Communicator::join_compute`], and
    /// the caller keeps its input alive until then. Candle's compute stream is the calling
    /// thread's per-thread stream: use such a group from the training thread only.
    pub fn on_side_stream(cpu: CpuGroup, device: &Device) -> Result<Self> {
        Self::with_stream(cpu, device, true)
    }

    fn with_stream(cpu: CpuGroup, device: &Device, side: bool) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            candle_core::bail!("NCCL group {}: device {device:?} is not CUDA", cpu.describe());
        };
        let what = format!("{} init", cpu.describe());
        let raw: Vec<u8> = if cpu.rank() == 0 {
            let id = Id::new().map_err(|e| nccl_err(&what, e))?;
            id.internal().iter().map(|c| *c as u8).collect()
        } else {
            vec![0u8; 128]
        };
        let t = Tensor::from_vec(raw, 128, &Device::Cpu)?;
        let got = cpu.broadcast(&t, 0)?.to_vec1::<u8>()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(got) {
            *d = s as std::ffi::c_char;
        }
        let side = if side {
            // cudarc's event tracking is off (`prepare_for_training`), so creating a second
            // stream adds no events to the compute stream's launches; the joins order them.
            // The highest priority: when a compute kernel retires, the collective's blocks
            // are scheduled before the next compute kernel fills the GPU again.
            let ctx = dev.cuda_stream().context().clone();
            let s = ctx.bind_to_thread().and_then(|_| {
                let (_, greatest) =
                    candle_core::cuda_backend::cudarc::driver::result::stream::get_priority_range(
                    )?;
                ctx.new_stream_with_priority(greatest)
            });
            Some(s.map_err(|e| nccl_err(format!("{what}: side stream"), e))?)
        } else {
            None
        };
        let stream = side.clone().unwrap_or_else(|| dev.cuda_stream());
        let comm = Comm::from_rank(stream, cpu.rank(), cpu.size(), Id::uninit(internal))
            .map_err(|e| nccl_err(&what, e))?;
        Ok(Self { cpu, comm: Arc::new(SharedComm(Mutex::new(comm))), device: dev.clone(), side })
    }

    /// A side-stream group reads only contiguous inputs: a copy made here would be freed on
    /// the compute stream while the side stream still reads it.
    fn check_side_input(&self, t: &Tensor, op: &str) -> Result<()> {
        if self.side.is_some() && !t.is_contiguous() {
            candle_core::bail!(
                "{}: {op} on the side stream needs a contiguous input",
                self.describe()
            );
        }
        Ok(())
    }

    fn on_gpu(&self, t: &Tensor) -> bool {
        matches!(t.device(), Device::Cuda(_))
    }

    /// The communicator, for one NCCL call (which is progress for the watchdog). A side
    /// stream first waits for the compute stream's work so far (the producers of the input,
    /// the allocation of the output).
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Comm>> {
        crate::parallel::watchdog::beat();
        if let Some(side) = &self.side {
            side.join(&self.device.cuda_stream())
                .map_err(|e| nccl_err(format!("{}: side stream wait", self.describe()), e))?;
        }
        Ok(self.comm.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A contiguous CUDA tensor's elements as a slice copy-free view, typed.
fn with_slice<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(candle_core::cuda_backend::cudarc::driver::CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(c) = &*storage else { candle_core::bail!("NCCL: tensor is not on CUDA") };
    let slice = c.as_cuda_slice::<T>()?;
    let start = layout.start_offset();
    let n = layout.shape().elem_count();
    f(slice.slice(start..start + n))
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let st = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    Tensor::from_storage(st, shape, BackpropOp::none(), false)
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $T:ident, $body:block) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            other => candle_core::bail!("NCCL: dtype {other:?} is not supported"),
        }
    };
}

fn alloc<
    T: CudaDType
        + NcclType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(n)
}

impl Communicator for NcclGroup {
    fn rank(&self) -> usize {
        self.cpu.rank()
    }

    fn size(&self) -> usize {
        self.cpu.size()
    }

    fn describe(&self) -> String {
        format!("{} (NCCL)", self.cpu.describe())
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if !self.on_gpu(t) || self.size() == 1 {
            return self.cpu.all_reduce(t, op);
        }
        self.check_side_input(t, "all_reduce")?;
        let nop = match op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Max => NcclOp::Max,
        };
        let n = t.elem_count();
        by_dtype!(t.dtype(), T, {
            let mut out = alloc::<T>(&self.device, n)?;
            with_slice::<T, _>(t, |src| {
                self.lock()?
                    .all_reduce(&src, &mut out, &nop)
                    .map_err(|e| nccl_err(self.describe(), e))?;
                Ok(())
            })?;
            Ok(wrap(out, &self.device, t.shape().clone()))
        })
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if !self.on_gpu(t) || self.size() == 1 {
            return self.cpu.all_gather(t, dim);
        }
        self.check_side_input(t, "all_gather")?;
        if dim >= t.rank() {
            candle_core::bail!(
                "{}: all_gather dim {dim} out of range for {:?}",
                self.describe(),
                t.dims()
            );
        }
        let n = t.elem_count();
        let size = self.size();
        // NCCL stacks the members' buffers: gather along a new leading dim, then move the
        // members next to `dim` and merge.
        let stacked = by_dtype!(t.dtype(), T, {
            let mut out = alloc::<T>(&self.device, n * size)?;
            with_slice::<T, _>(t, |src| {
                self.lock()?
                    .all_gather(&src, &mut out)
                    .map_err(|e| nccl_err(self.describe(), e))?;
                Ok(())
            })?;
            let mut dims = vec![size];
            dims.extend_from_slice(t.dims());
            wrap(out, &self.device, dims)
        });
        if dim == 0 {
            // A view: nothing runs on the compute stream, so a side stream's gather stays in
            // flight until `join_compute`.
            let mut dims = t.dims().to_vec();
            dims[0] *= size;
            return stacked.reshape(dims);
        }
        // Only collectives over dim 0 stay in flight on a side stream: the concatenation
        // below reads the output on the compute stream.
        self.join_compute()?;
        let parts: Vec<Tensor> = (0..size).map(|r| stacked.get(r)).collect::<Result<_>>()?;
        Tensor::cat(&parts, dim)
    }

    fn reduce_scatter(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if !self.on_gpu(t) || self.size() == 1 {
            return self.cpu.reduce_scatter(t, dim);
        }
        let size = self.size();
        if dim >= t.rank() || !t.dim(dim)?.is_multiple_of(size) {
            candle_core::bail!(
                "{}: reduce_scatter dim {dim} of {:?} does not split into {size} equal chunks",
                self.describe(),
                t.dims()
            );
        }
        // NCCL scatters contiguous chunks of the flat buffer: bring `dim` to the front first.
        let front = if dim == 0 { t.clone() } else { t.transpose(0, dim)?.contiguous()? };
        let n = front.elem_count() / size;
        let mut chunk_dims = front.dims().to_vec();
        chunk_dims[0] /= size;
        self.check_side_input(t, "reduce_scatter")?;
        let out = by_dtype!(t.dtype(), T, {
            let mut out = alloc::<T>(&self.device, n)?;
            with_slice::<T, _>(&front, |src| {
                self.lock()?
                    .reduce_scatter(&src, &mut out, &NcclOp::Sum)
                    .map_err(|e| nccl_err(self.describe(), e))?;
                Ok(())
            })?;
            wrap(out, &self.device, chunk_dims)
        });
        if dim == 0 {
            Ok(out)
        } else {
            self.join_compute()?;
            out.transpose(0, dim)?.contiguous()
        }
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if !self.on_gpu(t) || self.size() == 1 {
            return self.cpu.broadcast(t, root);
        }
        let n = t.elem_count();
        by_dtype!(t.dtype(), T, {
            let mut out = alloc::<T>(&self.device, n)?;
            with_slice::<T, _>(t, |src| {
                let send = (self.rank() == root).then_some(&src);
                self.lock()?
                    .broadcast(send, &mut out, root as i32)
                    .map_err(|e| nccl_err(self.describe(), e))?;
                Ok(())
            })?;
            self.join_compute()?;
            Ok(wrap(out, &self.device, t.shape().clone()))
        })
    }

    fn send(&self, t: &Tensor, dst: usize) -> Result<()> {
        if !self.on_gpu(t) {
            return self.cpu.send(t, dst);
        }
        by_dtype!(t.dtype(), T, {
            with_slice::<T, _>(t, |src| {
                self.lock()?.send(&src, dst as i32).map_err(|e| nccl_err(self.describe(), e))
            })?;
            self.join_compute()
        })
    }

    fn recv(&self, src: usize, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        if !matches!(device, Device::Cuda(_)) {
            return self.cpu.recv(src, shape, dtype, device);
        }
        by_dtype!(dtype, T, {
            let mut out = alloc::<T>(&self.device, shape.elem_count())?;
            self.lock()?.recv(&mut out, src as i32).map_err(|e| nccl_err(self.describe(), e))?;
            self.join_compute()?;
            Ok(wrap(out, &self.device, shape.clone()))
        })
    }

    fn barrier(&self) -> Result<()> {
        // GPU work queued before the barrier is finished first, then the ranks meet.
        self.device.synchronize()?;
        self.cpu.barrier()
    }

    fn exchange(
        &self,
        sends: &[(&Tensor, usize)],
        recvs: &[(usize, Shape, DType)],
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        let all_gpu = sends.iter().all(|(t, _)| self.on_gpu(t));
        if !matches!(device, Device::Cuda(_)) || !all_gpu {
            return super::send_then_recv(self, sends, recvs, device);
        }
        let comm = self.lock()?;
        let what = || format!("{} exchange", self.describe());
        // One NCCL group: nothing is enqueued before group_end, which launches every transfer
        // together; the send buffers stay alive (held by the caller) until the stream runs it.
        nccl_result::group_start().map_err(|e| nccl_err(what(), e))?;
        let issued = (|| -> Result<Vec<Tensor>> {
            for (t, dst) in sends {
                by_dtype!(t.dtype(), T, {
                    with_slice::<T, _>(t, |src| {
                        comm.send(&src, *dst as i32).map_err(|e| nccl_err(what(), e))
                    })?
                });
            }
            recvs
                .iter()
                .map(|(src, shape, dtype)| {
                    by_dtype!(*dtype, T, {
                        let mut out = alloc::<T>(&self.device, shape.elem_count())?;
                        comm.recv(&mut out, *src as i32).map_err(|e| nccl_err(what(), e))?;
                        Ok(wrap(out, &self.device, shape.clone()))
                    })
                })
                .collect()
        })();
        let ended = nccl_result::group_end().map_err(|e| nccl_err(what(), e));
        let got = issued?;
        ended?;
        drop(comm);
        self.join_compute()?;
        Ok(got)
    }

    fn enqueues_only(&self) -> bool {
        self.side.is_some()
    }

    fn join_compute(&self) -> Result<()> {
        if let Some(side) = &self.side {
            self.device.cuda_stream().join(side).map_err(|e| {
                nccl_err(format!("{}: joining the side stream", self.describe()), e)
            })?;
        }
        Ok(())
    }
}
