//! Tensor parallelism on the CPU backend: a TP=2 model on two threads gives the same logits,
//! loss and (sharded) gradients as the TP=1 model from the same seed; TP=2 × DP=2 on four
//! threads gives the TP=1 gradients of the whole batch.

mod model_common;
mod parallel_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::model::ModelConfig;
use mbridge::model::params::{shard_of, ShardLayout, TpCoord};
use mbridge::model::{loss_for_microbatch, ForwardOpts, GptModel, Microbatch, ParallelLayout};
use mbridge::ops::DropoutRng;
use mbridge::parallel::comm::Communicator;
use mbridge::parallel::data::all_reduce_grads;
use mbridge::parallel::{GroupKind, RankOrder, Topology};
use mbridge::train::grads::GradAccumulator;
use model_common::{rand_vec, tiny_gpt, tiny_llama, tiny_qwen_window};
use parallel_common::run_ranks;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(300);
const SEED: u64 = 11;

/// Token, label and loss-mask rows of a batch.
type Rows = (Vec<Vec<i64>>, Vec<Vec<i64>>, Vec<Vec<f32>>);

/// A deterministic micro-batch of `rows` rows over a vocabulary of `vocab`, with some
/// masked positions.
fn batch_rows(rows: usize, s: usize, vocab: usize, seed: u64) -> Rows {
    let ids = |k: u64| -> Vec<Vec<i64>> {
        let r = rand_vec(rows * s, seed * 31 + k);
        r.chunks(s)
            .map(|c| c.iter().map(|x| ((x + 1.0) / 2.0 * vocab as f64) as i64).collect())
            .collect()
    };
    let mask: Vec<Vec<f32>> = (0..rows)
        .map(|i| (0..s).map(|j| if (i + j) % 5 == 3 { 0.0 } else { 1.0 }).collect())
        .collect();
    (ids(1), ids(2), mask)
}

fn microbatch(rows: &Rows) -> Microbatch {
    Microbatch::from_rows(&rows.0, &rows.1, &rows.2, None, &Device::Cpu).unwrap()
}

/// (name, gradient, partition dim, layout) of one parameter.
type NamedGrad = (String, Tensor, Option<usize>, ShardLayout);

struct Run {
    logits: Vec<f64>,
    loss_sum: f64,
    count: f64,
    /// (name, gradient, partition dim, layout) per parameter of this rank.
    grads: Vec<NamedGrad>,
}

/// Forward, loss and backward of `model` on `batch`; the loss is normalised by `count`.
fn run_model(model: &GptModel, batch: &Microbatch) -> anyhow::Result<Run> {
    let local = model.forward(&batch.tokens, &ForwardOpts::default())?;
    let logits = model.gather_logits(&local)?.flatten_all()?.to_vec1::<f64>()?;
    // Training mode: every TP rank draws the masks of the same stream.
    let rng = DropoutRng::new(SEED, 3, 1);
    let (sum, count) = loss_for_microbatch(model, batch, Some(&rng))?;
    let grads = (&sum / count)?.backward()?;
    let mut out = Vec::new();
    for p in model.params().params() {
        let g = grads
            .get(p.var.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("{}: no gradient", p.name))?;
        out.push((p.name.clone(), g.clone(), p.partition_dim, p.layout));
    }
    Ok(Run { logits, loss_sum: sum.to_scalar::<f64>()?, count, grads: out })
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    d / s.max(1e-30)
}

/// Checks each rank's gradient shards against the shards of the TP=1 gradients.
fn check_grads(
    full: &HashMap<String, Tensor>,
    rank: usize,
    tp: usize,
    grads: &[NamedGrad],
    tol: f64,
) {
    assert_eq!(grads.len(), full.len(), "rank {rank}: parameter count");
    for (name, g, dim, layout) in grads {
        let want = shard_of(&full[name], *dim, *layout, TpCoord { rank, size: tp }).unwrap();
        assert_eq!(g.dims(), want.dims(), "{name} on TP rank {rank}");
        let e = max_rel(g, &want);
        assert!(e < tol, "{name} on TP rank {rank}: relative gradient error {e:.3e}");
    }
}

fn tp_layout(rank: usize, size: usize) -> ParallelLayout {
    ParallelLayout { tp_rank: rank, tp_size: size, pp_rank: 0, pp_size: 1 }
}

