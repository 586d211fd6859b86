//! Gradient buckets reduced while backward still runs (`ddp.overlap_grad_reduce`), as
//! megatron-core's `DistributedDataParallel` does with its per-parameter backward hooks.
//!
//! The layers with a written-out backward and the recomputed segments hand their parameter
//! gradients to the step's side sink ([`RecomputeGrads`]) as backward reaches them, last layer
//! first, and the buffer lays parameters out back to front, so buckets fill up in order. A
//! bucket can be reduced once every one of its parameters has had the last push of the step.
//! How many pushes that is, and which parameters get their gradient from candle's autograd
//! instead (that store arrives only when `backward()` returns), is learned on the first step,
//! which reduces everything after backward as before; later steps with the same number of
//! micro-batches start each eligible bucket's collective from inside backward, on a
//! communicator of its own ([`crate::parallel::ProcessGroups::dp_cp_grads`]). A push that
//! arrives after its bucket was started is an error, never a silently wrong gradient.
//!
//! Over NCCL that communicator runs on a side stream, and the training thread only enqueues
//! (each collective waits for the compute stream's work up to its bucket's packing); on the
//! CPU backends the collectives run on a communication thread.
//!
//! [`RecomputeGrads`]: crate::model::recompute::RecomputeGrads

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, TensorId, Var};

use super::buckets::BufferLayout;
use super::flights::{Collective, Flights};
use super::reducer::pack;
use crate::model::recompute::PushObserver;
use crate::parallel::comm::{Communicator, ReduceOp};
use crate::train::grads::GradAccumulator;

/// What the first step of a micro-batch count taught.
struct Learned {
    micro_batches: usize,
    /// Side-sink pushes per parameter per step.
    pushes: Vec<usize>,
    /// Per bucket: every parameter's gradient comes through the side sink only.
    early: Vec<bool>,
}

/// The current step.
#[derive(Default)]
struct StepState {
    micro_batches: usize,
    pushes: Vec<usize>,
    started: Vec<bool>,
    /// Buckets may start during backward (a learned step with this micro-batch count).
    armed: bool,
    /// Parameters whose gradient came from autograd's store (learning step).
    from_store: Vec<bool>,
}

struct State {
    layout: BufferLayout,
    /// (buffer, bucket) in reduction order.
    buckets: Vec<(usize, usize)>,
    vars: Vec<Var>,
    names: Vec<String>,
    index: HashMap<TensorId, usize>,
    /// Per parameter: its position in `buckets`.
    bucket_of: Vec<usize>,
    /// Per parameter: never reduced before backward ends (a tied embedding copy that the
    /// pipeline's embedding group sums first).
    late: Vec<bool>,
    /// Factor applied before the collective.
    pre: f64,
    device: Device,
    learned: Option<Learned>,
    /// What the last learning step found, until the trainer logs it.
    report: Option<OverlapReport>,
    step: StepState,
    flights: Flights,
}

/// The overlap state of one run's gradient reduction; see the module docs.
pub struct BackwardOverlap {
    state: Mutex<State>,
}

impl std::fmt::Debug for BackwardOverlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackwardOverlap")
    }
}

/// Per-step counts of what overlapped, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlapReport {
    /// Buckets that may start during backward.
    pub eligible: usize,
    /// All buckets.
    pub buckets: usize,
}

