//! The raw, layered config tree: defaults ← recipe files ← `--config-file` ← overrides, with the
//! source of every value remembered so `config show` can say where it came from.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::container::ConfigContainer;
use super::error::{ConfigError, ConfigResult};
use super::mixed_precision;
use super::overrides::{Override, OverrideOp};
use super::schema;
use crate::config_err;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// A recipe or model preset file (embedded name or path).
    Recipe(String),
    /// A `--config-file`.
    File(String),
    /// A command-line override or flag, as typed.
    Override(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::Recipe(r) => write!(f, "recipe {r}"),
            Source::File(p) => write!(f, "file {p}"),
            Source::Override(o) => write!(f, "override {o}"),
        }
    }
}

/// The merged tree plus provenance by dotted path.
#[derive(Debug, Clone)]
pub struct RawConfig {
    tree: Value,
    sources: BTreeMap<String, Source>,
    /// Warnings about overrides that replaced earlier ones, in order (see [`Self::apply`]).
    replaced: Vec<String>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig { tree: schema::defaults(), sources: BTreeMap::new(), replaced: Vec::new() }
    }
}

impl RawConfig {
    /// The merged tree as it stands.
    pub fn tree(&self) -> &Value {
        &self.tree
    }

    /// Where the value at `path` (dotted) came from: its own record or its nearest ancestor's.
    pub fn source_of(&self, path: &str) -> Source {
        let mut p = path;
        loop {
            if let Some(s) = self.sources.get(p) {
                return s.clone();
            }
            match p.rsplit_once('.') {
                Some((parent, _)) => p = parent,
                None => return Source::Default,
            }
        }
    }

    /// Deep-merge a table (from a recipe or file): tables merge, everything else replaces.
    pub fn merge(&mut self, layer: &Map<String, Value>, source: &Source) {
        let mut path = Vec::new();
        merge_into(&mut self.tree, layer, source, &mut path, &mut self.sources);
    }

    /// Apply one command-line override with Hydra's struct-mode rules.
    pub fn apply(&mut self, ov: &Override) -> ConfigResult<()> {
        let keys: Vec<&str> = ov.path.iter().map(String::as_str).collect();
        let key = ov.key();
        if schema::lookup(&keys).is_none() {
            return Err(unknown_key_error(&keys, &ov.text));
        }
        let source = Source::Override(ov.text.clone());
        let current = get(&self.tree, &keys).filter(|v| !v.is_null()).cloned();
        let free_form_parent = schema::is_free_form(&keys[..keys.len() - 1]);
        match ov.op {
            OverrideOp::Set if free_form_parent && current.is_none() => {
                return Err(config_err!(
                    "override `{}`: `{key}` does not exist; add it with `+{key}=...`",
                    ov.text
                ))
            }
            OverrideOp::Add if current.is_some() => {
                return Err(config_err!(
                    "override `{}`: `{key}` is already set; use `{key}=...` or `++{key}=...`",
                    ov.text
                ))
            }
            OverrideOp::Delete => {
                let Some(cur) = current else {
                    return Err(config_err!(
                        "override `{}`: `{key}` is not set, so there is nothing to delete",
                        ov.text
                    ));
                };
                if let Some(expected) = &ov.value {
                    if !values_equal(&cur, expected) {
                        return Err(config_err!(
                            "override `{}`: `{key}` is {cur}, not {expected}; nothing deleted",
                            ov.text
                        ));
                    }
                }
                let default = get(&schema::defaults(), &keys).cloned();
                match default {
                    Some(d) => self.set(&keys, d, source),
                    None => self.remove(&keys),
                }
                return Ok(());
            }
            _ => {}
        }
        // Overrides apply in order, as Hydra's: a whole table (or a preset name such as
        // `mixed_precision=bf16_with_fp8_current_scaling_mixed`) set after a field override
        // inside it drops that field's value. Easy to miss in a long command line, so say it.
        let prefix = format!("{key}.");
        let earlier: Vec<String> = self
            .sources
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(_, s)| match s {
                Source::Override(text) => Some(format!("`{text}`")),
                _ => None,
            })
            .collect();
        if !earlier.is_empty() {
            self.replaced.push(format!(
                "override `{}` replaces all of `{key}`, so the earlier {} no longer {}: \
                 overrides apply in order, put field overrides after the value they refine",
                ov.text,
                earlier.join(", "),
                if earlier.len() == 1 { "applies" } else { "apply" }
            ));
        }
        let value = ov.value.clone().unwrap_or(Value::Null);
        self.set(&keys, value, source);
        Ok(())
    }

    /// Warnings for overrides that replaced the values of earlier ones (a table or preset set
    /// after a field inside it).
    pub fn replaced_overrides(&self) -> &[String] {
        &self.replaced
    }

    /// Set a value at a dotted path, creating optional sections as needed.
    pub fn set(&mut self, keys: &[&str], value: Value, source: Source) {
        let mut node = &mut self.tree;
        for k in &keys[..keys.len() - 1] {
            materialize_table(node);
            node = node.as_object_mut().unwrap().entry(k.to_string()).or_insert(Value::Null);
        }
        materialize_table(node);
        node.as_object_mut().unwrap().insert(keys[keys.len() - 1].to_string(), value);
        let path = keys.join(".");
        self.forget_below(&path);
        self.sources.insert(path, source);
    }

    fn remove(&mut self, keys: &[&str]) {
        if let Some(parent) = get_mut(&mut self.tree, &keys[..keys.len() - 1]) {
            if let Some(t) = parent.as_object_mut() {
                t.shift_remove(keys[keys.len() - 1]);
            }
        }
        let path = keys.join(".");
        self.forget_below(&path);
        self.sources.remove(&path);
    }

    fn forget_below(&mut self, path: &str) {
        let prefix = format!("{path}.");
        self.sources.retain(|k, _| !k.starts_with(&prefix));
    }

    /// Deserialize into the typed container: unknown keys (all of them, with hints) first, then
    /// type errors with the full dotted path.
    pub fn to_container(&self) -> ConfigResult<ConfigContainer> {
        let unknown = schema::unknown_keys(&self.tree);
        if !unknown.is_empty() {
            let lines: Vec<String> = unknown
                .iter()
                .map(|(path, hint)| {
                    let src = self.source_of(path);
                    match hint {
                        Some(h) => {
                            format!("unknown key `{path}` (from {src}); did you mean `{h}`?")
                        }
                        None => format!("unknown key `{path}` (from {src})"),
                    }
                })
                .collect();
            return Err(ConfigError::many("invalid configuration:", &lines));
        }
        let de = self.tree.clone();
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let src = self.source_of(&path);
            config_err!("invalid value for `{path}` (from {src}): {}", e.inner())
        })
    }
}

