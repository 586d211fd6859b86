//! The distributed optimizer (ZeRO-1, megatron-core's `DistributedOptimizer`): each
//! data-parallel rank keeps fp32 master weights and optimizer moments only for its shard of
//! every gradient bucket, steps that shard with the reduce-scattered gradients, and the
//! updated parameters are all-gathered back into every replica.
//!
//! The shard's state lives in an ordinary [`Optimizer`] whose parameters are the slices of
//! model parameters inside this rank's shard ([`ShardSlice`]), so the update arithmetic is the
//! replicated optimizer's, element for element. Checkpoints hold full (TP-local) tensors per
//! parameter, gathered over DP at save time, in the replicated optimizer's names: a
//! checkpoint loads into any DP size and into either optimizer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, TensorId, Var};

use super::grads::GradSource;
use super::optimizer::{
    default_wd_mult, master_dtype, Algorithm, MasterStorage, OptimError, Optimizer, ParamState,
    StateStorage,
};
use super::optimizer_state::OptimizerState;
use crate::model::fp8_params;
use crate::parallel::comm::Communicator;
use crate::parallel::ddp::{BufferLayout, Collective, Flights, ShardSlice};

/// One model parameter as the optimizer sees it.
#[derive(Debug, Clone)]
struct ModelParam {
    name: String,
    var: Var,
}

/// ZeRO-1 optimizer state of one data-parallel rank.
#[derive(Debug)]
pub struct DistributedOptimizer {
    layout: BufferLayout,
    params: Vec<ModelParam>,
    slices: Vec<ShardSlice>,
    /// One parameter per slice, in `slices` order; its variables are the master values.
    inner: Optimizer,
    dp_rank: usize,
    /// `overlap_param_gather`: a bucket's all-gather starts as soon as this rank's slices of
    /// it are updated, on a communicator of its own, while the step goes on with the next
    /// buckets. None: the all-gathers follow the step on the DP group.
    gathers: Option<Flights>,
}

/// Gradient of every slice variable: a view into its bucket's reduced shard.
struct SliceGrads(HashMap<TensorId, Tensor>);

impl GradSource for SliceGrads {
    fn grad_of(&self, var: &Var) -> Option<&Tensor> {
        self.0.get(&var.id())
    }
}

impl DistributedOptimizer {
    /// State for DP rank `dp_rank` over `params` (name, variable; the optimizer's order) laid
    /// out as `layout` (built with `distributed_optimizer: true`); masters start from the
    /// model's current weights. With [`MasterStorage::Remainders`] a bf16 parameter's shard
    /// keeps its bf16 values and remainders (the same 4 bytes per element as an f32 master:
    /// the shard is a copy of its slice, not a view into the model's parameter).
    pub fn new(
        algorithm: Algorithm,
        params: Vec<(String, Var)>,
        layout: BufferLayout,
        dp_rank: usize,
        overlap_param_gather: Option<Arc<dyn Communicator>>,
        storage: impl Into<StateStorage>,
    ) -> Result<Self, OptimError> {
        let storage: StateStorage = storage.into();
        let params: Vec<ModelParam> =
            params.into_iter().map(|(name, var)| ModelParam { name, var }).collect();
        let slices = layout.shard_slices(dp_rank);
        let mut inner_params = Vec::with_capacity(slices.len());
        for s in &slices {
            let p = &params[s.param];
            let dtype = shard_dtype(p.var.dtype(), storage.masters);
            let value = slice_of(&fp8_params::master_init(p.var.as_tensor(), dtype)?, s)?;
            let name = format!("{}[{}..{}]", p.name, s.param_offset, s.param_offset + s.len);
            // The group follows the whole parameter (a 1-D slice of a matrix still decays).
            let wd = default_wd_mult(&p.name, p.var.rank());
            inner_params.push((name, Var::from_tensor(&value)?, wd));
        }
        let inner = Optimizer::with_storage(algorithm, inner_params, storage)?;
        let gathers = overlap_param_gather.map(|c| Flights::new(c, Collective::AllGather));
        Ok(Self { layout, params, slices, inner, dp_rank, gathers })
    }

