//! `config show`: the resolved config as TOML, one comment per value saying where it came
//! from. The output is itself a valid recipe that resolves to the same config.

use std::fmt::Write;

use serde_json::{Map, Value};

use super::container::ConfigContainer;
use super::raw::{get, RawConfig};
use super::schema;
use super::validate::Derived;

/// Options for [`render`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ShowOptions {
    /// Print only values that differ from the defaults.
    pub only_changed: bool,
    /// Leave out the provenance comments.
    pub no_sources: bool,
}

/// Render the container as commented TOML; `derived` adds a trailing comment block.
pub fn render(
    cfg: &ConfigContainer,
    raw: &RawConfig,
    derived: Option<&Derived>,
    opts: ShowOptions,
) -> String {
    let tree = serde_json::to_value(cfg).expect("config serializes");
    let defaults = schema::defaults();
    let mut out = String::new();
    let mut path = Vec::new();
    render_table(tree.as_object().unwrap(), &defaults, raw, opts, &mut path, &mut out);
    if let Some(d) = derived {
        out.push_str("\n# derived (not part of the recipe):\n");
        let _ = writeln!(
            out,
            "#   world_size = {}, data_parallel_size = {}, num_microbatches = {}",
            d.world_size, d.data_parallel_size, d.num_microbatches
        );
        let _ = writeln!(
            out,
            "#   global_batch_size = {}, train_iters = {}, lr_decay_iters = {}, lr_warmup_iters = {}",
            d.global_batch_size, d.train_iters, d.lr_decay_iters, d.lr_warmup_iters
        );
        match d.padded_vocab_size {
            Some(v) => {
                let _ = writeln!(out, "#   padded_vocab_size = {v}");
            }
            None => out.push_str("#   padded_vocab_size = (known once the tokenizer is loaded)\n"),
        }
    }
    out
}

fn render_table(
    table: &Map<String, Value>,
    defaults: &Value,
    raw: &RawConfig,
    opts: ShowOptions,
    path: &mut Vec<String>,
    out: &mut String,
) {
    let refs: Vec<&str> = path.iter().map(String::as_str).collect();
    let free_form = schema::is_free_form(&refs);
    // TOML wants a table's plain keys before its sub-tables.
    let mut subtables = Vec::new();
    let mut body = String::new();
    for (key, value) in table {
        path.push(key.clone());
        let dotted = path.join(".");
        let keys: Vec<&str> = path.iter().map(String::as_str).collect();
        let default = if free_form { None } else { get(defaults, &keys) };
        let changed = default != Some(value);
        path.pop();
        if opts.only_changed && !changed {
            continue;
        }
        match value {
            Value::Object(_) => subtables.push((key.clone(), value)),
            Value::Null => {
                let _ = writeln!(body, "# {key} = (unset){}", comment(raw, &dotted, opts));
            }
            v => {
                let _ = writeln!(
                    body,
                    "{} = {}{}",
                    toml_key(key),
                    toml_value(v),
                    comment(raw, &dotted, opts)
                );
            }
        }
    }
    if !path.is_empty() && (!body.is_empty() || subtables.is_empty()) {
        let _ =
            writeln!(out, "\n[{}]", path.iter().map(|p| toml_key(p)).collect::<Vec<_>>().join("."));
    }
    out.push_str(&body);
    for (key, value) in subtables {
        path.push(key);
        render_table(value.as_object().unwrap(), defaults, raw, opts, path, out);
        path.pop();
    }
}

fn comment(raw: &RawConfig, dotted: &str, opts: ShowOptions) -> String {
    if opts.no_sources {
        String::new()
    } else {
        format!("  # {}", raw.source_of(dotted))
    }
}

fn toml_key(key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// A JSON value as a TOML literal (nulls never reach here except inside arrays, shown as "").
pub fn toml_value(v: &Value) -> String {
    match v {
        Value::Null => "\"\"".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => toml::Value::Float(f).to_string(),
            _ => n.to_string(),
        },
        Value::String(s) => toml::Value::String(s.clone()).to_string(),
        Value::Array(items) => {
            format!("[{}]", items.iter().map(toml_value).collect::<Vec<_>>().join(", "))
        }
        Value::Object(m) => format!(
            "{{ {} }}",
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("{} = {}", toml_key(k), toml_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
