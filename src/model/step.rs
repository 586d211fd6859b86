//! The per-micro-batch training building block: forward + masked cross-entropy.

use super::gpt::{ForwardOpts, GptModel};
use super::recompute::RecomputeGrads;
use crate::ops::DropoutRng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

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
    /// Packed sequences (THD) instead of a dense mask: token offsets into the rows flattened
    /// row-major (row `r`'s boundaries shifted by `r·s`; see [`ForwardOpts::cu_seqlens`]).
    pub cu_seqlens: Option<Vec<u32>>,
    /// The ids' and loss mask's summaries, when the host built them (None ⇒ the model and
    /// the loss read them back from the device).
    pub host_stats: Option<HostStats>,
}

/// What the host knows of a micro-batch when it builds it. The model checks the ids' ranges
/// before its forward and the loss needs the mask's count before the backward: read back
/// from the device, each would wait for the work queued before it and leave the GPU idle
/// while the host queues what follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostStats {
    /// The largest input token id (checked against the vocabulary).
    pub max_token: u32,
    /// The largest position id, when the micro-batch has position ids.
    pub max_position: Option<u32>,
    /// The largest label id (checked against the vocabulary).
    pub max_label: u32,
    /// `Σ loss_mask`: the micro-batch's loss-token count.
    pub mask_sum: f64,
}

impl HostStats {
    /// The summaries of a micro-batch's ids and loss mask as the host holds them.
    pub fn of(
        tokens: &[u32],
        positions: Option<&[u32]>,
        labels: &[u32],
        loss_mask: &[f32],
    ) -> Self {
        let max = |ids: &[u32]| ids.iter().copied().max().unwrap_or(0);
        Self {
            max_token: max(tokens),
            max_position: positions.map(max),
            max_label: max(labels),
            // Summed in f64 from the f32 weights; 0/1 masks count exactly either way.
            mask_sum: loss_mask.iter().map(|&m| f64::from(m)).sum(),
        }
    }
}

impl Microbatch {
    /// Stacks per-sample rows (as the GPT datasets yield them: i64 ids, f32 loss mask) into a
    /// micro-batch on `device`. All rows must have the same length; negative ids are errors.
    pub fn from_rows(
        tokens: &[Vec<i64>],
        labels: &[Vec<i64>],
        loss_mask: &[Vec<f32>],
        position_ids: Option<&[Vec<i64>]>,
        device: &Device,
    ) -> Result<Self> {
        let b = tokens.len();
        let s = tokens.first().map_or(0, Vec::len);
        if b == 0 || s == 0 {
            bail!("empty micro-batch");
        }
        let ids = |what: &str, rows: &[Vec<i64>]| -> Result<Vec<u32>> {
            if rows.len() != b || rows.iter().any(|r| r.len() != s) {
                bail!("micro-batch {what}: expected {b} rows of {s}");
            }
            let mut flat = Vec::with_capacity(b * s);
            for &v in rows.iter().flatten() {
                if v < 0 || v > i64::from(u32::MAX) {
                    bail!("micro-batch {what}: id {v} out of range");
                }
                flat.push(v as u32);
            }
            Ok(flat)
        };
        let tensor = |flat: Vec<u32>| Tensor::from_vec(flat, (b, s), device);
        if loss_mask.len() != b || loss_mask.iter().any(|r| r.len() != s) {
            bail!("micro-batch loss_mask: expected {b} rows of {s}");
        }
        let mask: Vec<f32> = loss_mask.iter().flatten().copied().collect();
        let (tokens, labels) = (ids("tokens", tokens)?, ids("labels", labels)?);
        let positions = position_ids.map(|p| ids("position_ids", p)).transpose()?;
        let host_stats = Some(HostStats::of(&tokens, positions.as_deref(), &labels, &mask));
        Ok(Self {
            tokens: tensor(tokens)?,
            labels: tensor(labels)?,
            loss_mask: Tensor::from_vec(mask, (b, s), device)?,
            position_ids: positions.map(tensor).transpose()?,
            attention_mask: None,
            cu_seqlens: None,
            host_stats,
        })
    }

    /// The forward options of this micro-batch (positions, mask or packed boundaries) with
    /// the dropout mask source `dropout` (None = evaluation).
    pub fn forward_opts<'a>(&'a self, dropout: Option<&'a DropoutRng>) -> ForwardOpts<'a> {
        ForwardOpts {
            position_ids: self.position_ids.as_ref(),
            attention_mask: self.attention_mask.as_ref(),
            cu_seqlens: self.cu_seqlens.as_deref(),
            dropout,
            host_stats: self.host_stats,
            no_grad: false,
        }
    }
}

/// Runs the model on `batch` and returns `(Σ mask·CE, Σ mask)` (see
/// [`crate::ops::masked_cross_entropy`]; vocab-parallel with TP > 1); call `.backward()` on
/// `sum / global_count` after summing the
/// counts over the global batch, exactly as Megatron reduces `{"lm loss": [sum, count]}`.
/// `dropout` is the mask source of this micro-batch in training (None = no dropout, e.g.
/// for validation or when the config's dropouts are zero).
pub fn loss_for_microbatch(
    model: &GptModel,
    batch: &Microbatch,
    dropout: Option<&DropoutRng>,
) -> Result<(Tensor, f64)> {
    let opts = batch.forward_opts(dropout);
    let logits = model.forward(&batch.tokens, &opts)?;
    model.cross_entropy(&logits, &batch.labels, &batch.loss_mask)
}

/// `(Σ mask·CE, Σ mask)` of `batch` for evaluation: no backward can follow (the layers run
/// forward only, see [`crate::model::ForwardOpts::no_grad`]).
pub fn eval_loss_for_microbatch(model: &GptModel, batch: &Microbatch) -> Result<(Tensor, f64)> {
    let opts = ForwardOpts { no_grad: true, ..batch.forward_opts(None) };
    let logits = model.forward(&batch.tokens, &opts)?;
    model.cross_entropy(&logits, &batch.labels, &batch.loss_mask)
}

/// [`loss_for_microbatch`] with the model's activation recompute: parameter gradients of the
/// recomputed layers arrive in `grads` during `backward()`; add them to the step's gradients.
pub fn loss_for_microbatch_recompute(
    model: &GptModel,
    batch: &Microbatch,
    dropout: Option<&DropoutRng>,
    grads: &RecomputeGrads,
) -> Result<(Tensor, f64)> {
    let opts = batch.forward_opts(dropout);
    model.forward_stage_loss(&batch.tokens, &opts, Some(grads), batch)
}
