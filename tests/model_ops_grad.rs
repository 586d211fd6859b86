//! Finite-difference gradient checks (f64, CPU) of every differentiable op in `mbridge::ops`.

mod model_common;

use candle_core::{DType, Device, Tensor};
use mbridge::config::model::{Activation, AttnBackend};
use mbridge::ops::{self, AttentionShape, RopeScaling, RopeTable};
use model_common::{check_grads, project, rand_t, rand_var};

fn named(vars: &[(&str, &candle_core::Var)]) -> Vec<(String, candle_core::Var)> {
    vars.iter().map(|(n, v)| (n.to_string(), (*v).clone())).collect()
}

#[test]
fn rms_norm_grad() {
    for zc in [false, true] {
        let x = rand_var(&[2, 3, 8], 1, 1.0);
        let w = rand_var(&[8], 2, 1.0);
        let loss = || project(&ops::rms_norm(&x, &w, 1e-5, zc)?, 3);
        check_grads(&named(&[("x", &x), ("w", &w)]), &loss, 24);
    }
}

#[test]
fn layer_norm_grad() {
    for zc in [false, true] {
        let x = rand_var(&[2, 3, 8], 4, 1.0);
        let w = rand_var(&[8], 5, 1.0);
        let b = rand_var(&[8], 6, 1.0);
        let loss = || project(&ops::layer_norm(&x, &w, &b, 1e-5, zc)?, 7);
        check_grads(&named(&[("x", &x), ("w", &w), ("b", &b)]), &loss, 24);
    }
}

#[test]
fn rms_norm_matches_definition() {
    let x = rand_t(&[1, 4], 8, 1.0);
    let w = rand_t(&[4], 9, 1.0);
    let got = ops::rms_norm(&x, &w, 0.0, false).unwrap().flatten_all().unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let wv = w.to_vec1::<f64>().unwrap();
    let rms = (xv.iter().map(|v| v * v).sum::<f64>() / 4.0).sqrt();
    for (i, g) in got.to_vec1::<f64>().unwrap().iter().enumerate() {
        assert!((g - xv[i] / rms * wv[i]).abs() < 1e-12);
    }
}

#[test]
fn rope_grad_partial_and_llama3_scaled() {
    let table = RopeTable::new(8, 0.5, 500000.0, RopeScaling::Llama3(8.0), None).unwrap();
    assert_eq!(table.rot_dim, 4);
    let pos = Tensor::new(&[[0u32, 3, 7, 2000], [1, 2, 3, 4]], &Device::Cpu).unwrap();
    let (cos, sin) = table.cos_sin(&pos, DType::F64).unwrap();
    let x = rand_var(&[2, 3, 4, 8], 10, 1.0);
    let loss = || project(&ops::apply_rope(&x, &cos, &sin)?, 11);
    check_grads(&named(&[("x", &x)]), &loss, 48);
}

#[test]
fn rope_preserves_norm_and_passes_tail() {
    let table = RopeTable::new(8, 0.5, 10000.0, RopeScaling::None, None).unwrap();
    let pos = Tensor::new(&[[5u32]], &Device::Cpu).unwrap();
    let (cos, sin) = table.cos_sin(&pos, DType::F64).unwrap();
    let x = rand_t(&[1, 1, 1, 8], 12, 1.0);
    let y = ops::apply_rope(&x, &cos, &sin).unwrap();
    let (xv, yv) = (
        x.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
    );
    // Pairs (i, i+2) of the rotated half keep their norm; the last 4 channels pass through.
    for i in 0..2 {
        let a = xv[i].hypot(xv[i + 2]);
        let b = yv[i].hypot(yv[i + 2]);
        assert!((a - b).abs() < 1e-12);
    }
    assert_eq!(&xv[4..], &yv[4..]);
}

#[test]
fn llama3_scaling_branches() {
    use mbridge::ops::rope::llama3_scale;
    // High frequency (wavelen < 2048): unchanged; low frequency (> 8192): divided by factor.
    assert_eq!(llama3_scale(1.0, 8.0), 1.0);
    assert!((llama3_scale(1e-5, 8.0) - 1.25e-6).abs() < 1e-18);
    // In between: interpolated, strictly between inv/8 and inv. (HF value for theta 500000,
    // d 8, k 2 is 5.2485e-4.)
    let inv = 1.0 / 500000f64.powf(0.5);
    let s = llama3_scale(inv, 8.0);
    assert!((s - 5.2485e-4).abs() < 1e-8, "{s}");
}

