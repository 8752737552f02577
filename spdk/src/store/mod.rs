//! The block store: immutable blocks, log-structured on a [`BlockDevice`].
//!
//! PUBLIC API CONTRACT (other crates code against exactly this; internals are free):
//!
//! - `BlockStore::format(dev, opts)` writes a fresh superblock (refuses nothing: the caller decides).
//! - `BlockStore::open(dev, opts)` reads the superblock (clear error if absent/corrupt/other
//!   version), rebuilds the index from segment summaries, scans open segments and discards a
//!   torn tail.
//! - `put(id, data)`: store an immutable block (1..=max_block_bytes). The block is readable
//!   when put returns; it is durable after a later `flush()` returns.
//! - `get(id, offset, len)`: any byte range of a block, verified by crc32c per 4 KiB page
//!   without reading the whole block.
//! - `delete(id)`: gone from the index at once; durable after `flush()`.
//! - `flush()`: barrier + device flush: every put/delete that returned before flush was
//!   called is durable when it returns.
//! - `clean()`: segment cleaning; gives space of dead blocks back.
//! - Cleaning ahead: a background task on the caller's tokio runtime frees segments when free
//!   ones run low (after puts use segments and deletes leave dead space), so puts rarely wait
//!   for cleaning; a put that finds no free segment still cleans, but only what it needs.
//!   `set_background_cleaning(false)` turns it off (tests that check exact `clean()` stats).
//! - `close()`: stop cleaning ahead, wait for it, flush; no write after it. Call it before
//!   opening the same device again in the same process (dropping the store also stops the
//!   task and refuses further writes, waiting for a running pass except on a current-thread
//!   runtime).
//! - `stats()`, `contains(id)`, `ids()`.

use std::sync::Arc;

use bytes::Bytes;

use crate::device::{BlockDevice, DeviceError};

mod ahead;
mod cache;
mod cleaner;
mod format;
mod imp;
mod recover;
pub(crate) mod state;

/// Names the same bytes forever; allocated by the meta group, never reused.
pub type BlockId = u64;

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Largest block accepted by `put`. Default 4 MiB.
    pub max_block_bytes: usize,
    /// Segment size on the device. Default 256 MiB; tests use small ones.
    pub segment_bytes: u64,
    /// Memory for cached per-block checksum pages (lets a 4 KiB read cost one I/O). Default 64 MiB.
    pub crc_cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { max_block_bytes: 4 << 20, segment_bytes: 256 << 20, crc_cache_bytes: 64 << 20 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("no superblock on device (not formatted)")]
    NotFormatted,
    #[error("corrupt superblock: {reason}")]
    CorruptSuperblock { reason: String },
    #[error("unsupported block store format version found={found} supported={supported}")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("device full need_bytes={need} free_bytes={free}")]
    NoSpace { need: u64, free: u64 },
    #[error("block not found block_id={0}")]
    NotFound(BlockId),
    #[error("block already exists block_id={0}")]
    Exists(BlockId),
    #[error("block too large len={len} max={max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty block block_id={0}")]
    Empty(BlockId),
    #[error("read out of block range block_id={id} offset={offset} len={len} block_len={block_len}")]
    Range { id: BlockId, offset: u32, len: u32, block_len: u32 },
    #[error("block checksum mismatch block_id={id} page={page}")]
    Checksum { id: BlockId, page: u32 },
    #[error("device too small for the block store size_bytes={size} segment_bytes={segment}")]
    DeviceTooSmall { size: u64, segment: u64 },
    #[error("invalid block store options: {reason}")]
    InvalidOptions { reason: String },
}

#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub capacity_bytes: u64,
    /// Bytes in segments that are not free (live + dead + headers).
    pub used_bytes: u64,
    /// Payload bytes of live blocks.
    pub live_bytes: u64,
    pub blocks: u64,
    pub segments_total: u64,
    pub segments_free: u64,
    /// Approximate heap bytes of the block index (for the "<= 64 B per block" budget).
    pub index_bytes: u64,
    /// Segments freed by cleaning since open (every trigger).
    pub cleaned_segments: u64,
    /// Of `cleaned_segments`: freed by a put that found no free segment (and waited for it).
    pub cleaned_segments_for_puts: u64,
    /// Of `cleaned_segments`: freed by cleaning ahead in the background.
    pub cleaned_segments_ahead: u64,
    pub torn_entries_discarded: u64,
}

#[derive(Debug, Clone, Default)]
pub struct CleanStats {
    pub segments_freed: u64,
    pub blocks_moved: u64,
    pub bytes_moved: u64,
}

