//! LoRA and DoRA adapters on one linear layer, tensor-parallel aware as Megatron Bridge's
//! `ParallelLinearAdapter`: for a column-parallel base layer `linear_in` (A) is replicated
//! and `linear_out` (B) is split on dim 0 like the base weight; for a row-parallel base layer
//! A is split on dim 1 and B is replicated.
//!
//! LoRA: `y = base(x) + B(A(dropout(x))) · alpha/dim` (`dropout_position = "post"`: dropout
//! on the adapter output instead). DoRA (Megatron Bridge `DoRALinear`):
//! `y = m / ‖W + s·BA‖_row · (x Wᵀ + s·B(A x)) + b`, the norm detached, `m` initialized to
//! `‖W‖_row` of the (pretrained) base weight. Canonical LoRA ([`super::canonical`]): one A, B
//! pair per part of a fused `linear_qkv` / `linear_fc1`, their outputs assembled into the
//! fused layout.

use super::canonical::Split;
use crate::config::peft::{PeftConfig, PeftScheme};
use crate::model::init::Init;
use crate::model::params::{shard_of, ParamStore, ShardLayout, TpCoord};
use crate::ops::{self, DropoutRng};
use crate::parallel::comm::ReduceOp;
use crate::parallel::tensor::TensorParallel;
use anyhow::{bail, Result};
use candle_core::{Tensor, Var, D};

/// How the adapted base layer is parallelized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseParallel {
    /// Column-parallel: output rows split over TP with the given layout.
    Column(ShardLayout),
    /// Row-parallel: input columns split over TP, partial outputs all-reduced.
    Row,
}

/// The low-rank factors of one adapter.
#[derive(Debug, Clone)]
enum Factors {
    /// One A (`linear_in`), B (`linear_out`) pair over the whole output.
    Fused { a: Tensor, b: Tensor },
    /// Canonical LoRA: an (A, B) pair per part of `split` (None: that part is not a target).
    Canonical { split: Split, parts: Vec<Option<(Tensor, Tensor)>> },
}

/// The adapter of one linear layer.
#[derive(Debug, Clone)]
pub struct Adapter {
    factors: Factors,
    scale: f64,
    kind: BaseParallel,
    /// DoRA magnitude `[out]` (this rank's rows for a column-parallel base layer).
    magnitude: Option<(Tensor, Var)>,
    /// `peft.dropout` and whether it applies to the adapter output (`post`) or input (`pre`).
    dropout: f64,
    post: bool,
}

impl Adapter {
    /// Registers the adapter of module `module` (full name, e.g.
    /// `decoder.layers.0.self_attention.linear_qkv`) with base weight shape `[out, inp]`
    /// when the store has PEFT on and `module` is a target; `None` otherwise. `split`
    /// describes a fused layer's parts, which canonical LoRA adapts separately.
    pub fn maybe_new(
        store: &mut ParamStore,
        module: &str,
        out: usize,
        inp: usize,
        kind: BaseParallel,
        split: Option<Split>,
    ) -> Result<Option<Self>> {
        let Some(cfg) = store.peft().cloned() else { return Ok(None) };
        let canonical = cfg.peft_scheme == PeftScheme::CanonicalLora;
        let targeted: Vec<bool> = match (canonical, split) {
            (true, Some(sp)) => super::matcher::canonical_parts(&cfg, module, sp),
            _ => vec![super::matcher::is_target(&cfg, module)],
        };
        if !targeted.contains(&true) {
            return Ok(None);
        }
        check_supported(&cfg, module)?;
        let r = cfg.dim;
        let a_std = (2.0 / (inp + r) as f64).sqrt(); // xavier_normal_ on [r, inp]
        let (a_part, a_layout, b_part, b_layout) = match kind {
            BaseParallel::Column(l) => (None, ShardLayout::Contiguous, Some(0), l),
            BaseParallel::Row => (Some(1), ShardLayout::Contiguous, None, ShardLayout::Contiguous),
        };
        // One `linear_in` / `linear_out` pair under `prefix`, B with `rows` output rows.
        let mut pair =
            |prefix: &str, rows: usize, b_layout: ShardLayout| -> Result<(Tensor, Tensor)> {
                let a = store.create_adapter(
                    &format!("{prefix}.linear_in.weight"),
                    &[r, inp],
                    a_part,
                    a_layout,
                    Init::Normal(a_std),
                )?;
                let b = store.create_adapter(
                    &format!("{prefix}.linear_out.weight"),
                    &[rows, r],
                    b_part,
                    b_layout,
                    Init::Zeros,
                )?;
                Ok((a, b))
            };
        let factors = match (canonical, split) {
            // Each part's B rows are split over TP contiguously, as the part's own
            // column-parallel adapter in Megatron Bridge.
            (true, Some(sp)) => {
                let parts = sp
                    .parts()
                    .iter()
                    .zip(sp.part_rows())
                    .zip(&targeted)
                    .map(|(((key, _), rows), &on)| {
                        on.then(|| {
                            pair(&format!("{module}.adapter.{key}"), rows, ShardLayout::Contiguous)
                        })
                        .transpose()
                    })
                    .collect::<Result<_>>()?;
                Factors::Canonical { split: sp, parts }
            }
            _ => {
                let (a, b) = pair(&format!("{module}.adapter"), out, b_layout)?;
                Factors::Fused { a, b }
            }
        };
        let magnitude = if cfg.peft_scheme == PeftScheme::Dora {
            let name = format!("{module}.adapter.weight_magnitude");
            let t = store.create_adapter(&name, &[out], b_part, b_layout, Init::Ones)?;
            let var = store.get(&name).expect("just registered").var.clone();
            Some((t, var))
        } else {
            None
        };
        let (dropout, post) = (cfg.dropout, cfg.dropout_position == "post");
        Ok(Some(Self { factors, scale: cfg.alpha / r as f64, kind, magnitude, dropout, post }))
    }

