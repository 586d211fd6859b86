//! The per-micro-batch training building block: forward + masked cross-entropy.

use super::gpt::{ForwardOpts, GptModel};
use crate::ops::{masked_cross_entropy, DropoutRng};
use anyhow::Result;
use candle_core::Tensor;

/// One micro-batch as the GPT datasets produce it.
#[derive(Debug, Clone)]
pub struct Microbatch {
    /// Input ids `[b, s]` (u32).
    pub tokens: Tensor,
    /// Target ids `[b, s]` (u32): tokens shifted left by one.
    pub labels: Tensor,
    /// Loss weights `[b, s]` (float, 0 at padding/EOD-masked positions).
    pub loss_mask: Tensor,
    /// Position ids `[b, s]`; None ⇒ `0..s`.
    pub position_ids: Option<Tensor>,
    /// Megatron attention mask `[b, 1, s, s]`, nonzero = masked out; None ⇒ causal.
    pub attention_mask: Option<Tensor>,
}

/// Runs the model on `batch` and returns `(Σ mask·CE, Σ mask)` (see
/// [`masked_cross_entropy`]); call `.backward()` on `sum / global_count` after summing the
/// counts over the global batch, exactly as Megatron reduces `{"lm loss": [sum, count]}`.
/// `dropout` is the mask source of this micro-batch in training (None = no dropout, e.g.
/// for validation or when the config's dropouts are zero).
pub fn loss_for_microbatch(
    model: &GptModel,
    batch: &Microbatch,
    dropout: Option<&DropoutRng>,
) -> Result<(Tensor, f64)> {
    let opts = ForwardOpts {
        position_ids: batch.position_ids.as_ref(),
        attention_mask: batch.attention_mask.as_ref(),
        dropout,
    };
    let logits = model.forward(&batch.tokens, &opts)?;
    Ok(masked_cross_entropy(&logits, &batch.labels, &batch.loss_mask)?)
}
