//! Checks of the fused kernels (`ops::cuda`): the GPU in bf16 with the fused path forced on,
//! against the composite ops in f32 on the CPU from the same (bf16-representable) inputs and
//! the same upstream gradient.

use super::{compare, Check, CheckFn, Measure};
use crate::ops;
use crate::ops::fused::set_override;
use crate::train::optimizer::{
    default_wd_mult, AdamConfig, Algorithm, MasterStorage, Optimizer, StateStorage,
};
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Forward outputs: bf16 rounding of the result (2^-8) plus accumulated f32 noise.
const FWD_TOL: f64 = 1e-2;
/// Gradients pass through one more bf16 rounding (the upstream gradient) and reductions.
const BWD_TOL: f64 = 2e-2;

pub(super) fn checks() -> Vec<Check> {
    vec![
        Check { name: "rms_norm", run: CheckFn::Measures(rms_norm) },
        Check { name: "rms_norm_residual", run: CheckFn::Measures(rms_norm_residual) },
        Check { name: "add", run: CheckFn::Measures(add) },
        Check { name: "linear_plus", run: CheckFn::Measures(linear_plus) },
        Check { name: "fp8_linear", run: CheckFn::Measures(fp8_linear) },
        Check { name: "wgrad_into", run: CheckFn::Measures(wgrad_into) },
        Check { name: "rope", run: CheckFn::Measures(rope) },
        Check { name: "rope_qkv_dense_q", run: CheckFn::Measures(rope_qkv_dense_q) },
        Check { name: "swiglu", run: CheckFn::Measures(swiglu) },
        Check { name: "cross_entropy", run: CheckFn::Measures(cross_entropy) },
        Check { name: "vocab_parallel_ce", run: CheckFn::Measures(vocab_parallel_ce) },
        Check { name: "adamw", run: CheckFn::Measures(adamw) },
        Check { name: "adamw_fp8_stored", run: CheckFn::Measures(adamw_fp8_stored) },
        Check { name: "grad_norm", run: CheckFn::Measures(grad_norm) },
    ]
}

/// Normal(0, scale²) samples rounded to bf16, as a CPU f32 tensor.
fn randn(seed: u64, dims: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(&mut rng);
            offset + scale * z
        })
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

/// An input of the op under test.
enum In {
    /// Float tensor (CPU f32, bf16-representable): bf16 on the GPU; `true` = differentiate.
    Float(Tensor, bool),
    /// Moved to the GPU as it is (e.g. u32 labels).
    Fixed(Tensor),
}

