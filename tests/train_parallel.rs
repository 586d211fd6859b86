//! Tensor and data parallel training on the in-process CPU backend equals one process.

mod train_common;

use train_common::{tiny_config, train_ranks};

use candle_core::Device;
use mbridge::config::finalize;
use mbridge::train::trainer::{TrainOutcome, Trainer};

fn config(extra: &[&str]) -> (mbridge::config::LoadedConfig, String) {
    let base = ["train.train_iters=8", "validation.eval_iters=0", "rng.seed=11"];
    tiny_config(&[&base[..], extra].concat())
}

fn run_ranks(world: usize, extra: &[&str]) -> Vec<TrainOutcome> {
    let (loaded, toml) = config(extra);
    train_ranks(world, &loaded, &toml).unwrap()
}

fn single(extra: &[&str]) -> TrainOutcome {
    let (loaded, toml) = config(extra);
    let fin = finalize(loaded.cfg, None, None).unwrap();
    Trainer::new(fin, toml, Device::Cpu).unwrap().train().unwrap()
}

fn assert_close(a: &TrainOutcome, b: &TrainOutcome, what: &str) {
    assert_eq!(a.losses.len(), b.losses.len(), "{what}");
    for ((it, x), (_, y)) in a.losses.iter().zip(&b.losses) {
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(rel < 2e-5, "{what}: iteration {it}: {x} vs {y} (rel {rel:.2e})");
    }
    for (x, y) in a.grad_norms.iter().zip(&b.grad_norms) {
        let (x, y) = (x.1.unwrap_or(0.0), y.1.unwrap_or(0.0));
        assert!((x - y).abs() / x.abs().max(1e-12) < 2e-4, "{what}: grad norm {x} vs {y}");
    }
}

#[test]
fn tp2_dp2_and_tp2xdp2_match_one_process() {
    let base = single(&[]);
    assert!(base.losses.last().unwrap().1 < base.losses[0].1);
    let tp = run_ranks(2, &["model.tensor_model_parallel_size=2"]);
    for r in &tp {
        assert_close(&base, r, "TP=2");
    }
    let dp = run_ranks(2, &[]);
    assert_close(&base, &dp[0], "DP=2");
    assert_eq!(dp[0].losses, dp[1].losses, "DP ranks report the same reduced loss");
    let both = run_ranks(4, &["model.tensor_model_parallel_size=2"]);
    assert_close(&base, &both[3], "TP=2 × DP=2");
}

#[test]
fn per_token_loss_with_data_parallel_matches() {
    let extra = ["model.calculate_per_token_loss=true", "dataset.eod_mask_loss=true"];
    let base = single(&extra);
    let dp = run_ranks(2, &extra);
    assert_close(&base, &dp[1], "DP=2 per-token");
}

#[test]
fn checkpoint_saved_with_tp2_resumes_with_tp1() {
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().display());
    let load = format!("+checkpoint.load={}", dir.path().display());
    let full = single(&[]);
    let first =
        run_ranks(2, &["model.tensor_model_parallel_size=2", "+train.exit_interval=4", &save]);
    assert_eq!(first[0].final_step, 4);
    assert!(dir.path().join("iter_0000004/model/shard_tp01_pp00.safetensors").is_file());
    let resumed = single(&[&save, &load]);
    assert_eq!(resumed.losses[0].0, 5);
    let tail = TrainOutcome {
        losses: full.losses[4..].to_vec(),
        grad_norms: full.grad_norms[4..].to_vec(),
        ..full
    };
    assert_close(&tail, &resumed, "TP=2 checkpoint resumed at TP=1");
}

#[test]
fn a_multi_rank_config_in_one_process_says_how_to_launch() {
    let (loaded, toml) = config(&["model.tensor_model_parallel_size=2"]);
    let fin = finalize(loaded.cfg, Some(2), None).unwrap();
    let e = Trainer::new(fin, toml, Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("--nproc-per-node 2"), "{e}");
}

#[test]
fn tp2_run_resumes_from_its_own_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let save = format!("+checkpoint.save={}", dir.path().display());
    let load = format!("+checkpoint.load={}", dir.path().display());
    let tp = "model.tensor_model_parallel_size=2";
    let full = run_ranks(2, &[tp]);
    let first = run_ranks(2, &[tp, "+train.exit_interval=3", &save]);
    assert_eq!(first[0].final_step, 3);
    let resumed = run_ranks(2, &[tp, &save, &load]);
    assert_eq!(resumed[0].losses[0].0, 4);
    assert_eq!(&full[0].losses[3..], resumed[0].losses.as_slice(), "TP=2 resume is exact");
}

