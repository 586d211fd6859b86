//! Hydra-style command-line overrides: `a.b=v`, `+a.b=v`, `++a.b=v`, `~a.b`, `~a.b=v`.

use serde_json::Value;

/// What an override does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideOp {
    /// `a.b=v`: set a key that exists.
    Set,
    /// `+a.b=v`: add a key that is not set yet.
    Add,
    /// `++a.b=v`: set or add.
    ForceSet,
    /// `~a.b` / `~a.b=v`: reset to the default (only if equal to v when given).
    Delete,
}

/// One parsed override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub op: OverrideOp,
    pub path: Vec<String>,
    pub value: Option<Value>,
    /// The override as typed, for provenance and error messages.
    pub text: String,
}

impl Override {
    /// Dotted key of the override.
    pub fn key(&self) -> String {
        self.path.join(".")
    }
}

/// Parse one override argument.
pub fn parse(text: &str) -> Result<Override, String> {
    let (op, rest) = if let Some(r) = text.strip_prefix("++") {
        (OverrideOp::ForceSet, r)
    } else if let Some(r) = text.strip_prefix('+') {
        (OverrideOp::Add, r)
    } else if let Some(r) = text.strip_prefix('~') {
        (OverrideOp::Delete, r)
    } else {
        (OverrideOp::Set, text)
    };
    let (key, value) = match rest.split_once('=') {
        Some((k, v)) => (k.trim(), Some(parse_value(v)?)),
        None => (rest.trim(), None),
    };
    if value.is_none() && op != OverrideOp::Delete {
        return Err(format!(
            "override `{text}` has no value: write `key=value` (or `~key` to delete)"
        ));
    }
    let path: Vec<String> = key.split('.').map(str::to_string).collect();
    if key.is_empty() || path.iter().any(|p| !is_valid_key(p)) {
        return Err(format!(
            "override `{text}`: `{key}` is not a dotted key such as `train.train_iters`"
        ));
    }
    Ok(Override { op, path, value, text: text.to_string() })
}

fn is_valid_key(part: &str) -> bool {
    !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parse an override value as a TOML literal (`10`, `1e-4`, `true`, `"s"`, `[1, 2]`,
/// `{a = 1}`); `null`/`None` unsets; YAML-style `{a: 1}` dicts are accepted; anything else is a
/// bare string (Hydra: `mixed_precision=bf16_mixed`).
pub fn parse_value(raw: &str) -> Result<Value, String> {
    let s = raw.trim();
    if s == "null" || s == "None" || s == "~" {
        return Ok(Value::Null);
    }
    if let Some(v) = toml_literal(s) {
        return Ok(v);
    }
    // Python/YAML spellings users paste from Megatron Bridge docs.
    match s {
        "True" => return Ok(Value::Bool(true)),
        "False" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if s.starts_with('{') {
        let tomlish = yaml_dict_to_toml(s);
        return toml_literal(&tomlish)
            .ok_or_else(|| format!("value `{s}` is not a valid inline table"));
    }
    if s.starts_with('[') {
        // Hydra allows unquoted strings inside lists: [a,b] → ["a","b"].
        let inner = &s[1..s.len().saturating_sub(1).max(1)];
        let items: Vec<String> = inner
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match toml_literal(t) {
                Some(_) => t.to_string(),
                None => format!("{:?}", t.trim_matches(|c| c == '\'' || c == '"')),
            })
            .collect();
        return toml_literal(&format!("[{}]", items.join(", ")))
            .ok_or_else(|| format!("value `{s}` is not a valid list"));
    }
    if let Some(q) = s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Ok(Value::String(q.to_string()));
    }
    Ok(Value::String(s.to_string()))
}

fn toml_literal(s: &str) -> Option<Value> {
    let table: toml::Table = toml::from_str(&format!("v = {s}")).ok()?;
    serde_json::to_value(table.get("v")?).ok()
}

/// `{a: 1, b: x}` → `{a = 1, b = "x"}` (flat dicts only).
fn yaml_dict_to_toml(s: &str) -> String {
    let inner = s.trim_start_matches('{').trim_end_matches('}');
    let parts: Vec<String> = inner
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once(':') {
            Some((k, v)) => {
                let v = v.trim();
                let v = if toml_literal(v).is_some() { v.to_string() } else { format!("{v:?}") };
                format!("{} = {}", k.trim(), v)
            }
            None => p.to_string(),
        })
        .collect();
    format!("{{{}}}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_form() {
        let o = parse("train.train_iters=10").unwrap();
        assert_eq!(
            (o.op, o.key(), o.value),
            (OverrideOp::Set, "train.train_iters".into(), Some(json!(10)))
        );
        assert_eq!(parse("+train.foo=1").unwrap().op, OverrideOp::Add);
        assert_eq!(parse("++a.b=x").unwrap().op, OverrideOp::ForceSet);
        let d = parse("~logger.wandb_project").unwrap();
        assert_eq!((d.op, d.value), (OverrideOp::Delete, None));
        assert_eq!(parse("~a.b=3").unwrap().value, Some(json!(3)));
    }

    #[test]
    fn parses_values_as_toml_literals() {
        assert_eq!(parse_value("1e-4").unwrap(), json!(1e-4));
        assert_eq!(parse_value("3").unwrap(), json!(3));
        assert_eq!(parse_value("true").unwrap(), json!(true));
        assert_eq!(parse_value("False").unwrap(), json!(false));
        assert_eq!(parse_value("null").unwrap(), Value::Null);
        assert_eq!(parse_value("bf16_mixed").unwrap(), json!("bf16_mixed"));
        assert_eq!(parse_value("\"10\"").unwrap(), json!("10"));
        assert_eq!(parse_value("'quoted'").unwrap(), json!("quoted"));
        assert_eq!(parse_value("[1, 2]").unwrap(), json!([1, 2]));
        assert_eq!(parse_value("[a,b]").unwrap(), json!(["a", "b"]));
        assert_eq!(parse_value("[0.3, \"a\", 0.7, b]").unwrap(), json!([0.3, "a", 0.7, "b"]));
        assert_eq!(parse_value("{k = 1}").unwrap(), json!({"k": 1}));
        assert_eq!(parse_value("{k: 1, s: x}").unwrap(), json!({"k": 1, "s": "x"}));
    }

    #[test]
    fn rejects_malformed_overrides() {
        assert!(parse("train.train_iters").unwrap_err().contains("no value"));
        assert!(parse("=3").unwrap_err().contains("dotted key"));
        assert!(parse("a..b=3").unwrap_err().contains("dotted key"));
    }
}