/// Runs `f` on the GPU (bf16, fused on) and on the CPU (f32, composite), backpropagates
/// `Σ out·dy` with the same `dy` through both, and compares the outputs and the gradients
/// of the differentiable inputs.
fn fwd_bwd(
    dev: &Device,
    seed: u64,
    label: &str,
    inputs: &[In],
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<Vec<Measure>> {
    let prepare = |gpu: bool| -> Result<(Vec<Tensor>, Vec<Option<Var>>)> {
        let mut ts = Vec::new();
        let mut vars = Vec::new();
        for i in inputs {
            match i {
                In::Float(t, diff) => {
                    let t = if gpu { t.to_dtype(DType::BF16)?.to_device(dev)? } else { t.clone() };
                    if *diff {
                        let v = Var::from_tensor(&t)?;
                        ts.push(v.as_tensor().clone());
                        vars.push(Some(v));
                    } else {
                        ts.push(t);
                        vars.push(None);
                    }
                }
                In::Fixed(t) => {
                    ts.push(if gpu { t.to_device(dev)? } else { t.clone() });
                    vars.push(None);
                }
            }
        }
        Ok((ts, vars))
    };
    let run = |gpu: bool| -> Result<(Tensor, GradStore, Vec<Option<Var>>)> {
        let (ts, vars) = prepare(gpu)?;
        set_override(Some(true));
        let out = f(&ts);
        set_override(None);
        let out = out?;
        let dy = randn(seed ^ 0xD1, out.dims(), 1.0, 0.0)?.to_device(out.device())?;
        let loss = out.to_dtype(DType::F32)?.mul(&dy)?.sum_all()?;
        Ok((out, loss.backward()?, vars))
    };
    let (got, ggrads, gvars) = run(true)?;
    let (want, wgrads, wvars) = run(false)?;
    let mut ms = vec![compare(&format!("{label} forward"), &got, &want, FWD_TOL)?];
    for (i, (gv, wv)) in gvars.iter().zip(&wvars).enumerate() {
        let (Some(gv), Some(wv)) = (gv, wv) else { continue };
        let what = format!("{label} backward d(input {i})");
        match (ggrads.get(gv.as_tensor()), wgrads.get(wv.as_tensor())) {
            (Some(g), Some(w)) => ms.push(compare(&what, g, w, BWD_TOL)?),
            (None, _) => ms.push(Measure::failed(format!("{what}: no gradient on the GPU"))),
            (_, None) => ms.push(Measure::failed(format!("{what}: no reference gradient"))),
        }
    }
    Ok(ms)
}

fn rms_norm(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let mut ms = Vec::new();
    // Hidden-size rows (the layer norms) and head-size rows (QK-norm), both gamma styles;
    // rows of 2, 3 and 4 vectors per thread (`_v2`, `_v4`) and a width that is not a whole
    // number of vectors (the scalar kernels).
    let shapes = [
        (512, 2048, false),
        (300, 2048, true),
        (1024, 128, false),
        (40, 16384, false),
        (24, 20000, true),
        (96, 2050, false),
    ];
    for (rows, h, zc) in shapes {
        let x = randn(seed, &[rows, h], 1.5, 0.2)?;
        let w =
            if zc { randn(seed + 1, &[h], 0.1, 0.0)? } else { randn(seed + 1, &[h], 0.1, 1.0)? };
        let label = format!("[{rows},{h}]{}", if zc { " zero-centered" } else { "" });
        ms.extend(fwd_bwd(dev, seed, &label, &[In::Float(x, true), In::Float(w, true)], &|t| {
            Ok(ops::rms_norm(&t[0], &t[1], 1e-5, zc)?)
        })?);
    }
    Ok(ms)
}

/// The norm backward with the skip connection's gradient added in the same pass (the
/// written-out layers' `dx + residual`), against the CPU's vjp plus add.
fn rms_norm_residual(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let mut ms = Vec::new();
    for (rows, h, zc) in [(256, 2048, false), (64, 2050, true)] {
        let x = randn(seed, &[rows, h], 1.5, 0.2)?;
        let w = randn(seed + 1, &[h], 0.1, 1.0)?;
        let dy = randn(seed + 2, &[rows, h], 1.0, 0.0)?;
        let res = randn(seed + 3, &[rows, h], 1.0, 0.0)?;
        let run = |d: &Device, dtype: DType| -> Result<(Tensor, Tensor)> {
            let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(d)?) };
            set_override(Some(d.is_cuda()));
            let r = ops::manual::rms_norm_backward(
                &on(&x)?,
                &on(&w)?,
                &on(&dy)?,
                Some(&on(&res)?),
                1e-5,
                zc,
            );
            set_override(None);
            Ok(r?)
        };
        let (gdx, gdw) = run(dev, DType::BF16)?;
        let (wdx, wdw) = run(&Device::Cpu, DType::F32)?;
        let label = format!("[{rows},{h}]{}", if zc { " zero-centered" } else { "" });
        ms.push(compare(&format!("{label} dx + residual"), &gdx, &wdx, BWD_TOL)?);
        ms.push(compare(&format!("{label} dw"), &gdw, &wdw, BWD_TOL)?);
    }
    Ok(ms)
}

/// The vectorized residual add: aligned buffers, a length that is not a whole number of
/// vectors (the scalar tail), and an operand that starts mid-vector (the scalar loop).
fn add(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let mut ms = Vec::new();
    for (label, n, offset) in [("aligned", 4096 * 8, 0), ("tail", 1001, 0), ("offset", 999, 3)] {
        let a = randn(seed, &[n + offset], 1.0, 0.0)?;
        let b = randn(seed + 1, &[n], 1.0, 0.0)?;
        let gpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?.to_device(dev)?) };
        let ga = gpu(&a)?.narrow(0, offset, n)?;
        set_override(Some(true));
        let got = ops::manual::add(&ga, &gpu(&b)?);
        set_override(None);
        let want = (a.narrow(0, offset, n)? + &b)?;
        ms.push(compare(&format!("add {label} [{n}]"), &got?, &want, FWD_TOL)?);
    }
    Ok(ms)
}

/// `x·wᵀ + r` in one cuBLASLt GEMM (the residual in its epilogue) against the CPU's f32
/// product plus `r`; shapes a layer's `linear_proj` / `linear_fc2` have, and odd ones.
fn linear_plus(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let mut ms = Vec::new();
    for (rows, inp, out) in [(256, 512, 128), (200, 96, 40), (8192, 2048, 2048)] {
        let x = randn(seed, &[rows, inp], 1.0, 0.0)?;
        let w = randn(seed + 1, &[out, inp], 0.05, 0.0)?;
        let r = randn(seed + 2, &[rows, out], 1.0, 0.0)?;
        let gpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?.to_device(dev)?) };
        set_override(Some(true));
        let got = ops::manual::linear_plus(&gpu(&x)?, &gpu(&w)?, &gpu(&r)?);
        set_override(None);
        let Some(got) = got? else {
            ms.push(Measure::failed(format!("linear_plus [{rows},{inp}]x[{out}]: not fused")));
            continue;
        };
        let want = (x.matmul(&w.t()?)? + &r)?;
        ms.push(compare(&format!("linear_plus [{rows},{inp}]x[{out}]"), &got, &want, FWD_TOL)?);
    }
    Ok(ms)
}