    /// `alpha / dim`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// `(A, B, alpha/dim)` when the written-out layer backward covers this adapter: LoRA
    /// without dropout (DoRA's weight norm and dropout masks run through autograd).
    pub fn explicit_parts(&self) -> Option<(&Tensor, &Tensor, f64)> {
        match &self.factors {
            Factors::Fused { a, b } if self.magnitude.is_none() && self.dropout == 0.0 => {
                Some((a, b, self.scale))
            }
            _ => None,
        }
    }

    /// A trainable tensor of this adapter, to anchor a graph node whose input is untracked
    /// (see `model::recompute::with_backward_anchored`).
    pub fn anchor(&self) -> &Tensor {
        match &self.factors {
            Factors::Fused { a, .. } => a,
            Factors::Canonical { parts, .. } => {
                &parts.iter().flatten().next().expect("a canonical adapter has a part").0
            }
        }
    }

    /// DoRA: sets the magnitude to `‖W‖_row` of the base weight whose shard on this rank is
    /// `w` (call after the pretrained base weights are loaded and before training); no-op for
    /// LoRA.
    pub fn init_magnitude(&self, w: &Tensor, tp: Option<&TensorParallel>) -> Result<()> {
        if let Some((_, var)) = &self.magnitude {
            let n = self.row_norm(&w.to_dtype(var.dtype())?, tp)?;
            var.set(&n)?;
        }
        Ok(())
    }

    /// `‖M‖` of every output row of the matrix whose shard on this rank is `m`: a row-parallel
    /// layer holds a slice of every row's columns, so the squares are summed over TP.
    fn row_norm(&self, m: &Tensor, tp: Option<&TensorParallel>) -> Result<Tensor> {
        let sq = m.sqr()?.sum(D::Minus1)?;
        let sq = match (self.kind, tp) {
            (BaseParallel::Row, Some(tp)) if tp.size() > 1 => {
                tp.comm().all_reduce(&sq.contiguous()?, ReduceOp::Sum)?
            }
            _ => sq,
        };
        Ok(sq.sqrt()?)
    }