fn tp2_matches_tp1(cfg: ModelConfig) {
    let vocab = cfg.vocab_size.unwrap();
    let rows = batch_rows(2, 8, vocab, 5);
    let whole =
        GptModel::new(&cfg, ParallelLayout::single(), SEED, DType::F64, &Device::Cpu).unwrap();
    let base = run_model(&whole, &microbatch(&rows)).unwrap();
    let full: HashMap<String, Tensor> =
        base.grads.iter().map(|(n, g, _, _)| (n.clone(), g.clone())).collect();
    let runs = run_ranks(2, DEADLINE, move |rank, world| {
        let comm: Arc<dyn Communicator> = Arc::new(world.group(rank, "tp", &[0, 1])?);
        let m = GptModel::new_parallel(
            &cfg,
            tp_layout(rank, 2),
            Some(comm),
            SEED,
            DType::F64,
            &Device::Cpu,
        )?;
        assert_eq!(m.tensor_parallel().unwrap().sequence_parallel(), cfg.sequence_parallel);
        run_model(&m, &microbatch(&rows))
    });
    for (rank, r) in runs.iter().enumerate() {
        assert_eq!(r.count, base.count);
        let e = (r.loss_sum - base.loss_sum).abs() / base.loss_sum.abs();
        assert!(e < 1e-12, "rank {rank}: loss {} vs {}", r.loss_sum, base.loss_sum);
        let lmax = base.logits.iter().fold(0f64, |m, x| m.max(x.abs()));
        let ld = r.logits.iter().zip(&base.logits).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(ld / lmax < 1e-12, "rank {rank}: logits differ by {ld:.3e}");
        check_grads(&full, rank, 2, &r.grads, 1e-10);
    }
    // Both TP ranks computed the same loss bit for bit.
    assert_eq!(runs[0].loss_sum.to_bits(), runs[1].loss_sum.to_bits());
}

/// Llama: RMSNorm, GQA (4 heads / 2 groups), SwiGLU, RoPE, untied embeddings.
#[test]
fn tp2_equals_tp1_llama_untied() {
    tp2_matches_tp1(tiny_llama());
}

/// With hidden and attention dropout: TP ranks drop exactly the elements TP=1 drops.
#[test]
fn tp2_equals_tp1_with_dropout() {
    tp2_matches_tp1(ModelConfig { hidden_dropout: 0.2, attention_dropout: 0.3, ..tiny_llama() });
}

/// Qwen3/Mistral-like: tied embeddings, QK-norm, QKV bias, sliding window.
#[test]
fn tp2_equals_tp1_tied_qk_norm() {
    tp2_matches_tp1(tiny_qwen_window());
}

/// GPT-2-like: LayerNorm, learned positions, biases on every linear (row-parallel biases are
/// added after the reduction), plain GELU MLP, tied embeddings.
#[test]
fn tp2_equals_tp1_gpt_with_biases() {
    tp2_matches_tp1(ModelConfig { num_query_groups: Some(2), ..tiny_gpt() });
}

/// Sequence parallelism with dropout: norms, dropout and residuals on sequence shards,
/// all-gather / reduce-scatter around the TP regions.
#[test]
fn tp2_sequence_parallel_equals_tp1_llama_dropout() {
    let cfg = ModelConfig {
        sequence_parallel: true,
        hidden_dropout: 0.2,
        attention_dropout: 0.3,
        ..tiny_llama()
    };
    tp2_matches_tp1(cfg);
}

/// Sequence parallelism with LayerNorm biases, row-parallel biases, learned positions, tied
/// embeddings and QK-norm.
#[test]
fn tp2_sequence_parallel_equals_tp1_biases_and_qk_norm() {
    tp2_matches_tp1(ModelConfig {
        sequence_parallel: true,
        num_query_groups: Some(2),
        ..tiny_gpt()
    });
    tp2_matches_tp1(ModelConfig { sequence_parallel: true, ..tiny_qwen_window() });
}

