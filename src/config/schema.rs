//! The shape of a valid config, as a JSON tree of defaults, used to reject unknown keys with a
//! "did you mean" hint before serde sees them, and to know which keys "exist" for overrides.

use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::container::ConfigContainer;
use super::dataset::PackedSequenceSpecs;
use super::mixed_precision::{MixedPrecision, MixedPrecisionConfig};
use super::parallel::CommOverlapConfig;
use super::peft::PeftConfig;

/// Dotted paths whose tables are free-form maps (any key allowed).
pub const FREE_FORM: &[&str] = &["env_vars", "dataset.dataset_kwargs"];

/// Defaults of every section, with optional sections filled in so all their keys are known.
pub fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut full = ConfigContainer {
            mixed_precision: Some(MixedPrecision::Table(MixedPrecisionConfig::default())),
            comm_overlap: Some(CommOverlapConfig::default()),
            peft: Some(PeftConfig::default()),
            ..Default::default()
        };
        full.dataset.packed_sequence_specs = Some(PackedSequenceSpecs::default());
        serde_json::to_value(full).expect("config defaults serialize")
    })
}

/// Plain defaults (optional sections unset), the base layer every config starts from.
pub fn defaults() -> Value {
    serde_json::to_value(ConfigContainer::default()).expect("config defaults serialize")
}

/// The schema node at a dotted path; None when the path names no known key.
pub fn lookup(path: &[&str]) -> Option<&'static Value> {
    let mut node = schema();
    for (i, key) in path.iter().enumerate() {
        if is_free_form(&path[..i]) {
            return Some(&Value::Null);
        }
        node = node.as_object()?.get(*key)?;
    }
    Some(node)
}

/// True when the table at `path` accepts arbitrary keys.
pub fn is_free_form(path: &[&str]) -> bool {
    !path.is_empty() && FREE_FORM.contains(&path.join(".").as_str())
}

/// The closest known sibling names to `key` in a table, best first.
pub fn suggest(table: &Map<String, Value>, key: &str) -> Option<String> {
    table
        .keys()
        .map(|k| (strsim::jaro_winkler(k, key), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.clone())
}

/// Every key in `tree` that the schema does not know, as `(dotted path, suggestion)`.
pub fn unknown_keys(tree: &Value) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    walk_unknown(tree, schema(), &mut Vec::new(), &mut out);
    out
}

fn walk_unknown(
    node: &Value,
    schema: &Value,
    path: &mut Vec<String>,
    out: &mut Vec<(String, Option<String>)>,
) {
    let (Some(table), Some(known)) = (node.as_object(), schema.as_object()) else {
        return;
    };
    let refs: Vec<&str> = path.iter().map(String::as_str).collect();
    if is_free_form(&refs) {
        return;
    }
    for (key, value) in table {
        path.push(key.clone());
        match known.get(key) {
            Some(sub) => walk_unknown(value, sub, path, out),
            None => out.push((path.join("."), suggest(known, key))),
        }
        path.pop();
    }
}
