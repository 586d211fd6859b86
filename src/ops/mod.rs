//! Differentiable building blocks of the GPT model.
//!
//! Every op here is written with candle's basic tensor ops (matmul, broadcast arithmetic,
//! `exp`, `sum_keepdim`, `index_select`, `gather`, `where_cond`, ...), all of which have a
//! backward pass. candle-nn's fast kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`,
//! `rope*`, `sdpa`) have none and silently cut gradients, so they are never used in the
//! training path. Fused CUDA kernels will later replace these bodies as CustomOps whose
//! backward is checked against these reference forms.

pub mod activation;
pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod linear;
pub mod norm;
pub mod rope;
pub mod softmax;

pub use activation::{apply_activation, swiglu};
pub use attention::{attention, build_attention_mask, AttentionShape};
pub use cross_entropy::masked_cross_entropy;
pub use dropout::DropoutRng;
pub use linear::linear;
pub use norm::{layer_norm, rms_norm};
pub use rope::{apply_rope, RopeTable};
pub use softmax::softmax_last_dim;
