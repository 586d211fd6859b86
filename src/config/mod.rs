//! The config container: sections, recipes, overrides, validation.
//!
//! Flow (ripgrep's lowargs → hiargs split): recipe TOML (with `extends`) → `--config-file` →
//! dotted overrides, all on a raw JSON tree that remembers where each value came from
//! ([`raw`]) → typed [`ConfigContainer`] (serde, unknown keys rejected with hints) → one
//! [`validate::finalize`] pass that derives values and reports every broken rule.
pub mod checkpoint;
pub mod container;
pub mod dataset;
pub mod ddp_rules;
pub mod error;
pub mod fp8_rules;
pub mod inert;
pub mod load;
pub mod logger;
pub mod misc;
pub mod mixed_precision;
pub mod model;
pub mod optimizer;
pub mod optimizer_rules;
pub mod overrides;
pub mod parallel;
pub mod peft;
pub mod raw;
pub mod recipes;
pub mod schema;
pub mod show;
pub mod tokenizer;
pub mod train;
pub mod validate;

pub use container::ConfigContainer;
pub use error::{ConfigError, ConfigResult};
pub use load::{load, ConfigRequest, LoadedConfig};
pub use validate::{finalize, Derived, Finalized};

/// Everything in `cfg` that mbridge's engine cannot honour, one message per field (empty when
/// a run can go on): the data-parallel, optimizer, FP8 and inert-field rules. The trainer refuses
/// such a config; `config show` and conversions still accept it.
pub fn engine_unsupported(cfg: &ConfigContainer) -> Vec<String> {
    let mut errs = ddp_rules::engine_unsupported(cfg);
    errs.extend(optimizer_rules::engine_unsupported(cfg));
    errs.extend(fp8_rules::engine_unsupported(cfg));
    errs.extend(inert::engine_unsupported(cfg));
    errs
}
