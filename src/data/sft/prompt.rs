//! Prompt/completion tokenization (`tokenize_prompt_completion_example`, spec §3).
use anyhow::{bail, ensure, Context, Result};

use super::SftExample;
use crate::config::dataset::SftPreprocessingConfig;
use crate::data::tokenizer::Tokenizer;

/// Which tokens count in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcLossMode {
    /// Completion (+ EOS) only.
    Completion,
    /// Every token.
    Full,
}

/// Which end of an over-long sequence to cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the head, cut the tail.
    Right,
    /// Keep the tail, cut the head.
    Left,
}

/// Resolved `PromptCompletionSFTPreprocessingConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptCompletionConfig {
    /// Prompt column.
    pub prompt_column: String,
    /// Completion column.
    pub completion_column: String,
    /// Template with one `{prompt}` placeholder (`{{`/`}}` escape braces).
    pub prompt_template: String,
    /// Text put before the completion.
    pub separator: String,
    /// Loss mode.
    pub loss_mode: PcLossMode,
    /// `str.strip(" ")` prompt and completion.
    pub strip_whitespace: bool,
    /// Prepend BOS.
    pub add_bos: bool,
    /// Append SEP after the prompt.
    pub add_sep: bool,
    /// Append EOS after the completion.
    pub add_eos: bool,
    /// Truncation side.
    pub truncation: Truncation,
}

impl PromptCompletionConfig {
    /// Defaults: Megatron Bridge's `dataset_root` default (input/output, separator " ") when
    /// nothing is set, else `PromptCompletionSFTPreprocessingConfig` defaults for unset fields.
    pub fn resolve(c: &SftPreprocessingConfig) -> Result<Self> {
        let explicit = c != &SftPreprocessingConfig::default();
        let (pcol, ccol, sep) =
            if explicit { ("prompt", "completion", "") } else { ("input", "output", " ") };
        let loss_mode = match c.loss_mode.as_deref() {
            None | Some("completion") => PcLossMode::Completion,
            Some("full") => PcLossMode::Full,
            // Chat-only modes: prompt/completion rows then use their default.
            Some("assistant") | Some("last_turn") => PcLossMode::Completion,
            Some(o) => bail!(
                "dataset.preprocessing.loss_mode {o:?}: expected \"completion\" or \"full\" \
                 (chat rows: \"assistant\", \"last_turn\", \"full\")"
            ),
        };
        let truncation = match c.truncation_method.as_deref() {
            None | Some("right") => Truncation::Right,
            Some("left") => Truncation::Left,
            Some(o) => bail!(
                "dataset.preprocessing.truncation_method {o:?}: expected \"right\" or \"left\""
            ),
        };
        let cfg = PromptCompletionConfig {
            prompt_column: c.prompt_column.clone().unwrap_or_else(|| pcol.into()),
            completion_column: c.completion_column.clone().unwrap_or_else(|| ccol.into()),
            prompt_template: c.prompt_template.clone().unwrap_or_else(|| "{prompt}".into()),
            separator: c.separator.clone().unwrap_or_else(|| sep.into()),
            loss_mode,
            strip_whitespace: c.strip_whitespace.unwrap_or(true),
            add_bos: c.add_bos.unwrap_or(false),
            add_sep: c.add_sep.unwrap_or(false),
            add_eos: c.add_eos.unwrap_or(true),
            truncation,
        };
        format_prompt(&cfg.prompt_template, "").context("dataset.preprocessing.prompt_template")?;
        Ok(cfg)
    }
}

