//! Packed SFT batches through the model: with the block-diagonal mask (or the THD offsets
//! that replace it) and per-row position ids from `collate_packed`, each packed row's logits
//! equal the logits of that row run alone (unpacked collate), so packed and unpacked training
//! see the same loss; the two packed representations give the same loss and gradients.

mod model_common;

use candle_core::{DType, Device, IndexOp, Tensor};
use mbridge::config::model::{ModelConfig, RecomputeGranularity, RecomputeMethod};
use mbridge::data::sft::{
    collate_packed, collate_unpacked, CollateParams, PackedBatch, PackedBin, PackedParams,
    PackingMetadata, SftExample,
};
use mbridge::model::recompute::RecomputeGrads;
use mbridge::model::{
    loss_for_microbatch, loss_for_microbatch_recompute, ForwardOpts, GptModel, Microbatch,
    ParallelLayout,
};
use model_common::{tiny_llama, tiny_qwen_window};

fn row(ids: &[i64], answer: usize) -> SftExample {
    SftExample {
        input_ids: ids.to_vec(),
        loss_mask: (0..ids.len()).map(|i| u8::from(i >= answer)).collect(),
        answer_start_idx: answer,
    }
}

fn tensor(v: &[i64], s: usize) -> Tensor {
    Tensor::from_vec(v.iter().map(|&x| x as u32).collect::<Vec<_>>(), (1, s), &Device::Cpu).unwrap()
}

fn check(cfg: &mbridge::config::model::ModelConfig) {
    let m = GptModel::new(cfg, ParallelLayout::single(), 3, DType::F64, &Device::Cpu).unwrap();
    let rows = [row(&[3, 9, 4, 11, 7, 1], 2), row(&[5, 6, 20, 1], 1), row(&[8, 2, 14, 1], 3)];
    // Pack the three rows into one bin (loss masks shifted as the packer stores them).
    let mut bin = PackedBin { input_ids: vec![], loss_mask: vec![], seq_start_id: vec![] };
    for r in &rows {
        bin.seq_start_id.push(bin.input_ids.len());
        bin.input_ids.extend(&r.input_ids);
        bin.loss_mask.extend(r.loss_mask[1..].iter().chain([&0]));
    }
    let collate = CollateParams {
        max_seq_length: 16,
        pad_to_max_length: true,
        pad_seq_length_to_mult: 1,
        eos_id: 1,
    };
    let p = PackedParams { collate, pad_seq_to_mult: 1, pad_cu_seqlens: false };
    let pb = collate_packed(&[(&bin, true)], &[], &p).unwrap();
    let s = pb.batch.seq_length;
    let pos = tensor(&pb.batch.position_ids, s);
    let mask = pb.attention_mask(&Device::Cpu).unwrap();
    let opts =
        ForwardOpts { position_ids: Some(&pos), attention_mask: Some(&mask), ..Default::default() };
    let packed = m.forward(&tensor(&pb.batch.tokens, s), &opts).unwrap();
    // The THD representation the trainer passes gives the very same logits.
    let cu = pb.thd_cu_seqlens().unwrap();
    let opts_thd =
        ForwardOpts { position_ids: Some(&pos), cu_seqlens: Some(&cu), ..Default::default() };
    let thd = m.forward(&tensor(&pb.batch.tokens, s), &opts_thd).unwrap();
    let d = (&thd - &packed).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(d < 1e-12, "cu_seqlens and dense-mask logits differ by {d}");
    let mut off = 0;
    for r in &rows {
        let ub =
            collate_unpacked(&[(r, true)], &CollateParams { pad_to_max_length: false, ..collate })
                .unwrap();
        let n = r.input_ids.len() - 1;
        let alone = m.forward(&tensor(&ub.tokens, ub.seq_length), &ForwardOpts::default()).unwrap();
        let a = alone.i((0, 0..n)).unwrap();
        let b = packed.i((0, off..off + n)).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(diff < 1e-10, "row at {off}: packed logits differ by {diff}");
        assert_eq!(&pb.batch.labels[off..off + n], &ub.labels[..n]);
        assert_eq!(&pb.batch.loss_mask[off..off + n], &ub.loss_mask[..n]);
        off += n;
    }
    // Without the mask the rows would see each other: the check above is not vacuous.
    let leaky = m
        .forward(
            &tensor(&pb.batch.tokens, s),
            &ForwardOpts { position_ids: Some(&pos), ..Default::default() },
        )
        .unwrap();
    let d = (leaky.i((0, 5..8)).unwrap() - packed.i((0, 5..8)).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d > 1e-6, "cross-row attention should change the logits");
}

