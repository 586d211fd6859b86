//! Forward/backward pairs of the layer primitives, for layers whose backward is written out
//! by hand (`model::explicit_layer`) instead of being recorded by candle's autograd.
//!
//! Every forward here runs on detached tensors, so candle records nothing. On CUDA in half
//! precision a backward is the fused kernel's backward; elsewhere it is the vector-Jacobian
//! product of the composite op, taken by candle's autograd on a small local graph ([`vjp`]),
//! so the reference path computes exactly the maths of the recorded one.

use super::attention::{attention_auto, AttentionShape, AttnMask, OwnedAttnMask};
use super::cross_entropy::at_least_f32;
use super::flash::{FlashSpec, PackedSeqs};
use super::fp8::Fp8Amax;
use crate::config::model::Activation;
use candle_core::{DType, Result, Tensor, Var};

/// Gradients of `f` at `inputs` for the output gradient `dy` (one per input, zeros where the
/// output does not depend on an input).
pub fn vjp(
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    inputs: &[&Tensor],
    dy: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars = inputs.iter().map(|t| Var::from_tensor(&t.detach())).collect::<Result<Vec<_>>>()?;
    let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&args)?;
    // backward() seeds with ones, so d(y·dy)/dy = dy exactly.
    let grads = y.mul(&dy.detach())?.backward()?;
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.as_tensor().zeros_like(),
        })
        .collect()
}

/// Whether the fused CUDA kernels serve tensors of `t`'s device and dtype.
#[cfg(feature = "cuda")]
fn fused(t: &Tensor) -> bool {
    super::fused::use_fused(t.device(), t.dtype())
}

/// `a + b` of same-shape tensors: the vectorized kernel on CUDA for contiguous operands of one
/// dtype, else candle's add (same rounding).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(a)
        && a.is_contiguous()
        && b.is_contiguous()
        && a.dims() == b.dims()
        && a.dtype() == b.dtype()
    {
        return super::cuda::add::add(a, b);
    }
    a + b
}

/// `(dx, dγ)` of RMSNorm (see [`super::rms_norm`]) at `x` for the output gradient `dy`;
/// with `residual`, `dx + residual` (a pre-norm block's skip connection; one pass on CUDA).
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    residual: Option<&Tensor>,
    eps: f64,
    zero_centered: bool,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused(x)
        && w.dtype() == x.dtype()
        && super::cuda::rms_norm::supports_width(x.dim(candle_core::D::Minus1)?, x.dtype())
    {
        return super::cuda::rms_norm::rms_norm_backward(
            &x.contiguous()?,
            &w.contiguous()?,
            &dy.contiguous()?,
            residual.map(Tensor::contiguous).transpose()?.as_ref(),
            eps as f32,
            zero_centered,
        );
    }
    let g = vjp(|a| super::rms_norm(&a[0], &a[1], eps, zero_centered), &[x, w], dy)?;
    let mut g = g.into_iter();
    let dx = g.next().expect("two inputs");
    let dx = match residual {
        Some(r) => (dx + r)?,
        None => dx,
    };
    Ok((dx, g.next().expect("two inputs")))
}

/// Gradient of [`super::apply_rope`] with respect to `x`: the rotation is orthogonal, so its
/// transpose is the rotation by the opposite angle, i.e. rope with `-sin` (exact, and the
/// same fused kernel on CUDA).
pub fn rope_backward(dy: &Tensor, cos: &Tensor, neg_sin: &Tensor) -> Result<Tensor> {
    super::apply_rope(dy, cos, neg_sin)
}

/// Whether RoPE can run inside the fused QKV buffer of `qkv` (`cuda::rope_qkv`: CUDA half
/// precision); otherwise q and k are rotated as separate views ([`super::apply_rope`]).
pub fn rope_in_qkv_available(qkv: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        fused(qkv)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = qkv;
        false
    }
}

/// Rotates the q and k heads of the fused `qkv` `[b, s, groups·(hpg+2)·d]` in place (the
/// caller's own buffer); see [`rope_in_qkv_available`].
pub fn rope_in_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    groups: usize,
    hpg: usize,
) -> Result<()> {
    rope_in_qkv_pass(qkv, None, cos, sin, (groups, hpg), false)
}

