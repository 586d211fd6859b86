//! The legacy `GPTSFTDataset` template path (spec §3, last paragraph): active when
//! `dataset.dataset_kwargs.prompt_template` is set, e.g. `"{input}\n\n{output}"` with the label
//! placeholder last. The template is split at placeholders (`( *?{.+?})`), each piece tokenized
//! on its own, the `truncation_field`s shortened evenly when the row is too long (then the
//! remaining overflow from the right or left end), and the loss masked from `answer_start_idx`
//! when `answer_only_loss`.
use std::sync::LazyLock;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};

use super::prompt::{PcTokenInfo, Truncation};
use super::SftExample;
use crate::data::tokenizer::Tokenizer;

static PLACEHOLDER: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(r"\{(.*?)\}").expect("valid regex"));
static SPLIT: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(r" *?\{.+?\}").expect("valid regex"));

/// `dataset_kwargs` keys this path reads (others are refused so typos do not pass silently).
pub const LEGACY_KEYS: [&str; 9] = [
    "prompt_template",
    "label_key",
    "answer_only_loss",
    "truncation_field",
    "add_bos",
    "add_eos",
    "add_sep",
    "truncation_method",
    "pad_to_max_length",
];

/// Resolved legacy settings (defaults of Megatron Bridge's `create_sft_dataset`).
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyTemplate {
    /// The template after `unicode_escape` decoding.
    pub template: String,
    /// Placeholder names in order.
    pub keys: Vec<String>,
    /// The label placeholder (last in the template; "output").
    pub label_key: String,
    /// Fields shortened first (comma-separated `truncation_field`; "input").
    pub truncation_fields: Vec<String>,
    /// Loss only from `answer_start_idx` (true).
    pub answer_only_loss: bool,
    /// BOS first (false).
    pub add_bos: bool,
    /// EOS last (true).
    pub add_eos: bool,
    /// SEP after the context (false).
    pub add_sep: bool,
    /// Which end to cut (right).
    pub truncation: Truncation,
}

/// Python's `s.encode("utf-8").decode("unicode_escape")` for the escapes templates use.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some('\'') => out.push('\''),
            Some('"') => out.push('"'),
            Some(o) => {
                out.push('\\');
                out.push(o);
            }
            None => out.push('\\'),
        }
    }
    out
}

impl LegacyTemplate {
    /// Read `dataset_kwargs`; None when it has no `prompt_template`.
    pub fn from_kwargs(kwargs: Option<&toml::Table>) -> Result<Option<Self>> {
        let Some(kw) = kwargs else { return Ok(None) };
        for k in kw.keys() {
            ensure!(
                LEGACY_KEYS.contains(&k.as_str()),
                "dataset.dataset_kwargs.{k} is not supported; known keys: {}",
                LEGACY_KEYS.join(", ")
            );
        }
        let Some(t) = kw.get("prompt_template") else {
            if let Some(k) = kw.keys().find(|k| k.as_str() != "pad_to_max_length") {
                bail!(
                    "dataset.dataset_kwargs.{k} only applies with dataset_kwargs.prompt_template"
                );
            }
            return Ok(None);
        };
        let s = |k: &str, d: &str| -> Result<String> {
            match kw.get(k) {
                None => Ok(d.to_string()),
                Some(toml::Value::String(v)) => Ok(v.clone()),
                Some(v) => bail!("dataset.dataset_kwargs.{k} must be a string, got {v}"),
            }
        };
        let b = |k: &str, d: bool| -> Result<bool> {
            match kw.get(k) {
                None => Ok(d),
                Some(toml::Value::Boolean(v)) => Ok(*v),
                Some(v) => bail!("dataset.dataset_kwargs.{k} must be a boolean, got {v}"),
            }
        };
        let template = unescape(
            t.as_str().context("dataset.dataset_kwargs.prompt_template must be a string")?,
        );
        let keys: Vec<String> =
            PLACEHOLDER.captures_iter(&template).map(|c| c[1].to_string()).collect();
        let label_key = s("label_key", "output")?;
        ensure!(
            template.ends_with(&format!("{{{label_key}}}")),
            "dataset.dataset_kwargs.prompt_template {template:?}: {{{label_key}}} must be at the end"
        );
        let mut truncation_fields: Vec<String> =
            s("truncation_field", "input")?.split(',').map(str::to_string).collect();
        if keys.first().map(String::as_str) == Some("input") && truncation_fields[0] == "context" {
            truncation_fields[0] = "input".into();
        }
        for f in &truncation_fields {
            ensure!(keys.contains(f), "dataset.dataset_kwargs.truncation_field {f:?} is not a placeholder of {template:?} ({keys:?})");
        }
        let truncation = match s("truncation_method", "right")?.as_str() {
            "right" => Truncation::Right,
            "left" => Truncation::Left,
            o => bail!(
                "dataset.dataset_kwargs.truncation_method {o:?}: expected \"right\" or \"left\""
            ),
        };
        Ok(Some(LegacyTemplate {
            template,
            keys,
            label_key,
            truncation_fields,
            answer_only_loss: b("answer_only_loss", true)?,
            add_bos: b("add_bos", false)?,
            add_eos: b("add_eos", true)?,
            add_sep: b("add_sep", false)?,
            truncation,
        }))
    }

