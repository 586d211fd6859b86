//! Parameter-efficient finetuning: LoRA / DoRA / canonical LoRA adapters on the GPT linear
//! layers ([`lora::Adapter`], [`canonical`]) and the `target_modules` matcher ([`matcher`]).

pub mod canonical;
pub mod export;
pub mod lora;
pub mod matcher;

pub use canonical::Split;
pub use lora::{Adapter, BaseParallel};