/// Python `template.format(prompt=p)` restricted to the `{prompt}` placeholder.
pub fn format_prompt(template: &str, prompt: &str) -> Result<String> {
    let mut out = String::with_capacity(template.len() + prompt.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if let Some(after) = tail.strip_prefix("{prompt}") {
            out.push_str(prompt);
            rest = after;
        } else {
            bail!("{template:?}: only the `{{prompt}}` placeholder is allowed (use `{{{{`/`}}}}` for literal braces)");
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `tok("x y") != tok("x") + tok("y")`: the tokenizer encodes a leading space itself. A
/// tokenizer that cannot encode the probe text (the null tokenizer) is not space sensitive.
pub fn is_space_sensitive(tok: &dyn Tokenizer) -> bool {
    let probe = || -> Result<bool> {
        let mut xy = tok.encode("x")?;
        xy.extend(tok.encode("y")?);
        Ok(tok.encode("x y")? != xy)
    };
    probe().unwrap_or(false)
}

/// Tokenizer facts prompt/completion tokenization needs, computed once per dataset.
#[derive(Debug, Clone)]
pub struct PcTokenInfo {
    /// See [`is_space_sensitive`].
    pub space_sensitive: bool,
    /// BOS id (required by `add_bos`).
    pub bos: Option<i64>,
    /// SEP id (required by `add_sep`).
    pub sep: Option<i64>,
    /// EOS id.
    pub eos: i64,
    /// Ids never supervised (the pad id when it differs from EOS).
    pub skipped: Vec<i64>,
}

impl PcTokenInfo {
    /// Read the facts off `tok`.
    pub fn new(tok: &dyn Tokenizer) -> Result<Self> {
        let sep = tok.special_token("sep_token").and_then(|t| {
            let ids = tok.encode(t).ok()?;
            (ids.len() == 1).then(|| ids[0])
        });
        let skipped = tok.pad().filter(|&p| p != tok.eod()).into_iter().collect();
        Ok(PcTokenInfo {
            space_sensitive: is_space_sensitive(tok),
            bos: tok.bos(),
            sep,
            eos: tok.eod(),
            skipped,
        })
    }
}

fn cut(ids: &mut Vec<i64>, n: usize, how: Truncation) {
    let n = n.min(ids.len());
    match how {
        Truncation::Right => ids.truncate(ids.len() - n),
        Truncation::Left => {
            ids.drain(..n);
        }
    }
}

/// Tokenize one prompt/completion pair into at most `max_length` tokens.
pub fn tokenize_prompt_completion(
    prompt: &str,
    completion: &str,
    cfg: &PromptCompletionConfig,
    info: &PcTokenInfo,
    tok: &dyn Tokenizer,
    max_length: usize,
) -> Result<SftExample> {
    let (p, c) = if cfg.strip_whitespace {
        (prompt.trim_matches(' '), completion.trim_matches(' '))
    } else {
        (prompt, completion)
    };
    let prompt_text = format_prompt(&cfg.prompt_template, p)?;
    let sep_text = match cfg.separator.strip_prefix(' ') {
        Some(rest) if !info.space_sensitive => rest,
        _ => cfg.separator.as_str(),
    };
    let completion_text = format!("{sep_text}{c}");
    let mut prompt_ids = tok.encode(&prompt_text)?;
    let mut completion_ids = tok.encode(&completion_text)?;
    let bos = if cfg.add_bos {
        Some(info.bos.context("add_bos is set but the tokenizer has no BOS token")?)
    } else {
        None
    };
    let sep = if cfg.add_sep {
        Some(info.sep.context("add_sep is set but the tokenizer has no single-id `sep_token`")?)
    } else {
        None
    };
    let specials = bos.is_some() as usize + sep.is_some() as usize + cfg.add_eos as usize;
    ensure!(
        max_length > specials,
        "max length {max_length} leaves no room for text after {specials} special tokens"
    );
    let budget = max_length - specials;
    let total = prompt_ids.len() + completion_ids.len();
    if total > budget {
        let overflow = total - budget;
        let from_prompt = overflow.min(prompt_ids.len());
        cut(&mut prompt_ids, from_prompt, cfg.truncation);
        cut(&mut completion_ids, overflow - from_prompt, cfg.truncation);
    }
    let mut input_ids: Vec<i64> = bos.into_iter().collect();
    input_ids.extend(&prompt_ids);
    input_ids.extend(sep);
    let context_len = input_ids.len();
    input_ids.extend(&completion_ids);
    if cfg.add_eos {
        input_ids.push(info.eos);
    }
    ensure!(
        input_ids.len() >= 2,
        "row gives {} token(s); at least 2 are needed (prompt {prompt_text:?}, completion {completion_text:?})",
        input_ids.len()
    );
    let mut loss_mask: Vec<u8> = match cfg.loss_mode {
        PcLossMode::Completion => {
            (0..input_ids.len()).map(|i| u8::from(i >= context_len)).collect()
        }
        PcLossMode::Full => vec![1; input_ids.len()],
    };
    for (m, id) in loss_mask.iter_mut().zip(&input_ids) {
        if info.skipped.contains(id) {
            *m = 0;
        }
    }
    if !c.is_empty() {
        ensure!(
            loss_mask[1..].contains(&1),
            "after truncation to {max_length} tokens no completion token is left to train on"
        );
    }
    Ok(SftExample { input_ids, loss_mask, answer_start_idx: context_len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::NullTokenizer;

    #[test]
    fn template_formatting() {
        assert_eq!(format_prompt("Q: {prompt} {{x}}", "hi").unwrap(), "Q: hi {x}");
        assert!(format_prompt("{input}", "hi").is_err());
    }

    #[test]
    fn spec_vector_and_truncation() {
        // NullTokenizer: "x y" is not a number, so use ids directly: "5" → [5], "7 8" → [7, 8].
        let tok = NullTokenizer::new(100);
        let info =
            PcTokenInfo { space_sensitive: false, bos: None, sep: None, eos: 2, skipped: vec![] };
        let cfg = PromptCompletionConfig::resolve(&Default::default()).unwrap();
        assert_eq!(cfg.separator, " ");
        let ex = tokenize_prompt_completion("5", "7 8", &cfg, &info, &tok, 16).unwrap();
        assert_eq!(ex.input_ids, vec![5, 7, 8, 2]);
        assert_eq!(ex.loss_mask, vec![0, 1, 1, 1]);
        assert_eq!(ex.answer_start_idx, 1);
        // Prompt is cut first: right keeps the head, left keeps the tail.
        let ex = tokenize_prompt_completion("5 6 7", "8 9", &cfg, &info, &tok, 5).unwrap();
        assert_eq!(ex.input_ids, vec![5, 6, 8, 9, 2]);
        let left = PromptCompletionConfig { truncation: Truncation::Left, ..cfg.clone() };
        let ex = tokenize_prompt_completion("5 6 7", "8 9", &left, &info, &tok, 5).unwrap();
        assert_eq!(ex.input_ids, vec![6, 7, 8, 9, 2]);
        // Then the completion.
        let ex = tokenize_prompt_completion("5 6", "8 9 10", &cfg, &info, &tok, 3).unwrap();
        assert_eq!(ex.input_ids, vec![8, 9, 2]);
        assert_eq!(ex.loss_mask, vec![1, 1, 1]);
        let full = PromptCompletionConfig { loss_mode: PcLossMode::Full, ..cfg.clone() };
        let ex = tokenize_prompt_completion("5", "7", &full, &info, &tok, 16).unwrap();
        assert_eq!(ex.loss_mask, vec![1, 1, 1]);
        // Only one token in total: an error.
        let no_eos = PromptCompletionConfig { add_eos: false, ..cfg };
        assert!(tokenize_prompt_completion("", "7", &no_eos, &info, &tok, 16).is_err());
    }
}
