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
    remove_stale_temps(&parent, &name)?;
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

/// Removes temporaries of earlier conversions into the same target whose process is gone
/// (killed mid-write): they were never renamed, so nothing else refers to them.
fn remove_stale_temps(parent: &Path, name: &str) -> Result<()> {
    let prefix = format!(".{name}.mbridge-tmp-");
    for e in std::fs::read_dir(parent)? {
        let e = e?;
        let file = e.file_name().to_string_lossy().to_string();
        let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        if !alive && pid != std::process::id() {
            std::fs::remove_dir_all(e.path())
                .with_context(|| format!("cannot remove stale `{}`", e.path().display()))?;
        }
    }
    Ok(())
}
