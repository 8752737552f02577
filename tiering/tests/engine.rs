//! The tiering engine over a real filesystem (Raft log in a temp folder, block store on the
//! in-memory device) and a real local-folder object store: write-back into chunk and pack
//! objects, read-through after eviction, a small device filled several times over, GC after
//! churn, faults, an unreachable bucket, and crash-left orphans.

use std::sync::Arc;
use std::time::Duration;

use tidepool_cluster::meta::BlockState;
use tidepool_cluster::{ManualClock, MetaGroup, MetaState, RaftOptions};
use tidepool_fs::{ErrorKind, Fs, FsOptions, ROOT_INO};
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::{BlockDevice, BlockStore, StoreOptions};
use tidepool_tiering::format::{ObjectId, decode_object};
use tidepool_tiering::store::fault::{FaultConfig, Faulty};
use tidepool_tiering::{LocalStore, ObjectStore, RetryConfig, Retrying, Tier, TierConfig};

struct Env {
    _dir: tempfile::TempDir,
    fs: Arc<Fs>,
    tier: Arc<Tier>,
    bucket: Arc<LocalStore>,
    clock: Arc<ManualClock>,
}

const BLOCK: usize = 256 << 10;

fn config(device_bytes: u64) -> TierConfig {
    TierConfig {
        pack_threshold_bytes: 1 << 20,
        chunk_object_bytes: 4 << 20,
        pack_object_bytes: 4 << 20,
        round_bytes: 16 << 20,
        dirty_wait: Duration::from_millis(300),
        ..TierConfig::for_capacity(device_bytes)
    }
}

async fn env_with(device_bytes: u64, objects: impl FnOnce(Arc<LocalStore>) -> Arc<dyn ObjectStore>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(device_bytes));
    let opts = StoreOptions { segment_bytes: 2 << 20, max_block_bytes: BLOCK, crc_cache_bytes: 1 << 20 };
    let store = Arc::new(BlockStore::format(dev, opts).await.unwrap());
    let meta = MetaGroup::open(&dir.path().join("meta"), RaftOptions::default(), MetaState::new()).unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let fsopts = FsOptions { block_size: BLOCK, id_batch: 256, ..FsOptions::default() };
    let (fs, _) = Fs::open(meta, store, clock.clone(), fsopts).await.unwrap();
    let fs = Arc::new(fs);
    let bucket = Arc::new(LocalStore::new(dir.path().join("bucket")).unwrap());
    let tier = Tier::new(&fs, objects(bucket.clone()), config(device_bytes), clock.clone());
    Env { _dir: dir, fs, tier, bucket, clock }
}

async fn env(device_bytes: u64) -> Env {
    env_with(device_bytes, |b| b).await
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn put(fs: &Fs, name: &str, data: &[u8]) -> u64 {
    let ino = match fs.lookup(ROOT_INO, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(_) => fs.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0).await.unwrap().ino,
    };
    if !data.is_empty() {
        fs.write(ino, 0, data).await.unwrap();
    }
    ino
}

async fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    fs.read(ino, 0, size as usize).await.unwrap()
}

/// Every tiered block's object exists in the bucket (metadata never points at a missing object).
async fn check_locators(e: &Env) {
    let objects: Vec<String> = e.fs.meta().read(|s| {
        s.objects
            .iter()
            .map(|(id, o)| {
                let kind = match o.kind {
                    tidepool_cluster::meta::ObjectKind::Chunk => tidepool_tiering::format::ObjectKind::Chunk,
                    tidepool_cluster::meta::ObjectKind::Pack => tidepool_tiering::format::ObjectKind::Pack,
                };
                ObjectId(*id).key(kind)
            })
            .collect()
    });
    for key in objects {
        assert!(e.bucket.head(&key).await.unwrap().is_some(), "recorded object missing from the bucket: {key}");
    }
}

