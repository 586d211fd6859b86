//! Greedy decoding, with a KV cache (the product path) and by full recompute (its oracle).

use super::gpt::{ForwardOpts, GptModel};
use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};

/// Greedy next token from the last position of logits `[1, s, V]`.
fn argmax_last(logits: &Tensor) -> Result<u32> {
    let s = logits.dim(1)?;
    let last = logits.i((0, s - 1))?.to_dtype(DType::F32)?;
    Ok(last.argmax(0)?.to_scalar::<u32>()?)
}

fn check_prompt(model: &GptModel, prompt: &[u32], max_new_tokens: usize) -> Result<()> {
    if prompt.is_empty() {
        bail!("generate: the prompt is empty");
    }
    let need = prompt.len() + max_new_tokens.saturating_sub(1);
    let max = model.arch().max_positions;
    if need > max {
        bail!(
            "generate: prompt of {} tokens + {max_new_tokens} new tokens exceeds the model's maximum of {max} positions",
            prompt.len()
        );
    }
    Ok(())
}

/// Greedily extends `prompt` by up to `max_new_tokens` tokens using a KV cache: the prompt is
/// run once, then one token per step. Stops after emitting `eod` (which is included).
/// Returns only the new tokens.
pub fn generate(
    model: &GptModel,
    prompt: &[u32],
    max_new_tokens: usize,
    eod: Option<u32>,
) -> Result<Vec<u32>> {
    check_prompt(model, prompt, max_new_tokens)?;
    let mut out = Vec::with_capacity(max_new_tokens);
    let mut cache = model.new_cache();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    for _ in 0..max_new_tokens {
        let logits = model.forward_cached(&input, &mut cache)?;
        let next = argmax_last(&logits)?;
        out.push(next);
        if Some(next) == eod {
            break;
        }
        input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
    }
    Ok(out)
}

/// Same as [`generate`] but recomputes the whole sequence each step (no cache); slow, used to
/// check the cached path.
pub fn generate_no_cache(
    model: &GptModel,
    prompt: &[u32],
    max_new_tokens: usize,
    eod: Option<u32>,
) -> Result<Vec<u32>> {
    check_prompt(model, prompt, max_new_tokens)?;
    let mut seq = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new_tokens);
    for _ in 0..max_new_tokens {
        let input = Tensor::new(seq.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&input, &ForwardOpts::default())?;
        let next = argmax_last(&model.gather_logits(&logits)?)?;
        out.push(next);
        seq.push(next);
        if Some(next) == eod {
            break;
        }
    }
    Ok(out)
}
