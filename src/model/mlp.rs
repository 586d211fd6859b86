//! The MLP block: column-parallel `linear_fc1` (fused `[gate; up]` when gated), activation,
//! row-parallel `linear_fc2`; the pre-MLP norm lives in `linear_fc1` as in TE's layer spec.

use super::arch::GptArch;
use super::attention::row_parallel;
use super::explicit_layer::ExplicitInputs;
use super::explicit_linear::{ExplicitLinear, LinearSaved, TpBoundary};
use super::fp8_weights::Fp8Linears;
use super::init::Init;
use super::norm::Norm;
use super::params::{ParamStore, ShardLayout};
use super::recompute::LayerGrads;
use crate::config::model::Activation;
use crate::ops::timing::section;
use crate::ops::{self, manual, DropoutRng};
use crate::parallel::tensor::TensorParallel;
use crate::peft::{Adapter, BaseParallel, Split};
use anyhow::Result;
use candle_core::Tensor;

/// One layer's MLP with its pre-norm.
#[derive(Debug, Clone)]
pub struct Mlp {
    norm: Norm,
    fc1_w: Tensor,
    fc1_b: Option<Tensor>,
    fc2_w: Tensor,
    fc2_b: Option<Tensor>,
    gated: bool,
    activation: Activation,
    tp: Option<TensorParallel>,
    fc1_adapter: Option<Adapter>,
    fc2_adapter: Option<Adapter>,
    /// FP8 GEMMs for `linear_fc1` and `linear_fc2` in training (`ops::fp8`).
    fp8: Option<Fp8Linears>,
}

impl Mlp {
    /// Registers the parameters of layer `layer` (global number) under `decoder.layers.{layer}.mlp`.
    pub fn new(store: &mut ParamStore, arch: &GptArch, layer: usize) -> Result<Self> {
        let p = format!("decoder.layers.{layer}.mlp");
        let h = arch.hidden;
        let fc1_rows = if arch.gated { 2 * arch.ffn } else { arch.ffn };
        let fc1_layout =
            if arch.gated { ShardLayout::GatedHalves } else { ShardLayout::Contiguous };
        let std = arch.init_std;
        let out_std = std / (2.0 * arch.num_layers as f64).sqrt();
        let norm = Norm::new(
            store,
            arch,
            &format!("{p}.linear_fc1.layer_norm_weight"),
            &format!("{p}.linear_fc1.layer_norm_bias"),
            h,
        )?;
        let fc1_w = store.create(
            &format!("{p}.linear_fc1.weight"),
            &[fc1_rows, h],
            Some(0),
            fc1_layout,
            Init::Normal(std),
        )?;
        let fc1_b = if arch.add_bias_linear {
            Some(store.create(
                &format!("{p}.linear_fc1.bias"),
                &[fc1_rows],
                Some(0),
                fc1_layout,
                Init::Zeros,
            )?)
        } else {
            None
        };
        // Row-parallel bias is added once after the reduction, so it is replicated.
        let (fc2_w, fc2_b) = store.create_row_parallel(
            &format!("{p}.linear_fc2"),
            h,
            arch.ffn,
            out_std,
            arch.add_bias_linear,
        )?;
        let fc1_adapter = Adapter::maybe_new(
            store,
            &format!("{p}.linear_fc1"),
            fc1_rows,
            h,
            BaseParallel::Column(fc1_layout),
            arch.gated.then_some(Split::GateUp { ffn: arch.ffn }),
        )?;
        let fc2_adapter = Adapter::maybe_new(
            store,
            &format!("{p}.linear_fc2"),
            h,
            arch.ffn,
            BaseParallel::Row,
            None,
        )?;
        Ok(Self {
            fc1_adapter,
            fc2_adapter,
            norm,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
            gated: arch.gated,
            activation: arch.activation,
            tp: None,
            fp8: None,
        })
    }

    /// Runs the block's linear layers as FP8 GEMMs in training (None: bf16).
    pub(super) fn set_fp8(&mut self, fp8: Option<Fp8Linears>) {
        self.fp8 = fp8;
    }

    /// Runs `linear_fc1` column-parallel and `linear_fc2` row-parallel over `tp`.
    pub fn with_tensor_parallel(mut self, tp: TensorParallel) -> Self {
        if tp.sequence_parallel() {
            self.norm = self.norm.with_tp_grad_sum(tp.clone());
        }
        self.tp = Some(tp);
        self
    }