#[tokio::test]
async fn dirty_blocks_go_up_after_tier_after_into_chunks_and_packs() {
    let e = env(64 << 20).await;
    let big = pattern(1, 3 << 20); // 12 blocks: 3 MiB >= pack threshold -> chunk objects
    let big_ino = put(&e.fs, "big", &big).await;
    let mut small = Vec::new();
    for i in 0..50u64 {
        let data = pattern(100 + i, 1 + (i as usize * 997) % 20_000);
        small.push((put(&e.fs, &format!("small-{i}"), &data).await, data));
    }
    // Nothing is due before tier_after.
    let r = e.tier.upload_round(false).await.unwrap();
    assert_eq!(r.objects, 0);
    e.clock.advance(31_000_000_000);
    let r = e.tier.upload_round(false).await.unwrap();
    assert_eq!(r.remaining_dirty_bytes, 0, "{r:?}");
    // 3 MiB of one file in one chunk object (4 MiB max), 50 small files in ONE pack.
    let (chunks, packs) = e.fs.meta().read(|s| {
        let c = s.objects.values().filter(|o| o.kind == tidepool_cluster::meta::ObjectKind::Chunk).count();
        (c, s.objects.len() - c)
    });
    assert_eq!((chunks, packs), (1, 1));
    assert!(e.fs.meta().read(|s| s.blocks.values().all(|b| matches!(b.state, BlockState::Tiered(_)))));
    // The objects in the bucket decode on their own, every block checked.
    let page = e.bucket.list("", None, 100).await.unwrap();
    assert_eq!(page.objects.len(), 2);
    for o in &page.objects {
        let bytes = e.bucket.get(&o.key, None).await.unwrap();
        let (_, entries) = decode_object(&bytes).unwrap();
        assert!(!entries.is_empty());
    }
    check_locators(&e).await;
    // Release everything from NVMe: reads come back through the bucket, byte for byte.
    let (blocks, _) = e.tier.release_path("/").await.unwrap();
    assert_eq!(blocks, 12 + 50);
    let st = e.tier.status("/").unwrap();
    assert_eq!((st.path.cold_files, st.path.resident_percent), (51, 0.0));
    // A small range in the middle of a cold block; then the whole file.
    assert_eq!(e.fs.read(big_ino, 300_000, 10).await.unwrap(), big[300_000..300_010]);
    assert_eq!(e.tier.counters().snapshot()[6], ("read_through_blocks", 1));
    assert_eq!(read_all(&e.fs, big_ino).await, big);
    for (ino, data) in &small {
        assert_eq!(&read_all(&e.fs, *ino).await, data);
    }
    let st = e.tier.status("/").unwrap();
    assert_eq!(st.path.resident_percent, 100.0, "read-through caches blocks again: {st:?}");
    // Fetch brings a released subtree back.
    e.tier.release_path("/").await.unwrap();
    let (blocks, bytes) = e.tier.fetch_path("/big").await.unwrap();
    assert_eq!((blocks, bytes), (12, 3 << 20));
}

#[tokio::test]
async fn a_small_device_filled_several_times_over_reads_back() {
    // 24 MiB device, 96 MiB of data: blocks must be tiered and evicted to make room.
    let e = env(24 << 20).await;
    e.tier.spawn();
    let mut files = Vec::new();
    for i in 0..24u64 {
        let data = pattern(1000 + i, (4 << 20) - (i as usize * 4099));
        // Writers may briefly hit the dirty limit while uploads catch up: retry then.
        let ino = put(&e.fs, &format!("f{i}"), &[]).await;
        let mut tries = 0;
        loop {
            match e.fs.write(ino, 0, &data).await {
                Ok(_) => break,
                Err(err) if err.kind() == ErrorKind::Unavailable && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("write f{i}: {err}"),
            }
        }
        files.push((ino, data));
        e.clock.advance(31_000_000_000);
    }
    for (ino, data) in &files {
        assert_eq!(&read_all(&e.fs, *ino).await, data);
    }
    let c = e.tier.counters().snapshot();
    let get = |k: &str| c.iter().find(|(n, _)| *n == k).unwrap().1;
    assert!(get("evicted_bytes") > 48 << 20, "{c:?}");
    assert!(get("read_through_bytes") > 0, "{c:?}");
    e.tier.stop();
    check_locators(&e).await;
}

