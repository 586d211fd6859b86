//! Named parameter registry: every trainable tensor under its Megatron name, with its global
//! shape and tensor-parallel partition dim, holding only this rank's shard.

use super::fp8_params;
use super::init::{draw_normal, init_full, Init};
use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;
use std::collections::HashMap;

/// How many bytes of drawn values [`ParamStore::finish_init`] keeps on the host before moving
/// them to the device.
const INIT_BATCH_BYTES: usize = 4 << 30;

/// How the global tensor is cut into TP shards along `partition_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardLayout {
    /// Rank r holds the r-th contiguous chunk (QKV is laid out per query group, so this is
    /// also right for `linear_qkv` as long as `groups % tp == 0`).
    Contiguous,
    /// Gated `linear_fc1` `[gate; up]`: rank r holds `cat(gate_r, up_r)` (each half chunked
    /// separately), as Megatron's column-parallel GLU does.
    GatedHalves,
}

/// Tensor-parallel coordinates of this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpCoord {
    /// This rank's index in its tensor-parallel group.
    pub rank: usize,
    /// Tensor-parallel group size.
    pub size: usize,
}

/// One registered parameter.
#[derive(Debug, Clone)]
pub struct Param {
    /// Megatron name with global layer numbers, e.g. `decoder.layers.3.mlp.linear_fc2.weight`.
    pub name: String,
    /// This rank's shard (trainable).
    pub var: Var,
    /// Shape of the unsharded tensor.
    pub global_shape: Vec<usize>,
    /// TP partition dim: 0 for column-parallel and vocab-parallel, 1 for row-parallel, None
    /// for replicated tensors (norms, row-parallel biases).
    pub partition_dim: Option<usize>,
    /// How shards are cut along `partition_dim`.
    pub layout: ShardLayout,
    /// True for `output_layer.weight` on a last PP stage whose model ties embeddings: a copy
    /// of the first stage's word embeddings that the loop must keep in sync (Megatron's
    /// `shared_embedding` flag).
    pub shared_embedding: bool,
    /// False for frozen base weights under PEFT: they are not optimized, not saved in
    /// adapter-only checkpoints, and the model uses a detached view of them (no gradient).
    pub trainable: bool,
}

impl Param {
    /// True for biases and norm weights (1-D), which Megatron's default param groups exempt
    /// from weight decay.
    pub fn is_bias_or_norm(&self) -> bool {
        self.global_shape.len() == 1
    }
}

/// All parameters of one model stage on one rank, in creation order.
#[derive(Debug)]
pub struct ParamStore {
    params: Vec<Param>,
    index: HashMap<String, usize>,
    tp: TpCoord,
    seed: u64,
    dtype: DType,
    device: Device,
    frozen: bool,
    peft: Option<crate::config::peft::PeftConfig>,
    /// Parameters whose random values are still to be drawn (by [`Self::finish_init`]).
    pending: Vec<PendingDraw>,
    /// GEMM weights created now are FP8 primary weights ([`Self::store_gemm_weights_in_fp8`]).
    fp8_gemm_weights: bool,
}

/// The weights of a transformer layer's GEMMs, by the end of their Megatron names.
const GEMM_WEIGHTS: [&str; 4] =
    [".linear_qkv.weight", ".linear_proj.weight", ".linear_fc1.weight", ".linear_fc2.weight"];

/// A registered parameter that holds zeros until [`ParamStore::finish_init`] draws its values.
#[derive(Debug)]
struct PendingDraw {
    /// Index into `params`.
    param: usize,
    init_key: String,
    std: f64,
}

impl ParamStore {
    /// An empty registry for rank `tp` whose initial values derive from `seed`.
    pub fn new(tp: TpCoord, seed: u64, dtype: DType, device: Device) -> Self {
        Self {
            params: Vec::new(),
            index: HashMap::new(),
            tp,
            seed,
            dtype,
            device,
            frozen: false,
            peft: None,
            pending: Vec::new(),
            fp8_gemm_weights: false,
        }
    }

    /// While on, the GEMM weights created (`linear_qkv`, `linear_proj`, `linear_fc1`,
    /// `linear_fc2`) are FP8 primary weights ([`super::fp8_params`]): the model turns it on
    /// for the layers that run in FP8 under `mixed_precision.fp8_param`.
    pub fn store_gemm_weights_in_fp8(&mut self, on: bool) {
        self.fp8_gemm_weights = on;
    }