fn rope(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let mut ms = Vec::new();
    // Full and partial rotary; q laid out [b, s, heads, d] and viewed as [b, heads, s, d]
    // (strided, as it comes out of the fused QKV).
    for (percent, b, s, heads, d) in [(1.0, 2, 64, 4, 64), (0.5, 1, 48, 3, 128)] {
        let table =
            ops::RopeTable::new(d, percent, 500_000.0, ops::RopeScaling::Llama3(32.0), None)?;
        let pos = Tensor::arange(0u32, s as u32, &Device::Cpu)?.unsqueeze(0)?.repeat((b, 1))?;
        let (cos, sin) = table.cos_sin(&pos, DType::F32)?;
        let round =
            |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?) };
        let x = randn(seed + 2, &[b, s, heads, d], 1.0, 0.0)?;
        let label = format!("[{b},{heads},{s},{d}] rot {percent}");
        let inputs =
            [In::Float(x, true), In::Float(round(cos)?, false), In::Float(round(sin)?, false)];
        ms.extend(fwd_bwd(dev, seed, &label, &inputs, &|t| {
            Ok(ops::apply_rope(&t[0].transpose(1, 2)?, &t[1], &t[2])?)
        })?);
    }
    Ok(ms)
}

/// RoPE inside the fused QKV with the queries through a dense buffer against the in-place
/// kernel: the same rotated q and k forward, the same dQKV backward (exactly: one kernel
/// body, other addresses).
fn rope_qkv_dense_q(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    use crate::ops::cuda::rope_qkv::{self as rq, QkvLayout};
    let (b, s, groups, hpg, d) = (2, 40, 2, 3, 64);
    let l = QkvLayout { groups, hpg, head_dim: d };
    let rows = groups * (hpg + 2) * d;
    let table = ops::RopeTable::new(d, 1.0, 500_000.0, ops::RopeScaling::None, None)?;
    let pos = Tensor::arange(0u32, s as u32, &Device::Cpu)?.unsqueeze(0)?.repeat((b, 1))?;
    let (cos, sin) = table.cos_sin(&pos, DType::F32)?;
    let gpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?.to_device(dev)?) };
    let (cos, sin) = (gpu(&cos)?, gpu(&sin)?);
    let qkv = gpu(&randn(seed, &[b, s, rows], 1.0, 0.0)?)?;
    // [b, s, groups, hpg + 2, d] → the query heads as [b, s, heads, d].
    let queries = |t: &Tensor| -> Result<Tensor> {
        Ok(t.reshape((b, s, groups, hpg + 2, d))?.narrow(3, 0, hpg)?.reshape((
            b,
            s,
            groups * hpg,
            d,
        ))?)
    };
    let keys = |t: &Tensor| -> Result<Tensor> {
        Ok(t.reshape((b, s, groups, hpg + 2, d))?.narrow(3, hpg, 2)?.contiguous()?)
    };
    let exact = |what: &str, got: &Tensor, want: &Tensor| compare(what, got, want, 0.0);
    let in_place = qkv.copy()?;
    rq::rope_qkv_inplace(&in_place, &cos, &sin, l)?;
    let fused = qkv.copy()?;
    let dense = rq::rope_qkv_dense_q(&fused, &cos, &sin, l)?;
    let mut ms = vec![
        exact("fwd q (dense vs in place)", &dense, &queries(&in_place)?.contiguous()?)?,
        exact("fwd k, v", &keys(&fused)?, &keys(&in_place)?)?,
    ];
    // Backward: dq apart versus dq in the fused buffer's query slots.
    let dqkv = gpu(&randn(seed + 1, &[b, s, rows], 1.0, 0.0)?)?;
    let dq = queries(&dqkv)?.contiguous()?;
    let want = dqkv.copy()?;
    rq::rope_qkv_backward(&want, None, &cos, &sin, l)?;
    let got = dqkv.copy()?;
    // The query slots must come from `dq` alone.
    let scrambled = queries(&got)?.affine(0.0, 7.0)?;
    let got = Tensor::cat(
        &[
            scrambled.reshape((b, s, groups, hpg, d))?,
            got.reshape((b, s, groups, hpg + 2, d))?.narrow(3, hpg, 2)?,
        ],
        3,
    )?
    .reshape((b, s, rows))?;
    rq::rope_qkv_backward(&got, Some(&dq), &cos, &sin, l)?;
    ms.push(exact("bwd dQKV", &got, &want)?);
    Ok(ms)
}

fn swiglu(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    // F = 1000 takes the kernels' 16-byte vector path, F = 77 the per-element one.
    let mut ms = Vec::new();
    for (dims, label) in [([4, 96, 2 * 1000], "[4,96,2x1000]"), ([3, 5, 2 * 77], "[3,5,2x77]")] {
        let x = randn(seed + 3, &dims, 2.0, 0.0)?;
        ms.extend(fwd_bwd(dev, seed, label, &[In::Float(x, true)], &|t| Ok(ops::swiglu(&t[0])?))?);
        ms.extend(swiglu_amax(dev, seed, label, &dims)?);
    }
    Ok(ms)
}

