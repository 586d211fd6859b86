//! `mbridge pretrain` / `mbridge finetune`: resolve, validate, print the plan, train.

use super::config_args::{world_size, ConfigArgs};
use super::config_cmd::PeftArg;
use crate::config::parallel::DistBackend;
use crate::config::recipes::Task;
use crate::config::show::{render, ShowOptions};
use crate::config::{finalize, load, Finalized};
use crate::config_err;
use crate::parallel::launch::discover_from_process_env;
use crate::parallel::spawn::{self, SpawnSpec};
use crate::parallel::watchdog::Watchdog;
use crate::parallel::{ProcessGroups, Topology};
use crate::train::trainer::Trainer;
use candle_core::Device;
use std::time::Duration;

/// Which entry point was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pretrain,
    Finetune,
}

/// Arguments of `pretrain` and `finetune`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Finetune with adapters (picks the `<model>/peft` recipe).
    #[arg(long, value_enum)]
    pub peft: Option<PeftArg>,
    /// Number of ranks (default: WORLD_SIZE or TP·PP·CP).
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Validate and print the plan, then exit without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Device to train on: `cpu` (default in CPU builds) or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Start this many rank processes on this node (torchrun's `--nproc-per-node`).
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// Number of nodes in the launch.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// Index of this node.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Host of rank 0 (rendezvous).
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port.
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
}

/// A rank process exited with this non-zero code (the launcher exits with it too).
#[derive(Debug, thiserror::Error)]
#[error("a rank process failed with exit code {0}")]
pub struct RankFailed(pub i32);

/// Run `pretrain` or `finetune`.
pub fn run(args: TrainArgs, mode: Mode) -> anyhow::Result<()> {
    let task = match (mode, args.peft) {
        (Mode::Pretrain, _) => Task::Pretrain,
        (Mode::Finetune, None) => Task::Sft,
        (Mode::Finetune, Some(_)) => Task::Peft,
    };
    if let (Some(n), false) = (args.nproc_per_node, spawn::is_child()) {
        if n == 0 || args.nnodes == 0 || args.node_rank >= args.nnodes {
            return Err(config_err!(
                "`--nproc-per-node` and `--nnodes` must be ≥ 1 and `--node-rank` < `--nnodes`"
            )
            .into());
        }
        let spec = SpawnSpec {
            nproc_per_node: n,
            nnodes: args.nnodes,
            node_rank: args.node_rank,
            master_addr: args.master_addr.clone(),
            master_port: args.master_port,
        };
        let argv: Vec<String> = std::env::args().skip(1).collect();
        return match spawn::spawn_ranks(&spec, &argv)? {
            0 => Ok(()),
            code => Err(RankFailed(code).into()),
        };
    }
    let env = discover_from_process_env()?;
    let loaded = load(&args.config.request(task, args.peft.map(Into::into)))?;
    let (loaded, args_from) = super::checkpoint_args::apply(loaded)?;
    let loaded = super::num_epochs::resolve(loaded, env.rank == 0)?;
    // Ranks started by SLURM/OpenMPI know the world size from the environment too.
    let ranks = world_size(args.world_size).or((env.world_size > 1).then_some(env.world_size));
    let fin = finalize(loaded.cfg.clone(), ranks, None)?;
    if env.rank == 0 {
        for w in loaded.raw.replaced_overrides().iter().chain(&fin.warnings) {
            tracing::warn!("{w}");
        }
        if let Some(dir) = &args_from {
            tracing::info!(
                "model architecture from {} (checkpoint.use_checkpoint_args)",
                dir.join("run_config.toml").display()
            );
        }
        super::out(&plan(&fin, args.config.recipe.as_deref()));
    }
    if args.dry_run {
        return Ok(());
    }
    // `--device cuda` (no ordinal) gives each local rank its own GPU, as torchrun users
    // expect from `torch.cuda.set_device(LOCAL_RANK)`.
    let device = if args.device == "cuda" {
        parse_device(&format!("cuda:{}", env.local_rank))?
    } else {
        parse_device(&args.device)?
    };
    let run_config = render(&loaded.cfg, &loaded.raw, None, ShowOptions::default());
    let timeout = Duration::from_secs(60 * fin.cfg.dist.distributed_timeout_minutes);
    let nccl = fin.cfg.dist.distributed_backend == DistBackend::Nccl && device.is_cuda();
    let groups = if env.world_size > 1 {
        let topo = Topology::from_config(&fin.cfg.model, &fin.cfg.dist, env.world_size)?;
        Some(ProcessGroups::connect(
            &env,
            topo,
            timeout,
            &device,
            nccl,
            fin.cfg.ddp.overlap_grad_reduce || fin.cfg.ddp.overlap_param_gather,
        )?)
    } else {
        None
    };
    let tcp_world = groups.as_ref().and_then(|g| g.tcp_world.clone());
    // Over NCCL a dead or hung peer blocks this rank inside the GPU stream, beyond any
    // receive timeout: the watchdog ends the process with the reason instead.
    let _watchdog = match (&tcp_world, nccl) {
        (Some(w), true) => {
            let w = w.clone();
            Some(Watchdog::start(env.rank, move || w.failed_peers(), timeout)?)
        }
        _ => None,
    };
    let mut trainer = Trainer::new_rank(fin, run_config, device, groups)?;
    let outcome = trainer.train()?;
    if let Some(w) = &tcp_world {
        w.farewell();
    }
    tracing::info!("training stopped at iteration {} ({:?})", outcome.final_step, outcome.reason);
    Ok(())
}

