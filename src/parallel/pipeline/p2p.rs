//! Stage-to-stage transfers: activations go to the next pipeline rank and their gradients
//! come back, in `model.pipeline_dtype` (the parameter dtype when unset).
//!
//! Activations and gradients travel on two communicators of the same pipeline group (two
//! message streams): with PP=2 both directions of a rank pair carry both kinds of tensors,
//! and a separate stream per kind keeps each one first-in first-out whatever the schedule.
//! Under the interleaved schedule the last rank's chunk c feeds chunk c+1 of rank 0, so the
//! neighbours wrap around.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};

use crate::parallel::comm::Communicator;

/// This rank's pipeline neighbours and the wire dtype.
#[derive(Debug, Clone)]
pub struct PipelineP2p {
    /// Activations (forward direction).
    forward: Arc<dyn Communicator>,
    /// Gradients of activations (backward direction).
    backward: Arc<dyn Communicator>,
    wire_dtype: DType,
}

impl PipelineP2p {
    /// `forward` and `backward` are two communicators over the same pipeline group (group
    /// rank = pipeline stage); tensors travel as `wire_dtype`.
    pub fn new(
        forward: Arc<dyn Communicator>,
        backward: Arc<dyn Communicator>,
        wire_dtype: DType,
    ) -> Result<Self> {
        if forward.size() != backward.size() || forward.rank() != backward.rank() {
            candle_core::bail!(
                "pipeline communicators differ: {} vs {}",
                forward.describe(),
                backward.describe()
            );
        }
        Ok(Self { forward, backward, wire_dtype })
    }

    /// This rank's pipeline stage.
    pub fn rank(&self) -> usize {
        self.forward.rank()
    }

    /// Number of pipeline stages.
    pub fn size(&self) -> usize {
        self.forward.size()
    }

    /// Dtype of every transfer.
    pub fn wire_dtype(&self) -> DType {
        self.wire_dtype
    }

    fn next(&self) -> usize {
        (self.rank() + 1) % self.size()
    }

    fn prev(&self) -> usize {
        (self.rank() + self.size() - 1) % self.size()
    }

    /// Sends a chunk's output activation to the next stage.
    pub fn send_forward(&self, activation: &Tensor) -> Result<()> {
        self.forward.send(&activation.to_dtype(self.wire_dtype)?.contiguous()?, self.next())
    }

    /// Receives this chunk's input activation of `shape` from the previous stage, as `dtype`.
    pub fn recv_forward(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        self.forward.recv(self.prev(), shape, self.wire_dtype, device)?.to_dtype(dtype)
    }

    /// Sends the gradient of a chunk's input back to the previous stage.
    pub fn send_backward(&self, grad: &Tensor) -> Result<()> {
        self.backward.send(&grad.to_dtype(self.wire_dtype)?.contiguous()?, self.prev())
    }

    /// Receives the gradient of this chunk's output of `shape` from the next stage.
    pub fn recv_backward(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        self.backward.recv(self.next(), shape, self.wire_dtype, device)?.to_dtype(dtype)
    }
}