    /// `fc2(act(fc1(norm(x))))` for `x` `[b, s, h]` (no residual).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_train(x, None)
    }

    /// [`Self::forward`] with the dropout stream of a training step (LoRA adapter dropout).
    pub fn forward_train(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let xn = self.norm.forward(x)?;
        let xe = match &self.tp {
            Some(tp) => tp.enter_column(&xn)?,
            None => xn.clone(),
        };
        let y = match &self.fc1_adapter {
            Some(a) => {
                a.forward_column(&xn, &xe, &self.fc1_w, self.fc1_b.as_ref(), self.tp.as_ref(), rng)?
            }
            None => ops::linear(&xe, &self.fc1_w, self.fc1_b.as_ref())?,
        };
        let y = manual::activation_forward(&y, self.activation, self.gated)?;
        match &self.fc2_adapter {
            Some(a) => a.forward_row(&y, &self.fc2_w, self.fc2_b.as_ref(), self.tp.as_ref(), rng),
            None => row_parallel(&y, &self.fc2_w, self.fc2_b.as_ref(), self.tp.as_ref()),
        }
    }

    /// DoRA: initializes the adapters' magnitudes from the current base weights.
    pub fn init_dora(&self) -> Result<()> {
        for (a, w) in [(&self.fc1_adapter, &self.fc1_w), (&self.fc2_adapter, &self.fc2_w)] {
            if let Some(a) = a {
                a.init_magnitude(w, self.tp.as_ref())?;
            }
        }
        Ok(())
    }
}

/// What the written-out backward of [`Mlp`] keeps from its forward: the pre-norm's output,
/// `linear_fc1`'s output and the activation (`linear_fc2`'s input) when `linear_fc2` needs it
/// for a weight or adapter gradient.
pub struct MlpSaved {
    /// This rank's part of the sequence under SP; None under selective recompute of
    /// `layernorm` or `mlp` (recomputed from the block input in the backward) and when
    /// `linear_fc1` keeps its FP8 input instead.
    normed: Option<Tensor>,
    /// With what `linear_fc1` keeps; None under selective recompute of `mlp` (recomputed in the
    /// backward).
    fc1_out: Option<(Tensor, LinearSaved)>,
    /// The activation, kept rather than recomputed from `fc1_out` (a pass over the widest
    /// tensor of the layer) unless `mlp` is recomputed.
    act: Option<Tensor>,
    fc2_saved: LinearSaved,
}

impl MlpSaved {
    /// Whether `linear_fc1`'s output was kept (not under selective recompute of `mlp`).
    #[cfg(test)]
    pub(super) fn keeps_fc1(&self) -> bool {
        self.fc1_out.is_some()
    }

    /// Whether the pre-norm's output was kept.
    #[cfg(test)]
    pub(super) fn keeps_normed(&self) -> bool {
        self.normed.is_some()
    }

    /// Whether the activation (`linear_fc2`'s input) was kept.
    #[cfg(test)]
    pub(super) fn keeps_act(&self) -> bool {
        self.act.is_some()
    }

    /// Whether an FP8 linear layer kept quantized operands.
    #[cfg(test)]
    pub(super) fn keeps_fp8(&self) -> bool {
        self.fc1_out.as_ref().is_some_and(|(_, s)| s.is_fp8()) || self.fc2_saved.is_fp8()
    }
}

impl Mlp {
    /// Whether the written-out forward/backward covers this block: adapters only as LoRA
    /// without dropout.
    pub(super) fn explicit_ok(&self) -> bool {
        ExplicitLinear::explicit_ok(self.fc1_adapter.as_ref())
            && ExplicitLinear::explicit_ok(self.fc2_adapter.as_ref())
    }

    /// A trainable tensor of the block when its base is frozen (PEFT), see
    /// [`super::attention::SelfAttention::adapter_anchor`].
    pub(super) fn adapter_anchor(&self) -> Option<&Tensor> {
        self.fc1_adapter.as_ref().or(self.fc2_adapter.as_ref()).map(Adapter::anchor)
    }

