//! Training: learning-rate / weight-decay schedule, optimizers with fp32 master weights,
//! gradient accumulation and clipping. The loop itself builds on these.
//!
//! One iteration, as megatron-core runs it (see `spec/config-reference.md`, "Step semantics"):
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use mbridge::train::clip::clip_grad_norm;
//! use mbridge::train::grads::GradAccumulator;
//! use mbridge::train::optimizer::{AdamConfig, Algorithm, Optimizer};
//! use mbridge::train::scheduler::{
//!     LrDecayStyle, OptimizerParamScheduler, ScheduleInputs, WdIncrStyle, WsdDecayStyle,
//! };
//!
//! # fn main() -> anyhow::Result<()> {
//! let w = Var::from_tensor(&Tensor::new(&[[2.0f32, -1.0]], &Device::Cpu)?)?;
//! let mut opt = Optimizer::new(
//!     Algorithm::Adam(AdamConfig::default()),
//!     vec![("decoder.linear.weight".to_string(), w.clone())],
//! )?;
//! let gbs = 4; // global batch size = num_microbatches · MBS · DP
//! let mut sched = OptimizerParamScheduler::from_resolved(&ScheduleInputs {
//!     lr: 0.1, min_lr: 0.01, lr_warmup_init: 0.0, weight_decay: 0.01,
//!     start_weight_decay: None, end_weight_decay: None,
//!     weight_decay_incr_style: WdIncrStyle::Constant, lr_decay_style: LrDecayStyle::Cosine,
//!     lr_wsd_decay_style: WsdDecayStyle::Exponential, global_batch_size: gbs,
//!     train_iters: Some(50), train_samples: None, max_steps: None, lr_decay_iters: None,
//!     lr_decay_samples: None, lr_warmup_iters: 2, lr_warmup_samples: 0,
//!     lr_warmup_fraction: None, lr_wsd_decay_iters: None, lr_wsd_decay_samples: None,
//! })?;
//! let mut acc = GradAccumulator::new(opt.vars());
//! let loss_of = |w: &Var| w.as_tensor().sqr().and_then(|t| t.sum_all());
//! let first = loss_of(&w)?.to_scalar::<f32>()?;
//! for _iteration in 1..=50 {
//!     acc.clear();
//!     for _micro_batch in 0..2 {
//!         acc.accumulate(&loss_of(&w)?.backward()?)?;
//!     }
//!     acc.scale(0.5)?; // e.g. divide by the global batch's loss-token count
//!     let norm = clip_grad_norm(&mut acc, opt.vars().iter(), 1.0)?;
//!     if !norm.is_finite() {
//!         anyhow::bail!("grad norm is {}", norm.norm); // or skip the step (no scheduler advance)
//!     }
//!     opt.step_scheduled(&acc, &sched)?; // runs with lr((k-1)·GBS)
//!     sched.step(gbs); // the log line then shows sched.get_lr()
//! }
//! assert!(loss_of(&w)?.to_scalar::<f32>()? < first);
//! # Ok(())
//! # }
//! ```

pub mod checkpointing;
pub mod clip;
pub mod datasets;
pub mod dist_optimizer;
mod dp_setup;
mod dp_step;
pub mod grads;
pub mod log;
pub mod loss_scale;
pub mod memory;
pub mod optimizer;
mod optimizer_state;
pub mod phase_timer;
mod pipeline;
mod profile_hooks;
mod progress_log;
mod report;
pub mod run_optimizer;
pub mod run_records;
mod schedule_resolve;
pub mod scheduler;
mod setup;
mod spiky_loss;
pub mod tensorboard;
pub mod trainer;
