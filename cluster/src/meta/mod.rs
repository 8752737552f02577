//! The metadata state machine: pure and deterministic. `apply(command)` over the namespace
//! (inodes, directory entries, user metadata, extents), the block table and block-id ranges.
//! No I/O, no clock, no randomness: the same commands in the same order give the same state.

mod apply;
mod check;
mod data;
mod keys;
mod read;
mod snapshot;
#[cfg(test)]
mod tests;
mod tier;
mod types;

pub use apply::SYMLINK_MAX;
pub use data::{ALLOC_MAX, MAX_FILE_SIZE, XATTR_KEY_MAX, XATTR_VALUE_MAX};
pub use keys::{ACCESS_KEY_ID_MAX, ACCESS_KEY_ID_MIN, ACCESS_KEY_NAME_MAX, SEALED_SECRET_MAX, is_access_key_id};
pub use read::{DirPage, Totals};
pub use types::*;

/// Version of the snapshot encoding written by [`MetaState::encode_snapshot`].
/// Version 2 added `access_keys`; version 3 the cold tier (block `written` times and
/// locators into `objects`, `pins`, `dirty_bytes`); version 4 the cluster's `nodes`.
/// Versions 1 to 3 are still read.
pub const SNAPSHOT_VERSION: u32 = 4;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The whole metadata image. `PartialEq` is what the determinism tests compare.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    pub inodes: BTreeMap<Ino, Inode>,
    /// Directory ino -> name -> child ino.
    pub entries: BTreeMap<Ino, BTreeMap<Vec<u8>, Ino>>,
    pub blocks: BTreeMap<BlockId, BlockMeta>,
    pub next_ino: Ino,
    /// Block ids below this have been handed out by `AllocBlockIds`.
    pub next_block_id: BlockId,
    /// Number of commands applied (successful or not): the generation source for new inodes.
    pub applied: u64,
    /// S3 access key id -> the key (secret sealed). Snapshot version 2 on.
    pub access_keys: BTreeMap<String, AccessKey>,
    /// Objects in the bucket that tiered blocks point into. Snapshot version 3 on.
    pub objects: BTreeMap<ObjectId, ObjectMeta>,
    /// Pinned inodes (`tidepool pin`): their files' blocks are never evicted.
    pub pins: BTreeSet<Ino>,
    /// Total length of the `Dirty` blocks (kept so writers can be held back cheaply).
    pub dirty_bytes: u64,
    /// Newest manifest epoch written (0: none), and the oldest one still retained: objects
    /// kept by a retained manifest are not deleted by GC.
    pub manifest_epoch: u64,
    pub manifest_oldest_retained: u64,
    /// Cluster nodes by Raft id, with their addresses. Snapshot version 4 on.
    pub nodes: BTreeMap<u64, NodeInfo>,
    /// Writes are refused on every node (a spin-down is under way or done). Version 4 on.
    pub frozen: bool,
}

impl MetaState {
    /// An object GC may delete: no live block, and no retained manifest may point into it.
    pub fn object_deletable(&self, o: &ObjectMeta) -> bool {
        o.live_blocks == 0 && o.kept_epoch.is_none_or(|k| k < self.manifest_oldest_retained)
    }
}