    fn fc1_linear(&self) -> ExplicitLinear<'_> {
        ExplicitLinear {
            w: &self.fc1_w,
            b: self.fc1_b.as_ref(),
            adapter: self.fc1_adapter.as_ref(),
            column_tp: self.tp.as_ref(),
            fp8: self.fp8.as_ref(),
            backward_follows: true,
        }
    }

    fn fc2_linear(&self) -> ExplicitLinear<'_> {
        ExplicitLinear {
            w: &self.fc2_w,
            b: self.fc2_b.as_ref(),
            adapter: self.fc2_adapter.as_ref(),
            column_tp: None,
            fp8: self.fp8.as_ref(),
            backward_follows: true,
        }
    }

    fn tp_boundary(&self) -> TpBoundary<'_> {
        TpBoundary(self.tp.as_ref())
    }

    /// `x +` [`Self::forward`] (the block with its skip connection) without autograd, keeping
    /// what [`Self::backward`] needs: what `selective` recomputes is not kept.
    pub(super) fn forward_saving(
        &self,
        x: &Tensor,
        inputs: &ExplicitInputs,
    ) -> Result<(Tensor, MlpSaved)> {
        let selective = inputs.selective;
        let recompute = selective.mlp;
        let xn = self.norm.forward_untracked(x)?;
        let (fc1_out, fc1_saved) = self.fc1_of_normed(&xn, inputs.backward_follows)?;
        // Kept for `linear_fc1`'s weight gradient unless its FP8 input was kept instead (the
        // norm's backward reads the block input).
        let normed =
            (!recompute && !selective.layernorm && self.fc1_linear().needs_input()).then_some(xn);
        // An FP8 `linear_fc2` takes its input's amax from the activation's own pass.
        let fp8 = self.fc2_linear().runs_fp8();
        let (act, act_amax) =
            manual::activation_forward_amax(&fc1_out, self.activation, self.gated, fp8)?;
        let fc2 = self.fc2_linear().in_pass(inputs.backward_follows);
        let (y, fc2_saved) =
            fc2.forward_row_plus(&act, act_amax.as_ref(), self.tp_boundary(), x)?;
        let fc2_needs_input = self.fc2_linear().needs_input();
        Ok((
            y,
            MlpSaved {
                normed,
                fc1_out: (!recompute).then_some((fc1_out, fc1_saved)),
                act: (!recompute && fc2_needs_input).then_some(act),
                // Recomputing the MLP means keeping none of its activations, FP8 ones neither.
                fc2_saved: if recompute { fc2_saved.without_input() } else { fc2_saved },
            },
        ))
    }

    /// `linear_fc1` of the pre-norm's output `xn`, outside autograd (over the whole sequence
    /// under sequence parallelism).
    fn fc1_of_normed(&self, xn: &Tensor, backward_follows: bool) -> Result<(Tensor, LinearSaved)> {
        let xe = self.tp_boundary().enter(xn)?;
        self.fc1_linear().in_pass(backward_follows).forward(&xe, None)
    }

    /// Gradient of the residual block's input `x` (`x + mlp(x)`) for the output gradient
    /// `dy` `[b, s, h]`: the MLP's input gradient plus `dy` itself, the skip connection's
    /// share (added by the norm's backward pass). Parameter gradients go into `grads`.
    pub(super) fn backward(
        &self,
        saved: MlpSaved,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut LayerGrads,
    ) -> Result<Tensor> {
        let dev = x.device();
        let tpb = self.tp_boundary();
        let residual = dy;
        // The whole sequence's output gradient (gathered under sequence parallelism).
        let dy = tpb.exit_grad(dy)?;
        let (b, s, h) = dy.dims3()?;
        let dy = dy.reshape((b * s, h))?;
        let mut normed = saved.normed;
        let (fc1_out, fc1_saved) = match saved.fc1_out {
            Some(kept) => kept,
            // Selective recompute: the norm and `linear_fc1` run again.
            None => section("mlp.fwd.fc1", dev, || {
                let xn = self.norm.forward_untracked(x)?;
                let out = self.fc1_of_normed(&xn, true)?;
                normed = Some(xn);
                Ok::<_, anyhow::Error>(out)
            })?,
        };
        let u = fc1_out.reshape((b * s, ()))?;
        let kept_act = saved.act;
        let dact = section("mlp.bwd.fc2", dev, || {
            let act = || match kept_act {
                Some(a) => Ok(a.reshape((b * s, ()))?),
                None => Ok(manual::activation_forward(&u, self.activation, self.gated)?),
            };
            self.fc2_linear().backward(&dy, None, act, saved.fc2_saved, grads)
        })?;
        // An FP8 `linear_fc1` takes its output gradient's amax from the activation's backward.
        let fp8 = self.fc1_linear().runs_fp8();
        let (du, du_amax) = section("mlp.bwd.act", dev, || {
            manual::activation_backward_amax(&u, self.activation, self.gated, &dact, fp8)
        })?;
        drop((dact, u, fc1_out));
        let dxe = section("mlp.bwd.fc1", dev, || -> Result<Tensor> {
            let xe = || {
                let xn = match normed {
                    Some(xn) => xn,
                    None => self.norm.forward_untracked(x)?,
                };
                Ok(tpb.enter(&xn)?.reshape((b * s, h))?)
            };
            let dxe = self.fc1_linear().backward(&du, du_amax.as_ref(), xe, fc1_saved, grads)?;
            Ok(dxe.reshape((b, s, h))?)
        })?;
        let dxn = tpb.enter_grad(&dxe)?;
        drop(dxe);
        section("mlp.bwd.norm", dev, || self.norm.backward(x, &dxn, Some(residual), grads))
    }
}
