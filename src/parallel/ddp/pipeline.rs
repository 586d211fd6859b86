//! Runs one collective per bucket, optionally on a communication thread: the distributed
//! optimizer's parameter all-gathers (`overlap_param_gather`), where the main thread writes
//! back bucket i while the communication thread gathers bucket i+1. (Gradient reduction has
//! its own overlap, started during backward: [`super::overlap`].)

use std::sync::mpsc;

use candle_core::{Result, Tensor};

/// For every bucket `i` in `0..n`: `produce(i)` builds its input, `collective` runs on it, and
/// `consume(i, out)` takes the result, always in bucket order.
pub fn run_buckets(
    n: usize,
    overlap: bool,
    mut produce: impl FnMut(usize) -> Result<Tensor>,
    collective: impl Fn(&Tensor) -> Result<Tensor> + Sync,
    mut consume: impl FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    if !overlap || n < 2 {
        for i in 0..n {
            let t = produce(i)?;
            consume(i, collective(&t)?)?;
        }
        return Ok(());
    }
    std::thread::scope(|s| {
        let (to_comm, inbox) = mpsc::channel::<Tensor>();
        let (done, results) = mpsc::channel::<Result<Tensor>>();
        let collective = &collective;
        s.spawn(move || {
            for t in inbox {
                let r = collective(&t);
                let failed = r.is_err();
                if done.send(r).is_err() || failed {
                    break;
                }
            }
        });
        let mut consumed = 0;
        for i in 0..n {
            if to_comm.send(produce(i)?).is_err() {
                // The thread stopped on a failed collective: report that failure.
                return Err(results
                    .try_iter()
                    .find_map(|r| r.err())
                    .unwrap_or_else(comm_thread_gone));
            }
            // Unpack whatever already came back while later buckets are in flight.
            while let Ok(r) = results.try_recv() {
                consume(consumed, r?)?;
                consumed += 1;
            }
        }
        drop(to_comm);
        while consumed < n {
            let r = results.recv().map_err(|_| comm_thread_gone())?;
            consume(consumed, r?)?;
            consumed += 1;
        }
        Ok(())
    })
}

fn comm_thread_gone() -> candle_core::Error {
    candle_core::Error::Msg("the gradient communication thread stopped early".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn results_come_back_in_bucket_order_with_and_without_overlap() {
        for overlap in [false, true] {
            let mut seen = Vec::new();
            run_buckets(
                5,
                overlap,
                |i| Tensor::new(&[i as f32], &Device::Cpu),
                |t| t.affine(2.0, 1.0),
                |i, t| {
                    seen.push((i, t.to_vec1::<f32>()?[0]));
                    Ok(())
                },
            )
            .unwrap();
            let want: Vec<(usize, f32)> = (0..5).map(|i| (i, 2.0 * i as f32 + 1.0)).collect();
            assert_eq!(seen, want);
        }
    }

    #[test]
    fn a_failing_collective_is_an_error() {
        let r = run_buckets(
            3,
            true,
            |i| Tensor::new(&[i as f32], &Device::Cpu),
            |_| candle_core::bail!("peer went away"),
            |_, _| Ok(()),
        );
        assert!(r.unwrap_err().to_string().contains("peer went away"));
    }
}
