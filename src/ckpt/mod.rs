//! Checkpoints: `iter_0000100/` directories of safetensors shards with a JSON index, written
//! atomically (temp dir → fsync → rename → tracker last) so a crash never leaves a half
//! checkpoint that loads.
//!
//! ```text
//! <save>/
//!   latest_checkpointed_iteration.txt   # written last (Megatron-LM compatible)
//!   latest_train_state.json
//!   iter_0000100/
//!     model/shard_tp00_pp00.safetensors  # this rank's tensors, Megatron names
//!     model/index.json                   # global shape, dtype, partition, shard files + CRC-32C
//!     optimizer/shard_tp00_pp00_dp00.safetensors (+ index.json)
//!     scheduler.json  rng.json  train_state.json  run_config.toml  tokenizer/
//! ```
pub mod format;
pub mod layout;
pub mod save;
pub mod shard_io;
pub mod state;

pub use format::{
    find_checkpoint, is_complete, iter_dir_name, load_tensors, model_shard_name, prune_old,
    read_index, read_json, read_tracker, write_shard_files, CheckpointWrite, Index, IndexEntry,
    ShardFile, TensorSet,
};
pub use layout::{Partition, ShardedParam};
pub use save::{
    save_checkpoint, save_checkpoint_with, AsyncSaver, OwnedCheckpoint, SavedCheckpoint,
};
pub use state::TrainState;
