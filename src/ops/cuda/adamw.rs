//! Fused Adam/AdamW step: one kernel per parameter updates the f32 master, both moments and
//! the model's (bf16/f16) copy in place, instead of ~15 candle ops that each allocate a
//! full-size temporary. Semantics (and f32 rounding) of `train::optimizer::adam_update`.
//! The moments are f32, or both bf16 (the precision-aware optimizer's `exp_avg_dtype` and
//! `exp_avg_sq_dtype`, kernels `..._m16`).

use super::{cuda_storage, dtype_suffix, elementwise_blocks};
use crate::with_float_type;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Layout, Result, Storage, Tensor};

crate::kernel_module!(MODULE, "adamw");

/// Weight decay handling of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightDecay {
    None,
    /// AdamW: `p ← p·(1 − lr·wd)`.
    Decoupled(f64),
    /// Adam + L2: `g ← g + wd·p`.
    Coupled(f64),
}

/// Scalars of one step as the host computes them (f64, as torch's Python floats).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 1-based step count (bias correction).
    pub t: f64,
    pub weight_decay: WeightDecay,
    /// Factor applied to the gradient before the update (clipping coefficient / fp16 loss
    /// scale; 1 = none), so neither needs a pass of its own over the gradients.
    pub grad_scale: f64,
}

/// Mirror of `struct AdamArgs` in kernels/adamw.cu (passed by value).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AdamArgs {
    lr_wd_keep: f32,
    wd: f32,
    one_m_beta1: f32,
    beta2: f32,
    one_m_beta2: f32,
    inv_bc2_sqrt: f32,
    eps: f32,
    neg_step: f32,
    mode: i32,
    has_grad: i32,
    grad_scale: f32,
}

// SAFETY: plain-old-data with C layout, matching the kernel's struct.
unsafe impl DeviceRepr for AdamArgs {}

impl AdamStep {
    fn args(&self, has_grad: bool) -> AdamArgs {
        let bc1 = 1.0 - self.beta1.powf(self.t);
        let bc2_sqrt = (1.0 - self.beta2.powf(self.t)).powf(0.5);
        let (mode, keep, wd) = match self.weight_decay {
            WeightDecay::None => (0, 1.0, 0.0),
            WeightDecay::Decoupled(wd) => (1, 1.0 - self.lr * wd, wd),
            WeightDecay::Coupled(wd) => (2, 1.0, wd),
        };
        AdamArgs {
            lr_wd_keep: keep as f32,
            wd: wd as f32,
            one_m_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_m_beta2: (1.0 - self.beta2) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: self.eps as f32,
            neg_step: (-self.lr / bc1) as f32,
            mode,
            has_grad: i32::from(has_grad),
            grad_scale: self.grad_scale as f32,
        }
    }
}

/// The `n` f32 elements of a contiguous tensor's storage.
fn f32_view<'a>(s: &'a Storage, l: &Layout, n: usize, what: &str) -> Result<CudaView<'a, f32>> {
    let s = cuda_storage(s, what)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(l.start_offset()..l.start_offset() + n))
}

/// A gradient or moment operand of the kernel: f32, or the raw half-precision buffer (typed
/// by the kernel's name, `adamw_*_tgrad`, `..._m16`).
enum Operand<'a> {
    F32(CudaView<'a, f32>),
    Half(CudaView<'a, u16>),
}

impl<'a> Operand<'a> {
    fn push<'b>(&'b self, b: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'b>) {
        match self {
            Operand::F32(v) => b.arg(v),
            Operand::Half(v) => b.arg(v),
        };
    }
}

/// The `n` half-precision elements (as raw 16-bit words) of a contiguous tensor of `dtype`.
fn half_view<'a>(
    s: &'a Storage,
    l: &Layout,
    n: usize,
    dtype: DType,
    what: &str,
) -> Result<CudaView<'a, u16>> {
    let s = cuda_storage(s, what)?;
    let range = l.start_offset()..l.start_offset() + n;
    // SAFETY: bf16 and f16 are 16-bit words; the kernel reads them as their own type.
    match dtype {
        DType::BF16 => unsafe { s.as_cuda_slice::<half::bf16>()?.slice(range).transmute(n) },
        DType::F16 => unsafe { s.as_cuda_slice::<half::f16>()?.slice(range).transmute(n) },
        d => candle_core::bail!("fused adam: {d:?} {what}"),
    }
    .ok_or_else(|| candle_core::Error::Msg(format!("fused adam: {what} view")))
}