    /// The dtype parameter `name` is created with.
    fn dtype_of(&self, name: &str) -> DType {
        let gemm = GEMM_WEIGHTS.iter().any(|s| name.ends_with(s));
        if self.fp8_gemm_weights && gemm && !self.frozen {
            DType::F8E4M3
        } else {
            self.dtype
        }
    }

    /// Sets `var` to `value` (its shape, on any device): cast to its dtype, or stored in FP8
    /// with the value kept for the optimizer's master (a host `value` is kept as it is).
    fn set_value(var: &Var, value: &Tensor) -> Result<()> {
        if fp8_params::is_stored(var.as_tensor()) {
            fp8_params::store(var, value, true)
        } else {
            var.set(&value.to_device(var.device())?.to_dtype(var.dtype())?)
        }
    }

    /// Creates, initializes and registers a parameter; returns its shard as a tensor that
    /// shares storage (and gradient identity) with the registered `Var`.
    pub fn create(
        &mut self,
        name: &str,
        global_shape: &[usize],
        partition_dim: Option<usize>,
        layout: ShardLayout,
        init: Init,
    ) -> Result<Tensor> {
        self.create_keyed(name, name, global_shape, partition_dim, layout, init)
    }

    /// A row-parallel linear `{prefix}.weight` `[out, in]` split on dim 1, scaled-normal init,
    /// and, when `bias`, its `{prefix}.bias` — replicated, since it is added once after the
    /// reduction over TP (`linear_proj`, `linear_fc2`).
    pub fn create_row_parallel(
        &mut self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        std: f64,
        bias: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = self.create(
            &format!("{prefix}.weight"),
            &[out_features, in_features],
            Some(1),
            ShardLayout::Contiguous,
            Init::Normal(std),
        )?;
        let b = if bias {
            Some(self.create(
                &format!("{prefix}.bias"),
                &[out_features],
                None,
                ShardLayout::Contiguous,
                Init::Zeros,
            )?)
        } else {
            None
        };
        Ok((w, b))
    }

    /// Like [`Self::create`], but draws the initial values from the random stream of
    /// `init_key` instead of `name` (a tied copy starts equal to its original).
    pub fn create_keyed(
        &mut self,
        name: &str,
        init_key: &str,
        global_shape: &[usize],
        partition_dim: Option<usize>,
        layout: ShardLayout,
        init: Init,
    ) -> Result<Tensor> {
        if self.index.contains_key(name) {
            candle_core::bail!("parameter {name} registered twice");
        }
        let var = match init {
            // Drawn later, on all cores: see `finish_init`.
            Init::Normal(std) => {
                let mut shape = global_shape.to_vec();
                if let Some(d) = partition_dim {
                    shape[d] /= self.tp.size;
                }
                self.pending.push(PendingDraw {
                    param: self.params.len(),
                    init_key: init_key.to_string(),
                    std,
                });
                Var::zeros(shape, self.dtype_of(name), &self.device)?
            }
            _ => {
                let full =
                    init_full(init_key, global_shape, init, self.seed, self.dtype, &self.device)?;
                let shard = shard_of(&full, partition_dim, layout, self.tp)?;
                let var = Var::zeros(shard.shape(), self.dtype_of(name), &self.device)?;
                Self::set_value(&var, &shard)?;
                var
            }
        };
        // A frozen weight is used through a detached view: it shares the storage (so loads
        // through `Var::set` reach it) but takes no part in backward.
        let t = if self.frozen { var.as_tensor().detach() } else { var.as_tensor().clone() };
        self.index.insert(name.to_string(), self.params.len());
        self.params.push(Param {
            name: name.to_string(),
            var,
            global_shape: global_shape.to_vec(),
            partition_dim,
            layout,
            shared_embedding: false,
            trainable: !self.frozen,
        });
        Ok(t)
    }

    /// Draws the random initial values of every parameter created since the last call, on
    /// all cores (each has its own stream, see [`super::init`]), and moves them into the
    /// parameters: the values `create` promises, bit for bit. The model's constructor calls
    /// it once all parameters exist; until then they hold zeros.
    pub fn finish_init(&mut self) -> Result<()> {
        self.draw_pending(INIT_BATCH_BYTES)
    }

