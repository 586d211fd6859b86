//! Running one global batch through this rank's model chunks in pipeline-schedule order
//! ([`crate::parallel::pipeline::schedule`]), with the neighbour exchanges where
//! [`crate::parallel::pipeline::plan`] puts them, and the tied-embedding gradient all-reduce
//! between the first and last pipeline stage.
//!
//! A chunk that does not embed starts from the received activation made a leaf variable, so
//! its backward yields the gradient to send back; a chunk that does not end in the loss runs
//! backward from the received gradient `g` as `(output · g).sum().backward()`, whose gradient
//! at `output` is exactly `g`. With PP=1 this is the plain per-micro-batch
//! forward/backward loop.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

use super::grads::{GradAccumulator, GradSource, GradSourceMut};
use crate::model::recompute::RecomputeGrads;
use crate::model::{ForwardOpts, GptModel, Microbatch};
use crate::ops::timing::section;
use crate::ops::DropoutRng;
use crate::parallel::comm::{Communicator, ReduceOp};
use crate::parallel::ddp::BackwardOverlap;
use crate::parallel::pipeline::plan::{plan, Payload, Step, Transfer};
use crate::parallel::pipeline::{Op, PipelineP2p, ScheduleSpec};
use crate::profiling::Range;

/// This rank's share of a pipelined model and how to reach its neighbours.
pub(crate) struct Pipeline<'a> {
    /// Model chunks in virtual-stage order (one without virtual pipelining).
    pub chunks: &'a [GptModel],
    /// Neighbour transfers; None when PP=1.
    pub p2p: Option<&'a PipelineP2p>,
    /// `microbatch_group_size_per_vp_stage` (interleaved schedule only).
    pub microbatch_group_size: usize,
}

/// What the training schedule needs besides the micro-batches.
pub(crate) struct TrainHooks<'a> {
    /// Dropout stream of (chunk, micro-batch); None disables dropout.
    pub dropout: &'a dyn Fn(usize, usize) -> Option<DropoutRng>,
    /// The tensor to back-propagate from micro-batch `i`'s `(Σ CE, Σ tokens)`: `(i, sum, count)`.
    pub objective: &'a dyn Fn(usize, Tensor, f64) -> Result<Tensor>,
    /// The data-parallel reduction that starts buckets during backward (it sees every push
    /// into the step's side sink).
    pub overlap: Option<&'a Arc<BackwardOverlap>>,
}

/// (payload, chunk, micro-batch) of a boundary tensor.
type TransferKey = (Payload, usize, usize);

/// A forward whose backward is still to come.
struct Pending {
    microbatch: usize,
    /// The received input activation (None on the chunk that embeds).
    input: Option<Var>,
    /// Chunk output, or the objective on the chunk that ends in the loss.
    output: Tensor,
}