    /// The model variables, in the optimizer's order (for the gradient accumulator).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// See [`Optimizer::set_decoupled_lr`].
    pub fn set_decoupled_lr(&mut self, lr: Option<f64>) {
        self.inner.set_decoupled_lr(lr);
    }

    /// Elements of optimizer state this rank holds per moment (its shards).
    pub fn shard_numel(&self) -> usize {
        self.slices.iter().map(|s| s.len).sum()
    }

    /// Sum of squares of the reduced gradient shards over the parameters for which
    /// `counts(param_index)` (the norm's TP de-duplication), in f64.
    pub fn shard_sq_norm(
        &self,
        shards: &[Tensor],
        counts: impl Fn(usize) -> bool,
    ) -> candle_core::Result<f64> {
        let buckets = self.layout.buckets();
        let slices = self
            .slices
            .iter()
            .filter(|s| counts(s.param))
            .map(|s| shards[bucket_index(&buckets, s)].narrow(0, s.shard_offset, s.len))
            .collect::<candle_core::Result<Vec<_>>>()?;
        super::clip::sum_of_squares(&slices.iter().collect::<Vec<_>>())
    }

    /// One optimizer step of this rank's shards with the reduced gradient shards times
    /// `grad_scale` (clipping coefficient / fp16 loss scale), then the all-gather of the
    /// updated parameters into the model over `dp` (with `overlap_param_gather`, over the
    /// gathers' own communicator, each bucket's starting as soon as its slices are updated).
    pub fn step(
        &mut self,
        shards: &[Tensor],
        lr: f64,
        wd: f64,
        grad_scale: Option<f64>,
        dp: &dyn Communicator,
    ) -> anyhow::Result<()> {
        let buckets = self.layout.buckets();
        let mut grads = HashMap::with_capacity(self.slices.len());
        for (s, p) in self.slices.iter().zip(self.inner.params()) {
            let k = bucket_index(&buckets, s);
            grads.insert(p.var.id(), shards[k].narrow(0, s.shard_offset, s.len)?);
        }
        let grads = SliceGrads(grads);
        let device = self.device();
        // Bucket i's shard is complete once its last slice (in the inner optimizer's update
        // order) is updated; a bucket of which this rank holds no slice (all padding) is
        // complete from the start.
        let mut last = vec![None; buckets.len()];
        for (j, s) in self.slices.iter().enumerate() {
            last[bucket_index(&buckets, s)] = Some(j);
        }
        let (layout, slices, gathers) = (&self.layout, &self.slices, &mut self.gathers);
        let params = &self.params;
        // With one rank every slice is a whole parameter: an FP8 primary weight is cast from
        // its master as soon as it is updated, and its buffer is not gathered.
        let cast_here = |b: usize| layout.dp == 1 && layout.buffers[b].param_dtype == DType::F8E4M3;
        let mut values: Vec<Option<Tensor>> = vec![None; slices.len()];
        // Gathers start strictly in bucket order on every rank (collectives pair up by
        // order): each bucket once it and every earlier one are complete.
        let mut next = 0;
        let mut start_complete =
            |updated: Option<usize>, values: &[Option<Tensor>]| -> candle_core::Result<()> {
                while next < buckets.len() && last[next] <= updated {
                    if cast_here(buckets[next].0) {
                        next += 1;
                        continue;
                    }
                    let dtype = gather_dtype(layout.buffers[buckets[next].0].param_dtype);
                    let shard = shard_tensor(layout, slices, &device, next, dtype, |j| {
                        values[j].clone().ok_or_else(|| {
                            candle_core::Error::Msg(format!(
                                "slice {j} was not updated before its gather"
                            ))
                        })
                    })?;
                    match gathers.as_mut() {
                        Some(flights) => flights.start(next, shard)?,
                        // Written back at once: one bucket's gathered values at a time.
                        None => write_bucket(layout, params, next, &dp.all_gather(&shard, 0)?)?,
                    }
                    next += 1;
                }
                Ok(())
            };
        self.inner.step_scaled_each(&grads, lr, wd, grad_scale, &mut |j, p| {
            let s = &slices[j];
            if cast_here(s.buffer) {
                let var = &params[s.param].var;
                fp8_params::store(var, &p.master_value()?.reshape(var.shape())?, false)?;
            } else {
                let dtype = gather_dtype(layout.buffers[s.buffer].param_dtype);
                values[j] = Some(p.value_as(dtype)?);
            }
            start_complete(Some(j), &values)
        })?;
        start_complete(Some(usize::MAX), &values)?;
        if let Some(flights) = self.gathers.as_mut() {
            for (i, full) in flights.collect()? {
                write_bucket(&self.layout, &self.params, i, &full)?;
            }
        }
        Ok(())
    }