/// The backward of [`rope_in_qkv`] over `dqkv` `[b, s, groups·(hpg+2)·d]` (the caller's own
/// buffer): its q and k parts are rotated back in place. After [`rope_in_qkv_dense_q`], `dq`
/// `[b, s, heads, d]` is rotated back into dQKV's query slots instead.
pub fn rope_in_qkv_backward(
    dqkv: &Tensor,
    dq: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    groups: usize,
    hpg: usize,
) -> Result<()> {
    rope_in_qkv_pass(dqkv, dq, cos, sin, (groups, hpg), true)
}

/// [`rope_in_qkv`] with the rotated query heads written to a new dense `[b, s, heads, d]`
/// buffer (returned; the fused buffer's query slots stay unrotated), the form cuDNN's
/// attention reads without a copy. Full rotary only (cos/sin's last dim = d).
pub fn rope_in_qkv_dense_q(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    groups: usize,
    hpg: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        use super::cuda::rope_qkv::{rope_qkv_dense_q, QkvLayout};
        let l = QkvLayout { groups, hpg, head_dim: qkv.dim(2)? / (groups * (hpg + 2)) };
        rope_qkv_dense_q(qkv, cos, sin, l)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, cos, sin, groups, hpg);
        candle_core::bail!("RoPE inside the fused QKV needs the cuda feature")
    }
}

/// One in-place RoPE pass over the q and k heads of a fused QKV-layout buffer (the
/// backward's query heads from `dq` when given).
fn rope_in_qkv_pass(
    t: &Tensor,
    dq: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
    (groups, hpg): (usize, usize),
    backward: bool,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        use super::cuda::rope_qkv::{rope_qkv_backward, rope_qkv_inplace, QkvLayout};
        let l = QkvLayout { groups, hpg, head_dim: t.dim(2)? / (groups * (hpg + 2)) };
        if backward {
            rope_qkv_backward(t, dq, cos, sin, l)
        } else {
            rope_qkv_inplace(t, cos, sin, l)
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (t, dq, cos, sin, groups, hpg, backward);
        candle_core::bail!("RoPE inside the fused QKV needs the cuda feature")
    }
}

/// The MLP activation on `fc1`'s output `u` (`[.., 2f]` `[gate; up]` when gated).
pub fn activation_forward(u: &Tensor, act: Activation, gated: bool) -> Result<Tensor> {
    if gated {
        super::activation::gated(u, act)
    } else {
        super::apply_activation(u, act)
    }
}

/// [`activation_forward`] and, with `amax` (FP8 current scaling of `linear_fc2`), the largest
/// magnitude of its output: from the fused SwiGLU kernel's own pass on CUDA (None for
/// activations without one, whose quantization computes it), from the values on the CPU.
pub fn activation_forward_amax(
    u: &Tensor,
    act: Activation,
    gated: bool,
    amax: bool,
) -> Result<(Tensor, Option<Fp8Amax>)> {
    if !amax {
        return Ok((activation_forward(u, act, gated)?, None));
    }
    #[cfg(feature = "cuda")]
    if gated && act == Activation::Silu && fused(u) {
        let (y, amax) = super::cuda::swiglu::forward_amax(u)?;
        return Ok((y, Some(Fp8Amax::cuda(amax))));
    }
    let y = activation_forward(u, act, gated)?;
    let amax = if u.device().is_cpu() { Some(Fp8Amax::of_cpu(&y)?) } else { None };
    Ok((y, amax))
}

/// [`activation_backward`] and, with `amax`, its output's largest magnitude (FP8 current
/// scaling of `linear_fc1`'s output gradient), as [`activation_forward_amax`] gives it.
pub fn activation_backward_amax(
    u: &Tensor,
    act: Activation,
    gated: bool,
    dy: &Tensor,
    amax: bool,
) -> Result<(Tensor, Option<Fp8Amax>)> {
    if !amax {
        return Ok((activation_backward(u, act, gated, dy)?, None));
    }
    #[cfg(feature = "cuda")]
    if gated && act == Activation::Silu && fused(u) {
        let (dx, amax) = super::cuda::swiglu::backward_amax(&u.contiguous()?, dy)?;
        return Ok((dx, Some(Fp8Amax::cuda(amax))));
    }
    let dx = activation_backward(u, act, gated, dy)?;
    let amax = if u.device().is_cpu() { Some(Fp8Amax::of_cpu(&dx)?) } else { None };
    Ok((dx, amax))
}