    /// `B(A x) · scale` for a column-parallel base layer, `x` the layer input **before**
    /// the TP region is entered: A is replicated, so its input gradient must not be summed
    /// a second time, and the gradient of `A x` is summed over TP instead (copy-to-region).
    fn column_delta(
        &self,
        x: &Tensor,
        tp: Option<&TensorParallel>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        check_no_sp(tp)?;
        // `x` is replicated over TP, so every rank draws the same mask.
        let x = self.drop(x, rng, false, tp)?;
        let low_rank = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
            let h = ops::linear(&x, a, None)?;
            let h = match tp {
                Some(tp) => tp.copy_to_region(&h)?,
                None => h,
            };
            Ok((ops::linear(&h, b, None)? * self.scale)?)
        };
        let out = match &self.factors {
            Factors::Fused { a, b } => low_rank(a, b)?,
            Factors::Canonical { split, parts } => {
                let outs = parts
                    .iter()
                    .map(|p| p.as_ref().map(|(a, b)| low_rank(a, b)).transpose())
                    .collect::<Result<Vec<_>>>()?;
                split.assemble(&outs, tp.map_or(1, |t| t.size()))?
            }
        };
        // Post-dropout: the output is this rank's part of the last dim.
        self.drop(&out, rng, true, tp)
    }

    /// Adapter dropout on `t` when it applies at this position (`post` says which): `sharded`
    /// tensors are this rank's part of the last dim, others are replicated.
    fn drop(
        &self,
        t: &Tensor,
        rng: Option<&DropoutRng>,
        sharded: bool,
        tp: Option<&TensorParallel>,
    ) -> Result<Tensor> {
        let pos_post = match self.kind {
            BaseParallel::Column(_) => sharded,
            BaseParallel::Row => !sharded,
        };
        let Some(r) = rng.filter(|_| self.dropout > 0.0 && pos_post == self.post) else {
            return Ok(t.clone());
        };
        let Some(tp) = tp.filter(|tp| sharded && tp.size() > 1) else {
            return Ok(r.dropout(t, self.dropout)?);
        };
        let last = t.rank() - 1;
        Ok(match self.kind {
            BaseParallel::Row => r.dropout_shard(t, self.dropout, last, tp.rank(), tp.size())?,
            // The output rows may be cut as gated halves: draw the global mask (the TP=1
            // stream) and keep this rank's part in the base layer's layout.
            BaseParallel::Column(layout) => {
                let mut global = t.dims().to_vec();
                global[last] *= tp.size();
                let ones = Tensor::ones(global, t.dtype(), t.device())?;
                let mask = r.dropout(&ones, self.dropout)?;
                let coord = TpCoord { rank: tp.rank(), size: tp.size() };
                t.mul(&shard_of(&mask, Some(last), layout, coord)?)?
            }
        })
    }

    /// Column-parallel adapted linear: `x` before and `xe` after entering the TP region.
    pub fn forward_column(
        &self,
        x: &Tensor,
        xe: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        tp: Option<&TensorParallel>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        debug_assert!(matches!(self.kind, BaseParallel::Column(_)));
        let y = (ops::linear(xe, w, None)? + self.column_delta(x, tp, rng)?)?;
        let y = self.dora_scale(y, w, tp)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Row-parallel adapted linear on this rank's input shard `x`: the base partial product
    /// and `A_r x_r` are each reduced over TP, then the replicated B applies.
    pub fn forward_row(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        tp: Option<&TensorParallel>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        debug_assert!(self.kind == BaseParallel::Row);
        check_no_sp(tp)?;
        let Factors::Fused { a, b } = &self.factors else {
            bail!("canonical LoRA adapts only the fused column-parallel layers in parts");
        };
        let y = ops::linear(x, w, None)?;
        // Pre-dropout on this rank's input shard (the last dim is split over TP).
        let h = ops::linear(&self.drop(x, rng, true, tp)?, a, None)?;
        let (y, h) = match tp {
            Some(tp) => (tp.exit_row(&y)?, tp.exit_row(&h)?),
            None => (y, h),
        };
        let delta = (ops::linear(&h, b, None)? * self.scale)?;
        let y = (y + self.drop(&delta, rng, false, tp)?)?;
        let y = self.dora_scale(y, w, tp)?;
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// DoRA: `y · m / ‖W + s·BA‖_row` (norm detached, as Megatron Bridge); LoRA: `y`. Each
    /// rank's `W + s·BA` is its shard of the merged weight (column-parallel: its rows;
    /// row-parallel: its columns of every row).
    fn dora_scale(&self, y: Tensor, w: &Tensor, tp: Option<&TensorParallel>) -> Result<Tensor> {
        let (Some((m, _)), Factors::Fused { a, b }) = (&self.magnitude, &self.factors) else {
            return Ok(y);
        };
        let merged = (w.detach() + (b.detach().matmul(&a.detach())? * self.scale)?)?;
        let norm = self.row_norm(&merged, tp)?;
        let factor = m.broadcast_div(&norm)?;
        Ok(y.broadcast_mul(&factor)?)
    }

    /// The merged weight `W + scale · B A` for full (unsharded) tensors `w`, `a`, `b`
    /// (DoRA: also rescaled rows by `m / ‖·‖`), the `--merge-lora` math.
    pub fn merge_full(
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        magnitude: Option<&Tensor>,
    ) -> Result<Tensor> {
        let merged = (w + (b.matmul(a)? * scale)?)?;
        Ok(match magnitude {
            Some(m) => {
                let norm = merged.sqr()?.sum(D::Minus1)?.sqrt()?;
                merged.broadcast_mul(&m.broadcast_div(&norm)?.unsqueeze(1)?)?
            }
            None => merged,
        })
    }
}

fn check_no_sp(tp: Option<&TensorParallel>) -> Result<()> {
    if tp.is_some_and(|t| t.sequence_parallel()) {
        bail!("LoRA/DoRA adapters with model.sequence_parallel=true are not implemented in this build");
    }
    Ok(())
}

/// Rejects the adapter options this build does not run, naming the module.
fn check_supported(cfg: &PeftConfig, module: &str) -> Result<()> {
    if cfg.dim == 0 {
        bail!("peft.dim must be > 0 (module {module})");
    }
    if !(0.0..1.0).contains(&cfg.dropout) {
        bail!("peft.dropout must be in [0, 1), got {} (module {module})", cfg.dropout);
    }
    if !matches!(cfg.dropout_position.as_str(), "pre" | "post") {
        bail!(
            "peft.dropout_position must be \"pre\" or \"post\", got {:?} (module {module})",
            cfg.dropout_position
        );
    }
    if cfg.dropout > 0.0 && cfg.peft_scheme == PeftScheme::Dora {
        bail!("DoRA with peft.dropout > 0 (Megatron Bridge's dropout correction) is not implemented in this build (module {module}); set peft.dropout=0");
    }
    if cfg.lora_a_init_method != "xavier" || cfg.lora_b_init_method != "zero" {
        bail!(
            "peft init methods lora_A_init_method={:?} lora_B_init_method={:?} (module {module}): only \"xavier\" / \"zero\" are implemented",
            cfg.lora_a_init_method,
            cfg.lora_b_init_method
        );
    }
    Ok(())
}
