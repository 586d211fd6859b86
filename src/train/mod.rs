//! Training: the loop and its parts.
pub mod tensorboard;