    /// `_separate_template`: (text, key or "<template>") pieces.
    fn separate(&self, values: &[String], space_sensitive: bool) -> Vec<(String, String)> {
        let mut pieces = Vec::new();
        let mut last = 0;
        for m in SPLIT.find_iter(&self.template) {
            pieces.push(&self.template[last..m.start()]);
            pieces.push(m.as_str());
            last = m.end();
        }
        pieces.push(&self.template[last..]);
        pieces
            .into_iter()
            .filter(|p| !p.is_empty())
            .map(|p| {
                let t = if !space_sensitive && p.starts_with(' ') { &p[1..] } else { p };
                let ph = t.trim_start_matches(' ');
                let spaces = &t[..t.len() - ph.len()];
                match self.keys.iter().position(|k| ph == format!("{{{k}}}")) {
                    Some(i) => (format!("{spaces}{}", values[i]), self.keys[i].clone()),
                    None => (t.to_string(), "<template>".to_string()),
                }
            })
            .collect()
    }

    fn cut(&self, ids: &[i64], keep: usize) -> Vec<i64> {
        match (keep, self.truncation) {
            (0, _) => Vec::new(),
            (k, Truncation::Left) => ids[ids.len().saturating_sub(k)..].to_vec(),
            (k, Truncation::Right) => ids[..k.min(ids.len())].to_vec(),
        }
    }

    /// `_process_example` + `_build_loss_mask` for one row.
    pub fn process(
        &self,
        row: &Map<String, Value>,
        tok: &dyn Tokenizer,
        info: &PcTokenInfo,
        max_length: usize,
    ) -> Result<SftExample> {
        let values = self
            .keys
            .iter()
            .map(|k| match row.get(k) {
                Some(Value::String(s)) => Ok(s.trim_matches(' ').to_string()),
                Some(v) => bail!("`{k}` must be a string, got {v}"),
                None => bail!("missing key `{k}` (used by dataset_kwargs.prompt_template)"),
            })
            .collect::<Result<Vec<_>>>()?;
        let pieces = self.separate(&values, info.space_sensitive);
        let mut ids: Vec<Vec<i64>> =
            pieces.iter().map(|(s, _)| tok.encode(s)).collect::<Result<_>>()?;
        let label_len = ids.last().map_or(0, Vec::len);
        let total = ids[..ids.len() - 1].iter().map(Vec::len).sum::<usize>()
            + label_len
            + self.add_bos as usize
            + self.add_sep as usize
            + self.add_eos as usize;
        if total > max_length {
            let mut over = total - max_length;
            let n = self.truncation_fields.len();
            let mut shares: Vec<usize> =
                (0..n).rev().map(|i| over / n + usize::from(i < over % n)).collect();
            for (i, (_, key)) in pieces.iter().enumerate() {
                if self.truncation_fields.contains(key) {
                    let Some(share) = shares.pop() else { break };
                    let t = share.min(ids[i].len());
                    over -= t;
                    ids[i] = self.cut(&ids[i], ids[i].len() - t);
                }
            }
            if over > 0 {
                let order: Vec<usize> = match self.truncation {
                    Truncation::Left => (0..ids.len()).collect(),
                    Truncation::Right => (0..ids.len()).rev().collect(),
                };
                for i in order {
                    let len = ids[i].len();
                    if len >= over {
                        ids[i] = self.cut(&ids[i], len - over);
                        break;
                    }
                    over -= len;
                    ids[i] = Vec::new();
                }
            }
        }
        let answer = ids.pop().unwrap_or_default();
        let mut input_ids: Vec<i64> = Vec::new();
        if self.add_bos {
            input_ids.push(
                info.bos.context("dataset_kwargs.add_bos needs a tokenizer with a BOS token")?,
            );
        }
        input_ids.extend(ids.into_iter().flatten());
        if self.add_sep {
            input_ids.push(
                info.sep.context("dataset_kwargs.add_sep needs a tokenizer with a `sep_token`")?,
            );
        }
        let answer_start_idx = input_ids.len();
        input_ids.extend(answer);
        if self.add_eos {
            input_ids.push(info.eos);
        }
        ensure!(
            input_ids.len() >= 2,
            "row gives {} token(s); at least 2 are needed",
            input_ids.len()
        );
        let loss_mask = (0..input_ids.len())
            .map(|i| u8::from(!self.answer_only_loss || i >= answer_start_idx))
            .collect();
        Ok(SftExample { input_ids, loss_mask, answer_start_idx })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kwargs_and_unescape() {
        let kw: toml::Table =
            toml::from_str(r#"prompt_template = "Q: {input}\\n\\nA: {output}""#).unwrap();
        let t = LegacyTemplate::from_kwargs(Some(&kw)).unwrap().unwrap();
        assert_eq!(t.template, "Q: {input}\n\nA: {output}");
        assert_eq!(t.keys, vec!["input", "output"]);
        let bad: toml::Table = toml::from_str(r#"prompt_template = "{output} {input}""#).unwrap();
        assert!(LegacyTemplate::from_kwargs(Some(&bad)).is_err());
        let typo: toml::Table = toml::from_str(r#"prompt_tempalte = "{input}""#).unwrap();
        assert!(LegacyTemplate::from_kwargs(Some(&typo))
            .unwrap_err()
            .to_string()
            .contains("known keys"));
        let only_pad: toml::Table = toml::from_str("pad_to_max_length = true").unwrap();
        assert!(LegacyTemplate::from_kwargs(Some(&only_pad)).unwrap().is_none());
    }
}
