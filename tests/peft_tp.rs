//! LoRA, DoRA and canonical LoRA under tensor parallelism (threads): with A/B split as Megatron Bridge's
//! `ParallelLinearAdapter` (and DoRA's row norms summed over TP where a row is split), a TP=2
//! model gives the TP=1 loss and each rank's adapter gradients are its shard of the TP=1
//! gradients.

mod model_common;
mod parallel_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::peft::{PeftConfig, PeftScheme};
use mbridge::model::params::{shard_of, TpCoord};
use mbridge::model::{loss_for_microbatch, GptModel, Microbatch, ParallelLayout};
use mbridge::parallel::comm::Communicator;
use model_common::{rand_t, tiny_llama};
use parallel_common::run_ranks;
use std::sync::Arc;
use std::time::Duration;

const SEED: u64 = 5;

fn lora(dropout: f64, pos: &str) -> PeftConfig {
    PeftConfig {
        dim: 4,
        alpha: 8.0,
        dropout,
        dropout_position: pos.into(),
        ..PeftConfig::for_scheme(PeftScheme::Lora)
    }
}

fn batch() -> Microbatch {
    let rows = vec![vec![1i64, 5, 9, 3, 7, 2], vec![4, 4, 8, 1, 0, 6]];
    let labels = vec![vec![5i64, 9, 3, 7, 2, 1], vec![4, 8, 1, 0, 6, 3]];
    Microbatch::from_rows(&rows, &labels, &[vec![1.0; 6], vec![1.0; 6]], None, &Device::Cpu)
        .unwrap()
}

/// Sets every B to the same random full value on every rank (A keeps its seeded init).
fn randomize_b(m: &GptModel) {
    for (i, p) in m.params().params().iter().enumerate() {
        if p.name.contains(".adapter.") && p.name.ends_with("linear_out.weight") {
            m.params().set_full(&p.name, &rand_t(&p.global_shape, 50 + i as u64, 0.3)).unwrap();
        }
    }
}

/// (loss, [(name, grad of this rank's shard)]) of the adapters.
fn run(m: &GptModel) -> anyhow::Result<(f64, Vec<(String, Tensor)>)> {
    // DoRA magnitudes from the base weights (no-op for LoRA), then B away from zero.
    m.init_dora_magnitudes()?;
    randomize_b(m);
    // Adapter dropout draws the global masks on every rank, so TP=2 drops what TP=1 drops.
    let rng = mbridge::ops::DropoutRng::new(9, 1, 0);
    let (s, c) = loss_for_microbatch(m, &batch(), Some(&rng))?;
    let loss = (s / c)?;
    let grads = loss.backward()?;
    let g = m
        .params()
        .trainable_named_vars()
        .into_iter()
        .map(|(n, v)| (n, grads.get(v.as_tensor()).expect("adapter gradient").clone()))
        .collect();
    Ok((loss.to_scalar::<f64>()?, g))
}

#[test]
fn tp2_lora_matches_tp1() {
    for (p, pos) in [(0.0, "pre"), (0.3, "pre"), (0.3, "post")] {
        tp2_matches_tp1(lora(p, pos));
    }
}

/// Canonical LoRA: each part's B split contiguously, the parts assembled per rank.
#[test]
fn tp2_canonical_lora_matches_tp1() {
    for (p, pos) in [(0.0, "pre"), (0.3, "post")] {
        tp2_matches_tp1(PeftConfig {
            dim: 4,
            alpha: 8.0,
            dropout: p,
            dropout_position: pos.into(),
            ..PeftConfig::for_scheme(PeftScheme::CanonicalLora)
        });
    }
}

#[test]
fn tp2_dora_matches_tp1() {
    tp2_matches_tp1(PeftConfig { dim: 4, alpha: 8.0, ..PeftConfig::for_scheme(PeftScheme::Dora) });
}

fn tp2_matches_tp1(peft: PeftConfig) {
    let what = format!("{:?} dropout {} {}", peft.peft_scheme, peft.dropout, peft.dropout_position);
    let cfg = tiny_llama();
    let one = GptModel::new_peft(
        &cfg,
        ParallelLayout::single(),
        None,
        Some(&peft),
        SEED,
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let (base_loss, base_grads) = run(&one).unwrap();
    let infos: Vec<_> = one
        .params()
        .params()
        .iter()
        .filter(|p| p.trainable)
        .map(|p| (p.partition_dim, p.layout))
        .collect();
    let (cfg2, peft2) = (cfg.clone(), peft.clone());
    let runs = run_ranks(2, Duration::from_secs(300), move |rank, world| {
        let comm: Arc<dyn Communicator> = Arc::new(world.group(rank, "tp", &[0, 1])?);
        let layout = ParallelLayout { tp_rank: rank, tp_size: 2, pp_rank: 0, pp_size: 1 };
        let m = GptModel::new_peft(
            &cfg2,
            layout,
            Some(comm),
            Some(&peft2),
            SEED,
            DType::F64,
            &Device::Cpu,
        )?;
        run(&m)
    });
    for (rank, (loss, grads)) in runs.iter().enumerate() {
        assert!((loss - base_loss).abs() < 1e-12, "{what} rank {rank}: loss {loss} vs {base_loss}");
        assert_eq!(grads.len(), base_grads.len());
        for (((name, g), (_, full)), (dim, layout)) in grads.iter().zip(&base_grads).zip(&infos) {
            let want = shard_of(full, *dim, *layout, TpCoord { rank, size: 2 }).unwrap();
            let d =
                (g - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(scale > 0.0, "{name}: zero gradient");
            assert!(
                d <= 1e-10 * scale.max(1.0),
                "{what} rank {rank} {name}: gradient off by {d:e}"
            );
        }
    }
}
