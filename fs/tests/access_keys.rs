//! S3 access keys through the fs API over a real meta group: put, list, revoke, the errors,
//! and keys surviving a reopen of the meta group (the Raft log replayed).

use std::sync::Arc;

use tidepool_cluster::{ManualClock, MetaGroup, MetaState, RaftOptions};
use tidepool_fs::{AccessKeyInfo, ErrorKind, Fs, FsOptions};
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::{BlockDevice, BlockStore, StoreOptions};

const NOW: i64 = 1_700_000_000_000_000_000;

async fn open(dir: &std::path::Path, dev: Arc<dyn BlockDevice>, format: bool) -> Fs {
    let opts = StoreOptions { segment_bytes: 4 << 20, max_block_bytes: 1 << 20, crc_cache_bytes: 1 << 20 };
    let store = Arc::new(if format {
        BlockStore::format(dev, opts).await.unwrap()
    } else {
        BlockStore::open(dev, opts).await.unwrap()
    });
    let meta = MetaGroup::open(&dir.join("meta"), RaftOptions::default(), MetaState::new()).unwrap();
    let clock = Arc::new(ManualClock::new(NOW));
    Fs::open(meta, store, clock, FsOptions { block_size: 1 << 20, id_batch: 64, ..FsOptions::default() })
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_list_revoke_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(32 << 20));
    let fs = open(dir.path(), dev.clone(), true).await;
    assert!(fs.access_keys().is_empty());
    let (a, b) = ("TPAAAAAAAAAAAAAAAAAA", "TPBBBBBBBBBBBBBBBBBB");
    fs.put_access_key(a, vec![1; 40], "laptop").await.unwrap();
    fs.put_access_key(b, vec![2; 40], "").await.unwrap();
    assert_eq!(
        fs.access_keys(),
        vec![
            AccessKeyInfo { id: a.into(), name: "laptop".into(), created: NOW },
            AccessKeyInfo { id: b.into(), name: "".into(), created: NOW },
        ]
    );
    assert_eq!(fs.access_key_sealed(a), Some(vec![1; 40]));
    assert_eq!(fs.put_access_key(a, vec![3; 40], "").await.unwrap_err().kind(), ErrorKind::Exists);
    assert_eq!(fs.put_access_key("short", vec![3; 40], "").await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(fs.put_access_key("TPCCCCCCCCCCCCCCCCCC", vec![], "").await.unwrap_err().kind(), ErrorKind::Invalid);
    fs.delete_access_key(a).await.unwrap();
    assert_eq!(fs.access_key_sealed(a), None, "revoked at once");
    let e = fs.delete_access_key(a).await.unwrap_err();
    assert_eq!((e.kind(), e.errno()), (ErrorKind::NotFound, libc::ENOENT));
    fs.shutdown().await.unwrap();

    let fs = open(dir.path(), dev, false).await;
    assert_eq!(fs.access_keys().iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), [b]);
    assert_eq!(fs.access_key_sealed(b), Some(vec![2; 40]));
    fs.shutdown().await.unwrap();
}