#[test]
fn softmax_grad_and_sum() {
    let x = rand_var(&[3, 5], 13, 3.0);
    let loss = || project(&ops::softmax_last_dim(&x)?, 14);
    check_grads(&named(&[("x", &x)]), &loss, 15);
    let s = ops::softmax_last_dim(&x).unwrap().sum(1).unwrap().to_vec1::<f64>().unwrap();
    assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-12));
}

#[test]
fn attention_gqa_window_grad() {
    let (b, heads, groups, s, d) = (2, 4, 2, 5, 3);
    let q = rand_var(&[b, heads, s, d], 15, 1.0);
    let k = rand_var(&[b, groups, s, d], 16, 1.0);
    let v = rand_var(&[b, groups, s, d], 17, 1.0);
    let shape = AttentionShape {
        heads,
        groups,
        head_dim: d,
        softmax_scale: 0.7,
        backend: AttnBackend::Auto,
    };
    let mask = ops::build_attention_mask(0, s, s, Some(2), None, &Device::Cpu).unwrap();
    let loss = || project(&ops::attention(&q, &k, &v, &mask, shape, None)?, 18);
    check_grads(&named(&[("q", &q), ("k", &k), ("v", &v)]), &loss, 30);
}

/// GQA must equal plain multi-head attention with each K/V head repeated for its queries,
/// computed here naively per head with an explicit window.
#[test]
fn attention_matches_naive_reference() {
    let (heads, groups, s, d, left) = (4usize, 2usize, 6usize, 3usize, 2i64);
    let q = rand_t(&[1, heads, s, d], 19, 1.0);
    let k = rand_t(&[1, groups, s, d], 20, 1.0);
    let v = rand_t(&[1, groups, s, d], 21, 1.0);
    let shape = AttentionShape {
        heads,
        groups,
        head_dim: d,
        softmax_scale: 0.5,
        backend: AttnBackend::Auto,
    };
    let mask = ops::build_attention_mask(0, s, s, Some(left), None, &Device::Cpu).unwrap();
    let got = ops::attention(&q, &k, &v, &mask, shape, None).unwrap();
    let (qv, kv, vv) = (
        q.squeeze(0).unwrap().to_vec3::<f64>().unwrap(),
        k.squeeze(0).unwrap().to_vec3::<f64>().unwrap(),
        v.squeeze(0).unwrap().to_vec3::<f64>().unwrap(),
    );
    let out = got.squeeze(0).unwrap().to_vec3::<f64>().unwrap();
    for h in 0..heads {
        let g = h / (heads / groups);
        for i in 0..s {
            let js: Vec<usize> = (0..=i).filter(|&j| (i - j) as i64 <= left).collect();
            let sc: Vec<f64> = js
                .iter()
                .map(|&j| (0..d).map(|c| qv[h][i][c] * kv[g][j][c]).sum::<f64>() * 0.5)
                .collect();
            let m = sc.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                let want: f64 = js.iter().zip(&e).map(|(&j, w)| w / z * vv[g][j][c]).sum();
                assert!((out[h][i][c] - want).abs() < 1e-12, "h{h} i{i} c{c}");
            }
        }
    }
}

#[test]
fn activations_and_glu_grad() {
    for act in [Activation::Gelu, Activation::GeluTanh, Activation::Silu, Activation::SquaredRelu] {
        let x = rand_var(&[3, 8], 22, 2.0);
        let plain = || project(&ops::apply_activation(&x, act)?, 23);
        check_grads(&named(&[("x", &x)]), &plain, 24);
        let glu = || project(&ops::activation::gated(&x, act)?, 24);
        check_grads(&named(&[("x", &x)]), &glu, 24);
    }
    // swiglu = silu(gate) * up with gate first.
    let x = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
    let y = ops::swiglu(&x).unwrap().to_vec2::<f64>().unwrap();
    let silu = |z: f64| z / (1.0 + (-z).exp());
    assert!((y[0][0] - silu(1.0) * 3.0).abs() < 1e-12);
    assert!((y[0][1] - silu(2.0) * 4.0).abs() < 1e-12);
}

#[test]
fn linear_grad() {
    let x = rand_var(&[2, 3, 4], 25, 1.0);
    let w = rand_var(&[5, 4], 26, 1.0);
    let b = rand_var(&[5], 27, 1.0);
    let loss = || project(&ops::linear(&x, &w, Some(&b))?, 28);
    check_grads(&named(&[("x", &x), ("w", &w), ("b", &b)]), &loss, 20);
}

