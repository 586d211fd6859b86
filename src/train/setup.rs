//! Building a run: tokenizer, model (this rank's TP shard of its pipeline stage(s)), optimizer, scheduler, data and
//! logging sinks from a finalized config, then resuming from a checkpoint when there is one.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::checkpointing;
use super::datasets::{build_run_splits, tokenizer_from_config};
use super::dp_setup;
use super::loss_scale::LossScaler;
use super::optimizer::{AdamConfig, Algorithm, GradAccumulator, SgdConfig};
use super::report::{metrics_path, wandb_sync_command, MetricsWriter};
use super::scheduler::{OptimizerParamScheduler, ScheduleInputs};
use super::tensorboard::SummaryWriter;
use super::trainer::{reports_on, Trainer};
use crate::ckpt::{self, AsyncSaver, TrainState};
use crate::config::model::DType as CfgDType;
use crate::config::optimizer::OptimizerKind;
use crate::config::{finalize, Finalized};
use crate::model::params::TpCoord;
use crate::model::{virtual_stages, GptModel, ParallelLayout};
use crate::parallel::pipeline::{schedule, PipelineP2p, ScheduleSpec};
use crate::parallel::ProcessGroups;
use crate::profiling::Profiler;

/// The candle dtype of a config dtype.
pub(super) fn candle_dtype(d: CfgDType) -> DType {
    match d {
        CfgDType::F32 => DType::F32,
        CfgDType::BF16 => DType::BF16,
        CfgDType::F16 => DType::F16,
    }
}

impl Trainer {
    /// Build model, optimizer, scheduler and data for `fin`; resume from `checkpoint.load` or
    /// start from `checkpoint.pretrained_checkpoint` when they hold a checkpoint.
    pub fn new(fin: Finalized, run_config_toml: String, device: Device) -> Result<Self> {
        Self::new_rank(fin, run_config_toml, device, None)
    }

