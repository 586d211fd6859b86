//! TP=2 × PP=2 on four threads: stage 0 sends its hidden states to stage 1 over the pipeline
//! group, stage 1 sends the gradient of its input back, stage 0 runs backward from it
//! (`(output · grad).sum().backward()`); the tied embedding's two copies are summed over the
//! embedding group. Loss and every gradient shard equal the TP=1/PP=1 model's.

mod model_common;
mod parallel_common;

use candle_core::{DType, Device, Tensor, Var};
use mbridge::config::model::ModelConfig;
use mbridge::model::params::{shard_of, TpCoord};
use mbridge::model::{ForwardOpts, GptModel, Microbatch, ParallelLayout};
use mbridge::parallel::comm::Communicator;
use mbridge::parallel::data::model_parallel_grad_sq_norm;
use mbridge::parallel::{GroupKind, RankOrder, ReduceOp, Topology};
use mbridge::train::clip::local_sq_norm;
use mbridge::train::grads::GradSourceMut;
use model_common::{tiny_llama, tiny_qwen_window};
use parallel_common::run_ranks;
use std::sync::Arc;
use std::time::Duration;

const SEED: u64 = 23;

fn batch() -> Microbatch {
    let tokens = vec![vec![3, 1, 4, 1, 5, 9, 2, 6], vec![6, 5, 3, 5, 8, 9, 7, 9]];
    let labels = vec![vec![1, 4, 1, 5, 9, 2, 6, 5], vec![5, 3, 5, 8, 9, 7, 9, 3]];
    let mask = vec![vec![1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], vec![1.0; 8]];
    Microbatch::from_rows(&tokens, &labels, &mask, None, &Device::Cpu).unwrap()
}

fn tp_pp_matches_whole(cfg: ModelConfig) {
    let whole =
        GptModel::new(&cfg, ParallelLayout::single(), SEED, DType::F64, &Device::Cpu).unwrap();
    let b = batch();
    let logits = whole.forward(&b.tokens, &ForwardOpts::default()).unwrap();
    let (sum, count) = whole.cross_entropy(&logits, &b.labels, &b.loss_mask).unwrap();
    let loss = (sum / count).unwrap();
    let grads = loss.backward().unwrap();
    let full: std::collections::HashMap<String, Tensor> = whole
        .params()
        .params()
        .iter()
        .map(|p| (p.name.clone(), grads.get(p.var.as_tensor()).unwrap().clone()))
        .collect();
    let want_loss = loss.to_scalar::<f64>().unwrap();
    let tied = cfg.share_embeddings_and_output_weights;
    let topo = Topology::new(4, 2, 1, 2, RankOrder::TpCpDpPp).unwrap();
    let results = run_ranks(4, Duration::from_secs(300), move |rank, world| {
        let c = topo.coords(rank)?;
        let group = |k: GroupKind| topo.group_of(k, rank).unwrap();
        let tp: Arc<dyn Communicator> = Arc::new(world.group(rank, "tp", &group(GroupKind::Tp))?);
        let pp = world.group(rank, "pp", &group(GroupKind::Pp))?;
        let emb = world.group(rank, "embd", &group(GroupKind::Embedding))?;
        let layout = ParallelLayout { tp_rank: c.tp, tp_size: 2, pp_rank: c.pp, pp_size: 2 };
        let m = GptModel::new_parallel(&cfg, layout, Some(tp), SEED, DType::F64, &Device::Cpu)?;
        let b = batch();
        let opts = ForwardOpts::default();
        // Stages exchange this rank's part of the sequence under sequence parallelism.
        let s = if cfg.sequence_parallel { 4 } else { 8 };
        let (bsz, h) = (2, cfg.hidden_size);
        let mut loss_value = None;
        let grads = if c.pp == 0 {
            let out = m.forward_stage(&b.tokens, &opts, None)?;
            pp.send(&out, 1)?;
            let g = pp.recv(1, &(bsz, s, h).into(), DType::F64, &Device::Cpu)?;
            (out * g)?.sum_all()?.backward()?
        } else {
            let input =
                Var::from_tensor(&pp.recv(0, &(bsz, s, h).into(), DType::F64, &Device::Cpu)?)?;
            let logits = m.forward_stage(input.as_tensor(), &opts, None)?;
            let (sum, count) = m.cross_entropy(&logits, &b.labels, &b.loss_mask)?;
            let loss = (sum / count)?;
            loss_value = Some(loss.to_scalar::<f64>()?);
            let grads = loss.backward()?;
            pp.send(grads.get(input.as_tensor()).expect("input gradient"), 0)?;
            grads
        };
        let mut grads = grads;
        let mut out = Vec::new();
        for p in m.params().params() {
            let mut g = grads
                .get(p.var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{}: no gradient", p.name))?
                .clone();
            // Tied embeddings: both copies get the sum of their gradients (Megatron's
            // embedding-group all-reduce in finalize_model_grads).
            if tied && (p.name == "embedding.word_embeddings.weight" || p.shared_embedding) {
                g = emb.all_reduce(&g, ReduceOp::Sum)?;
                grads.set_grad(&p.var, g.clone());
            }
            out.push((p.name.clone(), g, p.partition_dim, p.layout));
        }
        let mp = world.group(rank, "mp", &group(GroupKind::Mp))?;
        let norm = model_parallel_grad_sq_norm(&grads, m.params().params(), c.tp, &mp)?;
        Ok((c.tp, loss_value, out, norm))
    });
    let mut seen = std::collections::HashSet::new();
    let want_norm = local_sq_norm(&grads, whole.params().vars().iter()).unwrap();
    for (tp_rank, loss, grads, norm) in &results {
        let e = (norm - want_norm).abs() / want_norm;
        assert!(e < 1e-12, "squared grad norm {norm} vs {want_norm} on TP rank {tp_rank}");
        if let Some(l) = loss {
            assert!((l - want_loss).abs() < 1e-12 * want_loss.abs(), "loss {l} vs {want_loss}");
        }
        for (name, g, dim, layout) in grads {
            // The last stage's tied copy is compared with the embedding's gradient.
            let key = if name == "output_layer.weight" && tied {
                "embedding.word_embeddings.weight"
            } else {
                name.as_str()
            };
            let want =
                shard_of(&full[key], *dim, *layout, TpCoord { rank: *tp_rank, size: 2 }).unwrap();
            let d = (g - &want).unwrap().abs().unwrap().max_all().unwrap();
            let s = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let e = d.to_scalar::<f64>().unwrap() / s.max(1e-30);
            assert!(e < 1e-10, "{name} on TP rank {tp_rank}: relative error {e:.3e}");
            seen.insert(name.clone());
        }
    }
    for name in full.keys() {
        assert!(seen.contains(name), "{name} is held by no stage");
    }
}

#[test]
fn tp2_pp2_equals_whole_model_untied() {
    tp_pp_matches_whole(tiny_llama());
}

#[test]
fn tp2_pp2_equals_whole_model_tied() {
    tp_pp_matches_whole(tiny_qwen_window());
}

#[test]
fn tp2_pp2_sequence_parallel_equals_whole_model() {
    tp_pp_matches_whole(ModelConfig { sequence_parallel: true, ..tiny_qwen_window() });
}