#[tokio::test]
async fn gc_brings_the_bucket_back_near_the_live_bytes_after_churn() {
    let e = env(64 << 20).await;
    let mut live = std::collections::BTreeMap::new();
    for round in 0..6u64 {
        for i in 0..20u64 {
            let name = format!("f{i}");
            if (i + round) % 5 == 0 {
                let _ = e.fs.unlink(ROOT_INO, name.as_bytes()).await;
                live.remove(&name);
                continue;
            }
            let len = if i % 2 == 0 { 40_000 + (i as usize) * 1000 } else { (1 << 20) + 300_000 };
            let data = pattern(round * 100 + i, len);
            let _ = e.fs.unlink(ROOT_INO, name.as_bytes()).await;
            put(&e.fs, &name, &data).await;
            live.insert(name, data);
        }
        e.tier.flush_all().await.unwrap();
    }
    let before = e.tier.gc(false).await.unwrap();
    let mut r = before.clone();
    for _ in 0..10 {
        r = e.tier.gc(true).await.unwrap();
        if r.rewritten_objects == 0 && r.deleted_objects == 0 {
            break;
        }
    }
    let bucket: u64 = {
        let mut total = 0;
        let mut next = None;
        loop {
            let page = e.bucket.list("", next, 1000).await.unwrap();
            total += page.objects.iter().map(|o| o.size_bytes).sum::<u64>();
            match page.next {
                Some(n) => next = Some(n),
                None => break,
            }
        }
        total
    };
    let live_bytes: u64 = live.values().map(|d| d.len() as u64).sum();
    assert_eq!(r.live_bytes, live_bytes);
    assert!(bucket as f64 <= live_bytes as f64 * 1.15, "bucket {bucket} live {live_bytes} ({before:?} -> {r:?})");
    check_locators(&e).await;
    e.tier.release_path("/").await.unwrap();
    for (name, data) in &live {
        let ino = e.fs.lookup(ROOT_INO, name.as_bytes()).unwrap().ino;
        assert_eq!(&read_all(&e.fs, ino).await, data, "{name}");
    }
}

#[tokio::test]
async fn tiering_completes_through_20_percent_failures_and_delays() {
    let faulty = std::sync::OnceLock::new();
    let e = env_with(64 << 20, |b| {
        let f = Arc::new(Faulty::new(
            b,
            FaultConfig { fail_rate: 0.2, delay_rate: 0.2, delay: Duration::from_millis(20), seed: 7 },
        ));
        faulty.set(f.clone()).ok();
        let retry = RetryConfig {
            max_attempts: 10,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
        };
        Arc::new(Retrying::new(f, retry))
    })
    .await;
    let mut files = Vec::new();
    for i in 0..30u64 {
        let data = pattern(i, if i % 3 == 0 { 1_500_000 } else { 3000 + i as usize * 100 });
        files.push((put(&e.fs, &format!("f{i}"), &data).await, data));
    }
    e.tier.flush_all().await.unwrap();
    assert!(faulty.get().unwrap().injected_failures() > 0);
    e.tier.gc(true).await.unwrap();
    check_locators(&e).await;
    e.tier.release_path("/").await.unwrap();
    for (ino, data) in &files {
        assert_eq!(&read_all(&e.fs, *ino).await, data);
    }
}

