//! The seam to the cold tier. `Fs` knows only this trait; the tiering engine
//! (tidepool-tiering) implements it and the `tidepool` binary plugs it in with
//! [`Fs::set_cold_tier`]. Without one, every block stays on NVMe and a block missing from the
//! store is an error, as before.
//!
//! What passes through here: a read of a block that is no longer on NVMe (read-through), the
//! blocks a read touched (for least-recently-used eviction), a write asking whether it may
//! add dirty bytes, and a full device asking for room.

use async_trait::async_trait;
use tidepool_cluster::meta::{BlockId, ObjectLocator};

use crate::{Fs, Result};

/// Why the cold tier refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// Too many bytes are on NVMe only: the object store has not been taking uploads.
    #[error(
        "dirty data limit reached: {dirty_bytes} bytes are not yet in the object store (limit {limit_bytes}); last upload error: {last_error}"
    )]
    DirtyLimit { dirty_bytes: u64, limit_bytes: u64, last_error: String },
    /// The object store did not give the block back (unreachable, throttled, refused).
    #[error("cannot fetch block from the object store block_id={block}: {reason}")]
    Fetch { block: BlockId, reason: String, retryable: bool },
    /// The object store gave back bytes that do not match the block's checksum.
    #[error(
        "block from the object store fails its checksum block_id={block} expected={expected:#010x} actual={actual:#010x}"
    )]
    Checksum { block: BlockId, expected: u32, actual: u32 },
}

#[async_trait]
pub trait ColdTier: Send + Sync + 'static {
    /// Bytes `offset..offset + len` of block `id`, which is tiered at `loc` and not on NVMe:
    /// fetched from the object store with a ranged GET, verified, and cached on NVMe again.
    async fn read_through(&self, id: BlockId, loc: ObjectLocator, offset: u32, len: u32) -> Result<Vec<u8>>;

    /// Blocks a read just used (the eviction order is least recently used first).
    fn touch(&self, ids: &[BlockId]);

    /// A writer is about to add `new_bytes` dirty bytes. Over the dirty limit this waits for
    /// uploads to make room while the object store takes them, and answers
    /// `TierError::DirtyLimit` when it does not (unreachable) or the wait runs out.
    async fn admit_write(&self, new_bytes: u64) -> Result<()>;

    /// The device is full: evict clean blocks (least recently used first) to free at least
    /// `bytes`. Returns the bytes evicted.
    async fn make_room(&self, bytes: u64) -> u64;
}

impl Fs {
    /// Plug in the cold tier (once, at start-up).
    pub fn set_cold_tier(&self, cold: std::sync::Arc<dyn ColdTier>) {
        if self.cold.set(cold).is_err() {
            tracing::warn!("cold tier already set; keeping the first");
        }
    }

    pub(crate) fn cold(&self) -> Option<&std::sync::Arc<dyn ColdTier>> {
        self.cold.get()
    }

    /// The locator of a tiered block, if it is tiered.
    pub(crate) fn locator(&self, id: BlockId) -> Option<ObjectLocator> {
        self.meta.read(|s| match s.blocks.get(&id).map(|b| &b.state) {
            Some(tidepool_cluster::meta::BlockState::Tiered(loc)) => Some(*loc),
            _ => None,
        })
    }

    /// Asks the cold tier whether `new_bytes` more dirty bytes may be written.
    pub(crate) async fn admit_write(&self, new_bytes: u64) -> Result<()> {
        match self.cold() {
            Some(cold) => cold.admit_write(new_bytes).await,
            None => Ok(()),
        }
    }
}
