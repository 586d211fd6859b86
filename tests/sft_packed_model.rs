//! Packed SFT batches through the model: with the block-diagonal mask and per-row position ids
//! from `collate_packed`, each packed row's logits equal the logits of that row run alone
//! (unpacked collate), so packed and unpacked training see the same loss.

mod model_common;

use candle_core::{DType, Device, IndexOp, Tensor};
use mbridge::data::sft::{
    collate_packed, collate_unpacked, CollateParams, PackedBin, PackedParams, SftExample,
};
use mbridge::model::{ForwardOpts, GptModel, ParallelLayout};
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
