//! MLP activations, plain and gated (GLU).

use crate::config::model::Activation;
use candle_core::{Result, Tensor, D};

/// Applies an activation function elementwise (all variants have a backward in candle).
pub fn apply_activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        // Megatron's default `F.gelu` is the exact erf form.
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Silu => x.silu(),
        Activation::Relu => x.relu(),
        Activation::SquaredRelu => x.relu()?.sqr(),
    }
}

/// Gated linear unit on a fused `[.., 2f]` input laid out `[gate; up]` (Megatron's
/// `linear_fc1` with `gated_linear_unit=True`): `act(gate) * up`. SwiGLU is `act = Silu`,
/// GEGLU is `act = Gelu`. SwiGLU in half precision on CUDA takes the fused kernel;
/// [`gated_composite`] is the reference.
pub fn gated(x: &Tensor, act: Activation) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if act == Activation::Silu && super::fused::use_fused(x.device(), x.dtype()) {
        return x.contiguous()?.apply_op1(super::cuda::swiglu::SwiGlu);
    }
    gated_composite(x, act)
}

/// Device-generic form of [`gated`] from basic ops.
pub fn gated_composite(x: &Tensor, act: Activation) -> Result<Tensor> {
    let f = x.dim(D::Minus1)? / 2;
    let gate = x.narrow(D::Minus1, 0, f)?;
    let up = x.narrow(D::Minus1, f, f)?;
    apply_activation(&gate, act)?.mul(&up)
}

/// SwiGLU: `silu(gate) * up` on a fused `[gate; up]` last dimension.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    gated(x, Activation::Silu)
}