    fn device(&self) -> Device {
        self.params.first().map_or(Device::Cpu, |p| p.var.device().clone())
    }

    /// This rank's shard of bucket `i` as a flat tensor of `dtype` (see [`shard_tensor`]).
    fn shard_tensor(
        &self,
        i: usize,
        dtype: candle_core::DType,
        value: impl Fn(usize) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        shard_tensor(&self.layout, &self.slices, &self.device(), i, dtype, value)
    }

    /// The full optimizer state in the replicated optimizer's format (names, shapes and order
    /// of [`Optimizer::export_state`]), gathered over `dp`. Every DP rank must call it.
    pub fn export_state(&self, dp: &dyn Communicator) -> anyhow::Result<OptimizerState> {
        let m1 = first_moment_suffix(self.inner.algorithm());
        let is_adam = matches!(self.inner.algorithm(), Algorithm::Adam(_));
        let mut kinds: Vec<&str> = vec!["master", m1];
        if is_adam {
            kinds.push("exp_avg_sq");
        }
        let mut full: HashMap<(usize, &str), Tensor> = HashMap::new();
        let buckets = self.layout.buckets();
        for kind in &kinds {
            let state: Vec<Tensor> = self
                .inner
                .params()
                .iter()
                .map(|p| match *kind {
                    "master" => p.master_value(),
                    "exp_avg_sq" => Ok(p.exp_avg_sq.clone().expect("Adam keeps a second moment")),
                    _ => Ok(p.exp_avg.clone()),
                })
                .collect::<candle_core::Result<_>>()?;
            for (i, &(b, k)) in buckets.iter().enumerate() {
                let buf = &self.layout.buffers[b];
                let dtype = master_dtype(buf.param_dtype);
                // bf16 moments are gathered as the f32 values they hold (the checkpoint format).
                let shard = self.shard_tensor(i, dtype, |j| state[j].to_dtype(dtype))?;
                let bucket_full = dp.all_gather(&shard, 0)?;
                let bucket = &buf.buckets[k];
                for span in &buf.params[bucket.params.clone()] {
                    let t = bucket_full.narrow(0, span.start - bucket.range.start, span.numel)?;
                    full.insert((span.index, *kind), t.reshape(span.dims.as_slice())?);
                }
            }
        }
        let mut tensors = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            for kind in &kinds {
                // Like the replicated optimizer: a master copy only for narrow dtypes.
                if *kind == "master" && master_dtype(p.var.dtype()) == p.var.dtype() {
                    continue;
                }
                let t = full.remove(&(i, *kind)).expect("every parameter lies in one bucket");
                tensors.push((format!("{}.{kind}", p.name), t));
            }
        }
        Ok(OptimizerState {
            algorithm: self.inner.algorithm().name().to_string(),
            steps: self.inner.steps(),
            tensors,
        })
    }

    /// Takes this rank's shard of a full state (as [`Self::export_state`] or the replicated
    /// optimizer writes it). Masters absent from the state (f32 parameters) are read from the
    /// model variables, which must already hold the checkpoint's weights. On error nothing is
    /// changed.
    pub fn import_state(&mut self, state: &OptimizerState) -> Result<(), OptimError> {
        let by_name: HashMap<&str, &Tensor> =
            state.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let m1 = first_moment_suffix(self.inner.algorithm());
        let is_adam = matches!(self.inner.algorithm(), Algorithm::Adam(_));
        let mut expected = HashSet::new();
        for p in &self.params {
            let mut kinds = vec![m1];
            if is_adam {
                kinds.push("exp_avg_sq");
            }
            if master_dtype(p.var.dtype()) != p.var.dtype() {
                kinds.push("master");
            }
            for kind in kinds {
                let key = format!("{}.{kind}", p.name);
                let t = by_name
                    .get(key.as_str())
                    .ok_or_else(|| OptimError::MissingStateTensor(key.clone()))?;
                if t.dims() != p.var.dims() {
                    return Err(OptimError::StateShape {
                        name: key,
                        expected: p.var.dims().to_vec(),
                        got: t.dims().to_vec(),
                    });
                }
                expected.insert(key);
            }
        }
        if let Some((extra, _)) = state.tensors.iter().find(|(n, _)| !expected.contains(n)) {
            return Err(OptimError::UnexpectedStateTensor(extra.clone()));
        }
        let mut inner_tensors = Vec::new();
        let mut masters = Vec::with_capacity(self.slices.len());
        for (s, ip) in self.slices.iter().zip(self.inner.params()) {
            let p = &self.params[s.param];
            let dtype = master_dtype(p.var.dtype());
            let take = |kind: &str| -> Result<Tensor, OptimError> {
                let t = by_name[format!("{}.{kind}", p.name).as_str()];
                Ok(slice_of(t, s)?.to_dtype(dtype)?.to_device(p.var.device())?)
            };
            inner_tensors.push((format!("{}.{m1}", ip.name), take(m1)?));
            if is_adam {
                inner_tensors.push((format!("{}.exp_avg_sq", ip.name), take("exp_avg_sq")?));
            }
            let master = if dtype != p.var.dtype() {
                take("master")?
            } else {
                slice_of(&p.var.as_detached_tensor(), s)?.to_dtype(dtype)?
            };
            // A shard that keeps remainders beside its bf16 values restores them through the
            // inner optimizer; an f32 shard variable is the master itself.
            if ip.master.stored().is_some() {
                inner_tensors.push((format!("{}.master", ip.name), master));
                masters.push(None);
            } else {
                masters.push(Some(master));
            }
        }
        self.inner.import_state(&OptimizerState {
            algorithm: state.algorithm.clone(),
            steps: state.steps,
            tensors: inner_tensors,
        })?;
        for (ip, m) in self.inner.params_mut().iter_mut().zip(masters) {
            if let Some(m) = m {
                ip.set_master(m)?;
            }
        }
        // FP8 primary weights are cast from the restored masters, as every step casts them
        // (the checkpoint's model tensors hold their values rounded to the model's dtype,
        // whose amax can differ from the master's in the last bits).
        for p in self.params.iter().filter(|p| fp8_params::is_stored(p.var.as_tensor())) {
            let master = by_name[format!("{}.master", p.name).as_str()];
            fp8_params::store(&p.var, &master.to_device(p.var.device())?, false)?;
        }
        Ok(())
    }

    /// Re-reads the masters from the model variables (weights replaced after construction,
    /// e.g. loaded without optimizer state).
    pub fn sync_master_from_model(&mut self) -> Result<(), OptimError> {
        for (s, ip) in self.slices.iter().zip(self.inner.params_mut()) {
            let p = &self.params[s.param];
            let v = slice_of(&fp8_params::master_init(p.var.as_tensor(), ip.var.dtype())?, s)?;
            ip.var.set(&v)?;
            ip.sync_master_from_var()?;
        }
        Ok(())
    }

    /// The states of this rank's slices of the parameters for which `counts(param_index)`.
    pub fn shard_states_where(&self, counts: impl Fn(usize) -> bool) -> Vec<&ParamState> {
        self.slices
            .iter()
            .zip(self.inner.params())
            .filter(|(s, _)| counts(s.param))
            .map(|(_, p)| p)
            .collect()
    }

    /// This rank's data-parallel index.
    pub fn dp_rank(&self) -> usize {
        self.dp_rank
    }

    /// This rank's shards: each variable is a slice `name[start..end]` (the fp32 master, or the
    /// bf16 values beside their remainders), with its moments (for the memory report).
    pub fn shard_states(&self) -> &[ParamState] {
        self.inner.params()
    }
}

