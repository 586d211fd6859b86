//! Fused CPU kernels (candle CustomOps with backward) for the two elementwise-heavy parts of a
//! training step: masked softmax of attention scores and token cross-entropy.
//!
//! Measured before writing them (`tests/model_speed.rs`, 2-core CPU, f32): the composite
//! masked softmax over `[8, 1024, 1024]` took ~0.5 s forward+backward and the composite
//! cross-entropy over `[1024, 32768]` ~0.8–1.2 s, together about a quarter of a 4-layer
//! step, because each elementwise op is a separate pass over memory. Each kernel here makes
//! one or two passes per row. They only run on CPU for f32/f64 inputs; other devices and
//! dtypes use the composite forms in `softmax.rs` / `cross_entropy.rs`, which stay the
//! reference (tests compare the two).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// `softmax(scale · x)` over the last dim where `allowed` is 1, 0 elsewhere; rows with no
/// allowed key get a uniform distribution (as the composite form with a finite fill value).
#[derive(Debug, Clone)]
pub(crate) struct MaskedSoftmax {
    pub scale: f64,
    /// u8 mask `[mask_batches, sq, sk]`.
    pub allowed: Arc<Vec<u8>>,
    pub mask_batches: usize,
    /// Score rows per batch element (all heads × sq).
    pub rows_per_batch: usize,
    pub sq: usize,
    pub sk: usize,
}

impl MaskedSoftmax {
    /// The mask row of score row `r`.
    fn mask_row(&self, r: usize) -> &[u8] {
        let mb = if self.mask_batches == 1 { 0 } else { r / self.rows_per_batch };
        let i = r % self.sq;
        &self.allowed[(mb * self.sq + i) * self.sk..(mb * self.sq + i + 1) * self.sk]
    }
}