fn unknown_key_error(keys: &[&str], text: &str) -> ConfigError {
    // Find the first segment that is unknown, and suggest from its siblings.
    let mut node = schema::schema();
    for (i, k) in keys.iter().enumerate() {
        let table = node.as_object();
        match table.and_then(|t| t.get(*k)) {
            Some(next) => node = next,
            None => {
                let path = keys[..=i].join(".");
                let hint = table
                    .and_then(|t| schema::suggest(t, k))
                    .map(|h| {
                        let mut p: Vec<&str> = keys[..i].to_vec();
                        p.push(&h);
                        format!("; did you mean `{}`?", p.join("."))
                    })
                    .unwrap_or_default();
                let what = if table.is_some() { "unknown key" } else { "not a table:" };
                return config_err!("override `{text}`: {what} `{path}`{hint}");
            }
        }
    }
    config_err!("override `{text}`: unknown key `{}`", keys.join("."))
}

/// Optional sections are null and a mixed-precision preset is a string until a key inside them
/// is set; then they become the table they stand for.
fn materialize_table(node: &mut Value) {
    match node {
        Value::Object(_) => {}
        Value::String(name) => {
            let table = mixed_precision::preset(name)
                .map(|mp| serde_json::to_value(mp).expect("preset serializes"))
                .unwrap_or_else(|| Value::Object(Map::new()));
            *node = table;
        }
        _ => *node = Value::Object(Map::new()),
    }
}

fn merge_into(
    dst: &mut Value,
    layer: &Map<String, Value>,
    source: &Source,
    path: &mut Vec<String>,
    sources: &mut BTreeMap<String, Source>,
) {
    materialize_table(dst);
    let table = dst.as_object_mut().unwrap();
    for (k, v) in layer {
        path.push(k.clone());
        let dotted = path.join(".");
        match (table.get_mut(k), v) {
            (Some(existing), Value::Object(sub)) if !existing.is_array() => {
                merge_into(existing, sub, source, path, sources);
            }
            _ => {
                let prefix = format!("{dotted}.");
                sources.retain(|p, _| !p.starts_with(&prefix));
                table.insert(k.clone(), v.clone());
                sources.insert(dotted, source.clone());
            }
        }
        path.pop();
    }
}

/// The value at a dotted path.
pub fn get<'a>(tree: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(tree, |node, k| node.as_object()?.get(*k))
}

fn get_mut<'a>(tree: &'a mut Value, keys: &[&str]) -> Option<&'a mut Value> {
    keys.iter().try_fold(tree, |node, k| node.as_object_mut()?.get_mut(*k))
}

/// Equality that treats 1 and 1.0 alike (TOML literals vs serialized floats).
fn values_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}