/// Gradient of [`activation_forward`] with respect to `u`.
pub fn activation_backward(
    u: &Tensor,
    act: Activation,
    gated: bool,
    dy: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gated && act == Activation::Silu && fused(u) {
        use candle_core::CustomOp1;
        let u = u.contiguous()?;
        let dx = super::cuda::swiglu::SwiGlu.bwd(&u, &u, &dy.contiguous()?)?;
        return dx.ok_or_else(|| candle_core::Error::Msg("fused-swiglu gave no gradient".into()));
    }
    let mut g = vjp(|a| activation_forward(&a[0], act, gated), &[u], dy)?;
    Ok(g.remove(0))
}

/// What the backward of core attention needs besides q, k, v (which the caller recomputes).
#[derive(Debug, Clone)]
pub enum AttnState {
    /// The flash kernel: its output `[b, heads, s, d]` view and per-row logsumexp (and the
    /// packed sequences of a one-row packed batch).
    Flash { spec: FlashSpec, out: Tensor, lse: Tensor, packed: Option<PackedSeqs> },
    /// The composite reference (recomputed with autograd in the backward) under this mask.
    Composite { mask: OwnedAttnMask, shape: AttentionShape },
}

/// Core attention `[b, heads, sq, d]` of `q` `[b, heads, sq, d]` (or the grouped view of
/// [`super::flash::query_dims`], which the flash kernel reads in place), `k`/`v`
/// `[b, groups, sk, d]` (no dropout), and the state its backward needs: the flash kernel's
/// output and logsumexp where it runs (causal, or packed one-row batches), else the composite
/// reference, whose backward recomputes it under autograd.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttnMask,
    shape: AttentionShape,
) -> Result<(Tensor, AttnState)> {
    #[cfg(feature = "cuda")]
    {
        let flash_mask = match mask {
            AttnMask::Causal { window_left } => Some((window_left, None)),
            AttnMask::Packed { seqs, window_left } if q.dim(0)? == 1 => {
                Some((window_left, Some(seqs)))
            }
            _ => None,
        };
        if let (Some((window_left, packed)), None) =
            (flash_mask, super::flash::unsupported_reason(q, k, v, 0.0))
        {
            let spec = shape.causal_flash(window_left);
            let varlen = packed.map(super::cuda::flash_attn::Varlen::from_packed);
            let (out, lse) = super::cuda::flash_attn::forward_with_lse(q, k, v, spec, varlen)?;
            let packed = packed.cloned();
            return Ok((out.clone(), AttnState::Flash { spec, out, lse, packed }));
        }
    }
    let out = attention_auto(&super::flash::query_heads(q)?, k, v, mask, shape, None)?;
    Ok((out, AttnState::Composite { mask: OwnedAttnMask::from_mask(mask), shape }))
}

/// `(dq, dk, dv)` of [`attention_forward`] for the output gradient `dout` `[b, heads, sq, d]`.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: &AttnState,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    match state {
        #[cfg(feature = "cuda")]
        AttnState::Flash { spec, out, lse, packed } => {
            let varlen = packed.as_ref().map(super::cuda::flash_attn::Varlen::from_packed);
            super::cuda::flash_attn::backward_only(q, k, v, out, lse, dout, *spec, varlen.as_ref())
        }
        #[cfg(not(feature = "cuda"))]
        AttnState::Flash { .. } => {
            candle_core::bail!("flash attention state without the cuda feature")
        }
        AttnState::Composite { mask, shape } => {
            let mask = mask.as_mask();
            let q = super::flash::query_heads(q)?;
            let g = vjp(
                |a| attention_auto(&a[0], &a[1], &a[2], mask, *shape, None),
                &[&q, k, v],
                dout,
            )?;
            let mut g = g.into_iter();
            let mut next = || g.next().expect("three inputs");
            Ok((next(), next(), next()))
        }
    }
}

