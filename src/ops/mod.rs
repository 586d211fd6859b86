//! Differentiable building blocks of the GPT model.
//!
//! Every op here is written with candle's basic tensor ops (matmul, broadcast arithmetic,
//! `exp`, `sum_keepdim`, `index_select`, `gather`, `where_cond`, ...), all of which have a
//! backward pass. candle-nn's fast kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`,
//! `rope*`, `sdpa`) have none and silently cut gradients, so they are never used in the
//! training path. Two elementwise-heavy ops (masked softmax, token cross-entropy) also have
//! fused CPU CustomOps with their own backward (`fused_cpu.rs`), chosen automatically on CPU
//! for f32/f64; the composite forms stay public as the reference and the path for other
//! devices. Fused CUDA kernels (`cuda`, chosen by `fused::use_fused`: half precision on a
//! GPU) join them the same way, checked against these forms by `mbridge selftest cuda`.

pub mod activation;
pub mod attention;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dropout;
pub mod flash;
pub mod fp8;
pub mod fused;
mod fused_cpu;
pub mod linear;
pub mod main_grads;
pub mod manual;
pub mod norm;
pub mod nvtx;
pub mod param_remainder;
pub mod rope;
pub mod softmax;
pub mod timing;

pub use activation::{apply_activation, gated_composite, swiglu};
pub use attention::{
    attention, attention_auto, build_attention_mask, build_packed_attention_mask, AttentionShape,
    AttnMask,
};
pub use cross_entropy::{masked_cross_entropy, token_cross_entropy, token_cross_entropy_composite};
pub use dropout::DropoutRng;
pub use flash::PackedSeqs;
pub use linear::linear;
pub use norm::{layer_norm, rms_norm, rms_norm_composite};
pub use rope::{apply_rope, apply_rope_composite, RopeScaling, RopeTable, Yarn};
pub use softmax::{masked_softmax, masked_softmax_composite, softmax_last_dim};
