//! Stage-to-stage transfers: activations go to the next pipeline rank and their gradients
//! come back, in `model.pipeline_dtype` (the parameter dtype when unset).
//!
//! Every transfer of a [`super::plan`] exchange is issued as one group on the pipeline
//! communicator ([`Communicator::exchange`]), so a rank that sends its next activation while
//! its neighbour sends the previous gradient does not wait for the neighbour (NCCL sends
//! block until the receive is posted). Under the interleaved schedule the last rank's chunk c
//! feeds chunk c+1 of rank 0, so the neighbours wrap around.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};

use super::plan::Transfer;
use crate::parallel::comm::Communicator;

/// This rank's pipeline group and the wire dtype.
#[derive(Debug, Clone)]
pub struct PipelineP2p {
    comm: Arc<dyn Communicator>,
    wire_dtype: DType,
}

impl PipelineP2p {
    /// `comm` is the pipeline group (group rank = pipeline stage); tensors travel as
    /// `wire_dtype`.
    pub fn new(comm: Arc<dyn Communicator>, wire_dtype: DType) -> Self {
        Self { comm, wire_dtype }
    }

    /// This rank's pipeline stage.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of pipeline stages.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Dtype of every transfer.
    pub fn wire_dtype(&self) -> DType {
        self.wire_dtype
    }

    /// Sends each `(transfer, tensor)` to its peer and receives each `(transfer, shape)` from
    /// its peer, as one group; received tensors come back as `dtype` on `device`, in the
    /// order of `recvs`.
    pub fn exchange(
        &self,
        sends: &[(Transfer, Tensor)],
        recvs: &[(Transfer, Shape)],
        dtype: DType,
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        let wire: Vec<(Tensor, usize)> = sends
            .iter()
            .map(|(t, x)| Ok((x.to_dtype(self.wire_dtype)?.contiguous()?, t.peer)))
            .collect::<Result<_>>()?;
        let wire_refs: Vec<(&Tensor, usize)> = wire.iter().map(|(x, p)| (x, *p)).collect();
        let specs: Vec<(usize, Shape, DType)> =
            recvs.iter().map(|(t, s)| (t.peer, s.clone(), self.wire_dtype)).collect();
        self.comm
            .exchange(&wire_refs, &specs, device)?
            .into_iter()
            .map(|t| t.to_dtype(dtype))
            .collect()
    }
}