macro_rules! softmax_rows {
    ($t:ty, $op:expr, $x:expr) => {{
        let op = $op;
        let mut out = vec![0 as $t; $x.len()];
        let scale = op.scale as $t;
        out.par_chunks_mut(op.sk).zip($x.par_chunks(op.sk)).enumerate().for_each(|(r, (o, xr))| {
            let m = op.mask_row(r);
            let mut max = <$t>::NEG_INFINITY;
            for (v, &a) in xr.iter().zip(m) {
                if a != 0 && v * scale > max {
                    max = v * scale;
                }
            }
            if max == <$t>::NEG_INFINITY {
                o.fill(1.0 / op.sk as $t);
                return;
            }
            let mut sum = 0 as $t;
            for ((ov, v), &a) in o.iter_mut().zip(xr).zip(m) {
                *ov = if a != 0 { (v * scale - max).exp() } else { 0.0 };
                sum += *ov;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|ov| *ov *= inv);
        });
        out
    }};
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.dims().last() != Some(&self.sk)
            || !l.shape().elem_count().is_multiple_of(self.sq * self.sk)
        {
            candle_core::bail!("masked-softmax: scores {:?} do not match the mask", l.dims());
        }
        let out = match s {
            CpuStorage::F32(v) => {
                CpuStorage::F32(softmax_rows!(f32, self, contiguous(v, l, "masked-softmax")?))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(softmax_rows!(f64, self, contiguous(v, l, "masked-softmax")?))
            }
            _ => candle_core::bail!("masked-softmax: f32/f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&grad, &SoftmaxBwd { fwd: self.clone() })?))
    }
}

/// `dx = scale · y · (dy − Σ dy·y)` per row, from the softmax output `y` and its gradient;
/// zero for fully masked rows, whose uniform output does not depend on the scores.
struct SoftmaxBwd {
    fwd: MaskedSoftmax,
}

macro_rules! softmax_bwd_rows {
    ($t:ty, $fwd:expr, $y:expr, $dy:expr) => {{
        let fwd = $fwd;
        let (sk, scale) = (fwd.sk, fwd.scale as $t);
        let mut out = vec![0 as $t; $y.len()];
        out.par_chunks_mut(sk).zip($y.par_chunks(sk).zip($dy.par_chunks(sk))).enumerate().for_each(
            |(r, (o, (y, dy)))| {
                if fwd.mask_row(r).iter().all(|&a| a == 0) {
                    return; // stays zero
                }
                let dot: $t = y.iter().zip(dy).map(|(a, b)| a * b).sum();
                for ((ov, a), b) in o.iter_mut().zip(y).zip(dy) {
                    *ov = scale * a * (b - dot);
                }
            },
        );
        out
    }};
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "masked-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(dy)) => CpuStorage::F32(softmax_bwd_rows!(
                f32,
                &self.fwd,
                contiguous(y, l1, "softmax-bwd")?,
                contiguous(dy, l2, "softmax-bwd")?
            )),
            (CpuStorage::F64(y), CpuStorage::F64(dy)) => CpuStorage::F64(softmax_bwd_rows!(
                f64,
                &self.fwd,
                contiguous(y, l1, "softmax-bwd")?,
                contiguous(dy, l2, "softmax-bwd")?
            )),
            _ => candle_core::bail!("masked-softmax-bwd: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Per-row cross-entropy `logsumexp(x) − x[label]` of logits `[N, V]` and labels `[N]` (u32).
pub(crate) struct CrossEntropyRows;

macro_rules! ce_rows {
    ($t:ty, $x:expr, $labels:expr, $v:expr) => {{
        let mut out = vec![0 as $t; $labels.len()];
        out.par_iter_mut().zip($x.par_chunks($v).zip($labels.par_iter())).for_each(
            |(o, (xr, &lab))| {
                let max = xr.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
                let sum: $t = xr.iter().map(|v| (v - max).exp()).sum();
                *o = sum.ln() + max - xr[lab as usize];
            },
        );
        out
    }};
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let CpuStorage::U32(labels) = s2 else { candle_core::bail!("cross-entropy: u32 labels") };
        let labels = contiguous(labels, l2, "cross-entropy labels")?;
        if labels.len() != n || labels.iter().any(|&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: labels must be {n} ids below {v}");
        }
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(ce_rows!(f32, contiguous(x, l1, "cross-entropy")?, labels, v))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(ce_rows!(f64, contiguous(x, l1, "cross-entropy")?, labels, v))
            }
            _ => candle_core::bail!("cross-entropy: f32/f64 logits only"),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        Ok((Some(logits.apply_op3_no_bwd(labels, &grad, &CrossEntropyBwd)?), None))
    }
}

/// `dlogits = g · (softmax(x) − onehot(label))` per row.
struct CrossEntropyBwd;

macro_rules! ce_bwd_rows {
    ($t:ty, $x:expr, $labels:expr, $g:expr, $v:expr) => {{
        let mut out = vec![0 as $t; $x.len()];
        out.par_chunks_mut($v)
            .zip($x.par_chunks($v))
            .zip($labels.par_iter().zip($g.par_iter()))
            .for_each(|((o, xr), (&lab, &g))| {
                let max = xr.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
                let mut sum = 0 as $t;
                for (ov, v) in o.iter_mut().zip(xr) {
                    *ov = (v - max).exp();
                    sum += *ov;
                }
                let k = g / sum;
                o.iter_mut().for_each(|ov| *ov *= k);
                o[lab as usize] -= g;
            });
        out
    }};
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l1.shape().dims2()?;
        let CpuStorage::U32(labels) = s2 else {
            candle_core::bail!("cross-entropy-bwd: u32 labels")
        };
        let labels = contiguous(labels, l2, "cross-entropy-bwd")?;
        let out = match (s1, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => CpuStorage::F32(ce_bwd_rows!(
                f32,
                contiguous(x, l1, "cross-entropy-bwd")?,
                labels,
                contiguous(g, l3, "cross-entropy-bwd")?,
                v
            )),
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(ce_bwd_rows!(
                f64,
                contiguous(x, l1, "cross-entropy-bwd")?,
                labels,
                contiguous(g, l3, "cross-entropy-bwd")?,
                v
            )),
            _ => candle_core::bail!("cross-entropy-bwd: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}
