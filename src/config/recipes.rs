//! Recipes: TOML files under `recipes/<model>/<task>.toml` (and model presets under
//! `configs/models/`), embedded in the binary, loadable from a path, with `extends` inheritance.
//!
//! Reserved top-level keys of a recipe file: `extends` (a name or list of names/paths merged
//! first, in order) and `description`. Everything else is config.

use std::path::{Path, PathBuf};

use include_dir::{include_dir, Dir};
use serde_json::{Map, Value};

use super::error::{ConfigError, ConfigResult};
use crate::config_err;

static RECIPES: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/recipes");
static CONFIGS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/configs");

/// What a recipe is for; `pretrain` picks `<model>/pretrain`, `finetune` picks `sft` or `peft`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Pretrain,
    Sft,
    Peft,
}

impl Task {
    /// File stem of this task's recipe.
    pub fn stem(self) -> &'static str {
        match self {
            Task::Pretrain => "pretrain",
            Task::Sft => "sft",
            Task::Peft => "peft",
        }
    }
}

/// One file of a recipe chain, parsed.
#[derive(Debug, Clone)]
pub struct RecipeLayer {
    /// Embedded name (`llama3_8b/pretrain`, `models/llama3_8b`) or the file path.
    pub name: String,
    pub table: Map<String, Value>,
}

/// A shipped recipe, for `recipes list`.
#[derive(Debug, Clone)]
pub struct RecipeInfo {
    pub model: String,
    pub task: String,
    pub description: String,
}

/// Every embedded recipe (templates under `_common` excluded), sorted by model then task.
pub fn list() -> Vec<RecipeInfo> {
    let mut out = Vec::new();
    for dir in RECIPES.dirs() {
        let model = dir.path().to_string_lossy().to_string();
        if model.starts_with('_') {
            continue;
        }
        for file in dir.files() {
            let task = file.path().file_stem().unwrap().to_string_lossy().to_string();
            let description = file
                .contents_utf8()
                .and_then(|t| toml::from_str::<toml::Table>(t).ok())
                .and_then(|t| t.get("description").and_then(|d| d.as_str().map(String::from)))
                .unwrap_or_default();
            out.push(RecipeInfo { model: model.clone(), task, description });
        }
    }
    out.sort_by(|a, b| (&a.model, &a.task).cmp(&(&b.model, &b.task)));
    out
}

/// The text of an embedded recipe or preset by name (`llama3_8b`, `llama3_8b/sft`,
/// `models/llama3_8b`, `_common/pretrain`).
pub fn embedded_text(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches(".toml");
    let (dir, rel) = match name.strip_prefix("models/") {
        Some(m) => (&CONFIGS, format!("models/{m}.toml")),
        None => (&RECIPES, format!("{name}.toml")),
    };
    dir.get_file(&rel).and_then(|f| f.contents_utf8())
}

