//! Checkpoints: `iter_0000100/` directories of safetensors shards with a JSON index, written
//! atomically (temp dir → fsync → rename → tracker last) so a crash never leaves a half
//! checkpoint that loads. In a multi-rank run each rank writes its own shards and rank 0
//! writes the index from the sizes and checksums the ranks report ([`save`]).
//!
//! ```text
//! <save>/
//!   latest_checkpointed_iteration.txt   # written last (Megatron-LM compatible)
//!   latest_train_state.json
//!   iter_0000100/
//!     model/shard_tp00_pp00.safetensors  # one (tp, pp) position's tensors, Megatron names
//!     model/index.json                   # global shape, dtype, partition, shard files + CRC-32C
//!     optimizer/shard_tp00_pp00.safetensors (+ index.json)  # state sharded like the params
//!     scheduler.json  rng.json  train_state.json  run_config.toml  tokenizer/
//! ```
mod exchange;
pub mod format;
pub mod layout;
pub mod save;
pub mod shard_io;
pub mod state;

pub use format::{
    find_checkpoint, is_complete, iter_dir_name, iteration_of, load_tensors, load_tensors_where,
    model_shard_name, prune_old, read_index, read_json, read_tracker, write_shard_files,
    CheckpointWrite, Index, IndexEntry, Retention, ShardFile, TensorSet,
};
pub use layout::{Partition, ShardedParam};
pub use save::{
    save_checkpoint, save_checkpoint_on, save_checkpoint_with, AsyncSaver, OwnedCheckpoint,
    RankSave, SavedCheckpoint,
};
pub use state::{GradScalerState, TrainState};