/// A moment's buffer as the kernel reads it (f32 or bf16, checked by [`check_moments`]).
fn moment_view<'a>(s: &'a Storage, l: &Layout, n: usize, what: &str) -> Result<Operand<'a>> {
    Ok(match s.dtype() {
        DType::F32 => Operand::F32(f32_view(s, l, n, what)?),
        d => Operand::Half(half_view(s, l, n, d, what)?),
    })
}

/// The kernel's gradient operand: the gradient's storage (f32, or `pdt` when `half`), or
/// `absent`, a valid pointer the kernel never reads, when the parameter got no gradient.
fn grad_view<'a, G: std::ops::Deref<Target = Storage>>(
    grad: Option<&'a (G, &Layout)>,
    half: bool,
    pdt: DType,
    n: usize,
    absent: Operand<'a>,
) -> Result<Operand<'a>> {
    Ok(match grad {
        Some((s, l)) if half => Operand::Half(half_view(s, l, n, pdt, "grad")?),
        Some((s, l)) => Operand::F32(f32_view(s, l, n, "grad")?),
        None => absent,
    })
}

/// Checks that `tensors` are contiguous f32 buffers of `n` elements.
fn check_f32(tensors: &[(&Tensor, &str)], n: usize) -> Result<()> {
    for (t, what) in tensors {
        if t.dtype() != DType::F32 || t.elem_count() != n || !t.is_contiguous() {
            candle_core::bail!("fused adam: {what} must be contiguous f32 of {n} elements");
        }
    }
    Ok(())
}

/// Checks that both moments are contiguous buffers of `n` elements, both f32 or both bf16;
/// returns the kernel name's suffix (`_m16` for bf16).
fn check_moments(exp_avg: &Tensor, exp_avg_sq: &Tensor, n: usize) -> Result<&'static str> {
    let dtype = exp_avg.dtype();
    for (t, what) in [(exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")] {
        if t.dtype() != dtype || t.elem_count() != n || !t.is_contiguous() {
            candle_core::bail!(
                "fused adam: {what} must be contiguous {dtype:?} of {n} elements, like exp_avg"
            );
        }
    }
    match dtype {
        DType::F32 => Ok(""),
        DType::BF16 => Ok("_m16"),
        d => candle_core::bail!("fused adam: {d:?} moments (the kernels keep f32 or bf16)"),
    }
}

/// The gradient as the kernels read it: f32, or (bf16 main grads) in the parameter's half
/// precision `pdt`; anything else is converted to f32 first. The flag: half precision.
fn kernel_grad(grad: Option<&Tensor>, pdt: DType) -> Result<(Option<Tensor>, bool)> {
    let half_grad = |g: &Tensor| g.dtype() == pdt && pdt != DType::F32;
    let grad = match grad {
        Some(g) if !(g.dtype() == DType::F32 || half_grad(g)) || !g.is_contiguous() => {
            Some(g.to_dtype(DType::F32)?.contiguous()?)
        }
        other => other.cloned(),
    };
    let is_half = grad.as_ref().is_some_and(half_grad);
    Ok((grad, is_half))
}