/// Self-attention's q, k, v gradients in Megatron's fused QKV layout `[b, s, groups·(hpg+2)·d]`.
pub enum QkvGrads {
    /// dQKV whole.
    Fused(Tensor),
    /// dQKV with its key and value parts (the query part unwritten) and dQ `[b, s, heads, d]`
    /// apart: the backward of a q that the forward read from a dense buffer
    /// ([`rope_in_qkv_dense_q`]).
    DenseQ(Tensor, Tensor),
}

/// The gradient of self-attention's q, k, v written straight into Megatron's fused QKV layout
/// where the flash kernel ran (see `cuda::flash_attn::backward_to_qkv`), with dQ apart when
/// `dense_q`; None on other paths (use [`attention_backward`]).
pub fn attention_backward_to_qkv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: &AttnState,
    dout: &Tensor,
    dense_q: bool,
) -> Result<Option<QkvGrads>> {
    match state {
        #[cfg(feature = "cuda")]
        AttnState::Flash { spec, out, lse, packed } => {
            let varlen = packed.as_ref().map(super::cuda::flash_attn::Varlen::from_packed);
            let grads = super::cuda::flash_attn::backward_to_qkv(
                q,
                k,
                v,
                out,
                lse,
                dout,
                *spec,
                varlen.as_ref(),
                dense_q,
            )?;
            Ok(Some(grads))
        }
        _ => {
            let _ = (q, k, v, dout, dense_q);
            Ok(None)
        }
    }
}

/// What the cross-entropy backward needs besides the logits and labels.
#[derive(Debug, Clone)]
pub enum CeState {
    /// The fused CUDA kernel's `[N, 2]` f32 `(loss, lse)` rows.
    Fused(Tensor),
    /// The composite reference (recomputed in the backward).
    Composite,
}

/// Per-token cross-entropy `[N]` (f32 for half-precision logits) of logits `[N, V]` and u32
/// labels `[N]` (in range: the caller checks), and the state of its backward.
pub fn cross_entropy_forward(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, CeState)> {
    #[cfg(feature = "cuda")]
    if fused(logits) {
        let res = logits
            .contiguous()?
            .apply_op2_no_bwd(&labels.contiguous()?, &super::cuda::cross_entropy::CrossEntropy)?;
        return Ok((res.narrow(1, 0, 1)?.squeeze(1)?, CeState::Fused(res)));
    }
    Ok((composite_ce(logits, labels)?, CeState::Composite))
}

/// The reference per-token cross-entropy, statistics in at least f32.
fn composite_ce(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    super::token_cross_entropy(&at_least_f32(logits)?, labels)
}

/// Gradient of the logits (in their dtype) of [`cross_entropy_forward`] for per-token loss
/// gradients `g` `[N]`. Takes the logits by value: the fused path writes the gradient over
/// them (see `cuda::cross_entropy::backward_in_place`).
pub fn cross_entropy_backward(
    logits: Tensor,
    labels: &Tensor,
    state: &CeState,
    g: &Tensor,
) -> Result<Tensor> {
    match state {
        #[cfg(feature = "cuda")]
        CeState::Fused(res) => {
            let g = g.to_dtype(DType::F32)?.unsqueeze(1)?;
            let g2 = Tensor::cat(&[&g, &g.zeros_like()?], 1)?;
            super::cuda::cross_entropy::backward_in_place(logits, labels, res, &g2)
        }
        #[cfg(not(feature = "cuda"))]
        CeState::Fused(_) => {
            candle_core::bail!("fused cross-entropy state without the cuda feature")
        }
        CeState::Composite => {
            let dt = logits.dtype();
            let g = g.to_dtype(if dt == DType::F64 { DType::F64 } else { DType::F32 })?;
            let mut d = vjp(|a| composite_ce(&a[0], labels), &[&logits], &g)?;
            d.remove(0).to_dtype(dt)
        }
    }
}

