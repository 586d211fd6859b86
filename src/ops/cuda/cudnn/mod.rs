//! cuDNN's fused attention through its backend graph API (`model.attention_backend` "fused",
//! or "auto" where it serves the call). cuDNN is loaded at run time ([`ffi`]); without it
//! mbridge runs its own flash kernels (`super::flash_attn`).

pub mod ffi;
pub mod graph;
mod handle;
pub mod sdpa;

/// Whether cuDNN can be used, or why not.
pub fn available() -> Result<(), String> {
    ffi::api().map(|_| ())
}
