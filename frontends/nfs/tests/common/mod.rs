//! What the NFS tests share: a real `Fs` on the in-memory device, its Raft log in a folder.

use std::sync::Arc;

use tidepool_cluster::{MetaGroup, MetaState, RaftOptions, SystemClock};
use tidepool_fs::{Fs, FsOptions};
use tidepool_spdk::{BlockDevice, BlockStore, StoreOptions};

/// Block size of the test filesystems (small, so a few KiB of writes span blocks).
pub const BLOCK: usize = 64 << 10;

fn store_opts() -> StoreOptions {
    StoreOptions { segment_bytes: 4 << 20, max_block_bytes: BLOCK, crc_cache_bytes: 1 << 20 }
}

/// An `Fs` on `dev` with its meta group under `dir`: a new store if `fresh`, else the one
/// already on `dev` (a restart).
pub async fn open_fs(dir: &std::path::Path, dev: &Arc<dyn BlockDevice>, fresh: bool) -> Arc<Fs> {
    let store = if fresh {
        BlockStore::format(dev.clone(), store_opts()).await.unwrap()
    } else {
        BlockStore::open(dev.clone(), store_opts()).await.unwrap()
    };
    let meta = MetaGroup::open(&dir.join("meta"), RaftOptions::default(), MetaState::new()).unwrap();
    let (fs, _) = Fs::open(
        meta,
        Arc::new(store),
        Arc::new(SystemClock),
        FsOptions { block_size: BLOCK, id_batch: 4096, ..FsOptions::default() },
    )
    .await
    .unwrap();
    Arc::new(fs)
}