/// The fused SwiGLU's amax outputs (FP8 current scaling of `linear_fc2`'s input and
/// `linear_fc1`'s output gradient) are exactly the largest magnitudes of what the kernels
/// write, and the values themselves are those of the plain kernels.
fn swiglu_amax(dev: &Device, seed: u64, label: &str, dims: &[usize]) -> Result<Vec<Measure>> {
    use crate::ops::cuda::swiglu::{backward_amax, forward_amax, SwiGlu};
    use candle_core::CustomOp1;
    let cuda = dev.as_cuda_device()?;
    let x = randn(seed + 4, dims, 2.0, 0.0)?.to_dtype(DType::BF16)?.to_device(dev)?;
    let mut half = dims.to_vec();
    *half.last_mut().context("swiglu dims")? /= 2;
    let dy = randn(seed + 5, &half, 1.0, 0.0)?.to_dtype(DType::BF16)?.to_device(dev)?;
    let read = |a: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>| -> Result<Tensor> {
        let v = cuda.cuda_stream().clone_dtoh(a)?;
        Ok(Tensor::new(v[0], &Device::Cpu)?)
    };
    let largest = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_device(&Device::Cpu)?)
    };
    let (y, fwd_amax) = forward_amax(&x)?;
    let (dx, bwd_amax) = backward_amax(&x, &dy)?;
    let plain_dx = SwiGlu.bwd(&x, &x, &dy)?.context("fused-swiglu gave no gradient")?;
    let exact = |what: &str, got: &Tensor, want: &Tensor| {
        compare(&format!("{label} {what}"), got, want, 0.0)
    };
    Ok(vec![
        exact("fwd with amax: values", &y, &x.apply_op1(SwiGlu)?)?,
        exact("fwd amax", &read(&fwd_amax)?, &largest(&y)?)?,
        exact("bwd with amax: values", &dx, &plain_dx)?,
        exact("bwd amax", &read(&bwd_amax)?, &largest(&dx)?)?,
    ])
}

fn cross_entropy(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    // Logits of realistic spread over a vocabulary that is a multiple of the kernels' vector
    // width (16-byte loads) and one that is not, nor of the block size (element loads).
    let mut ms = Vec::new();
    for (k, (b, s, v)) in [(2, 96, 32_000), (2, 96, 32_003)].into_iter().enumerate() {
        let seed = seed + 10 * k as u64;
        let logits = randn(seed + 4, &[b, s, v], 3.0, 0.0)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 5);
        let labels: Vec<u32> =
            (0..b * s).map(|_| rand::Rng::random_range(&mut rng, 0..v as u32)).collect();
        let mask: Vec<f32> = (0..b * s).map(|i| if i % 7 == 3 { 0.0 } else { 1.0 }).collect();
        let labels = Tensor::from_vec(labels, (b, s), &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, (b, s), &Device::Cpu)?;
        let inputs = [In::Float(logits, true), In::Fixed(labels), In::Float(mask, false)];
        ms.extend(fwd_bwd(dev, seed, &format!("[{b},{s},{v}] masked"), &inputs, &|t| {
            Ok(ops::masked_cross_entropy(&t[0], &t[1], &t[2])?.0)
        })?);
    }
    Ok(ms)
}

/// The written-out head's vocab-parallel cross-entropy over two in-process TP ranks on this
/// GPU (bf16 shards through the fused kernels; the shards' statistics cross through host
/// memory) against the whole-vocabulary f32 composite on the CPU: the per-token losses, and
/// each rank's logits gradient against its columns of the reference gradient. Shard widths
/// of 16000 (16-byte vectors) and 16003 (element loads).
fn vocab_parallel_ce(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    use crate::parallel::comm::LocalWorld;
    use crate::parallel::tensor::TensorParallel;
    let mut ms = Vec::new();
    for (k, (n, v)) in [(192usize, 32_000usize), (192, 32_006)].into_iter().enumerate() {
        let seed = seed + 10 * k as u64;
        let logits = randn(seed + 4, &[n, v], 3.0, 0.0)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 5);
        let labels: Vec<u32> =
            (0..n).map(|_| rand::Rng::random_range(&mut rng, 0..v as u32)).collect();
        let labels = Tensor::from_vec(labels, n, &Device::Cpu)?;
        let g = randn(seed + 6, &[n], 1.0, 0.0)?;
        let x = Var::from_tensor(&logits)?;
        let want = ops::token_cross_entropy(x.as_tensor(), &labels)?;
        let dwant = want.mul(&g)?.sum_all()?.backward()?.get(x.as_tensor()).cloned();
        let dwant = dwant.ok_or_else(|| anyhow::anyhow!("no reference logits gradient"))?;
        let vs = v / 2;
        set_override(Some(true));
        let got = LocalWorld::run(2, std::time::Duration::from_secs(120), |rank, world| {
            let tp = TensorParallel::new(std::sync::Arc::new(world.world_group(rank)?));
            let shard = logits.narrow(1, rank * vs, vs)?.to_dtype(DType::BF16)?.to_device(dev)?;
            let (ce, state) = tp.cross_entropy_untracked(&shard, &labels.to_device(dev)?, None)?;
            let d = tp.cross_entropy_backward_untracked(shard, &state, &g.to_device(dev)?)?;
            Ok((ce.to_device(&Device::Cpu)?, d.to_device(&Device::Cpu)?))
        });
        set_override(None);
        let got = got?;
        let label = format!("[{n}, 2x{vs}]");
        ms.push(compare(&format!("{label} per-token loss"), &got[0].0, &want, FWD_TOL)?);
        for (rank, (_, d)) in got.iter().enumerate() {
            let want = dwant.narrow(1, rank * vs, vs)?;
            ms.push(compare(&format!("{label} rank {rank} logits gradient"), d, &want, BWD_TOL)?);
        }
    }
    Ok(ms)
}