/// Resolve what the user typed after `--recipe` to a file: a path on disk, an embedded
/// `<model>/<task>`, a bare model name (+ task), or Megatron Bridge's `<model>_<task>[_config]`.
pub fn resolve(name: &str, task: Task) -> ConfigResult<RecipeRef> {
    let path = Path::new(name);
    if name.ends_with(".toml") || path.is_file() {
        if !path.is_file() {
            return Err(config_err!("recipe file `{name}` does not exist"));
        }
        return Ok(RecipeRef::File(path.to_path_buf()));
    }
    let bare = name.trim_end_matches("_config");
    let mut candidates = vec![bare.to_string(), format!("{bare}/{}", task.stem())];
    for t in ["pretrain", "sft", "peft", "finetune"] {
        if let Some(model) = bare.strip_suffix(&format!("_{t}")) {
            let t = if t == "finetune" { "sft" } else { t };
            candidates.push(format!("{model}/{t}"));
        }
    }
    for c in &candidates {
        if c.contains('/') && embedded_text(c).is_some() {
            return Ok(RecipeRef::Embedded(c.clone()));
        }
    }
    if RECIPES.get_dir(bare).is_some() {
        let tasks: Vec<String> =
            list().into_iter().filter(|r| r.model == bare).map(|r| r.task).collect();
        return Err(config_err!(
            "recipe `{bare}` has no `{}` variant (it has: {})",
            task.stem(),
            tasks.join(", ")
        ));
    }
    let mut names: Vec<String> = list().into_iter().map(|r| r.model).collect();
    names.dedup();
    // Edit distance first (llama3_7b → llama3_8b), similarity to break ties.
    let mut close: Vec<(usize, f64, &String)> = names
        .iter()
        .map(|n| (strsim::levenshtein(n, bare), strsim::jaro_winkler(n, bare), n))
        .filter(|(d, _, _)| *d <= (bare.len() / 3).max(2))
        .collect();
    close.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let hint = if close.is_empty() {
        "run `mbridge recipes list` to see them".to_string()
    } else {
        let c: Vec<&str> = close.iter().take(4).map(|(_, _, n)| n.as_str()).collect();
        format!("did you mean {}?", c.join(", "))
    };
    Err(config_err!("unknown recipe `{name}`: {hint}"))
}

/// A recipe located by [`resolve`].
#[derive(Debug, Clone, PartialEq)]
pub enum RecipeRef {
    Embedded(String),
    File(PathBuf),
}

/// The recipe and everything it extends, in merge order (ancestors first).
pub fn load_chain(recipe: &RecipeRef) -> ConfigResult<Vec<RecipeLayer>> {
    let mut out = Vec::new();
    let mut stack = Vec::new();
    load_into(recipe, &mut stack, &mut out)?;
    Ok(out)
}

fn load_into(
    recipe: &RecipeRef,
    stack: &mut Vec<String>,
    out: &mut Vec<RecipeLayer>,
) -> ConfigResult<()> {
    let (name, text, base_dir) = match recipe {
        RecipeRef::Embedded(n) => {
            let text =
                embedded_text(n).ok_or_else(|| config_err!("unknown recipe or preset `{n}`"))?;
            (n.clone(), text.to_string(), None)
        }
        RecipeRef::File(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| config_err!("cannot read recipe `{}`: {e}", p.display()))?;
            (p.display().to_string(), text, p.parent().map(Path::to_path_buf))
        }
    };
    if stack.contains(&name) {
        stack.push(name);
        return Err(config_err!("recipe inheritance cycle: {}", stack.join(" -> ")));
    }
    stack.push(name.clone());
    let mut table = parse_toml(&text, &name)?;
    table.shift_remove("description");
    let parents = match table.shift_remove("extends") {
        None => vec![],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(config_err!("`extends` in `{name}` must list names, found {other}")),
            })
            .collect::<ConfigResult<_>>()?,
        Some(other) => {
            return Err(config_err!(
                "`extends` in `{name}` must be a name or a list, found {other}"
            ))
        }
    };
    for parent in parents {
        let parent_ref = match &base_dir {
            Some(dir) if parent.ends_with(".toml") => RecipeRef::File(dir.join(&parent)),
            _ if embedded_text(&parent).is_some() => RecipeRef::Embedded(parent),
            _ => {
                return Err(config_err!(
                    "`{name}` extends `{parent}`, which is neither an embedded recipe/preset \
                     (e.g. `models/llama3_8b`, `_common/pretrain`) nor a .toml path"
                ))
            }
        };
        load_into(&parent_ref, stack, out)?;
    }
    stack.pop();
    out.push(RecipeLayer { name, table });
    Ok(())
}

/// Parse TOML into a JSON table; errors name the file, line and column.
pub fn parse_toml(text: &str, origin: &str) -> ConfigResult<Map<String, Value>> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        ConfigError(format!(
            "malformed TOML in `{origin}` at line {line}, column {col}: {}",
            e.message()
        ))
    })?;
    match serde_json::to_value(table) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(config_err!("`{origin}` holds values mbridge cannot use (TOML dates?)")),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}