impl Pipeline<'_> {
    fn spec(&self, micro: usize, forward_only: bool) -> ScheduleSpec {
        ScheduleSpec {
            pp_size: self.p2p.map_or(1, |p| p.size()),
            pp_rank: self.p2p.map_or(0, |p| p.rank()),
            num_microbatches: micro,
            num_chunks: self.chunks.len(),
            microbatch_group_size: self.microbatch_group_size,
            forward_only,
        }
    }

    /// Forward and backward of every micro-batch, gradients summed into `acc` (forwards
    /// only when `acc` is None, e.g. a skipped iteration). Returns each micro-batch's Σ CE, in
    /// micro-batch order, and Σ tokens on the rank that computes the loss (nothing and 0 on
    /// the others).
    pub fn train_batch(
        &self,
        micro: &[Microbatch],
        hooks: &TrainHooks,
        mut acc: Option<&mut GradAccumulator>,
    ) -> Result<(Vec<f64>, f64)> {
        let steps = plan(&self.spec(micro.len(), acc.is_none()))?;
        let mut pending: Vec<VecDeque<Pending>> =
            self.chunks.iter().map(|_| VecDeque::new()).collect();
        // Tensors waiting to be sent / received ones waiting for their pass, keyed by
        // (payload, chunk, micro-batch).
        let mut outbox: HashMap<TransferKey, Tensor> = HashMap::new();
        let mut inbox: HashMap<TransferKey, Tensor> = HashMap::new();
        // Each micro-batch's loss sum stays on the device until the schedule is queued: read
        // back at once it would wait for the forward, and the GPU would idle while the host
        // queues the backward.
        let (mut loss_sums, mut tokens) = (Vec::new(), 0.0);
        // Parameter gradients produced outside the graph (recomputed segments, explicit
        // layers) of every micro-batch, summed as they arrive; only when backwards follow.
        let fused = self.chunks.iter().all(GptModel::accumulation_fusion);
        let side_grads = acc.as_ref().map(|_| {
            match hooks.overlap {
                Some(o) => RecomputeGrads::observed(o.clone()),
                None => RecomputeGrads::default(),
            }
            .with_accumulation_fusion(fused)
        });
        for step in steps {
            match step {
                Step::Exchange { sends, recvs } => {
                    self.exchange(micro, &sends, &recvs, &mut outbox, &mut inbox)?
                }
                Step::Run(Op::Forward { chunk, microbatch }) => {
                    let rng = (hooks.dropout)(chunk, microbatch);
                    let received = inbox.remove(&(Payload::Activation, chunk, microbatch));
                    let _range = Range::microbatch("forward", chunk, microbatch);
                    let (input, output, loss) = self.forward(
                        chunk,
                        &micro[microbatch],
                        received,
                        rng.as_ref(),
                        side_grads.as_ref(),
                    )?;
                    let output = match loss {
                        Some((sum, count)) => {
                            loss_sums.push(sum.detach().to_dtype(DType::F64)?.reshape(1)?);
                            tokens += count;
                            (hooks.objective)(microbatch, sum, count)?
                        }
                        None => {
                            outbox.insert((Payload::Activation, chunk, microbatch), output.clone());
                            output
                        }
                    };
                    if acc.is_some() {
                        pending[chunk].push_back(Pending { microbatch, input, output });
                    }
                }
                Step::Run(Op::Backward { chunk, microbatch }) => {
                    let acc = acc.as_deref_mut().context("backward pass without gradients")?;
                    let p = pending[chunk].pop_front().context("backward before its forward")?;
                    if p.microbatch != microbatch {
                        bail!(
                            "pipeline schedule out of order: chunk {chunk} runs backward of \
                             micro-batch {microbatch} before {}",
                            p.microbatch
                        );
                    }
                    let received = inbox.remove(&(Payload::Grad, chunk, microbatch));
                    let _range = Range::microbatch("backward", chunk, microbatch);
                    if let Some(g) = self.backward(chunk, p, received, acc)? {
                        outbox.insert((Payload::Grad, chunk, microbatch), g);
                    }
                }
            }
        }
        if let Some(((payload, chunk, mb), _)) = outbox.iter().chain(inbox.iter()).next() {
            bail!(
                "pipeline plan left the {payload:?} of chunk {chunk}, micro-batch {mb} \
                 unexchanged"
            );
        }
        if let (Some(acc), Some(side)) = (acc, &side_grads) {
            if let Some(o) = hooks.overlap {
                o.backward_done(acc)?;
            }
            // Moves them: the accumulator holds no other copy of these parameters' gradients.
            acc.add(&side.take())?;
        }
        // Read in one transfer, in micro-batch order.
        let sums = if loss_sums.is_empty() {
            Vec::new()
        } else {
            Tensor::cat(&loss_sums, 0)?.to_vec1()?
        };
        Ok((sums, tokens))
    }

    /// One exchange of the plan: the listed sends leave the outbox, the receives land in the
    /// inbox. Every boundary tensor (activation or its gradient) has the boundary shape.
    fn exchange(
        &self,
        micro: &[Microbatch],
        sends: &[Transfer],
        recvs: &[Transfer],
        outbox: &mut HashMap<TransferKey, Tensor>,
        inbox: &mut HashMap<TransferKey, Tensor>,
    ) -> Result<()> {
        let key = |t: &Transfer| (t.payload, t.chunk, t.microbatch);
        let out = sends
            .iter()
            .map(|t| {
                let x = outbox.remove(&key(t)).with_context(|| {
                    format!("pipeline plan sends a tensor no pass produced: {t:?}")
                })?;
                Ok((*t, x))
            })
            .collect::<Result<Vec<_>>>()?;
        let specs = recvs
            .iter()
            .map(|t| Ok((*t, self.boundary_shape(&micro[t.microbatch])?.into())))
            .collect::<Result<Vec<_>>>()?;
        let model = &self.chunks[0];
        let got = self.p2p().exchange(&out, &specs, model.dtype(), model.device())?;
        for (t, x) in recvs.iter().zip(got) {
            inbox.insert(key(t), x);
        }
        Ok(())
    }

    /// Forward-only schedule (evaluation): `(Σ CE, Σ tokens)` as [`Self::train_batch`].
    pub fn eval_batch(&self, micro: &[Microbatch]) -> Result<(f64, f64)> {
        let hooks =
            TrainHooks { dropout: &|_, _| None, objective: &|_, sum, _| Ok(sum), overlap: None };
        let (sums, tokens) = self.train_batch(micro, &hooks, None)?;
        Ok((sums.iter().sum(), tokens))
    }

    fn p2p(&self) -> &PipelineP2p {
        self.p2p.expect("a chunk without embedding or loss exists only with PP > 1")
    }

    /// Shape of the activation between chunks: `[b, s, h]`, or `[b, s/tp, h]` under sequence
    /// parallelism.
    fn boundary_shape(&self, mb: &Microbatch) -> Result<(usize, usize, usize)> {
        let (b, s) = mb.tokens.dims2()?;
        let m = &self.chunks[0];
        let sp = m.tensor_parallel().filter(|tp| tp.sequence_parallel()).map_or(1, |tp| tp.size());
        Ok((b, s / sp, m.arch().hidden))
    }

    /// Runs chunk `chunk` on `mb`: (input variable, output, loss on the last chunk).
    #[allow(clippy::type_complexity)]
    fn forward(
        &self,
        chunk: usize,
        mb: &Microbatch,
        received: Option<Tensor>,
        rng: Option<&DropoutRng>,
        recompute: Option<&RecomputeGrads>,
    ) -> Result<(Option<Var>, Tensor, Option<(Tensor, f64)>)> {
        let model = &self.chunks[chunk];
        // The step's side sink exists exactly when backwards follow: without one, the
        // forward is the last pass over this micro-batch (evaluation, a skipped step).
        let opts = ForwardOpts { no_grad: recompute.is_none(), ..mb.forward_opts(rng) };
        let input = if model.pre_process() {
            None
        } else {
            let t = received
                .with_context(|| format!("chunk {chunk}: no input activation was received"))?;
            Some(Var::from_tensor(&t)?)
        };
        let x = input.as_ref().map_or(&mb.tokens, |v| v.as_tensor());
        let (output, loss) = if model.post_process() {
            let (sum, count) = model.forward_stage_loss(x, &opts, recompute, mb)?;
            (sum.clone(), Some((sum, count)))
        } else {
            (model.forward_stage(x, &opts, recompute)?, None)
        };
        Ok((input, output, loss))
    }

    /// Backward of `p` from the loss or from the received output gradient; returns the
    /// gradient of the chunk's input activation (None on the chunk that embeds).
    fn backward(
        &self,
        chunk: usize,
        p: Pending,
        received: Option<Tensor>,
        acc: &mut GradAccumulator,
    ) -> Result<Option<Tensor>> {
        let model = &self.chunks[chunk];
        let grads = if model.post_process() {
            section("backward()", model.device(), || p.output.backward())?
        } else {
            let g = received
                .with_context(|| format!("chunk {chunk}: no output gradient was received"))?;
            section("backward()", model.device(), || (&p.output * g)?.sum_all()?.backward())?
        };
        let input_grad = p
            .input
            .as_ref()
            .map(|input| {
                grads.get(input.as_tensor()).cloned().with_context(|| {
                    format!("chunk {chunk}: no gradient reached its input activation")
                })
            })
            .transpose()?;
        section("grads.accumulate", model.device(), || acc.accumulate(&grads))?;
        Ok(input_grad)
    }
}