#[test]
fn packed_logits_equal_unpacked() {
    check(&tiny_llama());
    check(&tiny_qwen_window());
}

/// Rows packed into `bin`s as the packer stores them (loss masks shifted left by one).
fn bin_of(rows: &[SftExample]) -> PackedBin {
    let mut bin = PackedBin { input_ids: vec![], loss_mask: vec![], seq_start_id: vec![] };
    for r in rows {
        bin.seq_start_id.push(bin.input_ids.len());
        bin.input_ids.extend(&r.input_ids);
        bin.loss_mask.extend(r.loss_mask[1..].iter().chain([&0]));
    }
    bin
}

/// A two-row packed micro-batch with `pad_cu_seqlens` (zero-length sequences at the end of
/// each row's boundaries) and a padding tail.
fn two_row_batch() -> PackedBatch {
    let a = [row(&[3, 9, 4, 11, 7, 1], 2), row(&[5, 6, 20, 1], 1)];
    let b = [row(&[8, 2, 14, 1], 3), row(&[12, 4, 6, 9, 1], 2), row(&[7, 7, 1], 1)];
    let (ba, bb) = (bin_of(&a), bin_of(&b));
    let collate = CollateParams {
        max_seq_length: 16,
        pad_to_max_length: true,
        pad_seq_length_to_mult: 1,
        eos_id: 1,
    };
    let meta = [PackingMetadata {
        dataset_max_seqlen: 5,
        max_samples_per_bin: 4,
        packing_factor: 2.5,
        packing_efficiency: 50.0,
        pack_size: 16,
        min_packed_seqlen: 8,
    }];
    let p = PackedParams { collate, pad_seq_to_mult: 1, pad_cu_seqlens: true };
    let pb = collate_packed(&[(&ba, true), (&bb, true)], &meta, &p).unwrap();
    // Both representations must see padding entries, or this test would not exercise them.
    assert!(pb.cu_seqlens.iter().all(|cu| cu.ends_with(&[16, 16])), "{:?}", pb.cu_seqlens);
    pb
}

fn microbatch(pb: &PackedBatch, thd: bool, dtype: DType) -> Microbatch {
    let (b, s) = (pb.batch.batch_size, pb.batch.seq_length);
    let ids = |v: &[i64]| {
        let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
        Tensor::from_vec(v, (b, s), &Device::Cpu).unwrap()
    };
    let loss_mask = Tensor::from_vec(pb.batch.loss_mask.clone(), (b, s), &Device::Cpu).unwrap();
    Microbatch {
        tokens: ids(&pb.batch.tokens),
        labels: ids(&pb.batch.labels),
        loss_mask: loss_mask.to_dtype(dtype).unwrap(),
        position_ids: Some(ids(&pb.batch.position_ids)),
        attention_mask: (!thd).then(|| pb.attention_mask(&Device::Cpu).unwrap()),
        cu_seqlens: thd.then(|| pb.thd_cu_seqlens().unwrap()),
        host_stats: None,
    }
}