    /// [`Self::finish_init`] with about `batch_bytes` of drawn values on the host at once
    /// (at least one parameter).
    fn draw_pending(&mut self, batch_bytes: usize) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        let values = |d: &PendingDraw| self.params[d.param].global_shape.iter().product::<usize>();
        // Largest first: a batch then takes about as long as its largest draw or its share of
        // the cores, whichever is longer.
        pending.sort_by_key(|d| std::cmp::Reverse(values(d)));
        let per_value = self.dtype.size_in_bytes();
        let mut rest = pending.as_slice();
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len() && (take == 0 || bytes < batch_bytes) {
                bytes += values(&rest[take]) * per_value;
                take += 1;
            }
            let (batch, tail) = rest.split_at(take);
            rest = tail;
            // Drawn and cut to this rank's shard on the host; only the shard moves.
            let shards = batch
                .par_iter()
                .map(|d| {
                    let p = &self.params[d.param];
                    let full =
                        draw_normal(&d.init_key, &p.global_shape, d.std, self.seed, self.dtype)?;
                    shard_of(&full, p.partition_dim, p.layout, self.tp)
                })
                .collect::<Result<Vec<_>>>()?;
            for (d, shard) in batch.iter().zip(shards) {
                Self::set_value(&self.params[d.param].var, &shard)?;
            }
        }
        Ok(())
    }

    /// Turns on PEFT: parameters created from now on are frozen base weights until
    /// [`Self::create_adapter`] registers a trainable one; layers read `cfg` through
    /// [`Self::peft`] to decide which linear layers get adapters.
    pub fn enable_peft(&mut self, cfg: crate::config::peft::PeftConfig) {
        self.frozen = true;
        self.peft = Some(cfg);
    }

    /// The PEFT config when adapters are on.
    pub fn peft(&self) -> Option<&crate::config::peft::PeftConfig> {
        self.peft.as_ref()
    }

    /// The parameters' dtype (`model.params_dtype`), which FP8 primary weights stand in for.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// This rank's TP coordinates.
    pub fn tp(&self) -> TpCoord {
        self.tp
    }

    /// Registers a trainable (adapter) parameter even while the store is frozen.
    pub fn create_adapter(
        &mut self,
        name: &str,
        global_shape: &[usize],
        partition_dim: Option<usize>,
        layout: ShardLayout,
        init: Init,
    ) -> Result<Tensor> {
        let frozen = std::mem::replace(&mut self.frozen, false);
        let r = self.create(name, global_shape, partition_dim, layout, init);
        self.frozen = frozen;
        r
    }

    /// `(name, var)` of the trainable parameters only (all of them without PEFT).
    pub fn trainable_named_vars(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect()
    }

    /// Marks a registered parameter as a tied copy of the word embeddings.
    pub(crate) fn mark_shared_embedding(&mut self, name: &str) {
        if let Some(&i) = self.index.get(name) {
            self.params[i].shared_embedding = true;
        }
    }

    /// The parameter called `name`, if this stage has it.
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    /// All parameters in creation order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The trainable variables in creation order (what an optimizer consumes).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// `(name, var)` pairs in creation order (the optimizer's input format).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.params.iter().map(|p| (p.name.clone(), p.var.clone())).collect()
    }

    /// Number of scalars held by this rank.
    pub fn num_local_elements(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Overwrites parameter `name` from its full (global-shape) value, keeping only this
    /// rank's shard; the value is cast to the parameter dtype.
    pub fn set_full(&self, name: &str, full: &Tensor) -> Result<()> {
        let p = self
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("unknown parameter {name}")))?;
        if full.dims() != p.global_shape.as_slice() {
            candle_core::bail!(
                "parameter {name}: expected global shape {:?}, got {:?}",
                p.global_shape,
                full.dims()
            );
        }
        let full = full.to_dtype(self.dtype)?.to_device(&self.device)?;
        let shard = shard_of(&full, p.partition_dim, p.layout, self.tp)?;
        Self::set_value(&p.var, &shard)
    }

    /// Loads every parameter from full (global-shape) tensors keyed by Megatron name, e.g. a
    /// TP=1 checkpoint. A missing parameter is an error; returns the names in `state` that
    /// this stage does not use (other stages' layers, for example).
    pub fn load_full_state(&self, state: &HashMap<String, Tensor>) -> Result<Vec<String>> {
        self.load_full_state_where(state, |_| true)
    }

    /// Like [`Self::load_full_state`] for the parameters that `which` selects only (PEFT:
    /// the frozen base from a pretrained checkpoint, or the adapters from an adapter-only
    /// checkpoint); names in `state` that this store has but `which` skips count as used.
    pub fn load_full_state_where(
        &self,
        state: &HashMap<String, Tensor>,
        which: impl Fn(&Param) -> bool,
    ) -> Result<Vec<String>> {
        for p in self.params.iter().filter(|p| which(p)) {
            let t = state.get(&p.name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "parameter {} missing from the loaded state",
                    p.name
                ))
            })?;
            self.set_full(&p.name, t)?;
        }
        let mut unused: Vec<String> =
            state.keys().filter(|k| !self.index.contains_key(*k)).cloned().collect();
        unused.sort();
        Ok(unused)
    }

    /// This rank's shards by Megatron name, in creation order (the full tensors when TP=1).
    /// The tensors are detached snapshots: later optimizer steps do not change them. FP8
    /// primary weights come as the values they stand for, in the parameters' dtype.
    pub fn local_state(&self) -> Result<Vec<(String, Tensor)>> {
        self.params
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                let value = match fp8_params::is_stored(t) {
                    true => fp8_params::value_as(t, self.dtype)?,
                    false => t.detach().copy()?,
                };
                Ok((p.name.clone(), value))
            })
            .collect()
    }
}