/// Megatron's `_allreduce_embedding_grads`: with tied embeddings and PP > 1, the first
/// stage's word embeddings and the last stage's copy (`output_layer.weight`) get the sum of
/// both gradients over the embedding group, so the two copies take identical steps. No-op
/// for untied models, PP=1 and middle stages.
pub(crate) fn all_reduce_embedding_grads(
    chunks: &[GptModel],
    acc: &mut GradAccumulator,
    embedding: Option<&dyn Communicator>,
) -> Result<()> {
    let Some(group) = embedding.filter(|g| g.size() > 1) else { return Ok(()) };
    if !chunks[0].arch().tied_embeddings {
        return Ok(());
    }
    let mut copies = Vec::new();
    for m in chunks {
        for p in m.params().params() {
            let first = m.pre_process() && p.name == "embedding.word_embeddings.weight";
            if first || p.shared_embedding {
                copies.push(p);
            }
        }
    }
    let [param] = copies.as_slice() else {
        bail!(
            "tied embeddings: expected one embedding copy on this rank of the {}, found {}",
            group.describe(),
            copies.len()
        );
    };
    // Under PEFT both copies are frozen (on both stages alike): nothing to synchronise.
    if !param.trainable {
        return Ok(());
    }
    let var = &param.var;
    let dtype = super::optimizer::master_dtype(var.dtype());
    // One dtype on both stages: with bf16 main grads the first stage's embedding gradient is
    // f32 (its scatter-add's) and the last stage's output-layer gradient bf16.
    let local = match acc.grad_of(var) {
        Some(g) => g.to_dtype(dtype)?,
        None => Tensor::zeros(var.shape(), dtype, var.device())?,
    };
    let sum = group.all_reduce(&local, ReduceOp::Sum)?;
    acc.set_grad(var, sum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::ModelConfig;
    use crate::model::recompute::RecomputeGrads;
    use crate::model::{eval_loss_for_microbatch, loss_for_microbatch_recompute, ParallelLayout};
    use candle_core::Device;

    /// The evaluation schedule (no backward follows) runs the forward-only layers: an FP8
    /// model's evaluation loss is its training forward's, not the recorded layers' (which
    /// run in the parameters' dtype).
    #[test]
    fn the_evaluation_schedule_runs_the_layers_forward_only() {
        let cfg = ModelConfig {
            num_layers: 2,
            fp8: Some("hybrid".into()),
            ..crate::model::one_block_config()
        };
        let dev = Device::Cpu;
        let model = GptModel::new(&cfg, ParallelLayout::single(), 5, DType::F64, &dev).unwrap();
        let rows: Vec<Vec<i64>> =
            (0..2).map(|r| (0..8).map(|i| (r * 7 + i * 3) % 32).collect()).collect();
        let labels: Vec<Vec<i64>> =
            rows.iter().map(|r| r.iter().map(|t| (t + 1) % 32).collect()).collect();
        let mask = vec![vec![1f32; 8]; 2];
        let mb = Microbatch::from_rows(&rows, &labels, &mask, None, &dev).unwrap();
        let chunks = [model];
        let pipeline = Pipeline { chunks: &chunks, p2p: None, microbatch_group_size: 1 };
        let (sum, tokens) = pipeline.eval_batch(std::slice::from_ref(&mb)).unwrap();
        let sink = RecomputeGrads::default();
        let (train_sum, _) = loss_for_microbatch_recompute(&chunks[0], &mb, None, &sink).unwrap();
        let (eval_sum, _) = eval_loss_for_microbatch(&chunks[0], &mb).unwrap();
        let train = train_sum.to_scalar::<f64>().unwrap();
        assert_eq!(tokens, 16.0);
        assert!((sum - train).abs() < 1e-12 * train, "schedule {sum} vs training forward {train}");
        assert_eq!(sum, eval_sum.to_scalar::<f64>().unwrap());
        // The recorded layers (a forward a backward could follow) skip the FP8 GEMMs.
        let (recorded, _) = crate::model::loss_for_microbatch(&chunks[0], &mb, None).unwrap();
        let recorded = recorded.to_scalar::<f64>().unwrap();
        assert!((recorded - train).abs() > 1e-6 * train, "FP8 changed nothing: {recorded}");
    }
}