/// Without a communicator a TP=2 model refuses to run; a communicator of the wrong size is
/// rejected at construction.
#[test]
fn tp_needs_a_matching_communicator() {
    let cfg = tiny_llama();
    let m = GptModel::new(&cfg, tp_layout(0, 2), 1, DType::F32, &Device::Cpu).unwrap();
    let err = m.forward(&Tensor::new(&[[1u32]], &Device::Cpu).unwrap(), &ForwardOpts::default());
    assert!(err.unwrap_err().to_string().contains("new_parallel"));
    let world = mbridge::parallel::comm::LocalWorld::new(2, Duration::from_secs(5));
    let comm: Arc<dyn Communicator> = Arc::new(world.world_group(1).unwrap());
    let err =
        GptModel::new_parallel(&cfg, tp_layout(0, 2), Some(comm), 1, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
    assert!(err.contains("does not match the layout's TP rank 0 of 2"), "{err}");
}

/// TP=2 × DP=2 on four threads: each DP rank takes half of the batch, the token count and
/// the gradients are summed over DP, and every shard equals the TP=1 gradient of the whole
/// batch.
#[test]
fn tp2_dp2_grads_equal_whole_batch_tp1() {
    let cfg = ModelConfig { share_embeddings_and_output_weights: true, ..tiny_llama() };
    let vocab = cfg.vocab_size.unwrap();
    let rows = batch_rows(4, 6, vocab, 9);
    let whole =
        GptModel::new(&cfg, ParallelLayout::single(), SEED, DType::F64, &Device::Cpu).unwrap();
    let base = run_model(&whole, &microbatch(&rows)).unwrap();
    let full: HashMap<String, Tensor> =
        base.grads.iter().map(|(n, g, _, _)| (n.clone(), g.clone())).collect();
    let topo = Topology::new(4, 2, 1, 1, RankOrder::TpCpDpPp).unwrap();
    let runs = run_ranks(4, DEADLINE, move |rank, world| {
        let c = topo.coords(rank)?;
        let tp: Arc<dyn Communicator> =
            Arc::new(world.group(rank, "tp", &topo.group_of(GroupKind::Tp, rank).unwrap())?);
        let dp = world.group(rank, "dp", &topo.group_of(GroupKind::Dp, rank).unwrap())?;
        let m = GptModel::new_parallel(
            &cfg,
            tp_layout(c.tp, 2),
            Some(tp),
            SEED,
            DType::F64,
            &Device::Cpu,
        )?;
        let half = (
            rows.0[2 * c.dp..2 * c.dp + 2].to_vec(),
            rows.1[2 * c.dp..2 * c.dp + 2].to_vec(),
            rows.2[2 * c.dp..2 * c.dp + 2].to_vec(),
        );
        let (sum, count) = loss_for_microbatch(&m, &microbatch(&half), None)?;
        let count = Tensor::new(&[count], &Device::Cpu)?;
        let total = dp.all_reduce(&count, mbridge::parallel::ReduceOp::Sum)?.to_vec1::<f64>()?[0];
        let grads = (&sum / total)?.backward()?;
        let mut acc = GradAccumulator::new(m.params().vars());
        acc.accumulate(&grads)?;
        all_reduce_grads(&mut acc, &dp, 1.0)?;
        let out: Vec<_> = m
            .params()
            .params()
            .iter()
            .zip(acc.iter())
            .map(|(p, (_, g))| (p.name.clone(), g.unwrap().clone(), p.partition_dim, p.layout))
            .collect();
        Ok((c.tp, out))
    });
    for (tp_rank, grads) in &runs {
        check_grads(&full, *tp_rank, 2, grads, 1e-10);
    }
}

/// Greedy decoding with a KV cache under TP=2 (logits gathered over the group) produces the
/// TP=1 tokens.
#[test]
fn tp2_generation_equals_tp1() {
    let cfg = tiny_qwen_window();
    let prompt = [3u32, 1, 4, 1, 5];
    let whole =
        GptModel::new(&cfg, ParallelLayout::single(), SEED, DType::F64, &Device::Cpu).unwrap();
    let want = mbridge::model::generate(&whole, &prompt, 6, None).unwrap();
    let got = run_ranks(2, DEADLINE, move |rank, world| {
        let comm: Arc<dyn Communicator> = Arc::new(world.group(rank, "tp", &[0, 1])?);
        let layout = tp_layout(rank, 2);
        let m = GptModel::new_parallel(&cfg, layout, Some(comm), SEED, DType::F64, &Device::Cpu)?;
        let cached = mbridge::model::generate(&m, &prompt, 6, None)?;
        let uncached = mbridge::model::generate_no_cache(&m, &prompt, 6, None)?;
        assert_eq!(cached, uncached, "TP rank {rank}");
        Ok(cached)
    });
    assert_eq!(got, vec![want.clone(), want]);
}