/// Three Adam steps of bf16 parameters (fp32 master) on the GPU (fused kernel) and on the
/// CPU (composite ops): AdamW and Adam+L2, a no-decay parameter and one without gradient,
/// two of the steps with a clipping coefficient; f32 gradients, and bf16 ones (bf16 main
/// grads, `ddp.grad_reduce_in_fp32 = false`) read by the kernel as they are; masters as f32
/// copies and as remainders (`optimizer.store_param_remainders`); moments in f32 and in bf16
/// (`optimizer.exp_avg_dtype`, `exp_avg_sq_dtype`).
fn adamw(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let mut ms = Vec::new();
    let (copy, rem) = (MasterStorage::Copy.into(), MasterStorage::Remainders.into());
    let m16 = |masters| StateStorage { masters, exp_avg: DType::BF16, exp_avg_sq: DType::BF16 };
    let (copy16, rem16) = (m16(MasterStorage::Copy), m16(MasterStorage::Remainders));
    for (decoupled, grad_dtype, storage) in [
        (true, DType::F32, copy),
        (false, DType::F32, copy),
        (true, DType::BF16, copy),
        (true, DType::F32, rem),
        (false, DType::BF16, rem),
        (true, DType::F32, copy16),
        (true, DType::BF16, rem16),
    ] {
        let cfg = AdamConfig { decoupled_weight_decay: decoupled, ..AdamConfig::default() };
        let shapes: [&[usize]; 3] = [&[64, 37], &[37], &[5, 3]];
        let names = ["w.weight", "norm.weight", "unused.weight"];
        let build = |d: &Device| -> Result<(Optimizer, Vec<Var>)> {
            let mut params = Vec::new();
            for (k, (n, sh)) in names.iter().zip(shapes).enumerate() {
                let t = randn(seed + 10 + k as u64, sh, 0.5, 0.0)?
                    .to_dtype(DType::BF16)?
                    .to_device(d)?;
                let wd = default_wd_mult(n, sh.len());
                params.push((n.to_string(), Var::from_tensor(&t)?, wd));
            }
            let vars = params.iter().map(|(_, v, _)| v.clone()).collect();
            Ok((Optimizer::with_storage(Algorithm::Adam(cfg), params, storage)?, vars))
        };
        let (mut gpu, gvars) = build(dev)?;
        let (mut cpu, cvars) = build(&Device::Cpu)?;
        for step in 0..3u64 {
            let mut gg = GradStore::default();
            let mut cg = GradStore::default();
            for (k, sh) in shapes.iter().enumerate().take(2) {
                let g = randn(seed + 100 * (step + 1) + k as u64, sh, 0.01, 0.0)?
                    .to_dtype(grad_dtype)?;
                gg.insert(gvars[k].as_tensor(), g.to_device(dev)?);
                cg.insert(cvars[k].as_tensor(), g);
            }
            // Steps 2 and 3 clip (the coefficient is applied inside the kernel).
            let clip = [None, Some(0.37), Some(0.5)][step as usize];
            set_override(Some(true));
            let r = gpu.step_scaled(&gg, 1e-2, 0.1, clip);
            set_override(None);
            r?;
            cpu.step_scaled(&cg, 1e-2, 0.1, clip)?;
        }
        let tag = match (decoupled, grad_dtype) {
            (true, DType::F32) => "adamw",
            (false, DType::F32) => "adam+l2",
            (true, _) => "adamw bf16-grad",
            (false, _) => "adam+l2 bf16-grad",
        };
        let mut tag = tag.to_string();
        if storage.masters == MasterStorage::Remainders {
            tag += " remainders";
        }
        if storage.exp_avg == DType::BF16 {
            tag += " bf16-moments";
        }
        for (k, (g, c)) in gpu.params().iter().zip(cpu.params()).enumerate() {
            let what = |s: &str| format!("{tag} {} {s}", names[k]);
            let (gm, cm) = (g.master_value()?, c.master_value()?);
            ms.push(compare(&what("master"), &gm, &cm, 1e-6)?);
            ms.push(compare(&what("exp_avg"), &g.exp_avg, &c.exp_avg, 1e-6)?);
            if let (Some(gv), Some(cv)) = (&g.exp_avg_sq, &c.exp_avg_sq) {
                ms.push(compare(&what("exp_avg_sq"), gv, cv, 1e-6)?);
            }
            ms.push(compare(&what("bf16 param"), g.var.as_tensor(), c.var.as_tensor(), 1e-6)?);
            if storage.masters == MasterStorage::Remainders {
                // The checkpoint path: the GPU's split of the f32 master, merged on the CPU.
                let (hi, r) = ops::param_remainder::split(&gm)?;
                let back = ops::param_remainder::merge(
                    &hi.to_device(&Device::Cpu)?,
                    &r.to_device(&Device::Cpu)?,
                )?;
                ms.push(compare(&what("split and merge"), &back, &cm, 0.0)?);
            }
        }
    }
    Ok(ms)
}