    /// [`Trainer::new`] for one rank of a multi-rank run (`groups` from
    /// [`ProcessGroups::local`] for threads or [`ProcessGroups::connect_tcp`] for processes).
    pub fn new_rank(
        fin: Finalized,
        run_config_toml: String,
        device: Device,
        groups: Option<ProcessGroups>,
    ) -> Result<Self> {
        let tokenizer = tokenizer_from_config(&fin.cfg)?;
        // Finalize again now that the tokenizer's vocabulary is known (vocab padding).
        let fin = finalize(fin.cfg, Some(fin.derived.world_size), Some(tokenizer.vocab_size()))?;
        let Finalized { cfg, derived: d, .. } = fin;
        let world = groups.as_ref().map_or(1, |g| g.topology.world_size());
        if d.world_size != world {
            bail!(
                "the config asks for {} ranks (TP {} × PP {} × CP {} × DP {}) but {world} {} \
                 running: launch with `--nproc-per-node {}` (or torchrun/SLURM)",
                d.world_size,
                cfg.model.tensor_model_parallel_size,
                cfg.model.pipeline_model_parallel_size,
                cfg.model.context_parallel_size,
                d.data_parallel_size,
                if world == 1 { "is" } else { "are" },
                d.world_size,
            );
        }
        let mut unsupported = crate::config::engine_unsupported(&cfg);
        if cfg.model.deterministic_mode && device.is_cuda() {
            unsupported.push(
                "`model.deterministic_mode` = true: the CUDA engine is not bitwise reproducible \
                 (cuDNN attention's backward and cuBLAS pick their own algorithms); set it to \
                 false"
                    .into(),
            );
        }
        if cfg.checkpoint.also_save_hf_checkpoint && cfg.peft.is_some() {
            unsupported.push(
                "`checkpoint.also_save_hf_checkpoint` = true with PEFT: an HF copy of adapters is \
                 not written during training; run `mbridge export-hf --adapter-only` (or \
                 `--merge-lora`) on the checkpoint"
                    .into(),
            );
        }
        if !unsupported.is_empty() {
            bail!(
                "this run asks for what mbridge's engine cannot do:\n  - {}",
                unsupported.join("\n  - ")
            );
        }
        if groups.as_ref().is_none_or(|g| g.rank == 0) {
            // Debug level: the recipes set some of them (Megatron Bridge's `num_workers = 8`).
            for hint in crate::config::inert::ignored_hints(&cfg) {
                tracing::debug!("{hint}");
            }
        }
        // `logger.log_progress`: Megatron writes `Starting job` first thing.
        let progress = match &cfg.checkpoint.save {
            Some(dir) if cfg.logger.log_progress && groups.as_ref().is_none_or(|g| g.rank == 0) => {
                Some(super::progress_log::ProgressLog::start(&PathBuf::from(dir), world)?)
            }
            _ => None,
        };
        let dtype = candle_dtype(cfg.model.params_dtype);
        let started = std::time::Instant::now();
        let (layout, tp_comm) = match &groups {
            Some(g) => (g.layout(), Some(g.tp.clone())),
            None => (ParallelLayout::single(), None),
        };
        // One model per virtual pipeline stage of this rank (one without interleaving).
        let num_chunks = virtual_stages(&cfg.model, layout.pp_size);
        let chunks = (0..num_chunks)
            .map(|c| {
                GptModel::new_chunk(
                    &cfg.model,
                    layout,
                    c,
                    tp_comm.clone(),
                    cfg.peft.as_ref(),
                    cfg.rng.seed,
                    dtype,
                    &device,
                )
                .map(|m| match &groups {
                    Some(g) => m.with_context_parallel(g.cp.clone()),
                    None => m,
                })
                .with_context(|| {
                    format!("cannot build model chunk {c} of pipeline rank {}", layout.pp_rank)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model_built = started.elapsed();
        if let Some(g) = groups.as_ref().filter(|g| g.topology.cp() > 1 && g.rank == 0) {
            let (cp, seq) = (g.topology.cp(), cfg.model.seq_length);
            println!(
                " > context parallel: CP {cp}, CP rank r holds sequence chunks r and {} − r of \
                 {} ({} of {seq} tokens); attention all-gathers keys and values over the CP group",
                2 * cp - 1,
                2 * cp,
                seq / cp
            );
        }
        let p2p = match &groups {
            Some(g) if layout.pp_size > 1 => {
                let wire = cfg.model.pipeline_dtype.map_or(dtype, candle_dtype);
                Some(PipelineP2p::new(g.pp.clone(), wire))
            }
            _ => None,
        };
        let microbatch_group_size =
            cfg.model.microbatch_group_size_per_vp_stage.unwrap_or(layout.pp_size);
        // Refuse a schedule megatron-core would refuse before the first step, not at it.
        schedule(&ScheduleSpec {
            pp_size: layout.pp_size,
            pp_rank: layout.pp_rank,
            num_microbatches: d.num_microbatches,
            num_chunks,
            microbatch_group_size,
            forward_only: false,
        })?;
        // Megatron's start-up line, so a log shows the model size (benchmarks read it too).
        let num_params: usize = chunks
            .iter()
            .flat_map(|m| m.params().params())
            .filter(|p| !p.shared_embedding)
            .map(|p| p.var.elem_count())
            .sum();
        if groups.as_ref().is_none_or(|g| g.coords.dp == 0 && g.coords.cp == 0) {
            let (tp, pp) = (layout.tp_rank, layout.pp_rank);
            println!(
                " > number of parameters on (tensor, pipeline) model parallel rank ({tp}, {pp}): {num_params}"
            );
        }
        // Under PEFT the frozen base is not optimized: only the adapters are.
        let named = chunks.iter().flat_map(|m| m.params().trainable_named_vars()).collect();
        // Tied embedding copies under PP are summed over the embedding group after backward
        // (`all_reduce_embedding_grads`): their buckets cannot start during backward.
        let tied_over_pp = groups.as_ref().is_some_and(|g| g.embedding.is_some());
        let late = chunks
            .iter()
            .flat_map(|m| {
                m.params().params().iter().filter(|p| p.trainable).map(move |p| {
                    let first = m.pre_process() && p.name == "embedding.word_embeddings.weight";
                    tied_over_pp && (first || p.shared_embedding)
                })
            })
            .collect();
        let o = &cfg.optimizer;
        let algorithm = match o.optimizer {
            OptimizerKind::Adam => Algorithm::Adam(AdamConfig {
                beta1: o.adam_beta1,
                beta2: o.adam_beta2,
                eps: o.adam_eps,
                decoupled_weight_decay: o.decoupled_weight_decay,
            }),
            OptimizerKind::Sgd => Algorithm::Sgd(SgdConfig { momentum: o.sgd_momentum }),
        };
        let (optimizer, reducer) = dp_setup::build(&cfg, groups.as_ref(), algorithm, named, late)?;
        let acc = GradAccumulator::new(optimizer.vars());
        let scheduler =
            OptimizerParamScheduler::from_resolved(&ScheduleInputs::from_config(&cfg, &d))?;
        let optimizer_built = started.elapsed();
        // Megatron reports from the last pipeline stage (it holds the loss).
        let reporting = reports_on(groups.as_ref());
        if reporting {
            println!(
                "[after model, optimizer, and learning rate scheduler are built] datetime: {}",
                super::log::timestamp()
            );
        }
        let datasets = build_run_splits(&cfg, &d, tokenizer.as_ref())?;
        if reporting {
            // Megatron's two setup timers, split: the model's share is mostly drawing the
            // initial weights.
            let ms = |t: std::time::Duration| t.as_secs_f64() * 1e3;
            println!(
                "[after dataloaders are built] datetime: {}\n > setup time (ms) on this rank: \
                 model {:.1} | optimizer and scheduler {:.1} | data iterators {:.1}",
                super::log::timestamp(),
                ms(model_built),
                ms(optimizer_built - model_built),
                ms(started.elapsed() - optimizer_built)
            );
        }
        if let Some(cmd) = wandb_sync_command(&cfg.logger)? {
            println!(" W&B: TensorBoard events go to the tensorboard_dir; upload them with: {cmd}");
        }
        let tb = match &cfg.logger.tensorboard_dir {
            Some(dir) if reporting => Some(SummaryWriter::new(&PathBuf::from(dir))?),
            _ => None,
        };
        let metrics = match metrics_path(&cfg.logger) {
            Some(path) if reporting => Some(MetricsWriter::open(&path)?),
            _ => None,
        };
        if let (Some(path), true) = (&cfg.logger.save_config_filepath, reporting) {
            super::run_records::save_config_copy(&cfg, &run_config_toml, Path::new(path));
        }
        let stop = Arc::new(AtomicBool::new(false));
        if cfg.train.exit_signal_handler {
            // `train.exit_signal` (SIGTERM by default, what SLURM sends before the time limit),
            // and Ctrl-C.
            let name = &cfg.train.exit_signal;
            let configured = name
                .parse::<nix::sys::signal::Signal>()
                .ok()
                .filter(|s| !signal_hook::consts::FORBIDDEN.contains(&(*s as i32)))
                .with_context(|| {
                    format!(
                        "`train.exit_signal` = {name:?} is not a signal a handler can catch \
                         (e.g. \"SIGTERM\", \"SIGUSR1\")"
                    )
                })?;
            for sig in [configured as i32, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, Arc::clone(&stop))
                    .context("cannot install the exit signal handler")?;
            }
        }
        let cfg_seed = cfg.rng.seed;
        let profiler = Profiler::new(&cfg, groups.as_ref().map_or(0, |g| g.rank), &device)?;
        let scaler = LossScaler::from_config(&cfg.optimizer);
        let rerun = &cfg.rerun_state_machine;
        let spiky_loss = rerun
            .check_for_spiky_loss
            .then(|| super::spiky_loss::SpikyLoss::new(rerun.spiky_loss_factor));
        let mut t = Trainer {
            cfg,
            d,
            run_config_toml,
            chunks,
            p2p,
            microbatch_group_size,
            optimizer,
            reducer,
            scheduler,
            acc,
            datasets,
            state: TrainState { do_train: true, ..Default::default() },
            device,
            tb,
            metrics,
            stop,
            saver: AsyncSaver::with_world(groups.as_ref().map(|g| g.ckpt.clone())),
            groups,
            rng_seed: cfg_seed,
            memory_reported: false,
            scaler,
            profiler,
            progress,
            started,
            spiky_loss,
        };
        t.restore()?;
        let flops = t.state.floating_point_operations_so_far;
        if let Some(p) = &mut t.progress {
            p.set_flops_at_start(flops);
        }
        Ok(t)
    }

    /// Resume from `checkpoint.load`, or start from `checkpoint.pretrained_checkpoint`.
    fn restore(&mut self) -> Result<()> {
        let c = &self.cfg.checkpoint;
        let resume = checkpointing::checkpoint_to_resume(c)?;
        let peft = self.chunks[0].params().peft().is_some();
        if peft {
            // The frozen base always comes from the pretrained checkpoint; `load` then adds
            // the adapters (PEFT checkpoints hold nothing else).
            self.load_pretrained()?;
            for m in &self.chunks {
                m.init_dora_magnitudes()?;
            }
        }
        if let Some(dir) = resume {
            checkpointing::load_model(&dir, &self.chunks)?;
            // Masters follow the loaded weights unless the optimizer state brings its own.
            self.optimizer.sync_master_from_model()?;
            if c.finetune {
                tracing::info!(
                    "loaded weights from {} (finetune: iteration reset to 0)",
                    dir.display()
                );
                return Ok(());
            }
            if c.load_optim {
                let tp = match &self.groups {
                    Some(g) => TpCoord { rank: g.coords.tp, size: g.tp.size() },
                    None => TpCoord { rank: 0, size: 1 },
                };
                let owned = self
                    .chunks
                    .iter()
                    .flat_map(|m| m.params().params())
                    .filter(|p| p.trainable)
                    .map(|p| p.name.clone())
                    .collect();
                let state = checkpointing::read_optimizer_state(&dir, tp, &owned)?;
                self.optimizer.import_state(&state).with_context(|| {
                    format!("optimizer state in `{}` does not fit", dir.display())
                })?;
            }
            if c.load_rng {
                self.rng_seed = checkpointing::load_rng_seed(&dir)?;
            }
            checkpointing::load_scheduler(&dir, &mut self.scheduler)?;
            self.state = checkpointing::load_train_state(&dir)?;
            // fp16: continue with the loss scale the run had reached.
            if let (Some(scaler), Some(saved)) = (&mut self.scaler, self.state.grad_scaler) {
                scaler.restore(saved);
            }
            tracing::info!("resumed from {} at iteration {}", dir.display(), self.state.step);
            return Ok(());
        }
        if peft || self.load_pretrained()? {
            self.optimizer.sync_master_from_model()?;
            return Ok(());
        }
        if c.exit_on_missing_checkpoint {
            bail!(
                "`checkpoint.exit_on_missing_checkpoint` is set and `checkpoint.load` ({}) holds no checkpoint",
                c.load.as_deref().unwrap_or("unset")
            );
        }
        Ok(())
    }

    /// Loads `checkpoint.pretrained_checkpoint` (an mbridge checkpoint or a Hugging Face
    /// directory) into the model — the frozen base under PEFT; false when it is unset.
    fn load_pretrained(&self) -> Result<bool> {
        let Some(pre) = &self.cfg.checkpoint.pretrained_checkpoint else { return Ok(false) };
        let pre_path = PathBuf::from(pre);
        // A local Hugging Face directory is converted on the fly, as Megatron Bridge does.
        if pre_path.join("config.json").is_file() {
            for m in &self.chunks {
                crate::bridge::load_hf_weights(&pre_path, m)?;
            }
            tracing::info!("initialized weights from Hugging Face directory {pre}");
            return Ok(true);
        }
        let dir = ckpt::find_checkpoint(&pre_path, None)?.with_context(|| {
            format!(
                "`checkpoint.pretrained_checkpoint` `{pre}` holds neither an mbridge checkpoint \
                 nor a Hugging Face model (config.json)"
            )
        })?;
        let part = if self.chunks[0].params().peft().is_some() {
            checkpointing::LoadPart::Base
        } else {
            checkpointing::LoadPart::All
        };
        checkpointing::load_model_part(&dir, &self.chunks, part)?;
        tracing::info!("initialized weights from pretrained checkpoint {}", dir.display());
        Ok(true)
    }
}