/// `cpu` or `cuda:N` (the latter only in builds with the `cuda` feature).
pub fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| config_err!("`--device {s}`: expected cuda:N"))?;
            if !candle_core::utils::cuda_is_available() {
                return Err(config_err!(
                    "`--device {s}`: this mbridge was built without CUDA (build with --features cuda)"
                )
                .into());
            }
            let device = Device::new_cuda(ordinal)?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(d) = &device {
                // Before any tensor exists: event tracking applies to buffers created later.
                crate::ops::cuda::memory::prepare_for_training(d)?;
            }
            Ok(device)
        }
        other => Err(config_err!("unknown `--device {other}`: expected cpu or cuda:N").into()),
    }
}

/// A human-readable summary of what a run will do.
pub fn plan(fin: &Finalized, recipe: Option<&str>) -> String {
    let c = &fin.cfg;
    let d = &fin.derived;
    let m = &c.model;
    let mut s = String::new();
    s += &format!("recipe: {}\n", recipe.unwrap_or("(defaults)"));
    s += &format!(
        "model: {} layers, hidden {}, ffn {}, heads {} (query groups {}, head dim {}), seq {}\n",
        m.num_layers,
        m.hidden_size,
        m.ffn_hidden(),
        m.num_attention_heads,
        m.query_groups(),
        m.head_dim(),
        m.seq_length
    );
    s += &format!(
        "parallelism: world {} = TP {} × PP {} × CP {} × DP {}{}\n",
        d.world_size,
        m.tensor_model_parallel_size,
        m.pipeline_model_parallel_size,
        m.context_parallel_size,
        d.data_parallel_size,
        m.virtual_pipeline_model_parallel_size.map(|v| format!(" (VP {v})")).unwrap_or_default()
    );
    s += &format!(
        "batch: global {} = micro {} × {} micro-batches × DP {}\n",
        d.global_batch_size, d.micro_batch_size, d.num_microbatches, d.data_parallel_size
    );
    s += &format!(
        "schedule: {} iterations, lr {} → {} ({:?}), warmup {} iterations, decay over {}\n",
        d.train_iters,
        c.optimizer.lr.unwrap_or(0.0),
        c.optimizer.min_lr.unwrap_or(0.0),
        c.scheduler.lr_decay_style,
        d.lr_warmup_iters,
        d.lr_decay_iters
    );
    if let (Some(fp8), Some(span)) = (&m.fp8, m.fp8_layers()) {
        s += &format!(
            "precision: FP8 {fp8} with tensorwise current scaling in the linear layers of layers \
             {}..{} of {} (0-based; the rest and the output layer in {:?})\n",
            span.start, span.end, m.num_layers, m.params_dtype
        );
        if m.fp8_param == Some(true) {
            s += "precision: their GEMM weights are stored in FP8 (`fp8_param`), cast from the \
                  f32 master weights after every step\n";
        }
    }
    s += &format!("data: {:?}\n", c.dataset.kind());
    s += &format!(
        "checkpoint: save {} every {} iterations, load {}\n",
        c.checkpoint.save.as_deref().unwrap_or("(never)"),
        c.checkpoint.save_interval.map(|i| i.to_string()).unwrap_or_else(|| "(end only)".into()),
        c.checkpoint.load.as_deref().unwrap_or("(none)")
    );
    s
}
