//! The config container: sections, recipes, overrides, validation.
pub mod model;