/// One vocabulary shard's statistics for a vocab-parallel cross-entropy (Megatron's
/// `_VocabParallelCrossEntropy`, written out): per row of the shard's logits `[N, Vs]`, the
/// log-sum-exp over the shard and the logit at the label, 0 where the label lies in another
/// shard. `labels` `[N]` u32 holds shard-local ids (any value where `here` `[N]` u8 is 0).
/// Both results are `[N]`, f32 for half-precision logits.
pub fn ce_shard_stats(logits: &Tensor, labels: &Tensor, here: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused(logits) {
        // The kernel's loss column is lse − logit[label], NaN for a label past the shard.
        let res = logits
            .contiguous()?
            .apply_op2_no_bwd(&labels.contiguous()?, &super::cuda::cross_entropy::CrossEntropy)?;
        let lse = res.narrow(1, 1, 1)?.squeeze(1)?;
        let target = (&lse - res.narrow(1, 0, 1)?.squeeze(1)?)?;
        let target = here.where_cond(&target, &target.zeros_like()?)?;
        return Ok((lse, target));
    }
    let n = logits.dim(0)?;
    let x = at_least_f32(logits)?;
    let lse = super::softmax::logsumexp_keepdim(&x)?.reshape(n)?;
    let idx = here.where_cond(labels, &labels.zeros_like()?)?.reshape((n, 1))?;
    let target = x.gather(&idx, 1)?.reshape(n)?;
    let target = here.where_cond(&target, &target.zeros_like()?)?;
    Ok((lse, target))
}

/// Gradient of the shard's logits (in their dtype) for per-token loss gradients `g` `[N]`,
/// given the log-sum-exp over the whole vocabulary `lse` `[N]` (f32 or the logits' float
/// type): `(exp(x − lse) − onehot(label here))·g`. Takes the logits by value: on CUDA the
/// gradient is written over them (see [`cross_entropy_backward`]).
pub fn ce_shard_backward(
    logits: Tensor,
    labels: &Tensor,
    here: &Tensor,
    lse: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&logits) {
        // The kernel reads the lse column and g_loss + g_lse; a label outside the shard
        // (u32::MAX from the caller) matches no column.
        let lse = lse.to_dtype(DType::F32)?.unsqueeze(1)?;
        let res = Tensor::cat(&[&lse, &lse], 1)?;
        return cross_entropy_backward(logits, labels, &CeState::Fused(res), g);
    }
    let dt = logits.dtype();
    let n = logits.dim(0)?;
    let x = at_least_f32(&logits)?;
    let g = g.to_dtype(x.dtype())?;
    let p = x.broadcast_sub(&lse.to_dtype(x.dtype())?.unsqueeze(1)?)?.exp()?;
    let d = p.broadcast_mul(&g.unsqueeze(1)?)?;
    let idx = here.where_cond(labels, &labels.zeros_like()?)?.reshape((n, 1))?;
    let minus_g = here.where_cond(&g.neg()?, &g.zeros_like()?)?.reshape((n, 1))?;
    d.scatter_add(&idx, &minus_g, 1)?.to_dtype(dt)
}

/// Gradient of `W[ids]` (`W` `[vocab, h]`) for the output gradient `dy` `[n, h]` and u32
/// `ids` `[n]`: f32 on CUDA (an atomic scatter-add kernel; the trainer accumulates gradients
/// in f32 anyway), `dy`'s dtype elsewhere.
pub fn embedding_backward(ids: &Tensor, dy: &Tensor, vocab: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() {
        return super::cuda::embedding::embedding_backward(ids, &dy.contiguous()?, vocab);
    }
    let h = dy.dim(1)?;
    Tensor::zeros((vocab, h), dy.dtype(), dy.device())?.index_add(ids, dy, 0)
}

/// Adds the gradient of `W[ids]` into `dw` in place where that is cheap: on CUDA with `dw`
/// an f32 `[vocab, h]` tensor of the caller's own (a tied output layer's weight gradient,
/// which saves a vocabulary-sized zero fill and add). Returns false (nothing done) elsewhere.
pub fn embedding_backward_into(ids: &Tensor, dy: &Tensor, dw: &Tensor) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if dy.device().is_cuda() && dw.dtype() == DType::F32 && dw.is_contiguous() {
        super::cuda::embedding::embedding_backward_into(ids, &dy.contiguous()?, dw)?;
        return Ok(true);
    }
    let _ = (ids, dy, dw);
    Ok(false)
}

