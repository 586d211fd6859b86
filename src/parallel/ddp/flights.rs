//! Bucket collectives started without waiting for them, collected later in start order:
//! the gradient reduction during backward ([`super::overlap`]) and the distributed
//! optimizer's parameter all-gathers during its step.
//!
//! Over a communicator whose collectives only enqueue on a stream of their own (NCCL on a
//! side stream) they are issued from the calling thread, and collecting joins that stream
//! into the compute stream; over one that computes (the CPU backends) they run in order on a
//! communication thread.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Result, Tensor};

use crate::parallel::comm::{Communicator, ReduceOp};

/// The collective a bucket gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// Replicated optimizer: every rank gets the sum.
    AllReduce,
    /// Distributed optimizer: every rank gets its shard of the sum.
    ReduceScatter,
    /// Distributed optimizer: every rank gets the concatenation of the updated shards.
    AllGather,
}

impl Collective {
    pub(super) fn run(self, comm: &dyn Communicator, t: &Tensor) -> Result<Tensor> {
        match self {
            Collective::AllReduce => comm.all_reduce(t, ReduceOp::Sum),
            Collective::ReduceScatter => comm.reduce_scatter(t, 0),
            Collective::AllGather => comm.all_gather(t, 0),
        }
    }
}

/// A thread that runs collectives of a computing (CPU) communicator in submission order.
struct Worker {
    jobs: Option<Sender<Tensor>>,
    results: Receiver<Result<Tensor>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(comm: Arc<dyn Communicator>, kind: Collective) -> Self {
        let (jobs, inbox) = channel::<Tensor>();
        let (done, results) = channel();
        let thread = std::thread::Builder::new()
            .name("bucket-collectives".into())
            .spawn(move || {
                for t in inbox {
                    if done.send(kind.run(&*comm, &t)).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning the bucket communication thread");
        Self { jobs: Some(jobs), results, thread: Some(thread) }
    }

    fn gone() -> candle_core::Error {
        candle_core::Error::Msg("the bucket communication thread stopped".into())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A started collective.
enum Flight {
    /// Enqueued on the group's own stream: the input stays alive until the compute stream
    /// has joined that stream.
    Enqueued { _input: Tensor, output: Tensor },
    /// Submitted to the worker, whose results come back in submission order.
    OnWorker,
}

/// Collectives started and not yet collected.
pub struct Flights {
    comm: Arc<dyn Communicator>,
    kind: Collective,
    worker: Option<Worker>,
    /// (bucket, flight) in start order.
    started: Vec<(usize, Flight)>,
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flights({:?} on {})", self.kind, self.comm.describe())
    }
}

impl Flights {
    /// `kind` collectives over `comm` (a thread is started unless `comm` only enqueues).
    pub fn new(comm: Arc<dyn Communicator>, kind: Collective) -> Self {
        let worker = (!comm.enqueues_only()).then(|| Worker::start(comm.clone(), kind));
        Self { comm, kind, worker, started: Vec::new() }
    }

    pub fn kind(&self) -> Collective {
        self.kind
    }

    /// Starts the collective of `bucket` on `t` (kept alive until collected).
    pub fn start(&mut self, bucket: usize, t: Tensor) -> Result<()> {
        let flight = match &self.worker {
            None => Flight::Enqueued { output: self.kind.run(&*self.comm, &t)?, _input: t },
            Some(w) => {
                w.jobs.as_ref().ok_or_else(Worker::gone)?.send(t).map_err(|_| Worker::gone())?;
                Flight::OnWorker
            }
        };
        self.started.push((bucket, flight));
        Ok(())
    }

    /// Every started collective's result, as (bucket, tensor) in start order.
    pub fn collect(&mut self) -> Result<Vec<(usize, Tensor)>> {
        let started = std::mem::take(&mut self.started);
        if self.worker.is_none() && !started.is_empty() {
            self.comm.join_compute()?;
        }
        started
            .into_iter()
            .map(|(b, f)| match f {
                Flight::Enqueued { output, .. } => Ok((b, output)),
                Flight::OnWorker => {
                    let w = self.worker.as_ref().ok_or_else(Worker::gone)?;
                    Ok((b, w.results.recv().map_err(|_| Worker::gone())??))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::comm::LocalWorld;
    use candle_core::Device;
    use std::time::Duration;

    /// Over the CPU backend the collectives run on the thread; results come back in start
    /// order whatever the bucket numbers, and a failed collective is an error at collection.
    #[test]
    fn results_come_back_in_start_order_and_failures_are_errors() {
        LocalWorld::run(2, Duration::from_secs(10), |rank, world| {
            let comm: Arc<dyn Communicator> = Arc::new(world.world_group(rank)?);
            let mut f = Flights::new(comm, Collective::AllGather);
            for b in [2usize, 0, 1] {
                f.start(b, Tensor::new(&[(10 * b + rank) as f32], &Device::Cpu)?)?;
            }
            let got: Vec<(usize, Vec<f32>)> = f
                .collect()?
                .into_iter()
                .map(|(b, t)| Ok((b, t.to_vec1::<f32>()?)))
                .collect::<Result<_>>()?;
            let want: Vec<(usize, Vec<f32>)> = [2usize, 0, 1]
                .iter()
                .map(|&b| (b, vec![(10 * b) as f32, (10 * b + 1) as f32]))
                .collect();
            anyhow::ensure!(got == want, "{got:?}");
            // Shapes that differ between the ranks: the collective fails on both.
            let n = 1 + rank;
            f.start(0, Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu)?)?;
            anyhow::ensure!(f.collect().is_err(), "a failed collective must be an error");
            Ok(())
        })
        .unwrap();
    }
}