#[tokio::test]
async fn an_unreachable_bucket_stops_writers_at_the_dirty_limit_and_tiering_catches_up() {
    let faulty = std::sync::OnceLock::new();
    let e = env_with(32 << 20, |b| {
        let f =
            Arc::new(Faulty::new(b, FaultConfig { fail_rate: 0.0, delay_rate: 0.0, delay: Duration::ZERO, seed: 1 }));
        faulty.set(f.clone()).ok();
        f
    })
    .await;
    let f = faulty.get().unwrap().clone();
    f.set_down(true);
    // The limit is 60 % of 32 MiB; write 1 MiB files until refused.
    let mut written = Vec::new();
    let mut refused = None;
    for i in 0..40u64 {
        let data = pattern(i, 1 << 20);
        let ino = put(&e.fs, &format!("f{i}"), &[]).await;
        let _ = e.tier.upload_round(true).await; // fails: records the error
        match e.fs.write(ino, 0, &data).await {
            Ok(_) => written.push((ino, data)),
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    let err = refused.expect("writers must be refused at the dirty limit");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().contains("dirty data limit reached"), "{err}");
    assert!(written.len() >= 15, "writes continue on NVMe up to the limit: {}", written.len());
    // The bucket comes back: tiering catches up, writers go on, nothing was lost.
    f.set_down(false);
    e.tier.flush_all().await.unwrap();
    let ino = put(&e.fs, "after", &pattern(99, 1 << 20)).await;
    assert_eq!(read_all(&e.fs, ino).await, pattern(99, 1 << 20));
    e.tier.release_path("/").await.unwrap();
    for (ino, data) in &written {
        assert_eq!(&read_all(&e.fs, *ino).await, data);
    }
}

#[tokio::test]
async fn orphans_from_failed_records_are_swept_and_never_referenced() {
    let e = env(64 << 20).await;
    // An object in the bucket that no metadata records (as a crash between PUT and record leaves).
    let orphan = ObjectId(42).key(tidepool_tiering::format::ObjectKind::Pack);
    e.bucket.put(&orphan, bytes::Bytes::from_static(b"half an upload")).await.unwrap();
    let ino = put(&e.fs, "a", &pattern(5, 10_000)).await;
    e.tier.flush_all().await.unwrap();
    let r = e.tier.gc(true).await.unwrap();
    assert_eq!(r.orphans_deleted, 1);
    assert!(e.bucket.head(&orphan).await.unwrap().is_none());
    check_locators(&e).await;
    e.tier.release_path("/").await.unwrap();
    assert_eq!(read_all(&e.fs, ino).await, pattern(5, 10_000));
    // Pinned files are never evicted; status reports the pin.
    e.tier.fetch_path("/").await.unwrap();
    e.tier.set_pin("/a", true).await.unwrap();
    assert_eq!(tidepool_fs::ColdTier::make_room(&*e.tier, 1 << 30).await, 0);
    assert!(e.tier.status("/a").unwrap().path.pinned);
    e.tier.set_pin("/a", false).await.unwrap();
    assert_eq!(tidepool_fs::ColdTier::make_room(&*e.tier, 1 << 30).await, 10_000);
}

#[tokio::test]
async fn spin_down_then_a_new_node_starts_from_the_manifest_and_rehydrates() {
    let e = env(64 << 20).await;
    let mut files = Vec::new();
    for i in 0..40u64 {
        let data = pattern(500 + i, if i % 10 == 0 { 1_200_000 } else { 1 + i as usize * 300 });
        files.push((format!("f{i}"), data));
    }
    for (name, data) in &files {
        put(&e.fs, name, data).await;
    }
    e.fs.set_xattr(e.fs.lookup(ROOT_INO, b"f1").unwrap().ino, "loss", "0.31").await.unwrap();
    e.tier.set_pin("/f3", true).await.unwrap();
    let settings = std::collections::BTreeMap::from([("block_size".to_string(), "256KiB".to_string())]);
    let report = e.tier.spin_down(settings).await.unwrap();
    assert_eq!(report.epoch, 1);
    assert_eq!(report.files, 40);
    // Writers get a clear read-only error; readers go on.
    let err = e.fs.create(ROOT_INO, b"late", 0o644, 0, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    let objects: Arc<dyn ObjectStore> = e.bucket.clone();
    assert_eq!(tidepool_tiering::manifest::read_latest(&objects).await.unwrap(), 1);

    // A new node: empty device, metadata from the manifest, same bucket.
    let loaded = tidepool_tiering::manifest::read_manifest(&objects, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
    let opts = StoreOptions { segment_bytes: 2 << 20, max_block_bytes: BLOCK, crc_cache_bytes: 1 << 20 };
    let store = Arc::new(BlockStore::format(dev, opts).await.unwrap());
    let meta = MetaGroup::open(&dir.path().join("meta"), RaftOptions::default(), loaded.state).unwrap();
    meta.snapshot_now().await.unwrap();
    let (fs, report) =
        Fs::open(meta, store, e.clock.clone(), FsOptions { block_size: BLOCK, id_batch: 256, ..FsOptions::default() })
            .await
            .unwrap();
    assert_eq!(report.missing_blocks, 0);
    let fs = Arc::new(fs);
    let tier = Tier::new(&fs, objects.clone(), config(64 << 20), e.clock.clone());
    // Usable at once: everything cold, reads come through the bucket.
    assert_eq!(tier.status("/").unwrap().path.resident_percent, 0.0);
    let ino = fs.lookup(ROOT_INO, b"f20").unwrap().ino;
    assert_eq!(read_all(&fs, ino).await, files[20].1);
    assert_eq!(fs.get_xattr(fs.lookup(ROOT_INO, b"f1").unwrap().ino, "loss").unwrap().as_deref(), Some("0.31"));
    // Eager rehydration brings the rest; progress adds up exactly.
    assert!(tier.rehydrate(tidepool_tiering::engine::RehydrateMode::Eager, &loaded.heat).await.unwrap());
    let st = tier.rehydrate_progress().status();
    assert_eq!((st.files_done, st.files_total, st.bytes_done), (40, 40, st.bytes_total));
    assert_eq!(st.percent, 100.0);
    assert_eq!(tier.status("/").unwrap().path.resident_percent, 100.0);
    for (name, data) in &files {
        let ino = fs.lookup(ROOT_INO, name.as_bytes()).unwrap().ino;
        assert_eq!(&read_all(&fs, ino).await, data, "{name}");
    }
    // The new node writes on, and its next manifest continues the epochs.
    put(&fs, "new", b"after rehydrate").await;
    let r = tier.write_manifest(Default::default()).await.unwrap();
    assert_eq!((r.epoch, r.files), (2, 41));
}

#[tokio::test]
async fn gc_keeps_empty_objects_a_retained_manifest_points_into() {
    let e = env(64 << 20).await;
    put(&e.fs, "a", &pattern(700, 1_500_000)).await;
    put(&e.fs, "b", &pattern(701, 3_000)).await;
    assert_eq!(e.tier.write_manifest(Default::default()).await.unwrap().epoch, 1);
    let objects: Arc<dyn ObjectStore> = e.bucket.clone();
    let keys: Vec<String> = e.fs.meta().read(|s| {
        s.objects
            .iter()
            .map(|(id, o)| {
                let kind = match o.kind {
                    tidepool_cluster::meta::ObjectKind::Chunk => tidepool_tiering::format::ObjectKind::Chunk,
                    tidepool_cluster::meta::ObjectKind::Pack => tidepool_tiering::format::ObjectKind::Pack,
                };
                ObjectId(*id).key(kind)
            })
            .collect()
    });
    assert!(!keys.is_empty());
    // Both files replaced: every object manifest 1 points into is empty now, but manifest 1 is
    // retained (the 3 newest are), so GC leaves them in the bucket and the pass succeeds.
    put(&e.fs, "a", &pattern(702, 1_500_000)).await;
    put(&e.fs, "b", &pattern(703, 3_000)).await;
    e.tier.flush_all().await.unwrap();
    let r = e.tier.gc(true).await.unwrap();
    assert_eq!(r.deleted_objects, 0, "{r:?}");
    for key in &keys {
        assert!(e.bucket.head(key).await.unwrap().is_some(), "{key} deleted while manifest 1 is retained");
    }
    let old = tidepool_tiering::manifest::read_manifest(&objects, 1).await.unwrap();
    assert_eq!(old.root.summary.files, 2);
    // Three newer manifests: manifest 1 is no longer retained, and its empty objects go.
    for epoch in 2..=4 {
        assert_eq!(e.tier.write_manifest(Default::default()).await.unwrap().epoch, epoch);
    }
    let r = e.tier.gc(true).await.unwrap();
    assert_eq!(r.deleted_objects, keys.len() as u64, "{r:?}");
    for key in &keys {
        assert!(e.bucket.head(key).await.unwrap().is_none(), "{key} kept after manifest 1 was deleted");
    }
    check_locators(&e).await;
}