/// Copies the gathered bucket `i` (`full`, all ranks' shards) into the model variables.
fn write_bucket(
    layout: &BufferLayout,
    params: &[ModelParam],
    i: usize,
    full: &Tensor,
) -> candle_core::Result<()> {
    let (b, k) = layout.buckets()[i];
    let buf = &layout.buffers[b];
    let bucket = &buf.buckets[k];
    for span in &buf.params[bucket.params.clone()] {
        let v = full.narrow(0, span.start - bucket.range.start, span.numel)?;
        let v = v.reshape(span.dims.as_slice())?;
        let var = &params[span.index].var;
        match fp8_params::is_stored(var.as_tensor()) {
            // Each rank casts the gathered master with the scale of its amax.
            true => fp8_params::store(var, &v, false)?,
            false => var.set(&v)?,
        }
    }
    Ok(())
}

/// The dtype in which the updated values of a parameter of `dtype` are gathered: its own, but
/// f32 for an FP8 primary weight, whose scale (the amax of the whole parameter) only a rank
/// holding all of it can take. The FP8 gather of megatron-core's `fp8_param_gather`, which
/// reduces the amaxes over the ranks first, is not implemented: the f32 gather moves twice
/// the bytes of bf16's.
fn gather_dtype(dtype: candle_core::DType) -> candle_core::DType {
    match dtype {
        candle_core::DType::F8E4M3 => candle_core::DType::F32,
        other => other,
    }
}