fn launch_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (elementwise_blocks(n, 256).min(4096), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Updates `master` (f32), `exp_avg`, `exp_avg_sq` (both f32 or both bf16; contiguous,
/// distinct buffers) in place from
/// `grad · step.grad_scale` (f32 or `param`'s half precision, or bf16 for an f32 parameter
/// that is its own master; None = zeros) and writes the
/// rounded result into `param` (the model's variable, any float dtype). With `param = None`
/// the master *is* the f32 parameter.
pub fn adam_step(
    master: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: Option<&Tensor>,
    param: Option<&Tensor>,
    step: &AdamStep,
) -> Result<()> {
    let n = master.elem_count();
    check_f32(&[(master, "master")], n)?;
    let moments = check_moments(exp_avg, exp_avg_sq, n)?;
    let pdt = param.map_or(DType::F32, |p| p.dtype());
    // An f32 parameter that is its own master (an FP8 primary weight's master) with a bf16
    // gradient: the kernel widens the gradient as it reads it.
    let bf16_grad =
        param.is_none() && grad.is_some_and(|g| g.dtype() == DType::BF16 && g.is_contiguous());
    let (grad, grad_is_half) = match bf16_grad {
        true => (grad.cloned(), true),
        false => kernel_grad(grad, pdt)?,
    };
    let dev = master.device().as_cuda_device()?.clone();
    let tgrad = match (bf16_grad, grad_is_half) {
        (true, _) => "_bgrad",
        (false, true) => "_tgrad",
        (false, false) => "",
    };
    let name = format!("adamw_{}{tgrad}{moments}", dtype_suffix(pdt)?);
    let f = crate::function!(&dev, &MODULE, &name)?;
    let args = step.args(grad.is_some());
    let cfg = launch_cfg(n);
    let n64 = n as u64;
    let (ms, ml) = master.storage_and_layout();
    let (es, el) = exp_avg.storage_and_layout();
    let (vs, vl) = exp_avg_sq.storage_and_layout();
    let mv = f32_view(&ms, ml, n, "master")?;
    let (ev, vv) = (moment_view(&es, el, n, "exp_avg")?, moment_view(&vs, vl, n, "exp_avg_sq")?);
    let gguard = grad.as_ref().map(|g| g.storage_and_layout());
    // Without a gradient the master stands in as a valid pointer.
    let absent = Operand::F32(f32_view(&ms, ml, n, "master")?);
    let gdt = if bf16_grad { DType::BF16 } else { pdt };
    let gv = grad_view(gguard.as_ref(), grad_is_half, gdt, n, absent)?;
    let pguard = param.map(|p| p.storage_and_layout());
    with_float_type!(pdt, P, {
        match &pguard {
            Some((ps, pl)) => {
                if pl.shape().elem_count() != n || !pl.is_contiguous() {
                    candle_core::bail!(
                        "fused adam: parameter must be contiguous with {n} elements"
                    );
                }
                let pv = cuda_storage(ps, "param")?
                    .as_cuda_slice::<P>()?
                    .slice(pl.start_offset()..pl.start_offset() + n);
                let mut b = f.builder();
                b.arg(&mv);
                ev.push(&mut b);
                vv.push(&mut b);
                gv.push(&mut b);
                b.arg(&pv).arg(&n64).arg(&args);
                // SAFETY: argument list matches `adamw_*` in kernels/adamw.cu; the buffers are
                // distinct allocations (the optimizer keeps its state uniquely owned).
                unsafe { b.launch(cfg) }.w()?;
            }
            None => {
                // f32 parameter that is its own master: the kernel writes the same value twice.
                let mut b = f.builder();
                b.arg(&mv);
                ev.push(&mut b);
                vv.push(&mut b);
                gv.push(&mut b);
                b.arg(&mv).arg(&n64).arg(&args);
                // SAFETY: as above; `param` aliases `master` on purpose (identical writes).
                unsafe { b.launch(cfg) }.w()?;
            }
        }
    });
    Ok(())
}

/// The `n` 16-bit words of a contiguous bf16 or i16 tensor (a parameter's bits or its
/// remainders), as the remainder kernels read them.
fn words<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a Storage,
    l: &Layout,
    n: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    if l.shape().elem_count() != n {
        candle_core::bail!("param remainders: {what} must have {n} elements");
    }
    super::contiguous_view(cuda_storage(s, what)?, l, what)
}

/// [`adam_step`] for a bf16 `param` whose f32 master is kept as `param` plus the i16
/// `remainder` (`optimizer.store_param_remainders`, see `ops::param_remainder`): both are
/// updated in place, with the master's arithmetic of [`adam_step`].
pub fn adam_step_remainder(
    param: &Tensor,
    remainder: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: Option<&Tensor>,
    step: &AdamStep,
) -> Result<()> {
    let n = param.elem_count();
    let moments = check_moments(exp_avg, exp_avg_sq, n)?;
    if param.dtype() != DType::BF16 || remainder.dtype() != DType::I16 {
        candle_core::bail!(
            "param remainders need a bf16 parameter and i16 remainders, got {:?} and {:?}",
            param.dtype(),
            remainder.dtype()
        );
    }
    let (grad, grad_is_half) = kernel_grad(grad, DType::BF16)?;
    let dev = param.device().as_cuda_device()?.clone();
    let tgrad = if grad_is_half { "_tgrad" } else { "" };
    let f = crate::function!(&dev, &MODULE, &format!("adamw_bf16_rem{tgrad}{moments}"))?;
    let args = step.args(grad.is_some());
    let n64 = n as u64;
    let (ps, pl) = param.storage_and_layout();
    let (rs, rl) = remainder.storage_and_layout();
    let (es, el) = exp_avg.storage_and_layout();
    let (vs, vl) = exp_avg_sq.storage_and_layout();
    let pv = words::<half::bf16>(&ps, pl, n, "param")?;
    let rv = words::<i16>(&rs, rl, n, "remainder")?;
    let (ev, vv) = (moment_view(&es, el, n, "exp_avg")?, moment_view(&vs, vl, n, "exp_avg_sq")?);
    let gguard = grad.as_ref().map(|g| g.storage_and_layout());
    // Without a gradient a moment stands in as a valid pointer (the kernel never reads it).
    let absent = moment_view(&es, el, n, "exp_avg")?;
    let gv = grad_view(gguard.as_ref(), grad_is_half, DType::BF16, n, absent)?;
    let mut b = f.builder();
    b.arg(&rv);
    ev.push(&mut b);
    vv.push(&mut b);
    gv.push(&mut b);
    b.arg(&pv).arg(&n64).arg(&args);
    // SAFETY: argument list matches `adamw_bf16_rem*` in kernels/adamw.cu; the buffers are
    // distinct allocations (the optimizer keeps its state uniquely owned).
    unsafe { b.launch(launch_cfg(n)) }.w()?;
    Ok(())
}

/// The f32 masters of a bf16 `param` and its i16 `remainder` (same shape).
pub fn remainder_merge(param: &Tensor, remainder: &Tensor) -> Result<Tensor> {
    let n = param.elem_count();
    let dev = param.device().as_cuda_device()?.clone();
    let f = crate::function!(&dev, &MODULE, "remainder_merge")?;
    let (ps, pl) = param.storage_and_layout();
    let (rs, rl) = remainder.storage_and_layout();
    let pv = words::<half::bf16>(&ps, pl, n, "param")?;
    let rv = words::<i16>(&rs, rl, n, "remainder")?;
    // SAFETY: every element is written by the kernel below before the tensor is read.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let n64 = n as u64;
    let mut b = f.builder();
    b.arg(&pv).arg(&rv).arg(&out).arg(&n64);
    // SAFETY: argument list matches `remainder_merge` in kernels/adamw.cu.
    unsafe { b.launch(launch_cfg(n)) }.w()?;
    drop(b);
    Ok(super::wrap(out, &dev, param.shape()))
}

/// A contiguous f32 `master` as its bf16 parameter and i16 remainder.
pub fn remainder_split(master: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = master.elem_count();
    check_f32(&[(master, "master")], n)?;
    let dev = master.device().as_cuda_device()?.clone();
    let f = crate::function!(&dev, &MODULE, "remainder_split")?;
    let (ms, ml) = master.storage_and_layout();
    let mv = f32_view(&ms, ml, n, "master")?;
    // SAFETY: every element of both is written by the kernel below before they are read.
    let (hi, rem) = unsafe { (dev.alloc::<half::bf16>(n)?, dev.alloc::<i16>(n)?) };
    let n64 = n as u64;
    let mut b = f.builder();
    b.arg(&mv).arg(&hi).arg(&rem).arg(&n64);
    // SAFETY: argument list matches `remainder_split` in kernels/adamw.cu.
    unsafe { b.launch(launch_cfg(n)) }.w()?;
    drop(b);
    Ok((super::wrap(hi, &dev, master.shape()), super::wrap(rem, &dev, master.shape())))
}
