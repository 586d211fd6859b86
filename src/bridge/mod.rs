//! The Hugging Face bridge: config.json ⇄ model config, the one HF ⇄ Megatron tensor table,
//! the local HF cache, and the `import-hf` / `export-hf` conversions (hf-mapping spec).
//!
//! ```text
//! HF dir / cached repo ──hub──► config.json ──hf_config──► ModelConfig
//!                       └─weights (mmap, one tensor at a time)──mapping──► checkpoint writer
//! checkpoint (any TP/PP) ──ckpt::load_tensors──mapping──► model.safetensors + config.json
//! ```
pub mod checkpoint;
pub mod download;
pub mod export;
pub mod hf_config;
pub mod hub;
pub mod import;
pub mod load;
pub mod mapping;
pub mod output;
pub mod stream;
pub mod weights;

pub use checkpoint::{load_checkpoint_model, LoadedCheckpoint};
pub use export::{export_hf, ExportOptions};
pub use import::{import_hf, ImportOptions};
pub use load::load_hf_weights;