/// (loss, every parameter's gradient) of one micro-batch, plain or with full recompute.
fn loss_and_grads(m: &GptModel, mb: &Microbatch, recompute: bool) -> (f32, Vec<Tensor>) {
    let sink = RecomputeGrads::default();
    let (sum, count) = if recompute {
        loss_for_microbatch_recompute(m, mb, None, &sink).unwrap()
    } else {
        loss_for_microbatch(m, mb, None).unwrap()
    };
    let loss = (sum / count).unwrap();
    let store = loss.backward().unwrap();
    let side = sink.take();
    let grads = m
        .params()
        .params()
        .iter()
        .map(|p| {
            let mut g = store.get(p.var.as_tensor()).cloned();
            if let Some(x) = side.get(p.var.as_tensor()) {
                g = Some(match g {
                    Some(g) => (g + x).unwrap(),
                    None => x.clone(),
                });
            }
            g.unwrap_or_else(|| panic!("{}: no gradient", p.name))
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), grads)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// The trainer now passes packed batches as THD offsets (`Microbatch::cu_seqlens`) instead of
/// the dense block-diagonal mask: on CPU in f32 both give the same loss and gradients, for
/// two rows (flattened into one offset list), zero-length `pad_cu_seqlens` entries, a padding
/// tail, a sliding window, and through activation recompute.
#[test]
fn cu_seqlens_and_dense_mask_give_the_same_loss_and_gradients() {
    let pb = two_row_batch();
    let mut recompute = tiny_llama();
    recompute.recompute_granularity = Some(RecomputeGranularity::Full);
    recompute.recompute_method = Some(RecomputeMethod::Uniform);
    recompute.recompute_num_layers = Some(1);
    let cases: [(&str, ModelConfig, bool); 3] = [
        ("llama", tiny_llama(), false),
        ("qwen window", tiny_qwen_window(), false),
        ("recompute", recompute, true),
    ];
    for (name, cfg, rc) in cases {
        let m = GptModel::new(&cfg, ParallelLayout::single(), 5, DType::F32, &Device::Cpu).unwrap();
        let (ld, gd) = loss_and_grads(&m, &microbatch(&pb, false, DType::F32), rc);
        let (lt, gt) = loss_and_grads(&m, &microbatch(&pb, true, DType::F32), rc);
        assert!(ld.is_finite(), "{name}: loss {ld}");
        assert!((ld - lt).abs() <= 1e-6, "{name}: loss dense {ld} vs cu_seqlens {lt}");
        for ((a, b), p) in gd.iter().zip(&gt).zip(m.params().params()) {
            let d = max_diff(a, b);
            assert!(d <= 1e-6, "{name}: {} gradient differs by {d}", p.name);
        }
        // Without any mask the rows' examples would see each other: the loss changes, so
        // the comparison above is not vacuous.
        let mut leaky = microbatch(&pb, true, DType::F32);
        leaky.cu_seqlens = None;
        let (ll, _) = loss_and_grads(&m, &leaky, rc);
        assert!((ll - ld).abs() > 1e-4, "{name}: cross-example attention should change the loss");
    }
}

/// Offsets that do not fit the micro-batch, or come together with a dense mask, are refused
/// with a message naming the problem.
#[test]
fn bad_cu_seqlens_are_named() {
    let m = GptModel::new(&tiny_llama(), ParallelLayout::single(), 5, DType::F32, &Device::Cpu)
        .unwrap();
    let pb = two_row_batch();
    let mut mb = microbatch(&pb, true, DType::F32);
    let err = |mb: &Microbatch| format!("{:#}", loss_for_microbatch(&m, mb, None).unwrap_err());
    mb.cu_seqlens = Some(vec![0, 5, 20, 32]);
    let e = err(&mb);
    assert!(e.contains("row 1 starts at token 16"), "{e}");
    mb.cu_seqlens = Some(vec![0, 5, 16, 30]);
    let e = err(&mb);
    assert!(e.contains("end at token 30") && e.contains("32 tokens"), "{e}");
    mb.cu_seqlens = Some(vec![0, 16, 8, 32]);
    assert!(err(&mb).contains("must not decrease"));
    mb.cu_seqlens = Some(pb.thd_cu_seqlens().unwrap());
    mb.attention_mask = Some(pb.attention_mask(&Device::Cpu).unwrap());
    assert!(err(&mb).contains("either attention_mask or cu_seqlens"));
}