/// Weight gradient `dyᵀ · x` `[out, in]` of a linear layer for `dy` `[rows, out]` and its
/// input `x` `[rows, in]`. On CUDA in half precision it comes straight from the GEMM in the
/// main-grad dtype ([`super::main_grads`]: f32, or bf16 for bf16 with
/// `grad_reduce_in_fp32 = false`); elsewhere in the inputs' dtype.
pub fn weight_grad(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    weight_grad_scaled(dy, x, 1.0)
}

/// [`weight_grad`] in at least f32 whatever the main-grad dtype (half-precision inputs give
/// f32): for a gradient that f32-only kernels add into afterwards (a tied output layer's,
/// which the embedding's scatter-add joins).
pub fn weight_grad_at_least_f32(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let out = match dy.dtype() {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    };
    // A no-op conversion where the GEMM wrote f32.
    weight_grad_in(dy, x, 1.0, out)?.to_dtype(out)
}

/// `c += dyᵀ · x` in place, for `c` `[out, in]` a contiguous tensor of the caller's own in
/// f32 or `dy`'s dtype (a running sum of weight gradients). On CUDA in half precision the GEMM
/// accumulates into `c` (beta = 1: no gradient buffer, no add pass); elsewhere the product is
/// added and written back over `c`. False (nothing done) for a `c` it cannot write.
pub fn add_weight_grad_into(c: &Tensor, dy: &Tensor, x: &Tensor) -> Result<bool> {
    if !c.is_contiguous() || (c.dtype() != DType::F32 && c.dtype() != dy.dtype()) {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    if fused(dy) {
        super::cuda::gemm::weight_grad_into(c, dy, x)?;
        return Ok(true);
    }
    let sum = (c + weight_grad_in(dy, x, 1.0, c.dtype())?.to_dtype(c.dtype())?)?;
    c.slice_set(&sum, 0, 0)?;
    Ok(true)
}

/// `alpha ·` [`weight_grad`], the scale applied inside the GEMM on CUDA (a LoRA factor's
/// gradient carries the adapter's scale).
pub fn weight_grad_scaled(dy: &Tensor, x: &Tensor, alpha: f64) -> Result<Tensor> {
    weight_grad_in(dy, x, alpha, super::main_grads::main_grad_dtype(dy.dtype()))
}

/// `alpha · dyᵀ · x`, written by the GEMM as `out` (f32 or `dy`'s dtype) on CUDA.
fn weight_grad_in(dy: &Tensor, x: &Tensor, alpha: f64, out: DType) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(dy) {
        return super::cuda::gemm::weight_grad(dy, x, alpha as f32, out);
    }
    let _ = out;
    let g = dy.t()?.matmul(x)?;
    if alpha == 1.0 {
        Ok(g)
    } else {
        g * alpha
    }
}

/// `c + alpha · a · bᵀ` (`b_transposed`) or `c + alpha · a · b` for `c` `[rows, n]`, `a`
/// `[rows, k]`. On CUDA in half precision the product is accumulated into `c` itself (a GEMM
/// with beta = 1, no extra pass over `c`), so `c` must not be shared with anything else.
pub fn add_matmul(
    c: Tensor,
    a: &Tensor,
    b: &Tensor,
    b_transposed: bool,
    alpha: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&c) && c.is_contiguous() {
        super::cuda::gemm::add_matmul_in_place(&c, a, b, b_transposed, alpha as f32)?;
        return Ok(c);
    }
    let b = if b_transposed { b.t()? } else { b.clone() };
    c + (a.matmul(&b)? * alpha)?
}

/// `x·wᵀ + r` for `x` `[rows, in]`, `w` `[out, in]`, `r` `[rows, out]` when one fused GEMM
/// can add `r` (CUDA, half precision: cuBLASLt with `r` as the C operand, the sum rounded
/// once); None where it cannot, and the caller adds `r` itself.
pub fn linear_plus(x: &Tensor, w: &Tensor, r: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if fused(x)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && w.dtype() == x.dtype()
        && r.dtype() == x.dtype()
    {
        return Ok(Some(super::cuda::gemm_lt::linear_plus(x, w, r)?));
    }
    let _ = (x, w, r);
    Ok(None)
}

