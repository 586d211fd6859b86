//! SFT JSONL rows: reading `training.jsonl` & co. with file/line errors, and telling the row
//! schemas apart (prompt/completion vs chat; spec finetune-data.md §2).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// One parsed row of an SFT JSONL file.
#[derive(Debug, Clone, PartialEq)]
pub enum SftRow {
    /// `{"input": ..., "output": ...}` (or the configured / canonical prompt+completion columns).
    PromptCompletion {
        /// Prompt text.
        prompt: String,
        /// Completion text.
        completion: String,
    },
    /// `messages` / `conversation` / ShareGPT `conversations`, normalised to
    /// `[{"role", "content", ...}]`.
    Chat {
        /// OpenAI/HF-style messages (roles lower-cased for ShareGPT rows).
        messages: Vec<Value>,
        /// Optional `tools` (function schemas) passed to the template.
        tools: Option<Value>,
        /// Optional per-row `chat_template_kwargs`.
        kwargs: Map<String, Value>,
    },
}

/// Which prompt/completion columns to look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// Configured prompt column.
    pub prompt: String,
    /// Configured completion column.
    pub completion: String,
}

const CHAT_KEYS: [&str; 3] = ["messages", "conversation", "conversations"];

/// Read every non-blank line of `path` as a JSON object, with its 1-based line number.
pub fn read_objects(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read SFT data file {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let Value::Object(obj) = v else {
            bail!("{}: expected a JSON object per line, got {}", at(), kind_of(&v));
        };
        rows.push((i + 1, obj));
    }
    Ok(rows)
}

/// Read every non-blank line of `path` as an [`SftRow`]. Errors name the file and 1-based line.
pub fn read_rows(path: &Path, cols: &Columns) -> Result<Vec<(usize, SftRow)>> {
    read_objects(path)?
        .into_iter()
        .map(|(line, obj)| {
            let row =
                parse_row(&obj, cols).with_context(|| format!("{}:{line}", path.display()))?;
            Ok((line, row))
        })
        .collect()
}

/// True when the row carries a chat schema key.
pub fn is_chat(obj: &Map<String, Value>) -> bool {
    CHAT_KEYS.iter().any(|k| obj.contains_key(*k))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn text_field(obj: &Map<String, Value>, key: &str) -> Result<String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => bail!("`{key}` must be a string, got {}", kind_of(v)),
        None => bail!("missing key `{key}`"),
    }
}

/// Classify one row; exactly one schema must be present.
pub fn parse_row(obj: &Map<String, Value>, cols: &Columns) -> Result<SftRow> {
    let configured = obj.contains_key(&cols.prompt) || obj.contains_key(&cols.completion);
    let canonical = obj.contains_key("prompt") && obj.contains_key("completion");
    let pc_cols = if configured {
        Some((cols.prompt.as_str(), cols.completion.as_str()))
    } else if canonical {
        Some(("prompt", "completion"))
    } else {
        None
    };
    let chat: Vec<&str> = CHAT_KEYS.iter().copied().filter(|k| obj.contains_key(*k)).collect();
    if chat.len() > 1 || (pc_cols.is_some() && !chat.is_empty()) {
        let mut found: Vec<String> = chat.iter().map(|k| format!("`{k}`")).collect();
        if let Some((p, c)) = pc_cols {
            found.insert(0, format!("`{p}`/`{c}`"));
        }
        bail!("row mixes schemas ({}); a row must contain exactly one", found.join(", "));
    }
    if let Some((p, c)) = pc_cols {
        return Ok(SftRow::PromptCompletion {
            prompt: text_field(obj, p)?,
            completion: text_field(obj, c)?,
        });
    }
    let Some(&key) = chat.first() else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        bail!(
            "expected `{}`/`{}` (or `prompt`/`completion`) or one of `messages`, `conversation`, \
             `conversations`; found keys {keys:?}",
            cols.prompt,
            cols.completion
        );
    };
    let Some(Value::Array(list)) = obj.get(key) else {
        bail!("`{key}` must be a list of messages");
    };
    let mut messages = Vec::with_capacity(list.len() + 1);
    if key == "conversations" {
        if let Some(Value::String(s)) = obj.get("system") {
            if !s.is_empty() {
                messages.push(serde_json::json!({"role": "system", "content": s}));
            }
        }
        for (j, m) in list.iter().enumerate() {
            let (Some(Value::String(from)), Some(value)) = (m.get("from"), m.get("value")) else {
                bail!("`conversations[{j}]` needs string `from` and `value` (ShareGPT format)");
            };
            messages.push(serde_json::json!({"role": from.to_lowercase(), "content": value}));
        }
    } else {
        for (j, m) in list.iter().enumerate() {
            match m.get("role") {
                Some(Value::String(_)) => messages.push(m.clone()),
                _ => bail!("`{key}[{j}]` needs a string `role` (and `content`)"),
            }
        }
    }
    if messages.is_empty() {
        bail!("`{key}` is empty");
    }
    let kwargs = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => bail!("`chat_template_kwargs` must be an object, got {}", kind_of(v)),
    };
    let tools = obj.get("tools").filter(|v| !v.is_null()).cloned();
    Ok(SftRow::Chat { messages, tools, kwargs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Columns {
        Columns { prompt: "input".into(), completion: "output".into() }
    }
    fn parse(s: &str) -> Result<SftRow> {
        parse_row(serde_json::from_str::<Value>(s).unwrap().as_object().unwrap(), &cols())
    }

    #[test]
    fn schemas() {
        let r = parse(r#"{"input":"Q","output":"A","id":3}"#).unwrap();
        assert_eq!(r, SftRow::PromptCompletion { prompt: "Q".into(), completion: "A".into() });
        let r = parse(r#"{"prompt":"Q","completion":"A"}"#).unwrap();
        assert_eq!(r, SftRow::PromptCompletion { prompt: "Q".into(), completion: "A".into() });
        let r = parse(r#"{"system":"S","conversations":[{"from":"User","value":"hi"}]}"#).unwrap();
        let SftRow::Chat { messages, .. } = r else { panic!() };
        assert_eq!(messages[0]["role"], "system");
        assert_eq!(messages[1]["role"], "user");
        let e = parse(r#"{"input":"Q","output":"A","messages":[]}"#).unwrap_err().to_string();
        assert!(e.contains("exactly one"), "{e}");
        let e = parse(r#"{"input":"Q"}"#).unwrap_err().to_string();
        assert!(e.contains("missing key `output`"), "{e}");
        let e = parse(r#"{"question":"Q"}"#).unwrap_err().to_string();
        assert!(e.contains("found keys"), "{e}");
        assert!(parse(r#"{"input":1,"output":"A"}"#).is_err());
    }
}
