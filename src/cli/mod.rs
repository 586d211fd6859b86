//! Command-line interface: one file per subcommand, each a thin call into the library.

mod checkpoint_args;
mod config_args;
mod config_cmd;
mod data_cmd;
mod env;
pub mod export_hf;
pub mod generate;
pub mod import_hf;
mod num_epochs;
pub mod preprocess_data;
mod pretrain;
mod recipes_cmd;
pub mod selftest;

use clap::{Parser, Subcommand};

use crate::config::ConfigError;

pub use config_args::ConfigArgs;

/// mbridge: train LLMs the Megatron Bridge way — TOML recipes, dotted overrides, one binary.
#[derive(Debug, Parser)]
#[command(name = "mbridge", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG takes precedence when set.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List or print the shipped recipes.
    #[command(subcommand)]
    Recipes(recipes_cmd::RecipesCommand),
    /// Inspect a resolved configuration.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Pretrain a model from a recipe (`<model>/pretrain`).
    Pretrain(pretrain::TrainArgs),
    /// Finetune a model (`<model>/sft`, or `<model>/peft` with --peft).
    Finetune(pretrain::TrainArgs),
    /// Convert a Hugging Face checkpoint into an mbridge checkpoint.
    ImportHf(import_hf::ImportHfArgs),
    /// Convert an mbridge checkpoint into a Hugging Face model directory.
    ExportHf(export_hf::ExportHfArgs),
    /// Greedy generation from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Inspect datasets as a config resolves them.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Tokenize JSONL into Megatron .bin/.idx files.
    PreprocessData(preprocess_data::PreprocessDataArgs),
    /// Show the rank, world and master found in the launcher environment (torchrun, SLURM,
    /// OpenMPI) and this rank's process groups.
    Env(env::EnvArgs),
    /// Check the fused GPU kernels against their references and benchmark them.
    Selftest(selftest::SelftestArgs),
}

/// Parse arguments, run, and map the outcome to an exit code: 0 ok, 2 usage or config error,
/// 1 runtime failure.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    init_tracing(&cli.log_level);
    match run(cli.command) {
        Ok(()) => 0,
        Err(err) => {
            if let Some(pretrain::RankFailed(code)) = err.downcast_ref::<pretrain::RankFailed>() {
                eprintln!("error: {err}");
                return *code;
            }
            if err.downcast_ref::<ConfigError>().is_some() {
                eprintln!("error: {err}");
                2
            } else {
                eprintln!("error: {err:#}");
                1
            }
        }
    }
}

fn init_tracing(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Run one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Recipes(c) => recipes_cmd::run(c),
        Command::Config(c) => config_cmd::run(c),
        Command::Pretrain(a) => pretrain::run(a, pretrain::Mode::Pretrain),
        Command::Finetune(a) => pretrain::run(a, pretrain::Mode::Finetune),
        Command::ImportHf(a) => import_hf::run(a),
        Command::ExportHf(a) => export_hf::run(a),
        Command::Generate(a) => generate::run(a),
        Command::PreprocessData(a) => preprocess_data::run(a),
        Command::Data(c) => data_cmd::run(c),
        Command::Env(a) => env::run(a),
        Command::Selftest(a) => selftest::run(a),
    }
}

/// Print to stdout; a closed pipe (`mbridge recipes list | head`) is not an error.
pub(crate) fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush());
}
