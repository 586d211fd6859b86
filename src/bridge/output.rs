//! Output directories that never clobber: refuse a non-empty target, write into a hidden
//! sibling, rename onto the target only when everything is written.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Checks `out` may be written and returns a fresh temporary sibling to write into.
pub fn prepare_output(out: &Path) -> Result<PathBuf> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .with_context(|| format!("cannot read `{}`", out.display()))?
                .next()
                .is_none();
        if !empty {
            return Err(crate::config_err!(
                "output `{}` already exists and is not empty; refusing to overwrite it (choose a new directory)",
                out.display()
            )
            .into());
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create `{}`", parent.display()))?;
    let name =
        out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.mbridge-tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?;
    Ok(tmp)
}

/// Moves the finished `tmp` onto `out` (an empty `out` directory is replaced).
pub fn publish_output(tmp: &Path, out: &Path) -> Result<PathBuf> {
    if out.is_dir() {
        std::fs::remove_dir(out)
            .with_context(|| format!("cannot replace empty `{}`", out.display()))?;
    }
    std::fs::rename(tmp, out)
        .with_context(|| format!("cannot move the result into `{}`", out.display()))?;
    Ok(out.to_path_buf())
}