pub struct BlockStore {
    inner: Arc<imp::Inner>,
}

/// Run a store operation that writes to its end, even if the caller's future is dropped
/// halfway (an S3 client that hangs up mid-PUT, a timeout around an NFS call): a write is
/// counted in flight from its reservation until its completion is recorded, and `flush`
/// waits for every write in flight, so an operation abandoned between the two would leave
/// every later flush waiting forever. On a tokio runtime the operation runs as a task of its
/// own and the caller awaits its handle; outside one it runs in place (nothing there drops
/// futures halfway). A panic in the operation is the caller's panic.
async fn to_the_end<T, F>(op: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return op.await };
    match rt.spawn(op).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down: the operation may or may not have happened, as in a crash.
        Err(_) => Err(StoreError::Device(DeviceError::Stopped)),
    }
}

impl BlockStore {
    pub async fn format(dev: Arc<dyn BlockDevice>, opts: StoreOptions) -> Result<Self, StoreError> {
        Ok(BlockStore { inner: imp::Inner::format(dev, opts).await? })
    }

    pub async fn open(dev: Arc<dyn BlockDevice>, opts: StoreOptions) -> Result<Self, StoreError> {
        Ok(BlockStore { inner: imp::Inner::open(dev, opts).await? })
    }

    /// Store `data` as block `id`. Runs to its end even if the caller stops waiting (see
    /// [`to_the_end`]): the bytes are copied into the store's buffer before the first await.
    pub async fn put(&self, id: BlockId, data: &[u8]) -> Result<(), StoreError> {
        let entry = self.inner.prepare_put(id, data)?;
        let inner = Arc::clone(&self.inner);
        to_the_end(async move { inner.put_prepared(entry).await }).await
    }

    /// Bytes `offset..offset + len` of block `id`, every 4 KiB page of them checked against
    /// its crc32c. No copy: the answer is the device read's buffer (it returns to the store's
    /// buffer pool when the last clone drops, so do not keep small slices of big reads for long).
    pub async fn get_bytes(&self, id: BlockId, offset: u32, len: u32) -> Result<Bytes, StoreError> {
        self.inner.get(id, offset, len).await
    }

    /// [`BlockStore::get_bytes`] copied into a `Vec`.
    pub async fn get(&self, id: BlockId, offset: u32, len: u32) -> Result<Vec<u8>, StoreError> {
        Ok(self.inner.get(id, offset, len).await?.to_vec())
    }

    /// Most deletes only change memory; one that fills a page of tombstones writes it, and
    /// that write runs to its end even if the caller stops waiting (see [`to_the_end`]).
    pub async fn delete(&self, id: BlockId) -> Result<(), StoreError> {
        if !self.inner.delete_in_memory(id)? {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        to_the_end(async move { inner.write_tombs().await.map(|_| ()) }).await
    }

    /// Runs to its end even if the caller stops waiting (see [`to_the_end`]).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let inner = Arc::clone(&self.inner);
        to_the_end(async move { inner.flush().await }).await
    }

    /// Clean every segment that qualifies (the caller waits for all of it). Runs to its end
    /// even if the caller stops waiting (see [`to_the_end`]).
    pub async fn clean(&self) -> Result<CleanStats, StoreError> {
        let inner = Arc::clone(&self.inner);
        to_the_end(async move { inner.clean().await }).await
    }

    /// Turn cleaning ahead (the background task) on or off; on by default. Off, space comes
    /// back only through `clean()` and puts that find no free segment, which keeps cleaning
    /// figures exact in tests. A pass under way stops at its next check.
    pub fn set_background_cleaning(&self, on: bool) {
        self.inner.set_background_cleaning(on);
    }

    /// Stop cleaning ahead for good, wait until its task has stopped, then flush. After it the
    /// store writes nothing (puts and deletes that need a write fail with
    /// `DeviceError::Stopped`; reads still work), so the device can be opened again in this
    /// process.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }

    /// Length of a stored block, if present.
    pub fn block_len(&self, id: BlockId) -> Option<u32> {
        self.inner.block_len(id)
    }

    pub fn contains(&self, id: BlockId) -> bool {
        self.block_len(id).is_some()
    }

    pub fn ids(&self) -> Vec<BlockId> {
        self.inner.ids()
    }

    pub fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        self.inner.device()
    }
}

impl Drop for BlockStore {
    /// The background task holds the store weakly; stop it so it writes nothing once the store
    /// is gone (see `close` for a wait that works on every runtime).
    fn drop(&mut self) {
        self.inner.stop_background();
    }
}
