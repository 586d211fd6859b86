//! Parameter-efficient finetuning: LoRA / DoRA adapters on the GPT linear layers
//! ([`lora::Adapter`]) and the `target_modules` matcher ([`matcher`]).

pub mod export;
pub mod lora;
pub mod matcher;

pub use lora::{Adapter, BaseParallel};
