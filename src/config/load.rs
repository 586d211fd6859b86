//! Build a config from what the user typed: recipe → config files → flags → overrides.

use std::path::PathBuf;

use super::container::ConfigContainer;
use super::error::ConfigResult;
use super::overrides;
use super::peft::{PeftConfig, PeftScheme};
use super::raw::{RawConfig, Source};
use super::recipes::{self, Task};
use crate::config_err;

/// Everything that goes into a config, in the order it is applied.
#[derive(Debug, Clone, Default)]
pub struct ConfigRequest {
    /// `--recipe`: embedded name or path; None ⇒ defaults only.
    pub recipe: Option<String>,
    pub task: Option<Task>,
    /// `--config-file`s, merged in order after the recipe.
    pub config_files: Vec<PathBuf>,
    /// `--peft lora|dora`: turns on adapters with the scheme's defaults.
    pub peft: Option<PeftScheme>,
    /// Dotted overrides, applied last, in order.
    pub overrides: Vec<String>,
}

/// A loaded (not yet finalized) config with the raw tree that remembers sources.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub cfg: ConfigContainer,
    pub raw: RawConfig,
}

/// Load the layers and deserialize into the typed container.
pub fn load(req: &ConfigRequest) -> ConfigResult<LoadedConfig> {
    let mut raw = RawConfig::default();
    if let Some(name) = &req.recipe {
        let task = req.task.unwrap_or(Task::Pretrain);
        let recipe = recipes::resolve(name, task)?;
        for layer in recipes::load_chain(&recipe)? {
            raw.merge(&layer.table, &Source::Recipe(layer.name.clone()));
        }
    }
    for file in &req.config_files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| config_err!("cannot read config file `{}`: {e}", file.display()))?;
        let origin = file.display().to_string();
        let table = recipes::parse_toml(&text, &origin)?;
        if table.contains_key("extends") {
            return Err(config_err!(
                "`extends` is only allowed in recipes, not in --config-file `{origin}`"
            ));
        }
        raw.merge(&table, &Source::File(origin));
    }
    if let Some(scheme) = req.peft {
        let keep_existing =
            raw.to_container().ok().and_then(|c| c.peft).filter(|p| p.peft_scheme == scheme);
        if keep_existing.is_none() {
            let table =
                serde_json::to_value(PeftConfig::for_scheme(scheme)).expect("peft serializes");
            raw.set(&["peft"], table, Source::Override(format!("--peft {}", scheme_name(scheme))));
        }
    }
    for text in &req.overrides {
        let ov = overrides::parse(text).map_err(super::error::ConfigError)?;
        raw.apply(&ov)?;
    }
    let cfg = raw.to_container()?;
    Ok(LoadedConfig { cfg, raw })
}

fn scheme_name(s: PeftScheme) -> &'static str {
    match s {
        PeftScheme::Lora => "lora",
        PeftScheme::Dora => "dora",
        PeftScheme::CanonicalLora => "canonical_lora",
    }
}