impl BackwardOverlap {
    /// `vars` and `names` in the optimizer's (layout's caller's) order; `late[i]`: parameter
    /// `i` is summed over the pipeline's embedding group after backward, so its bucket waits.
    pub fn new(
        layout: BufferLayout,
        named: &[(String, Var)],
        late: Vec<bool>,
        comm: Arc<dyn Communicator>,
        kind: Collective,
        pre: f64,
    ) -> Self {
        let buckets = layout.buckets();
        let mut bucket_of = vec![0; named.len()];
        for (i, &(b, k)) in buckets.iter().enumerate() {
            let buf = &layout.buffers[b];
            for span in &buf.params[buf.buckets[k].params.clone()] {
                bucket_of[span.index] = i;
            }
        }
        let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
        let device = vars.first().map_or(Device::Cpu, |v| v.device().clone());
        let state = State {
            index: vars.iter().enumerate().map(|(i, v)| (v.id(), i)).collect(),
            names: named.iter().map(|(n, _)| n.clone()).collect(),
            vars,
            bucket_of,
            late,
            layout,
            buckets,
            pre,
            device,
            learned: None,
            report: None,
            step: StepState::default(),
            flights: Flights::new(comm, kind),
        };
        Self { state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a step of `micro_batches` micro-batches. Collectives left from a step that
    /// ended early (a skipped update) are waited for and dropped.
    pub fn begin_step(&self, micro_batches: usize) -> Result<()> {
        let mut s = self.lock();
        s.flights.collect()?;
        let n = s.vars.len();
        let armed = s.learned.as_ref().is_some_and(|l| l.micro_batches == micro_batches);
        s.step = StepState {
            micro_batches,
            pushes: vec![0; n],
            started: vec![false; s.buckets.len()],
            armed,
            from_store: vec![false; n],
        };
        Ok(())
    }

    /// Called once backward is over, before the side sink's sum joins `acc`: `acc` holds
    /// exactly the gradients that came through autograd's store.
    pub fn backward_done(&self, acc: &GradAccumulator) -> Result<()> {
        let mut s = self.lock();
        let fed: Vec<bool> = acc.iter().map(|(_, g)| g.is_some()).collect();
        if s.step.armed {
            for (p, &f) in fed.iter().enumerate() {
                if f && s.step.started[s.bucket_of[p]] {
                    candle_core::bail!(
                        "data-parallel overlap: autograd produced a gradient of {} after its \
                         bucket was reduced (it came through the side sink on the first step)",
                        s.names[p]
                    );
                }
            }
        }
        s.step.from_store = fed;
        Ok(())
    }

    /// The reduced bucket of every position in [`BufferLayout::buckets`] order, as the
    /// collective left it (before the master-dtype conversion and the post factor): buckets
    /// not started during backward are packed from `acc` and started now. Ends the step;
    /// a learning step learns here ([`Self::take_report`]). `kind` and `pre` must be those
    /// given to [`Self::new`]; `agree` checks that every rank learned the same.
    pub fn finish(
        &self,
        acc: &mut GradAccumulator,
        kind: Collective,
        pre: f64,
        agree: &dyn Communicator,
    ) -> Result<Vec<Tensor>> {
        let mut s = self.lock();
        let s = &mut *s;
        if kind != s.flights.kind() || pre != s.pre {
            candle_core::bail!(
                "data-parallel overlap: set up for {:?} with factor {}, asked for {kind:?} with {pre}",
                s.flights.kind(),
                s.pre
            );
        }
        let mut grads: Vec<Option<Tensor>> = acc.iter_mut().map(|(_, g)| g.take()).collect();
        for i in 0..s.buckets.len() {
            if s.step.started[i] {
                continue;
            }
            let (b, k) = s.buckets[i];
            let t = pack(&s.layout.buffers[b], k, &mut grads, &s.device, s.pre)?;
            s.flights.start(i, t)?;
            s.step.started[i] = true;
        }
        let mut out: Vec<Option<Tensor>> = vec![None; s.buckets.len()];
        for (b, t) in s.flights.collect()? {
            out[b] = Some(t);
        }
        if !s.step.armed {
            s.report = Some(s.learn(agree)?);
        }
        Ok(out.into_iter().map(|t| t.expect("every bucket was started")).collect())
    }

    /// What the last learning step found, once.
    pub fn take_report(&self) -> Option<OverlapReport> {
        self.lock().report.take()
    }
}

impl State {
    /// Learns this step's pushes and the buckets that may start early; every rank must have
    /// learned the same, or none overlaps (the collectives must start in the same order).
    fn learn(&mut self, agree: &dyn Communicator) -> Result<OverlapReport> {
        let step = &self.step;
        let mut early = vec![true; self.buckets.len()];
        for p in 0..self.vars.len() {
            if step.from_store[p] || self.late[p] {
                early[self.bucket_of[p]] = false;
            }
        }
        // A bucket without any pushed gradient has nothing to wait for, nor anything to start
        // it during backward: it goes with the rest afterwards.
        for (i, e) in early.iter_mut().enumerate() {
            let pushed = (0..self.vars.len()).any(|p| self.bucket_of[p] == i && step.pushes[p] > 0);
            *e &= pushed;
        }
        let fingerprint = fingerprint(&step.pushes, &early);
        let t = Tensor::new(&[fingerprint, -fingerprint], &Device::Cpu)?;
        let max = agree.all_reduce(&t, ReduceOp::Max)?.to_vec1::<f64>()?;
        let same = max[0] == fingerprint && -max[1] == fingerprint;
        if !same {
            early.iter_mut().for_each(|e| *e = false);
        }
        let report =
            OverlapReport { eligible: early.iter().filter(|&&e| e).count(), buckets: early.len() };
        self.learned =
            Some(Learned { micro_batches: step.micro_batches, pushes: step.pushes.clone(), early });
        Ok(report)
    }

    /// Counts a push of parameter `p`: an error once `p`'s bucket has started.
    fn count_push(&mut self, p: usize) -> Result<()> {
        self.step.pushes[p] += 1;
        let b = self.bucket_of[p];
        if self.step.armed && self.step.started[b] {
            candle_core::bail!(
                "data-parallel overlap: a gradient of {} arrived after its bucket was reduced \
                 (push {} of the step; the first step had {})",
                self.names[p],
                self.step.pushes[p],
                self.learned.as_ref().map_or(0, |l| l.pushes[p])
            );
        }
        Ok(())
    }

    /// Whether bucket `i` has every gradient it waits for.
    fn ready(&self, i: usize) -> bool {
        let Some(l) = &self.learned else { return false };
        if !self.step.armed || self.step.started[i] || !l.early[i] {
            return false;
        }
        let (b, k) = self.buckets[i];
        let buf = &self.layout.buffers[b];
        buf.params[buf.buckets[k].params.clone()]
            .iter()
            .all(|span| self.step.pushes[span.index] == l.pushes[span.index])
    }

    /// Packs bucket `i` from the sink's sum (taking its gradients out) and starts it.
    fn start_from_sum(&mut self, i: usize, sum: &mut GradStore) -> Result<()> {
        let (b, k) = self.buckets[i];
        let buf = &self.layout.buffers[b];
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        for span in &buf.params[buf.buckets[k].params.clone()] {
            grads[span.index] = sum.remove(self.vars[span.index].as_tensor());
        }
        let t = pack(buf, k, &mut grads, &self.device, self.pre)?;
        self.flights.start(i, t)?;
        self.step.started[i] = true;
        Ok(())
    }
}

impl PushObserver for BackwardOverlap {
    fn pushed(&self, ids: &[TensorId], sum: &mut GradStore) -> Result<()> {
        let mut s = self.lock();
        let mut touched = Vec::new();
        for id in ids {
            if let Some(&p) = s.index.get(id) {
                s.count_push(p)?;
                touched.push(s.bucket_of[p]);
            }
        }
        // Every rank sees the same pushes in the same order; starting the ready buckets in
        // bucket order keeps the collectives in the same order on every rank.
        touched.sort_unstable();
        touched.dedup();
        for i in touched {
            if s.ready(i) {
                s.start_from_sum(i, sum)?;
            }
        }
        Ok(())
    }
}

/// A value that differs (with high probability) between different push counts or eligible
/// sets, exact in an f64.
fn fingerprint(pushes: &[usize], early: &[bool]) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |v: u64| {
        h ^= v;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    pushes.iter().for_each(|&p| mix(p as u64));
    early.iter().for_each(|&e| mix(u64::from(e) + 7));
    (h >> 11) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::recompute::RecomputeGrads;
    use crate::parallel::comm::LocalWorld;
    use crate::parallel::ddp::LayoutOptions;
    use candle_core::DType;
    use std::time::Duration;

    const SHAPES: [&[usize]; 3] = [&[6, 5], &[7], &[3, 4]];

    /// Rank `rank`'s gradient of parameter `p` in step `step`.
    fn grad(rank: usize, step: usize, p: usize, n: usize) -> Vec<f32> {
        (0..n).map(|i| (step * 10_000 + rank * 1000 + p * 100 + i) as f32).collect()
    }

    fn store(var: &Var, values: Vec<f32>) -> GradStore {
        let mut g = GradStore::default();
        g.insert(var, Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap());
        g
    }

    impl BackwardOverlap {
        fn started(&self) -> usize {
            self.lock().step.started.iter().filter(|&&s| s).count()
        }
    }

    /// Two in-process ranks, one micro-batch per step, gradients pushed last parameter first
    /// as backward pushes them. The first step learns; on the second each bucket starts as
    /// soon as its last gradient is pushed, and the all-reduced buckets equal the sums of
    /// both ranks' gradients. Parameter 0 can come through autograd's store instead: then
    /// its bucket waits for the end of backward. A push beyond the learned count is an error.
    #[test]
    fn buckets_start_when_their_last_gradient_arrives() {
        for from_store in [false, true] {
            LocalWorld::run(2, Duration::from_secs(20), |rank, world| {
                let grads_group: Arc<dyn Communicator> =
                    Arc::new(world.group(rank, "dp_cp_grads", &[0, 1])?);
                let dp = world.world_group(rank)?;
                let named: Vec<(String, Var)> = SHAPES
                    .iter()
                    .enumerate()
                    .map(|(i, s)| Ok((format!("p{i}"), Var::zeros(*s, DType::F32, &Device::Cpu)?)))
                    .collect::<Result<_>>()?;
                let shapes: Vec<(Vec<usize>, DType)> =
                    SHAPES.iter().map(|s| (s.to_vec(), DType::F32)).collect();
                let opts = LayoutOptions {
                    dp: 2,
                    bucket_size: Some(5),
                    distributed_optimizer: false,
                    pad_for_high_nccl_busbw: false,
                    grad_reduce_in_fp32: true,
                };
                let layout = BufferLayout::new(&shapes, &opts);
                let buckets = layout.buckets();
                anyhow::ensure!(buckets.len() == 3, "one bucket per parameter: {buckets:?}");
                let o = Arc::new(BackwardOverlap::new(
                    layout.clone(),
                    &named,
                    vec![false; 3],
                    grads_group,
                    Collective::AllReduce,
                    1.0,
                ));
                let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
                let mut acc = GradAccumulator::new(vars.clone());
                let n = |p: usize| vars[p].elem_count();
                let mut started_after_each_push = Vec::new();
                for step in 0..2 {
                    o.begin_step(1)?;
                    acc.clear();
                    let sink = RecomputeGrads::observed(o.clone());
                    for p in [2, 1] {
                        sink.push(store(&vars[p], grad(rank, step, p, n(p))))?;
                        started_after_each_push.push(o.started());
                    }
                    let g0 = store(&vars[0], grad(rank, step, 0, n(0)));
                    if from_store {
                        acc.accumulate(&g0)?;
                    } else {
                        sink.push(g0)?;
                        started_after_each_push.push(o.started());
                    }
                    o.backward_done(&acc)?;
                    acc.add(&sink.take())?;
                    let flats = o.finish(&mut acc, Collective::AllReduce, 1.0, &dp)?;
                    let report = o.take_report();
                    if step == 0 {
                        let eligible = if from_store { 2 } else { 3 };
                        anyhow::ensure!(
                            report == Some(OverlapReport { eligible, buckets: 3 }),
                            "{report:?}"
                        );
                    }
                    for (&(b, k), flat) in buckets.iter().zip(&flats) {
                        let buf = &layout.buffers[b];
                        let span = &buf.params[buf.buckets[k].params.clone()][0];
                        let p = span.index;
                        let want: Vec<f32> = grad(0, step, p, n(p))
                            .iter()
                            .zip(grad(1, step, p, n(p)))
                            .map(|(a, b)| a + b)
                            .collect();
                        anyhow::ensure!(flat.to_vec1::<f32>()? == want, "step {step} p{p}");
                    }
                }
                // Learning step: nothing starts during backward. Then p2's bucket, then p1's
                // (and p0's unless its gradient comes from the store).
                let want: Vec<usize> =
                    if from_store { vec![0, 0, 1, 2] } else { vec![0, 0, 0, 1, 2, 3] };
                anyhow::ensure!(started_after_each_push == want, "{started_after_each_push:?}");
                // A third step that pushes p2 twice.
                o.begin_step(1)?;
                let sink = RecomputeGrads::observed(o.clone());
                sink.push(store(&vars[2], grad(rank, 2, 2, n(2))))?;
                let err = sink.push(store(&vars[2], grad(rank, 2, 2, n(2)))).unwrap_err();
                anyhow::ensure!(
                    err.to_string().contains("p2 arrived after its bucket was reduced"),
                    "{err}"
                );
                o.begin_step(1)?;
                Ok(())
            })
            .unwrap();
        }
    }
}
