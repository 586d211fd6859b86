//! Chat rows rendered with the tokenizer's HF chat template (minijinja, configured like
//! transformers' sandboxed Jinja: `trim_blocks`, `lstrip_blocks`, loop controls, Python string
//! methods, `raise_exception`, `strftime_now`, Python-style `tojson`), with assistant loss masks
//! (spec §4).
//!
//! Assistant spans come from `{% generation %}…{% endgeneration %}` blocks when the template
//! has them, mapped to tokens exactly as transformers' `return_assistant_tokens_mask` does.
//! Without them, each assistant turn's span is found by rendering the conversation prefix
//! with and without that turn (`render(msgs[..i], add_generation_prompt) ⊂ render(msgs[..=i])`);
//! a template for which this is not prefix-stable is an error rather than a silent full mask.
use std::sync::LazyLock;

use anyhow::{anyhow, bail, ensure, Result};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use super::SftExample;
use crate::data::tokenizer::Tokenizer;

/// How chat rows are supervised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatLossMode {
    /// Every assistant turn.
    Assistant,
    /// Only the final assistant turn.
    LastTurn,
    /// Every token.
    Full,
}

impl ChatLossMode {
    /// Parse `dataset.preprocessing.loss_mode` (None ⇒ assistant; "completion" ⇒ assistant).
    pub fn parse(s: Option<&str>) -> Result<Self> {
        Ok(match s {
            None | Some("assistant") | Some("completion") => ChatLossMode::Assistant,
            Some("last_turn") => ChatLossMode::LastTurn,
            Some("full") => ChatLossMode::Full,
            Some(o) => bail!(
                "dataset.preprocessing.loss_mode {o:?}: expected \"assistant\", \"last_turn\" or \"full\""
            ),
        })
    }
}

const GEN_START: char = '\u{F8F0}';
const GEN_END: char = '\u{F8F1}';

static GENERATION_TAG: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("valid regex")
});

/// A compiled chat template plus the special-token variables it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    specials: Map<String, Json>,
    has_generation: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("has_generation", &self.has_generation).finish()
    }
}

/// Text rendered from a conversation and the byte spans of its assistant turns.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The template output.
    pub text: String,
    /// `[start, end)` byte ranges of `{% generation %}` blocks, in order.
    pub spans: Vec<(usize, usize)>,
}

fn py_json(v: &Json, indent: Option<usize>, depth: usize, out: &mut String) {
    let (nl, pad, inner) = match indent {
        Some(n) => ("\n", " ".repeat(n * depth), " ".repeat(n * (depth + 1))),
        None => ("", String::new(), String::new()),
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Json::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                out.push_str(if i > 0 { item_sep } else { "" });
                out.push_str(nl);
                out.push_str(&inner);
                py_json(x, indent, depth + 1, out);
            }
            out.push_str(nl);
            out.push_str(&pad);
            out.push(']');
        }
        Json::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                out.push_str(if i > 0 { item_sep } else { "" });
                out.push_str(nl);
                out.push_str(&inner);
                out.push_str(&Json::String(k.clone()).to_string());
                out.push_str(": ");
                py_json(x, indent, depth + 1, out);
            }
            out.push_str(nl);
            out.push_str(&pad);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// sort_keys=sort_keys)` (positional or keyword `indent`).