/// The FP8 GEMMs of a linear layer (tensorwise current scaling, `ops::fp8`) on the GPU's FP8
/// tensor cores against the CPU reference, which quantizes the same bf16 values one by one and
/// multiplies them in f32: both round the sums to bf16, so they differ by the accumulation
/// order (and the forward's fast accumulator). Both formats; one operand with a scale from a
/// large outlier.
fn fp8_linear(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    use crate::ops::fp8::{self, Fp8Recipe, Fp8Weight};
    let mut ms = Vec::new();
    let (rows, inp, out) = (96, 160, 48);
    let x = randn(seed + 300, &[rows, inp], 1.0, 0.0)?;
    // An outlier sets x's scale: the other values use fewer of E4M3's steps.
    let x = x.slice_assign(&[0..1, 0..1], &Tensor::new(&[[40f32]], &Device::Cpu)?)?;
    let w = randn(seed + 301, &[out, inp], 0.05, 0.0)?;
    let dy = randn(seed + 302, &[rows, out], 1e-3, 0.0)?;
    let r = randn(seed + 303, &[rows, out], 1.0, 0.0)?;
    let gpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?.to_device(dev)?) };
    let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?) };
    for name in ["hybrid", "e4m3"] {
        let recipe = Fp8Recipe::from_name(name, true).expect("a known recipe");
        let pairs = [
            (
                "linear",
                fp8::linear(&gpu(&x)?, &gpu(&w)?, None, &recipe)?,
                fp8::linear(&cpu(&x)?, &cpu(&w)?, None, &recipe)?,
            ),
            (
                "linear + residual",
                fp8::linear(&gpu(&x)?, &gpu(&w)?, Some(&gpu(&r)?), &recipe)?,
                fp8::linear(&cpu(&x)?, &cpu(&w)?, Some(&cpu(&r)?), &recipe)?,
            ),
            (
                "input grad",
                fp8::input_grad(&gpu(&dy)?, &gpu(&w)?, &recipe)?,
                fp8::input_grad(&cpu(&dy)?, &cpu(&w)?, &recipe)?,
            ),
            (
                "weight grad",
                fp8::weight_grad(&gpu(&dy)?, &gpu(&x)?, &recipe)?,
                fp8::weight_grad(&cpu(&dy)?, &cpu(&x)?, &recipe)?,
            ),
        ];
        // The weight gradient as bf16 main grads take it (`grad_reduce_in_fp32 = false`); the
        // pairs above write it in f32, the default main grads' dtype.
        let bf16_wgrad = {
            let _bf16 = crate::ops::main_grads::bf16_main_grads(true);
            (
                "weight grad, bf16 main grads",
                fp8::weight_grad(&gpu(&dy)?, &gpu(&x)?, &recipe)?,
                fp8::weight_grad(&cpu(&dy)?, &cpu(&x)?, &recipe)?,
            )
        };
        let (gdx, gdw) = fp8::grads(&gpu(&dy)?, &gpu(&w)?, Some(&gpu(&x)?), &recipe)?;
        let gdw = gdw.context("no weight grad")?;
        let (cdx, cdw) = fp8::grads(&cpu(&dy)?, &cpu(&w)?, Some(&cpu(&x)?), &recipe)?;
        let both = [
            ("grads: input", gdx.clone(), cdx),
            ("grads: weight", gdw.clone(), cdw.context("no weight grad")?),
        ];
        // The operands the forward keeps give the backward the same FP8 values it would
        // quantize again: the same GEMMs, the same results bit for bit.
        let qw = Fp8Weight::quantize(&gpu(&w)?, &recipe)?;
        let (ky, kept) = fp8::linear_saving(&gpu(&x)?, qw, None, &recipe, true, None)?;
        let (kdx, kdw) = fp8::backward(&gpu(&dy)?, kept, None, &recipe, None, None)?;
        // A weight quantized once and shared (the step's cache) serves a second micro-batch
        // with the values it served the first: the whole weight stays, not just its
        // transposed half.
        let shared = Fp8Weight::quantize(&gpu(&w)?, &recipe)?;
        let mut cached = Vec::new();
        for _ in 0..2 {
            let q = shared.clone();
            let (y, kept) = fp8::linear_saving(&gpu(&x)?, q, None, &recipe, true, None)?;
            let (dx, dw) = fp8::backward(&gpu(&dy)?, kept, None, &recipe, None, None)?;
            cached.push((y, dx, dw.context("no weight grad")?));
        }
        let (cy, cdx, cdw) = cached.pop().context("two passes")?;
        let kdw = kdw.context("no weight grad")?;
        let kept = [
            ("kept operands: input grad", kdx.clone(), gdx),
            ("kept operands: weight grad", kdw.clone(), gdw),
            ("cached weight, second use: output", cy, ky),
            ("cached weight, second use: input grad", cdx, kdx),
            ("cached weight, second use: weight grad", cdw, kdw),
        ];
        for (what, g, c) in pairs.into_iter().chain([bf16_wgrad]).chain(both) {
            // The GPU writes what the reference computes: an f32 weight gradient from the
            // GEMM itself, not a bf16 one widened.
            if g.dtype() != c.dtype() {
                anyhow::bail!(
                    "fp8 {name} {what}: {:?} output, the reference {:?}",
                    g.dtype(),
                    c.dtype()
                );
            }
            // One bf16 step of the largest value (at most 2^-7 of it) bounds the difference
            // of two roundings of nearly the same sum.
            ms.push(compare(&format!("fp8 {name} {what}"), &g, &c, 2f64.powi(-7))?);
        }
        for (what, g, c) in kept {
            ms.push(compare(&format!("fp8 {name} {what}"), &g, &c, 0.0)?);
        }
        ms.extend(stored_weight(dev, &x, &w, &dy, &recipe, name)?);
    }
    Ok(ms)
}