/// `alpha · a · bᵀ` (`b_transposed`) or `alpha · a · b` for `a` `[rows, k]`: on CUDA in half
/// precision one GEMM with the scale applied inside it (no extra pass over the result).
pub fn matmul_scaled(a: &Tensor, b: &Tensor, b_transposed: bool, alpha: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(a) {
        return super::cuda::gemm::matmul_scaled(a, b, b_transposed, alpha as f32);
    }
    let b = if b_transposed { b.t()? } else { b.clone() };
    a.matmul(&b)? * alpha
}

/// `Σ_rows dy` of a `[rows, n]` gradient (a bias gradient), accumulated in f32.
pub fn bias_grad(dy: &Tensor) -> Result<Tensor> {
    let dt = dy.dtype();
    let acc =
        if matches!(dt, DType::BF16 | DType::F16) { dy.to_dtype(DType::F32)? } else { dy.clone() };
    acc.sum(0)?.to_dtype(dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// q as the grouped view of a fused QKV buffer gives the same attention and gradients as
    /// the same q collapsed to `[b, heads, s, d]`.
    #[test]
    fn grouped_query_view_matches_collapsed_heads() {
        let (b, s, g, hpg, d) = (2, 5, 2, 3, 4);
        let qkv = rand(&[b, s, g, hpg + 2, d], 3);
        let q5 = qkv.narrow(3, 0, hpg).unwrap().permute((0, 2, 3, 1, 4)).unwrap();
        let q4 = qkv.narrow(3, 0, hpg).unwrap().reshape((b, s, g * hpg, d)).unwrap();
        let q4 = q4.transpose(1, 2).unwrap();
        let kv = |i| qkv.narrow(3, i, 1).unwrap().squeeze(3).unwrap().transpose(1, 2).unwrap();
        let (k, v) = (kv(hpg), kv(hpg + 1));
        let shape = AttentionShape {
            heads: g * hpg,
            groups: g,
            head_dim: d,
            softmax_scale: 0.5,
            backend: crate::config::model::AttnBackend::Auto,
        };
        let mask = AttnMask::Causal { window_left: None };
        let (o5, st5) = attention_forward(&q5, &k, &v, mask, shape).unwrap();
        let (o4, st4) = attention_forward(&q4, &k, &v, mask, shape).unwrap();
        let dout = rand(&[b, g * hpg, s, d], 5);
        let g5 = attention_backward(&q5, &k, &v, &st5, &dout).unwrap();
        let g4 = attention_backward(&q4, &k, &v, &st4, &dout).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert_eq!(diff(&o5, &o4), 0.0);
        for (a, b) in [(&g5.0, &g4.0), (&g5.1, &g4.1), (&g5.2, &g4.2)] {
            assert_eq!(a.dims(), b.dims());
            assert_eq!(diff(a, b), 0.0);
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// The `-sin` rotation is the exact transpose of rope (partial rotary included).
    #[test]
    fn rope_backward_is_the_transpose() {
        let table =
            crate::ops::RopeTable::new(8, 0.5, 10000.0, crate::ops::RopeScaling::None, None)
                .unwrap();
        let pos = Tensor::arange(0u32, 5, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let (cos, sin) = table.cos_sin(&pos, DType::F32).unwrap();
        let x = rand(&[1, 2, 5, 8], 1);
        let dy = rand(&[1, 2, 5, 8], 2);
        let want = vjp(|a| crate::ops::apply_rope(&a[0], &cos, &sin), &[&x], &dy).unwrap();
        let got = rope_backward(&dy, &cos, &sin.neg().unwrap()).unwrap();
        assert!(max_diff(&want[0], &got) < 1e-6);
    }

    #[test]
    fn bias_grad_sums_rows() {
        let dy = rand(&[4, 3], 3);
        let want = dy.sum(0).unwrap();
        assert!(max_diff(&bias_grad(&dy).unwrap(), &want) < 1e-6);
    }

    /// vjp against a hand-derived gradient: d/dx Σ dy·x² = 2·x·dy.
    #[test]
    fn vjp_matches_the_analytic_gradient() {
        let x = rand(&[3, 4], 4);
        let dy = rand(&[3, 4], 5);
        let g = vjp(|a| a[0].sqr(), &[&x], &dy).unwrap();
        let want = (x.affine(2.0, 0.0).unwrap() * &dy).unwrap();
        assert!(max_diff(&g[0], &want) < 1e-6);
    }
}