/// Cuts this rank's shard out of a global tensor.
pub fn shard_of(
    full: &Tensor,
    partition_dim: Option<usize>,
    layout: ShardLayout,
    tp: TpCoord,
) -> Result<Tensor> {
    let Some(dim) = partition_dim else {
        return Ok(full.clone());
    };
    if tp.size == 1 {
        return Ok(full.clone());
    }
    let n = full.dim(dim)?;
    match layout {
        ShardLayout::Contiguous => {
            if n % tp.size != 0 {
                candle_core::bail!("dim {dim} of size {n} not divisible by TP size {}", tp.size);
            }
            let c = n / tp.size;
            full.narrow(dim, tp.rank * c, c)?.contiguous()
        }
        ShardLayout::GatedHalves => {
            if n % (2 * tp.size) != 0 {
                candle_core::bail!("gated dim {n} not divisible by 2·TP ({})", 2 * tp.size);
            }
            let half = n / 2;
            let c = half / tp.size;
            let gate = full.narrow(dim, tp.rank * c, c)?;
            let up = full.narrow(dim, half + tp.rank * c, c)?;
            Tensor::cat(&[&gate, &up], dim)?.contiguous()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers a column-parallel, a gated and a row-parallel weight and a norm on TP rank
    /// `rank` of `size`.
    fn store(rank: usize, size: usize) -> ParamStore {
        let mut s = ParamStore::new(TpCoord { rank, size }, 17, DType::F32, Device::Cpu);
        s.create("a.weight", &[8, 6], Some(0), ShardLayout::Contiguous, Init::Normal(0.02))
            .unwrap();
        s.create("fc1.weight", &[8, 6], Some(0), ShardLayout::GatedHalves, Init::Normal(0.5))
            .unwrap();
        s.create_row_parallel("proj", 6, 4, 0.1, true).unwrap();
        s.create("norm.weight", &[6], None, ShardLayout::Contiguous, Init::Ones).unwrap();
        s
    }

    /// The values drawn together on all cores are the ones each parameter's own stream gives
    /// (`init_full`, then this rank's shard), for every batch size.
    #[test]
    fn parallel_draws_give_each_parameters_own_stream() {
        for (rank, size) in [(0, 1), (1, 2)] {
            for batch in [1, 80, INIT_BATCH_BYTES] {
                let mut s = store(rank, size);
                // Until drawn, the random parameters hold zeros (ones for the norm).
                let w = s.get("a.weight").unwrap().var.as_tensor().clone();
                assert_eq!(w.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
                s.draw_pending(batch).unwrap();
                assert!(s.pending.is_empty());
                let tp = TpCoord { rank, size };
                for p in s.params() {
                    let init = match p.name.as_str() {
                        "a.weight" => Init::Normal(0.02),
                        "fc1.weight" => Init::Normal(0.5),
                        "proj.weight" => Init::Normal(0.1),
                        "proj.bias" => Init::Zeros,
                        _ => Init::Ones,
                    };
                    let full =
                        init_full(&p.name, &p.global_shape, init, 17, DType::F32, &Device::Cpu)
                            .unwrap();
                    let want = shard_of(&full, p.partition_dim, p.layout, tp).unwrap();
                    let got = p.var.as_tensor();
                    assert_eq!(got.dims(), want.dims(), "{}", p.name);
                    let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{} batch {batch}", p.name);
                }
                // Drawn values, not zeros: the shard's sum of squares is that of normals.
                assert!(w.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
            }
        }
    }
}
