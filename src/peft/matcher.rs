//! `peft.target_modules` / `peft.exclude_modules` matching with Megatron Bridge semantics: a
//! pattern without `*`/`?` names a module by its last name component (`linear_qkv`); a pattern
//! with wildcards is matched (fnmatch style, `*` crosses dots) against the full module name
//! such as `decoder.layers.0.self_attention.linear_qkv`.

use super::canonical::Split;
use crate::config::peft::PeftConfig;
use crate::model::ParamStore;

/// The linear layers LoRA can adapt in a GPT block.
pub const LINEAR_MODULES: [&str; 4] = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"];

/// The parts of fused layers canonical LoRA adapts separately (also linear modules for
/// `exclude_modules`).
const CANONICAL_PARTS: [&str; 5] =
    ["linear_q", "linear_k", "linear_v", "linear_fc1_up", "linear_fc1_gate"];

/// Fnmatch-style match of `name` against `pattern` (`*` any run, `?` one character).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

fn pattern_matches(pattern: &str, full_name: &str) -> bool {
    if pattern.contains(['*', '?']) {
        // Megatron names carry a `module.` prefix in MB; accept patterns written either way.
        glob_match(pattern, full_name) || glob_match(pattern, &format!("module.{full_name}"))
    } else {
        full_name.rsplit('.').next() == Some(pattern)
    }
}

/// True when the module `full_name` (e.g. `decoder.layers.3.mlp.linear_fc1`) gets an adapter:
/// it matches a target (with an empty `target_modules` and a non-empty `exclude_modules`,
/// every linear layer is a target, as in Megatron Bridge) and no exclude pattern.
pub fn is_target(cfg: &PeftConfig, full_name: &str) -> bool {
    let targeted = if cfg.target_modules.is_empty() {
        let last = full_name.rsplit('.').next();
        !cfg.exclude_modules.is_empty()
            && LINEAR_MODULES.iter().chain(&CANONICAL_PARTS).any(|m| last == Some(*m))
    } else {
        cfg.target_modules.iter().any(|p| pattern_matches(p, full_name))
    };
    targeted && !cfg.exclude_modules.iter().any(|p| pattern_matches(p, full_name))
}

/// Canonical LoRA: which parts of the fused layer `full_name` (`...linear_qkv` /
/// `...linear_fc1`) are targets, in [`Split::parts`] order — each part matched as the module
/// `...linear_q`, `...linear_fc1_up`, ... (Megatron Bridge's canonical names).
pub fn canonical_parts(cfg: &PeftConfig, full_name: &str, split: Split) -> Vec<bool> {
    let parent = full_name.rsplit_once('.').map_or("", |(p, _)| p);
    split
        .parts()
        .iter()
        .map(|(_, part)| {
            let name =
                if parent.is_empty() { part.to_string() } else { format!("{parent}.{part}") };
            is_target(cfg, &name)
        })
        .collect()
}

/// Errors (listing the stage's linear modules) when PEFT is on but no adapter was created.
pub fn ensure_matched(store: &ParamStore, cfg: &PeftConfig) -> anyhow::Result<()> {
    if !store.trainable_named_vars().is_empty() {
        return Ok(());
    }
    let mut modules: Vec<&str> = store
        .params()
        .iter()
        .filter_map(|q| q.name.strip_suffix(".weight"))
        .filter(|n| LINEAR_MODULES.iter().any(|m| n.ends_with(m)))
        .collect();
    modules.dedup();
    anyhow::bail!(
        "peft.target_modules {:?} (exclude_modules {:?}) match no linear layer; the modules are: {}",
        cfg.target_modules,
        cfg.exclude_modules,
        modules.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(targets: &[&str], excludes: &[&str]) -> PeftConfig {
        PeftConfig {
            target_modules: targets.iter().map(|s| s.to_string()).collect(),
            exclude_modules: excludes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn short_names_wildcards_and_excludes() {
        let qkv0 = "decoder.layers.0.self_attention.linear_qkv";
        let qkv1 = "decoder.layers.1.self_attention.linear_qkv";
        let fc1 = "decoder.layers.0.mlp.linear_fc1";
        assert!(is_target(&cfg(&["linear_qkv"], &[]), qkv1));
        assert!(!is_target(&cfg(&["linear_qkv"], &[]), fc1));
        let wild = cfg(&["*.layers.0.*.linear_qkv"], &[]);
        assert!(is_target(&wild, qkv0));
        assert!(!is_target(&wild, qkv1));
        assert!(!is_target(&wild, fc1));
        let ex = cfg(&["linear_qkv", "linear_fc1"], &["*.layers.1.*"]);
        assert!(is_target(&ex, qkv0) && !is_target(&ex, qkv1));
        // Excludes alone: every linear layer but the excluded ones.
        let only_ex = cfg(&[], &["linear_fc2"]);
        assert!(is_target(&only_ex, fc1));
        assert!(!is_target(&only_ex, "decoder.layers.0.mlp.linear_fc2"));
        assert!(!is_target(&cfg(&[], &[]), fc1));
    }

    #[test]
    fn glob_semantics() {
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("*.x", "a.y"));
    }
}