fn tojson(value: Value, indent: Option<usize>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let _ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut json: Json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys {
        json = sorted(json);
    }
    let mut out = String::new();
    py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn sorted(v: Json) -> Json {
    match v {
        Json::Object(m) => {
            let mut items: Vec<(String, Json)> =
                m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(items.into_iter().collect())
        }
        Json::Array(a) => Json::Array(a.into_iter().map(sorted).collect()),
        o => o,
    }
}

impl ChatTemplate {
    /// Compile `source` (a tokenizer's `chat_template`, or `tokenizer.chat_template` override)
    /// with `tok`'s special tokens (`bos_token`, `eos_token`, ...) as variables.
    pub fn new(source: &str, tok: &dyn Tokenizer) -> Result<Self> {
        let has_generation = GENERATION_TAG.is_match(source);
        // `{% generation %}` is a transformers extension: emit private-use markers instead and
        // keep the tag's whitespace control (an `if` block trims and strips like any block tag).
        let source = GENERATION_TAG
            .replace_all(source, |c: &regex::Captures| {
                let mark = if c.get(2).is_some() { GEN_END } else { GEN_START };
                format!("{{%{} if true %}}{{{{ \"{mark}\" }}}}{{% endif {}%}}", &c[1], &c[3])
            })
            .into_owned();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> Result<Value, Error> {
            Ok(Value::from(chrono::Local::now().format(&fmt).to_string()))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| anyhow!("cannot compile the chat template: {e}"))?;
        let mut specials = Map::new();
        for name in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(t) = tok.special_token(name) {
                specials.insert(name.into(), Json::String(t.into()));
            }
        }
        Ok(ChatTemplate { env, specials, has_generation })
    }

    /// Whether the template marks assistant output with `{% generation %}`.
    pub fn has_generation(&self) -> bool {
        self.has_generation
    }

    /// Render a conversation (`apply_chat_template(..., tokenize=False)`).
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        kwargs: &Map<String, Json>,
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        let mut ctx = self.specials.clone();
        ctx.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Json::Null));
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        let raw = self
            .env
            .get_template("chat")
            .and_then(|t| t.render(Value::from_serialize(&ctx)))
            .map_err(|e| anyhow!("chat template failed: {e:#}"))?;
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open = None;
        for ch in raw.chars() {
            match ch {
                GEN_START => open = Some(text.len()),
                GEN_END => {
                    let s = open.take().ok_or_else(|| {
                        anyhow!("{{% endgeneration %}} without {{% generation %}}")
                    })?;
                    spans.push((s, text.len()));
                }
                c => text.push(c),
            }
        }
        Ok(Rendered { text, spans })
    }

    /// Assistant spans without `{% generation %}`: the text each assistant turn adds after
    /// the generation prompt of the conversation before it.
    fn prefix_spans(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        kwargs: &Map<String, Json>,
        full: &str,
    ) -> Result<Vec<(usize, usize)>> {
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Json::as_str) != Some("assistant") {
                continue;
            }
            let before = self.render(&messages[..i], tools, kwargs, true)?.text;
            let upto = self.render(&messages[..=i], tools, kwargs, false)?.text;
            ensure!(
                upto.starts_with(&before) && full.starts_with(&upto),
                "cannot find assistant turn {i} in the rendered chat: the template has no \
                 {{% generation %}} block and does not render conversations prefix-stably; \
                 use loss_mode \"full\" or a template with {{% generation %}}"
            );
            spans.push((before.len(), upto.len()));
        }
        Ok(spans)
    }
}

/// transformers' `char_to_token`: the token whose offsets contain byte `pos`.
fn char_to_token(offsets: &[(usize, usize)], pos: usize) -> Option<usize> {
    offsets.iter().position(|&(s, e)| s <= pos && pos < e)
}

/// Tokenize one chat row: template-rendered ids, an assistant mask by `mode`, EOS appended when
/// the text does not end with it, truncated (right) to `max_length + 1` tokens.
pub fn tokenize_chat(
    messages: &[Json],
    tools: Option<&Json>,
    kwargs: &Map<String, Json>,
    tmpl: &ChatTemplate,
    tok: &dyn Tokenizer,
    mode: ChatLossMode,
    max_length: usize,
) -> Result<SftExample> {
    let r = tmpl.render(messages, tools, kwargs, false)?;
    let (mut input_ids, offsets) = tok.encode_with_offsets(&r.text)?;
    ensure!(!input_ids.is_empty(), "the chat template rendered no tokens");
    let mut spans = if tmpl.has_generation {
        r.spans
    } else if mode == ChatLossMode::Full {
        Vec::new()
    } else {
        tmpl.prefix_spans(messages, tools, kwargs, &r.text)?
    };
    if mode == ChatLossMode::LastTurn {
        spans = spans.split_off(spans.len().saturating_sub(1));
    }
    let n = input_ids.len();
    let mut mask = vec![0u8; n];
    if mode == ChatLossMode::Full {
        mask.fill(1);
    }
    for &(start, end) in &spans {
        // Same rule (and edge cases) as transformers' assistant_masks.
        let Some(first) = char_to_token(&offsets, start) else { break };
        let last = end.checked_sub(1).and_then(|e| char_to_token(&offsets, e));
        let stop = match last {
            Some(l) if l > 0 => l + 1,
            _ => n,
        };
        for m in mask.iter_mut().take(stop).skip(first) {
            *m = 1;
        }
    }
    ensure!(
        mode != ChatLossMode::Assistant || mask.contains(&1) || !has_assistant(messages),
        "no assistant tokens found in the rendered chat"
    );
    let eos = tok.eod();
    if input_ids.last() != Some(&eos) {
        input_ids.push(eos);
        mask.push(1);
    }
    if input_ids.len() > max_length + 1 {
        input_ids.truncate(max_length + 1);
        mask.truncate(max_length + 1);
        if !mask[1..].contains(&1) {
            tracing::warn!("truncation to {max_length} tokens left no assistant tokens; training on all tokens of this row");
            mask.fill(1);
        }
    }
    ensure!(input_ids.len() >= 2, "the chat renders to fewer than 2 tokens");
    let answer_start_idx = mask.iter().rposition(|&m| m == 0).map_or(mask.len(), |i| i + 1);
    Ok(SftExample { input_ids, loss_mask: mask, answer_start_idx })
}

fn has_assistant(messages: &[Json]) -> bool {
    messages.iter().any(|m| m.get("role").and_then(Json::as_str) == Some("assistant"))
}