#[test]
fn cross_entropy_grad_and_value() {
    let logits = rand_var(&[2, 3, 7], 29, 4.0);
    let labels = Tensor::new(&[[1u32, 6, 0], [3, 3, 2]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1.0f64, 0.0, 1.0], [1.0, 1.0, 0.0]], &Device::Cpu).unwrap();
    let loss = || Ok(ops::masked_cross_entropy(&logits, &labels, &mask)?.0);
    check_grads(&named(&[("logits", &logits)]), &loss, 42);
    let (sum, count) = ops::masked_cross_entropy(&logits, &labels, &mask).unwrap();
    assert_eq!(count, 4.0);
    let lv = logits.as_tensor().to_vec3::<f64>().unwrap();
    let (lab, mv) = (labels.to_vec2::<u32>().unwrap(), mask.to_vec2::<f64>().unwrap());
    let mut want = 0.0;
    for bi in 0..2 {
        for si in 0..3 {
            let row = &lv[bi][si];
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            want += mv[bi][si] * (lse - row[lab[bi][si] as usize]);
        }
    }
    assert!((sum.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    // Large logits stay finite (stable log-softmax).
    let big = (logits.as_tensor() * 1e4).unwrap();
    let (s, _) = ops::masked_cross_entropy(&big, &labels, &mask).unwrap();
    assert!(s.to_scalar::<f64>().unwrap().is_finite());
}

#[test]
fn cross_entropy_rejects_label_out_of_range() {
    let logits = rand_t(&[1, 2, 4], 30, 1.0);
    let labels = Tensor::new(&[[1u32, 4]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 2), DType::F64, &Device::Cpu).unwrap();
    let err = ops::masked_cross_entropy(&logits, &labels, &mask).unwrap_err().to_string();
    assert!(err.contains("label id 4") && err.contains("size 4"), "{err}");
}

/// A per-batch mask `[2, 1, 4, 5]` with one fully masked row (→ uniform, as padding).
fn test_mask() -> Tensor {
    let mut m = vec![0u8; 2 * 4 * 5];
    for (i, v) in m.iter_mut().enumerate() {
        let (bb, r, c) = (i / 20, (i / 5) % 4, i % 5);
        *v = u8::from(c <= r + bb && !(bb == 1 && r == 2));
    }
    Tensor::from_vec(m, (2, 1, 4, 5), &Device::Cpu).unwrap()
}

#[test]
fn masked_softmax_fused_equals_composite_and_grads() {
    let x = rand_var(&[2, 3, 2, 4, 5], 31, 3.0);
    let mask = test_mask();
    let fused = ops::masked_softmax(&x, &mask, 0.7).unwrap();
    let comp = ops::masked_softmax_composite(&x, &mask, 0.7).unwrap();
    let d = (&fused - &comp).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f64>().unwrap() < 1e-14);
    // The fully masked row is uniform.
    let row = fused.get(1).unwrap().get(0).unwrap().get(0).unwrap().get(2).unwrap();
    assert!(row.to_vec1::<f64>().unwrap().iter().all(|v| (v - 0.2).abs() < 1e-15));
    let lf = || project(&ops::masked_softmax(&x, &mask, 0.7)?, 32);
    check_grads(&named(&[("x", &x)]), &lf, 40);
    let lc = || project(&ops::masked_softmax_composite(&x, &mask, 0.7)?, 32);
    check_grads(&named(&[("x", &x)]), &lc, 40);
    let gf = lf().unwrap().backward().unwrap().get(&x).unwrap().clone();
    let gc = lc().unwrap().backward().unwrap().get(&x).unwrap().clone();
    let d = (gf - gc).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f64>().unwrap() < 1e-13);
    // Mask with batch dim 1 broadcasts over the batch; f32 takes the fused path too.
    let m1 = test_mask().narrow(0, 0, 1).unwrap();
    let x32 = x.as_tensor().to_dtype(DType::F32).unwrap();
    let f = ops::masked_softmax(&x32, &m1, 0.7).unwrap();
    let c = ops::masked_softmax_composite(&x32, &m1, 0.7).unwrap();
    let d = (f - c).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
}

#[test]
fn token_cross_entropy_fused_equals_composite_and_grads() {
    let logits = rand_var(&[6, 9], 33, 5.0);
    let labels = Tensor::new(&[0u32, 8, 3, 3, 5, 1], &Device::Cpu).unwrap();
    let f = ops::token_cross_entropy(&logits, &labels).unwrap();
    let c = ops::token_cross_entropy_composite(&logits, &labels).unwrap();
    let d = (&f - &c).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f64>().unwrap() < 1e-13);
    let lf = || project(&ops::token_cross_entropy(&logits, &labels)?, 34);
    check_grads(&named(&[("logits", &logits)]), &lf, 54);
    let lc = || project(&ops::token_cross_entropy_composite(&logits, &labels)?, 34);
    check_grads(&named(&[("logits", &logits)]), &lc, 54);
}