/// The dtype of a shard's variable for a parameter of `dtype`: its master dtype, or bf16 itself
/// when the master is kept as remainders beside it.
fn shard_dtype(dtype: candle_core::DType, storage: MasterStorage) -> candle_core::DType {
    if storage == MasterStorage::Remainders && dtype == candle_core::DType::BF16 {
        dtype
    } else {
        master_dtype(dtype)
    }
}

/// This rank's shard of bucket `i` as a flat tensor of `dtype`: `value(j)` for slice j,
/// zeros in the gaps.
fn shard_tensor(
    layout: &BufferLayout,
    slices: &[ShardSlice],
    device: &Device,
    i: usize,
    dtype: candle_core::DType,
    value: impl Fn(usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, k) = layout.buckets()[i];
    let shard_len = layout.buffers[b].buckets[k].len() / layout.dp;
    let mut parts = Vec::new();
    let mut at = 0;
    for (j, s) in slices.iter().enumerate() {
        if (s.buffer, s.bucket) != (b, k) {
            continue;
        }
        if s.shard_offset > at {
            parts.push(Tensor::zeros(s.shard_offset - at, dtype, device)?);
        }
        parts.push(value(j)?.flatten_all()?);
        at = s.shard_offset + s.len;
    }
    if shard_len > at {
        parts.push(Tensor::zeros(shard_len - at, dtype, device)?);
    }
    Tensor::cat(&parts, 0)
}

fn first_moment_suffix(a: &Algorithm) -> &'static str {
    match a {
        Algorithm::Adam(_) => "exp_avg",
        Algorithm::Sgd(_) => "momentum_buffer",
    }
}

/// The elements of a parameter-shaped tensor that slice `s` covers, flat.
fn slice_of(t: &Tensor, s: &ShardSlice) -> candle_core::Result<Tensor> {
    t.flatten_all()?.narrow(0, s.param_offset, s.len)?.contiguous()
}