/// An FP8 primary weight (`fp8_param`) cast on the GPU from f32 values holds what the CPU
/// casts; its GEMMs (the stored bytes read in place, the transposed copy written from them)
/// equal those of the same f32 weight quantized at the GEMM, bit for bit.
fn stored_weight(
    dev: &Device,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    recipe: &crate::ops::fp8::Fp8Recipe,
    name: &str,
) -> Result<Vec<Measure>> {
    use crate::model::fp8_params;
    use crate::ops::fp8::{self, Fp8Weight};
    let store = |d: &Device| -> Result<candle_core::Var> {
        let var = candle_core::Var::zeros(w.dims(), DType::F8E4M3, d)?;
        fp8_params::store(&var, &w.to_device(d)?, false)?;
        Ok(var)
    };
    let (on_gpu, on_cpu) = (store(dev)?, store(&Device::Cpu)?);
    let value = |v: &candle_core::Var| fp8_params::value_as(v.as_tensor(), DType::F32);
    let mut ms = vec![compare(
        &format!("fp8 {name} stored weight: values"),
        &value(&on_gpu)?,
        &value(&on_cpu)?,
        0.0,
    )?];
    let (gx, gdy) =
        (x.to_dtype(DType::BF16)?.to_device(dev)?, dy.to_dtype(DType::BF16)?.to_device(dev)?);
    let pass = |q: Fp8Weight| -> Result<(Tensor, Tensor)> {
        let (y, kept) = fp8::linear_saving(&gx, q, None, recipe, true, None)?;
        let (dx, _) = fp8::backward(&gdy, kept, None, recipe, None, None)?;
        Ok((y, dx))
    };
    let (sy, sdx) = pass(fp8_params::weight(on_gpu.as_tensor(), true)?)?;
    let (qy, qdx) = pass(Fp8Weight::quantize(&w.to_device(dev)?, recipe)?)?;
    ms.push(compare(&format!("fp8 {name} stored weight: output"), &sy, &qy, 0.0)?);
    ms.push(compare(&format!("fp8 {name} stored weight: input grad"), &sdx, &qdx, 0.0)?);
    let y_eval = fp8::linear_forward(
        &gx,
        &fp8_params::weight(on_gpu.as_tensor(), false)?,
        None,
        recipe,
        None,
    )?;
    ms.push(compare(&format!("fp8 {name} stored weight: forward only"), &y_eval, &qy, 0.0)?);
    Ok(ms)
}

/// Weight gradients added in place into a running sum (the GEMM with beta = 1, bf16 and FP8
/// operands) against the sum plus the CPU's product, in f32 and bf16 sums; the sum's own
/// tensor comes back.
fn wgrad_into(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    use crate::ops::fp8::{self, Fp8Recipe, Fp8Weight};
    let (rows, out, inp) = (256, 96, 160);
    let x = randn(seed + 401, &[rows, inp], 1.0, 0.0)?.to_dtype(DType::BF16)?;
    let w = randn(seed + 402, &[out, inp], 0.05, 0.0)?.to_dtype(DType::BF16)?;
    let dy = randn(seed + 403, &[rows, out], 1e-2, 0.0)?.to_dtype(DType::BF16)?;
    let start = randn(seed + 404, &[out, inp], 1.0, 0.0)?;
    let recipe = Fp8Recipe::from_name("hybrid", true).expect("a known recipe");
    let (gx, gdy) = (x.to_device(dev)?, dy.to_device(dev)?);
    let mut ms = Vec::new();
    for sum_dtype in [DType::F32, DType::BF16] {
        let _bf16 = crate::ops::main_grads::bf16_main_grads(sum_dtype == DType::BF16);
        let before = start.to_dtype(sum_dtype)?;
        // bf16: the product and the old sum are each rounded in the reference, once on the GPU.
        let tol = if sum_dtype == DType::F32 { 1e-5 } else { 2f64.powi(-7) };
        let sum = before.to_device(dev)?;
        if !crate::ops::manual::add_weight_grad_into(&sum, &gdy, &gx)? {
            anyhow::bail!("wgrad_into: a contiguous {sum_dtype:?} sum was not written");
        }
        let want = (before.to_dtype(DType::F32)?
            + dy.to_dtype(DType::F32)?.t()?.matmul(&x.to_dtype(DType::F32)?)?)?;
        ms.push(compare(&format!("bf16 wgrad into {sum_dtype:?} sum"), &sum, &want, tol)?);
        let sum = before.to_device(dev)?;
        let q = Fp8Weight::quantize(&w.to_device(dev)?, &recipe)?;
        let (_, kept) = fp8::linear_saving(&gx, q, None, &recipe, true, None)?;
        let (_, dw) = fp8::backward(&gdy, kept, None, &recipe, None, Some(&sum))?;
        if dw.map(|d| d.id()) != Some(sum.id()) {
            anyhow::bail!("wgrad_into: the FP8 backward did not add into the {sum_dtype:?} sum");
        }
        let fresh = fp8::weight_grad(&dy, &x, &recipe)?.to_dtype(DType::F32)?;
        let want = (before.to_dtype(DType::F32)? + fresh)?;
        // Two FP8 products (GPU, CPU) of the same quantized values: bf16-step agreement.
        ms.push(compare(&format!("fp8 wgrad into {sum_dtype:?} sum"), &sum, &want, 2f64.powi(-7))?);
    }
    Ok(ms)
}

