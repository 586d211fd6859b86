//! Human-readable rendering of dataset samples (`mbridge data show-samples`).
use std::fmt::Write as _;

use anyhow::Result;

use super::builder::PretrainDataset;
use super::tokenizer::Tokenizer;

/// Render samples `start..start+count` of `ds`: source dataset, token ids, loss-mask sum,
/// position-id resets and, with a tokenizer, the detokenized text.
pub fn render_samples(
    ds: &PretrainDataset,
    start: usize,
    count: usize,
    tok: Option<&dyn Tokenizer>,
) -> Result<String> {
    let mut out = String::new();
    let end = (start + count).min(ds.len());
    writeln!(out, "{} samples in dataset; showing {start}..{end}", ds.len())?;
    for i in start..end {
        let (src, s) = ds.get_with_source(i)?;
        let mask_sum: f32 = s.loss_mask.iter().sum();
        let resets = s.position_ids.iter().skip(1).filter(|&&p| p == 0).count();
        writeln!(
            out,
            "--- sample {i} (dataset {src}): {} tokens, loss_mask sum {mask_sum}, position resets {resets}",
            s.tokens.len()
        )?;
        writeln!(out, "tokens: {:?}", s.tokens)?;
        writeln!(out, "labels: {:?}", s.labels)?;
        if let Some(t) = tok {
            writeln!(out, "text: {:?}", t.decode(&s.tokens)?)?;
        }
    }
    Ok(out)
}