fn bucket_index(buckets: &[(usize, usize)], s: &ShardSlice) -> usize {
    buckets.iter().position(|&bk| bk == (s.buffer, s.bucket)).expect("slice of a known bucket")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::comm::LocalWorld;
    use crate::parallel::ddp::{GradReducer, LayoutOptions, ReduceScaling};
    use crate::train::grads::GradAccumulator;
    use crate::train::optimizer::AdamConfig;
    use candle_core::backprop::GradStore;
    use candle_core::DType;
    use std::time::Duration;

    /// Two ranks, where rank 1 holds no slice of the first bucket (a 7-element parameter
    /// padded to 128 elements). Its all-gather still comes first on both ranks, with and
    /// without `overlap_param_gather`, and the weights equal a replicated Adam step's.
    #[test]
    fn gathers_start_in_bucket_order_when_a_rank_owns_nothing_of_a_bucket() {
        let shapes = [vec![200usize], vec![7]];
        let init = |i: usize, n: usize| -> Vec<f32> {
            (0..n).map(|k| ((i * 31 + k * 7) % 13) as f32 * 0.1 - 0.6).collect()
        };
        let grad = |i: usize, n: usize| -> Vec<f32> {
            (0..n).map(|k| ((i * 17 + k * 5) % 11) as f32 * 0.01 - 0.05).collect()
        };
        let adam = Algorithm::Adam(AdamConfig::default());
        let named = || -> Vec<(String, Var)> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let t = Tensor::from_vec(init(i, s[0]), s[0], &Device::Cpu).unwrap();
                    (format!("p{i}.weight"), Var::from_tensor(&t).unwrap())
                })
                .collect()
        };
        // The reference: one replicated optimizer with the same gradients.
        let reference = named();
        let mut store = GradStore::default();
        for (i, (_, v)) in reference.iter().enumerate() {
            let g = Tensor::from_vec(grad(i, v.elem_count()), v.dims(), &Device::Cpu).unwrap();
            store.insert(v, g);
        }
        let mut replicated = Optimizer::new(adam, reference.clone()).unwrap();
        replicated.step(&store, 1e-2, 0.1).unwrap();
        let want: Vec<Vec<f32>> =
            reference.iter().map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap()).collect();
        for overlap in [false, true] {
            let got = LocalWorld::run(2, Duration::from_secs(20), |rank, world| {
                let dp = world.world_group(rank)?;
                let named = named();
                let opts = LayoutOptions {
                    dp: 2,
                    bucket_size: Some(5),
                    distributed_optimizer: true,
                    pad_for_high_nccl_busbw: false,
                    grad_reduce_in_fp32: true,
                };
                let dims: Vec<(Vec<usize>, DType)> =
                    shapes.iter().map(|s| (s.clone(), DType::F32)).collect();
                let layout = BufferLayout::new(&dims, &opts);
                let first = layout.buffers[0].buckets[0].clone();
                anyhow::ensure!(layout.shard_slices(1).iter().all(|s| s.bucket != 0));
                anyhow::ensure!(first.len() == 128, "{first:?}");
                let gathers: Option<Arc<dyn Communicator>> = if overlap {
                    Some(Arc::new(world.group(rank, "dp_cp_grads", &[0, 1])?))
                } else {
                    None
                };
                let mut d = DistributedOptimizer::new(
                    adam,
                    named.clone(),
                    layout.clone(),
                    rank,
                    gathers,
                    MasterStorage::Copy,
                )?;
                // Both ranks hold the same gradients, averaged: the shards are those gradients.
                let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
                let mut acc = GradAccumulator::new(vars.clone());
                let mut store = GradStore::default();
                for (i, v) in vars.iter().enumerate() {
                    let g = Tensor::from_vec(grad(i, v.elem_count()), v.dims(), &Device::Cpu)?;
                    store.insert(v, g);
                }
                acc.accumulate(&store)?;
                let scaling =
                    ReduceScaling { average_in_collective: false, average: true, post: 1.0 };
                let shards = GradReducer::new(layout).reduce_scatter(&mut acc, &dp, scaling)?;
                d.step(&shards, 1e-2, 0.1, None, &dp)?;
                vars.iter()
                    .map(|v| Ok(v.as_tensor().to_vec1::<f32>()?))
                    .collect::<Result<Vec<_>, anyhow::Error>>()
            })
            .unwrap();
            for (rank, params) in got.iter().enumerate() {
                for (i, (g, w)) in params.iter().zip(&want).enumerate() {
                    for (a, b) in g.iter().zip(w) {
                        assert!(
                            (a - b).abs() < 1e-6,
                            "overlap {overlap} rank {rank} p{i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