#[test]
fn every_rank_agrees_to_stop_on_exit_duration() {
    // A zero-minute budget stops after the first iteration on all ranks at once (no hang).
    let out =
        run_ranks(2, &["model.tensor_model_parallel_size=2", "+train.exit_duration_in_mins=0"]);
    assert!(
        out.iter().all(|o| o.final_step == 1),
        "{:?}",
        out.iter().map(|o| o.final_step).collect::<Vec<_>>()
    );
}

/// Selective recompute runs the layers' written-out backward, which takes tensor (and
/// sequence) parallelism as autograd does: gathers, partial sums and the replicated norms' and
/// biases' gradient sums written out. Covers RMSNorm and LayerNorm with biases, QK-norm.
#[test]
fn written_out_backward_with_tp_and_sp_matches_one_process() {
    let selective =
        ["model.recompute_granularity=\"selective\"", "model.recompute_modules=[\"mlp\"]"];
    let biased = [
        "model.normalization=\"LayerNorm\"",
        "model.add_bias_linear=true",
        "model.qk_layernorm=true",
    ];
    let tp = "model.tensor_model_parallel_size=2";
    let sp = "model.sequence_parallel=true";
    for model in [&[][..], &biased[..]] {
        let base = single(model);
        for extra in [&[tp][..], &[tp, sp][..]] {
            let args = [model, &selective[..], extra].concat();
            let what = format!("{args:?}");
            for r in &run_ranks(2, &args) {
                assert_close(&base, r, &what);
            }
        }
    }
    // Core attention recomputed, with context parallelism on top.
    let core =
        ["model.recompute_granularity=\"selective\"", tp, sp, "model.context_parallel_size=2"];
    let base = single(&[]);
    assert_close(&base, &run_ranks(4, &core)[0], "TP=2 (SP) × CP=2, selective core_attn");
}

/// `logger.log_params_norm`: the L2 norm of the parameters after each logged step. One
/// process's equals the norm of its model's weights; TP=2, DP=2 with the distributed
/// optimizer (shards summed over DP) and PP=2 with tied embeddings (the last stage's copy not
/// counted) report the same norm, each element counted once.
#[test]
fn params_norm_is_the_whole_models_norm_under_any_layout() {
    let logged = ["logger.log_params_norm=true", "logger.log_interval=2"];
    let (loaded, toml) = config(&logged);
    let fin = finalize(loaded.cfg, None, None).unwrap();
    let mut trainer = Trainer::new(fin, toml, Device::Cpu).unwrap();
    let base = trainer.train().unwrap();
    let iterations: Vec<u64> = base.params_norms.iter().map(|p| p.0).collect();
    assert_eq!(iterations, [2, 4, 6, 8]);
    let sq = |t: &candle_core::Tensor| {
        let t = t.to_dtype(candle_core::DType::F64).unwrap();
        t.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let params = trainer.model().params().params();
    let by_hand = params.iter().filter(|p| p.trainable).map(|p| sq(p.var.as_tensor())).sum::<f64>();
    let last = base.params_norms[3].1;
    assert!((last - by_hand.sqrt()).abs() <= 1e-6 * last, "{last} vs {}", by_hand.sqrt());
    assert_ne!(base.params_norms[0].1, last, "the weights changed");
    let tied = "model.share_embeddings_and_output_weights=true";
    let (loaded, toml) = config(&[&logged[..], &[tied]].concat());
    let fin = finalize(loaded.cfg, None, None).unwrap();
    let base_tied = Trainer::new(fin, toml, Device::Cpu).unwrap().train().unwrap();
    let layouts: [(&str, &[&str], &TrainOutcome); 3] = [
        ("TP=2", &["model.tensor_model_parallel_size=2"], &base),
        ("DP=2 distributed optimizer", &["ddp.use_distributed_optimizer=true"], &base),
        ("PP=2 tied", &["model.pipeline_model_parallel_size=2", tied], &base_tied),
    ];
    for (what, layout, want) in layouts {
        for (rank, got) in run_ranks(2, &[&logged[..], layout].concat()).iter().enumerate() {
            assert_eq!(got.params_norms.len(), want.params_norms.len(), "{what} rank {rank}");
            for ((it, x), (_, y)) in want.params_norms.iter().zip(&got.params_norms) {
                let rel = (x - y).abs() / x;
                assert!(rel < 1e-5, "{what} rank {rank} iteration {it}: {y} vs one process {x}");
            }
        }
    }
}