/// Three Adam steps of an FP8 primary weight (`fp8_param`: its f32 master stepped by the
/// fused kernel from the bf16 gradient as it is, then cast to FP8) against the CPU's
/// composite step and cast, with bf16 moments as the precision-aware optimizer keeps them.
/// The masters agree as in [`adamw`]; a cast of two masters that differ in the last bits
/// may land one E4M3 step apart (at most 2^-3 of the largest value).
fn adamw_fp8_stored(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    use crate::model::fp8_params;
    let storage = StateStorage {
        masters: MasterStorage::Remainders,
        exp_avg: DType::BF16,
        exp_avg_sq: DType::BF16,
    };
    let shape = [48, 80];
    let build = |d: &Device| -> Result<(Optimizer, Var)> {
        let init = randn(seed + 20, &shape, 0.5, 0.0)?.to_dtype(DType::BF16)?.to_device(d)?;
        let var = Var::zeros(&shape[..], DType::F8E4M3, d)?;
        fp8_params::store(&var, &init, true)?;
        let params = vec![("w.weight".to_string(), var.clone(), 1.0)];
        Ok((Optimizer::with_storage(Algorithm::Adam(AdamConfig::default()), params, storage)?, var))
    };
    let (mut gpu, gvar) = build(dev)?;
    let (mut cpu, cvar) = build(&Device::Cpu)?;
    for step in 0..3u64 {
        let g = randn(seed + 200 + step, &shape, 0.01, 0.0)?.to_dtype(DType::BF16)?;
        let (mut gg, mut cg) = (GradStore::default(), GradStore::default());
        gg.insert(gvar.as_tensor(), g.to_device(dev)?);
        cg.insert(cvar.as_tensor(), g);
        set_override(Some(true));
        let r = gpu.step_scaled(&gg, 1e-2, 0.1, Some(0.5));
        set_override(None);
        r?;
        cpu.step_scaled(&cg, 1e-2, 0.1, Some(0.5))?;
    }
    let (g, c) = (&gpu.params()[0], &cpu.params()[0]);
    let value = |v: &Var| fp8_params::value_as(v.as_tensor(), DType::F32);
    Ok(vec![
        compare("fp8 stored master", &g.master_value()?, &c.master_value()?, 1e-6)?,
        compare("fp8 stored exp_avg", &g.exp_avg, &c.exp_avg, 1e-6)?,
        compare("fp8 stored weight", &value(&gvar)?, &value(&cvar)?, 2f64.powi(-3))?,
    ])
}

/// Per-tensor sums of squares (the gradient norm) against f64 sums on the CPU, for tensors
/// smaller than one block, spanning many blocks, and larger than the fixed grid.
fn grad_norm(dev: &Device, seed: u64) -> Result<Vec<Measure>> {
    let mut ms = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let cpu: Vec<Tensor> = [&[7usize][..], &[301, 999], &[2048, 700]]
            .iter()
            .enumerate()
            .map(|(k, sh)| randn(seed + 200 + k as u64, sh, 0.02, 0.0))
            .collect::<Result<_>>()?;
        let gpu: Vec<Tensor> =
            cpu.iter().map(|t| Ok(t.to_dtype(dtype)?.to_device(dev)?)).collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = gpu.iter().collect();
        let got = crate::ops::cuda::sumsq::sums_of_squares(&refs)?;
        for (k, (g, c)) in got.iter().zip(&cpu).enumerate() {
            let want = c.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
            let (g, w) = (Tensor::new(&[*g], &Device::Cpu)?, Tensor::new(&[want], &Device::Cpu)?);
            ms.push(compare(&format!("{dtype:?} tensor {k} sum of squares"), &g, &w, 1e-5)?);
        }
    }
    Ok(ms)
}
