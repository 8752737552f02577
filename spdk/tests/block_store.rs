//! Tests of the log-structured block store through its public API, mostly on the in-memory
//! device (shared between store instances through its `Arc` to test reopen and recovery).
//!
//! On-disk offsets used to inject damage follow the documented layout: segment 0 starts at
//! 1 MiB, its header takes one page, and the first segment written is segment 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::device::{DeviceError, DeviceInfo, IoFuture, IoResult};
use tidepool_spdk::{AlignedBuf, BlockDevice, BlockStore, StoreError, StoreOptions};
use tokio::task::JoinSet;

type Dev = Arc<dyn BlockDevice>;

const MIB: u64 = 1 << 20;
const SEG0: u64 = MIB;
const PAGE: u64 = 4096;

fn mem(bytes: u64) -> Dev {
    Arc::new(MemDevice::new(bytes))
}

fn opts(segment_bytes: u64, max_block_bytes: usize) -> StoreOptions {
    StoreOptions { max_block_bytes, segment_bytes, crc_cache_bytes: 1 << 20 }
}

/// Deterministic bytes for block `id`.
fn data(id: u64, len: usize) -> Vec<u8> {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn put_n(s: &BlockStore, ids: std::ops::Range<u64>, len: usize) {
    for id in ids {
        s.put(id, &data(id, len)).await.unwrap();
    }
}

async fn check(s: &BlockStore, id: u64, len: usize) {
    assert_eq!(s.block_len(id), Some(len as u32), "block_id={id}");
    assert_eq!(s.get(id, 0, len as u32).await.unwrap(), data(id, len), "block_id={id}");
}

async fn write_raw(dev: &Dev, offset: u64, bytes: &[u8]) {
    let (_b, r) = dev.write(offset, AlignedBuf::from_slice(bytes)).await;
    r.unwrap();
}

async fn read_raw(dev: &Dev, offset: u64, len: usize) -> Vec<u8> {
    let (b, r) = dev.read(offset, AlignedBuf::zeroed(len)).await;
    r.unwrap();
    b.to_vec()
}

/// Counts reads, to check how many device I/Os a `get` costs.
struct Counting {
    inner: MemDevice,
    reads: AtomicU64,
    read_bytes: AtomicU64,
}

impl BlockDevice for Counting {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        self.inner.write(offset, buf)
    }
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        self.inner.flush()
    }
}

#[tokio::test]
async fn put_get_sizes_1b_to_4mib() {
    let s = BlockStore::format(mem(160 * MIB), opts(32 * MIB, 4 << 20)).await.unwrap();
    let sizes = [1, 2, 100, 4095, 4096, 4097, 8191, 8192, 65539, 1 << 20, (4 << 20) - 1, 4 << 20];
    for (i, &len) in sizes.iter().enumerate() {
        s.put(i as u64, &data(i as u64, len)).await.unwrap();
    }
    for (i, &len) in sizes.iter().enumerate() {
        let id = i as u64;
        check(&s, id, len).await;
        let full = data(id, len);
        for (off, n) in [(0, 1), (len - 1, 1), (len / 2, len - len / 2), (len / 3, len / 3)] {
            assert_eq!(
                s.get(id, off as u32, n as u32).await.unwrap(),
                &full[off..off + n],
                "len={len} off={off} n={n}"
            );
        }
        assert_eq!(s.get(id, len as u32, 0).await.unwrap(), Vec::<u8>::new());
    }
    let st = s.stats();
    assert_eq!(st.blocks, sizes.len() as u64);
    assert_eq!(st.live_bytes, sizes.iter().sum::<usize>() as u64);
    let mut ids = s.ids();
    ids.sort();
    assert_eq!(ids, (0..sizes.len() as u64).collect::<Vec<_>>());
}

#[test]
fn any_byte_range_reads_back() {
    // Cached crcs (the one-read path) and none (every read also fetches its header pages).
    for cache in [1 << 20, 0] {
        any_byte_range_reads_back_with(cache);
    }
}

fn any_byte_range_reads_back_with(crc_cache_bytes: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sizes = [1usize, 4096, 4097, 10_000, 300_000, 4 << 20];
    let s = rt.block_on(async {
        let o = StoreOptions { crc_cache_bytes, ..opts(16 * MIB, 4 << 20) };
        let s = BlockStore::format(mem(64 * MIB), o).await.unwrap();
        for (i, &len) in sizes.iter().enumerate() {
            s.put(i as u64, &data(i as u64, len)).await.unwrap();
        }
        s
    });
    let full: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &l)| data(i as u64, l)).collect();
    let cfg = ProptestConfig { cases: 300, ..ProptestConfig::default() };
    proptest!(cfg, |(which in 0..sizes.len(), a in any::<u32>(), b in any::<u32>())| {
        let len = sizes[which] as u32;
        let (x, y) = (a % (len + 1), b % (len + 1));
        let (off, n) = (x.min(y), x.max(y) - x.min(y));
        let got = rt.block_on(s.get_bytes(which as u64, off, n)).unwrap();
        prop_assert_eq!(&got[..], &full[which][off as usize..(off + n) as usize]);
    });
    let err = rt.block_on(s.get(0, 0, 2)).unwrap_err();
    assert!(matches!(err, StoreError::Range { id: 0, offset: 0, len: 2, block_len: 1 }), "{err}");
}

#[tokio::test]
async fn put_and_get_errors() {
    let s = BlockStore::format(mem(16 * MIB), opts(MIB, 64 << 10)).await.unwrap();
    assert!(matches!(s.put(1, &[]).await, Err(StoreError::Empty(1))));
    let too_big = vec![0u8; (64 << 10) + 1];
    assert!(matches!(s.put(1, &too_big).await, Err(StoreError::TooLarge { len: 65537, max: 65536 })));
    s.put(1, b"one").await.unwrap();
    assert!(matches!(s.put(1, b"uno").await, Err(StoreError::Exists(1))));
    assert!(matches!(s.get(2, 0, 1).await, Err(StoreError::NotFound(2))));
    assert!(matches!(s.delete(2).await, Err(StoreError::NotFound(2))));
    assert!(matches!(s.get(1, 2, 2).await, Err(StoreError::Range { .. })));
    assert!(s.contains(1) && !s.contains(2));
    let e = BlockStore::format(mem(16 * MIB), opts(MIB, 1 << 20)).await.err().unwrap();
    assert!(matches!(e, StoreError::InvalidOptions { .. }), "{e}");
}

#[tokio::test]
async fn superblock_errors() {
    let dev = mem(8 * MIB);
    let e = BlockStore::open(dev.clone(), opts(MIB, 64 << 10)).await.err().unwrap();
    assert!(matches!(e, StoreError::NotFormatted), "{e}");
    let e = BlockStore::format(mem(3 * MIB), opts(MIB, 64 << 10)).await.err().unwrap();
    assert!(matches!(e, StoreError::DeviceTooSmall { .. }), "{e}");

    drop(BlockStore::format(dev.clone(), opts(MIB, 64 << 10)).await.unwrap());
    let good = read_raw(&dev, 0, PAGE as usize).await;
    assert_eq!(&good[..4], b"TPBS");
    let mut bad = good.clone();
    bad[33] ^= 0x40;
    write_raw(&dev, 0, &bad).await;
    let e = BlockStore::open(dev.clone(), opts(MIB, 64 << 10)).await.err().unwrap();
    assert!(matches!(e, StoreError::CorruptSuperblock { .. }), "{e}");
    let mut v2 = good.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    write_raw(&dev, 0, &v2).await;
    let e = BlockStore::open(dev.clone(), opts(MIB, 64 << 10)).await.err().unwrap();
    assert!(matches!(e, StoreError::UnsupportedVersion { found: 2, supported: 1 }), "{e}");
    write_raw(&dev, 0, &good).await;
    // The superblock's geometry wins over the options passed to open.
    let s = BlockStore::open(dev, opts(2 * MIB, 4 << 20)).await.unwrap();
    assert_eq!(s.stats().segments_total, 7);
    assert!(matches!(s.put(1, &vec![1u8; 100 << 10]).await, Err(StoreError::TooLarge { .. })));
}

#[tokio::test]
async fn reopen_rebuilds_index_from_summaries_and_scan() {
    let dev = mem(32 * MIB);
    let o = opts(MIB, 64 << 10);
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    // 20 KB blocks take 24 KiB on disk: ~41 per 1 MiB segment; 200 fill 4 sealed + 1 open.
    put_n(&s, 0..200, 20_000).await;
    put_n(&s, 1000..1010, 1).await;
    s.flush().await.unwrap();
    let before = s.stats();
    assert!(before.segments_total - before.segments_free >= 5, "{before:?}");
    drop(s);

    let s = BlockStore::open(dev.clone(), o.clone()).await.unwrap();
    let after = s.stats();
    assert_eq!((after.blocks, after.live_bytes), (before.blocks, before.live_bytes));
    assert_eq!(after.torn_entries_discarded, 0);
    for id in 0..200 {
        check(&s, id, 20_000).await;
    }
    for id in 1000..1010 {
        check(&s, id, 1).await;
    }
    put_n(&s, 2000..2100, 5000).await;
    drop(s);
    // Not flushed, but MemDevice keeps completed writes: everything comes back.
    let s = BlockStore::open(dev, o).await.unwrap();
    assert_eq!(s.stats().blocks, 310);
    check(&s, 2099, 5000).await;
}

#[tokio::test]
async fn torn_tail_is_discarded_and_store_stays_writable() {
    let dev = mem(16 * MIB);
    let o = opts(MIB, 64 << 10);
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    put_n(&s, 0..10, 4096).await;
    s.flush().await.unwrap();
    drop(s);
    // Each 4 KiB block is one header page + one data page, appended after segment 0's header.
    let tail = SEG0 + PAGE + 10 * 2 * PAGE;
    let entry0 = read_raw(&dev, SEG0 + PAGE, 2 * PAGE as usize).await;
    // A partial entry: its header page landed, its data page did not.
    write_raw(&dev, tail, &entry0[..PAGE as usize]).await;
    let s = BlockStore::open(dev.clone(), o.clone()).await.unwrap();
    assert_eq!(s.stats().torn_entries_discarded, 1);
    assert_eq!(s.stats().blocks, 10);
    for id in 0..10 {
        check(&s, id, 4096).await;
    }
    put_n(&s, 10..20, 3000).await;
    s.flush().await.unwrap();
    drop(s);
    let s = BlockStore::open(dev.clone(), o.clone()).await.unwrap();
    assert_eq!(s.stats().blocks, 20);
    for id in 10..20 {
        check(&s, id, 3000).await;
    }
    drop(s);

    // Garbage after the last entry of the (new) open segment.
    let dev = mem(16 * MIB);
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    put_n(&s, 0..3, 5000).await;
    drop(s);
    let garbage: Vec<u8> = (0..3 * PAGE).map(|i| (i * 7 + 3) as u8).collect();
    write_raw(&dev, SEG0 + PAGE + 3 * 3 * PAGE, &garbage).await;
    let s = BlockStore::open(dev.clone(), o).await.unwrap();
    assert_eq!(s.stats().torn_entries_discarded, 1);
    for id in 0..3 {
        check(&s, id, 5000).await;
    }
    s.put(3, b"after the tear").await.unwrap();
    assert_eq!(s.get(3, 0, 14).await.unwrap(), b"after the tear");
}

#[tokio::test]
async fn deletes_are_durable_after_flush() {
    let dev = mem(32 * MIB);
    let o = opts(MIB, 64 << 10);
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    put_n(&s, 0..600, 3000).await;
    // More than one page of tombstones, spread over segments that get sealed later.
    for id in (0..600).filter(|i| i % 3 != 0) {
        s.delete(id).await.unwrap();
    }
    assert!(!s.contains(1) && s.get(1, 0, 1).await.is_err());
    s.flush().await.unwrap();
    put_n(&s, 600..700, 3000).await;
    s.delete(600).await.unwrap();
    s.flush().await.unwrap();
    drop(s);
    let s = BlockStore::open(dev, o).await.unwrap();
    assert_eq!(s.stats().blocks, 200 + 99);
    for id in 0..700 {
        if id % 3 == 0 && id != 600 || id > 600 {
            check(&s, id, 3000).await;
        } else {
            assert!(matches!(s.get(id, 0, 1).await, Err(StoreError::NotFound(_))), "block_id={id}");
        }
    }
}

#[tokio::test]
async fn cleaning_returns_space_and_survives_reopen() {
    let dev = mem(20 * MIB);
    let o = opts(MIB, 64 << 10);
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    s.set_background_cleaning(false); // exact `clean()` figures below
    let n = 400; // 400 * 28 KiB ~ 11 MiB of 19 segments
    put_n(&s, 0..n, 20_000).await;
    for id in (0..n).filter(|i| i % 5 != 0) {
        s.delete(id).await.unwrap();
    }
    s.flush().await.unwrap();
    let before = s.stats();
    let cs = s.clean().await.unwrap();
    let after = s.stats();
    assert!(cs.segments_freed >= 5, "{cs:?}");
    assert!(after.segments_free > before.segments_free, "{before:?} {after:?}");
    assert_eq!(after.cleaned_segments, cs.segments_freed);
    for id in (0..n).filter(|i| i % 5 == 0) {
        check(&s, id, 20_000).await;
    }
    // A second pass finds nothing worth cleaning.
    assert_eq!(s.clean().await.unwrap().segments_freed, 0);
    drop(s);
    // Reopen: moved blocks resolve to one copy; deleted blocks stay deleted (tombstones
    // were carried forward out of cleaned segments while older segments could need them).
    let s = BlockStore::open(dev, o).await.unwrap();
    assert_eq!(s.stats().blocks, n / 5);
    assert_eq!(s.stats().segments_free, after.segments_free);
    for id in 0..n {
        if id % 5 == 0 {
            check(&s, id, 20_000).await;
        } else {
            assert!(!s.contains(id), "deleted block came back block_id={id}");
        }
    }
}

#[tokio::test]
async fn full_device_gives_no_space_then_recovers_after_delete_and_clean() {
    let dev = mem(9 * MIB); // 8 segments of 1 MiB
    let o = opts(MIB, 64 << 10);
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    s.set_background_cleaning(false); // the explicit `clean()` below must find the dead space
    let mut id = 0;
    let err = loop {
        match s.put(id, &data(id, 30_000)).await {
            Ok(()) => id += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    let stored = id;
    assert!(stored > 150, "stored={stored}");
    for i in 0..stored {
        check(&s, i, 30_000).await;
    }
    assert!(matches!(s.put(stored, &data(stored, 30_000)).await, Err(StoreError::NoSpace { .. })));
    for i in (0..stored).filter(|i| i % 4 != 0) {
        s.delete(i).await.unwrap();
    }
    s.flush().await.unwrap();
    let cs = s.clean().await.unwrap();
    assert!(cs.segments_freed >= 3, "{cs:?}");
    put_n(&s, 10_000..10_050, 30_000).await;
    s.flush().await.unwrap();
    drop(s);
    let s = BlockStore::open(dev, o).await.unwrap();
    for i in 0..stored {
        if i % 4 == 0 {
            check(&s, i, 30_000).await;
        } else {
            assert!(!s.contains(i));
        }
    }
    for i in 10_000..10_050 {
        check(&s, i, 30_000).await;
    }
}

/// `get_bytes` hands out the read buffer itself: it must stay the caller's (never reused by a
/// later read) until every clone of it is dropped, and then go back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_from_get_bytes_stay_valid_while_held() {
    let s = Arc::new(BlockStore::format(mem(64 * MIB), opts(16 * MIB, 1 << 20)).await.unwrap());
    put_n(&s, 0..8, 1 << 20).await;
    let held = futures_held(&s).await;
    let mut set = JoinSet::new();
    for t in 0..4u64 {
        let s = Arc::clone(&s);
        set.spawn(async move {
            for i in 0..200u64 {
                let id = (t + i) % 8;
                let off = ((i * 7919) % 256) as u32 * 4096;
                let got = s.get_bytes(id, off, 4096).await.unwrap();
                assert_eq!(&got[..], &data(id, 1 << 20)[off as usize..off as usize + 4096]);
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    for (id, off, b) in &held {
        let want = &data(*id, 1 << 20)[*off as usize..*off as usize + b.len()];
        assert_eq!(&b[..], want, "held bytes of block {id} at {off} changed");
    }
}

/// One held slice per block (starting one byte into a 3-page read).
async fn futures_held(s: &BlockStore) -> Vec<(u64, u32, bytes::Bytes)> {
    let mut v = Vec::new();
    for id in 0..8u64 {
        let off = (id as u32 * 3) * 4096 + 17;
        let b = s.get_bytes(id, off, 3 * 4096).await.unwrap();
        v.push((id, off + 1, b.slice(1..)));
    }
    v
}

#[tokio::test]
async fn corrupt_data_page_is_a_checksum_error() {
    for cache in [0, 1 << 20] {
        let dev = mem(16 * MIB);
        let o = StoreOptions { crc_cache_bytes: cache, ..opts(MIB, 64 << 10) };
        let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
        s.put(7, &data(7, 10_000)).await.unwrap();
        // Block 7: header page at SEG0 + 4 KiB, data pages 0..3 after it. Damage page 1.
        let page1 = SEG0 + 3 * PAGE;
        let mut bytes = read_raw(&dev, page1, PAGE as usize).await;
        bytes[100] ^= 1;
        write_raw(&dev, page1, &bytes).await;
        let e = s.get(7, 4096, 10).await.unwrap_err();
        assert!(matches!(e, StoreError::Checksum { id: 7, page: 1 }), "{e}");
        assert!(matches!(s.get(7, 0, 10_000).await, Err(StoreError::Checksum { id: 7, page: 1 })));
        // Pages that are intact still read.
        assert_eq!(s.get(7, 0, 4096).await.unwrap(), &data(7, 10_000)[..4096]);
        assert_eq!(s.get(7, 8192, 100).await.unwrap(), &data(7, 10_000)[8192..8292]);
        drop(s);
        // In an open segment a damaged entry cannot be told from a torn write: the scan
        // discards it (and anything after it) rather than serve it.
        let s = BlockStore::open(dev, o).await.unwrap();
        assert_eq!(s.stats().torn_entries_discarded, 1);
        assert!(matches!(s.get(7, 0, 1).await, Err(StoreError::NotFound(7))));
    }
}

#[tokio::test]
async fn random_4k_read_costs_one_io_when_crcs_are_cached() {
    let dev =
        Arc::new(Counting { inner: MemDevice::new(64 * MIB), reads: AtomicU64::new(0), read_bytes: AtomicU64::new(0) });
    let o = opts(16 * MIB, 4 << 20);
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    s.put(1, &data(1, 4 << 20)).await.unwrap();
    let full = data(1, 4 << 20);
    for page in [0u32, 7, 1007, 1008, 1023] {
        let (r0, b0) = (dev.reads.load(Ordering::Relaxed), dev.read_bytes.load(Ordering::Relaxed));
        let off = page * 4096;
        assert_eq!(s.get(1, off, 4096).await.unwrap(), &full[off as usize..off as usize + 4096]);
        assert_eq!(dev.reads.load(Ordering::Relaxed) - r0, 1, "page={page}");
        assert_eq!(dev.read_bytes.load(Ordering::Relaxed) - b0, 4096, "page={page}");
    }
    drop(s);
    // Cold cache after reopen: the first read also fetches a crc page, later ones do not.
    let s = BlockStore::open(dev.clone(), o).await.unwrap();
    let r0 = dev.reads.load(Ordering::Relaxed);
    s.get(1, 500 * 4096, 4096).await.unwrap();
    assert_eq!(dev.reads.load(Ordering::Relaxed) - r0, 2);
    let r1 = dev.reads.load(Ordering::Relaxed);
    s.get(1, 600 * 4096 + 5, 4000).await.unwrap();
    assert_eq!(dev.reads.load(Ordering::Relaxed) - r1, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_puts_deletes_flush_and_clean() {
    let dev = mem(48 * MIB);
    let o = opts(MIB, 64 << 10);
    let s = Arc::new(BlockStore::format(dev.clone(), o.clone()).await.unwrap());
    let mut tasks = JoinSet::new();
    for t in 0..32u64 {
        let s = s.clone();
        tasks.spawn(async move {
            for i in 0..40u64 {
                let id = t * 1000 + i;
                let len = 1 + (id as usize * 7919) % 40_000;
                s.put(id, &data(id, len)).await.unwrap();
                if i % 2 == 1 {
                    s.delete(id - 1).await.unwrap();
                }
                if i % 10 == 9 {
                    s.flush().await.unwrap();
                }
            }
        });
    }
    let cleaner = {
        let s = s.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                s.clean().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    cleaner.await.unwrap();
    s.flush().await.unwrap();
    s.clean().await.unwrap();
    s.flush().await.unwrap();
    let expect = |id: u64| (id % 2 == 1).then(|| 1 + (id as usize * 7919) % 40_000);
    let verify = |s: Arc<BlockStore>| async move {
        assert_eq!(s.stats().blocks, 32 * 20);
        for t in 0..32u64 {
            for i in 0..40u64 {
                let id = t * 1000 + i;
                match expect(id) {
                    Some(len) => check(&s, id, len).await,
                    None => assert!(!s.contains(id), "block_id={id}"),
                }
            }
        }
    };
    verify(s.clone()).await;
    drop(s);
    verify(Arc::new(BlockStore::open(dev, o).await.unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_memory_is_at_most_64_bytes_per_block() {
    // 100,000 blocks of 100 B take 8 KiB each on the device: ~800 MiB.
    let s = Arc::new(BlockStore::format(mem(1024 * MIB), opts(64 * MIB, 1 << 20)).await.unwrap());
    let mut tasks = JoinSet::new();
    for t in 0..8u64 {
        let s = s.clone();
        tasks.spawn(async move {
            for id in (t..100_000).step_by(8) {
                s.put(id, &id.to_le_bytes().repeat(13)[..100]).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let st = s.stats();
    assert_eq!(st.blocks, 100_000);
    let per_block = st.index_bytes as f64 / st.blocks as f64;
    println!("index_bytes={} blocks={} index_bytes_per_block={per_block:.1}", st.index_bytes, st.blocks);
    assert!(st.index_bytes / st.blocks <= 64, "{st:?}");
    assert_eq!(s.get(99_999, 0, 8).await.unwrap(), 99_999u64.to_le_bytes());
}

/// A device that loses writes like a real one: writes since the last flush are volatile, and
/// a crash image keeps, drops or tears each of them (at 4 KiB granularity) at random.
struct CrashDev {
    info: DeviceInfo,
    st: std::sync::Mutex<CrashState>,
}

struct CrashState {
    data: Vec<u8>,
    /// Unflushed writes: offset and the bytes they replaced.
    log: Vec<(u64, Vec<u8>)>,
    crashed: bool,
}

impl CrashDev {
    fn new(bytes: u64) -> Arc<Self> {
        let info = MemDevice::new(PAGE).info().clone();
        let info = DeviceInfo { size_bytes: bytes, ..info };
        let st = CrashState { data: vec![0; bytes as usize], log: Vec::new(), crashed: false };
        Arc::new(CrashDev { info, st: std::sync::Mutex::new(st) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CrashState> {
        self.st.lock().unwrap()
    }

    /// The device as a crash now would leave it.
    async fn crash(&self, rng: &mut impl rand::Rng) -> Dev {
        let image = {
            let mut st = self.lock();
            st.crashed = true;
            let mut image = st.data.clone();
            for (off, old) in st.log.iter().rev() {
                let choice = rng.gen_range(0..3);
                for (i, page) in old.chunks(PAGE as usize).enumerate() {
                    if choice == 1 || (choice == 2 && rng.gen_bool(0.5)) {
                        let at = *off as usize + i * PAGE as usize;
                        image[at..at + page.len()].copy_from_slice(page);
                    }
                }
            }
            image
        };
        let dev = mem(image.len() as u64);
        write_raw(&dev, 0, &image).await;
        dev
    }
}

impl BlockDevice for CrashDev {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn read(&self, offset: u64, mut buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        let res = tidepool_spdk::device::check_io(&self.info, offset, buf.len()).map(|()| {
            let st = self.lock();
            let n = buf.len();
            buf.copy_from_slice(&st.data[offset as usize..offset as usize + n]);
        });
        Box::pin(async move { (buf, res) })
    }
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        let res = tidepool_spdk::device::check_io(&self.info, offset, buf.len()).map(|()| {
            let mut st = self.lock();
            let range = offset as usize..offset as usize + buf.len();
            let old = st.data[range.clone()].to_vec();
            st.data[range].copy_from_slice(&buf);
            st.log.push((offset, old));
        });
        Box::pin(async move {
            tokio::task::yield_now().await;
            (buf, res)
        })
    }
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        self.lock().log.clear();
        Box::pin(async { Ok(()) })
    }
}

#[derive(Default)]
struct Acks {
    /// Put (resp. deleted) before a flush that completed before the crash.
    durable: std::collections::HashSet<u64>,
    deleted: std::collections::HashSet<u64>,
    /// Returned from put / delete, not yet covered by a flush.
    put: Vec<u64>,
    del: Vec<u64>,
    /// Every delete ever started (its block may or may not survive a crash).
    del_started: std::collections::HashSet<u64>,
}

fn crash_len(id: u64) -> usize {
    1 + (id as usize).wrapping_mul(2_654_435_761) % 30_000
}

/// Concurrent puts, deletes, flushes and cleaning; crash at a random moment; every write
/// acknowledged by a completed flush must survive, every flushed delete must stay deleted,
/// and nothing may read back wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_keeps_everything_flushed() {
    use rand::{Rng, SeedableRng};
    for seed in 0..8u64 {
        let dev = CrashDev::new(12 * MIB);
        let o = opts(MIB, 64 << 10);
        let s = Arc::new(BlockStore::format(dev.clone(), o.clone()).await.unwrap());
        let acks = Arc::new(std::sync::Mutex::new(Acks::default()));
        let mut tasks = JoinSet::new();
        for t in 0..8u64 {
            let (s, acks, dev) = (s.clone(), acks.clone(), dev.clone());
            tasks.spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(seed * 100 + t);
                for i in 0..400u64 {
                    let id = t * 100_000 + i;
                    match s.put(id, &data(id, crash_len(id))).await {
                        Ok(()) => acks.lock().unwrap().put.push(id),
                        Err(StoreError::NoSpace { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    if i > 0 && rng.gen_bool(0.6) {
                        acks.lock().unwrap().del_started.insert(id - 1);
                        if s.delete(id - 1).await.is_ok() {
                            acks.lock().unwrap().del.push(id - 1);
                        }
                    }
                    if rng.gen_bool(0.1) {
                        let (put, del) = {
                            let mut a = acks.lock().unwrap();
                            (std::mem::take(&mut a.put), std::mem::take(&mut a.del))
                        };
                        // On a full device pending tombstones may find no room: not durable then.
                        match s.flush().await {
                            Ok(()) => {}
                            Err(StoreError::NoSpace { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                        if dev.lock().crashed {
                            return;
                        }
                        let mut a = acks.lock().unwrap();
                        a.durable.extend(put);
                        a.deleted.extend(del);
                    }
                    if rng.gen_bool(0.05) {
                        s.clean().await.unwrap();
                    }
                }
            });
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        tokio::time::sleep(std::time::Duration::from_millis(rng.gen_range(20..300))).await;
        let image = dev.crash(&mut rng).await;
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let a = std::mem::take(&mut *acks.lock().unwrap());
        let s = BlockStore::open(image, o).await.unwrap();
        // The explicit `clean()` below must find the dead space (the first store cleaned ahead).
        s.set_background_cleaning(false);
        for &id in &a.durable {
            if !a.del_started.contains(&id) {
                assert!(s.contains(id), "seed={seed} lost flushed block_id={id}");
            }
        }
        for &id in &a.deleted {
            assert!(!s.contains(id), "seed={seed} flushed delete undone block_id={id}");
        }
        for id in s.ids() {
            check(&s, id, crash_len(id)).await;
        }
        // Still writable: at once, or (the crash may leave it full) after deletes and a clean.
        if let Err(e) = s.put(999_999_999, b"still writable").await {
            assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
            println!("seed={seed} full after the crash: {e} {:?}", s.stats());
            for id in s.ids().into_iter().step_by(2) {
                s.delete(id).await.unwrap();
            }
            s.flush().await.unwrap();
            assert!(s.clean().await.unwrap().segments_freed > 0);
            s.put(999_999_999, b"still writable").await.unwrap();
        }
        println!(
            "seed={seed} durable={} deleted={} recovered={} {:?}",
            a.durable.len(),
            a.deleted.len(),
            s.stats().blocks,
            s.stats()
        );
    }
}

/// The same store on a real file through `open_device` (io_uring + O_DIRECT, or posix where
/// the filesystem refuses O_DIRECT), reopened from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_a_file_device_and_reopens() {
    use tidepool_spdk::{OpenOptions, open_device};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.img");
    let dopts = OpenOptions { create_size_bytes: Some(64 * MIB), ..OpenOptions::default() };
    let o = opts(4 * MIB, 1 << 20);
    let s = Arc::new(BlockStore::format(open_device(&path, &dopts).unwrap(), o.clone()).await.unwrap());
    let mut tasks = JoinSet::new();
    for t in 0..16u64 {
        let s = s.clone();
        tasks.spawn(async move { put_n(&s, t * 100..t * 100 + 10, 1 + (t as usize * 37_011) % 300_000).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    s.delete(0).await.unwrap();
    s.flush().await.unwrap();
    drop(s);
    let s = BlockStore::open(open_device(&path, &dopts).unwrap(), o).await.unwrap();
    assert_eq!(s.stats().blocks, 16 * 10 - 1);
    assert!(!s.contains(0));
    for t in 0..16u64 {
        for id in (t * 100..t * 100 + 10).filter(|&id| id != 0) {
            check(&s, id, 1 + (t as usize * 37_011) % 300_000).await;
        }
    }
}

/// Polls `done` every 10 ms for up to 20 s (cleaning ahead runs on its own task).
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("timed out after 20 s waiting for {what}");
}

/// Fills `s` with 20 KB blocks from id 0 until at most `free_left` segments are free; the ids put.
async fn fill_until_free(s: &BlockStore, free_left: u64) -> Vec<u64> {
    let mut ids = Vec::new();
    for id in 0.. {
        if s.stats().segments_free <= free_left {
            break;
        }
        s.put(id, &data(id, 20_000)).await.unwrap();
        ids.push(id);
    }
    ids
}

/// Deletes give space back without anyone calling `clean()`: the background task frees the
/// dead segments, the stats say so, and every live block still reads back. With cleaning
/// ahead turned off, the same deletes free nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_give_segments_back_without_clean() {
    for ahead in [true, false] {
        let dev = mem(21 * MIB); // 20 segments of 1 MiB
        let s = BlockStore::format(dev, opts(MIB, 64 << 10)).await.unwrap();
        s.set_background_cleaning(ahead);
        let ids = fill_until_free(&s, 3).await;
        for &id in ids.iter().filter(|&&id| id % 5 != 0) {
            s.delete(id).await.unwrap();
        }
        s.flush().await.unwrap();
        let before = s.stats();
        if ahead {
            // 80 % dead: ~3.5 segments of live blocks; the task stops at 15 free (3/4).
            wait_for("cleaning ahead to free 9 segments", || s.stats().segments_free >= 12).await;
            let st = s.stats();
            assert!(st.cleaned_segments_ahead >= 9, "{st:?}");
            assert_eq!(st.cleaned_segments, st.cleaned_segments_ahead, "only the background task cleaned: {st:?}");
            assert_eq!(st.cleaned_segments_for_puts, 0, "{st:?}");
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let st = s.stats();
            assert_eq!((st.cleaned_segments, st.segments_free), (0, before.segments_free), "{st:?}");
        }
        for &id in ids.iter().filter(|&&id| id % 5 == 0) {
            check(&s, id, 20_000).await;
        }
        s.close().await.unwrap();
    }
}

/// A put that finds no free segment cleans only what it needs (here two segments: the first
/// victim's live blocks go into the cleaner's reserve), not every victim while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_under_scarcity_cleans_only_what_it_needs() {
    let dev = mem(13 * MIB); // 12 segments of 1 MiB
    let s = BlockStore::format(dev, opts(MIB, 64 << 10)).await.unwrap();
    s.set_background_cleaning(false);
    let mut id = 0;
    loop {
        match s.put(id, &data(id, 20_000)).await {
            Ok(()) => id += 1,
            Err(StoreError::NoSpace { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let stored = id;
    for i in (0..stored).filter(|i| i % 4 != 0) {
        s.delete(i).await.unwrap();
    }
    s.flush().await.unwrap();
    // (The tombstones went into the cleaner's reserve: maybe no segment is free at all.)
    assert!(s.stats().segments_free <= 1, "{:?}", s.stats());
    s.put(stored, &data(stored, 20_000)).await.unwrap();
    let st = s.stats();
    assert!((1..=2).contains(&st.cleaned_segments_for_puts), "{st:?}");
    assert_eq!(st.cleaned_segments, st.cleaned_segments_for_puts, "{st:?}");
    // The rest of the dead space is still there for a later clean.
    let cs = s.clean().await.unwrap();
    assert!(cs.segments_freed >= 4, "the put cleaned more than it needed: {cs:?} {st:?}");
    for i in (0..stored).filter(|i| i % 4 == 0).chain([stored]) {
        check(&s, i, 20_000).await;
    }
}

/// After cleaning ahead moved blocks (and after a pass stopped in the middle by `close`), a
/// reopen finds every live block byte for byte and no deleted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_after_cleaning_ahead_recovers_every_block() {
    let dev = mem(21 * MIB);
    let o = opts(MIB, 64 << 10);
    let len = |id: u64| 1 + (id as usize * 7919) % 60_000;
    let s = BlockStore::format(dev.clone(), o.clone()).await.unwrap();
    let mut live = std::collections::BTreeSet::new();
    let mut next = 0u64;
    for round in 0..3u64 {
        // Write until few segments are free, then delete two thirds of everything.
        while s.stats().segments_free > 4 {
            s.put(next, &data(next, len(next))).await.unwrap();
            live.insert(next);
            next += 1;
        }
        let target = s.stats().cleaned_segments_ahead + 4;
        let doomed: Vec<u64> = live.iter().copied().filter(|id| id % 3 != round % 3).collect();
        for id in doomed {
            s.delete(id).await.unwrap();
            live.remove(&id);
        }
        s.flush().await.unwrap();
        if round < 2 {
            wait_for("cleaning ahead", || s.stats().cleaned_segments_ahead >= target).await;
        }
        // Round 2: closed at once, most likely in the middle of the pass the deletes started.
    }
    let st = s.stats();
    assert!(st.cleaned_segments_ahead >= 8, "{st:?}");
    s.close().await.unwrap();
    assert!(matches!(s.put(u64::MAX, b"x").await, Err(StoreError::Device(DeviceError::Stopped))));
    drop(s);
    let s = BlockStore::open(dev, o).await.unwrap();
    assert_eq!(s.stats().blocks, live.len() as u64);
    for id in 0..next {
        if live.contains(&id) {
            check(&s, id, len(id)).await;
        } else {
            assert!(!s.contains(id), "deleted block came back block_id={id}");
        }
    }
    s.put(next, b"writable after reopen").await.unwrap();
}

/// With most of the device free, cleaning ahead still frees segments left (nearly) empty by
/// deletes, which cost nothing to clean, but leaves half-dead ones alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_segments_are_freed_with_space_to_spare() {
    let dev = mem(21 * MIB); // 20 segments of 1 MiB, high watermark 15
    let s = BlockStore::format(dev, opts(MIB, 64 << 10)).await.unwrap();
    let ids = fill_until_free(&s, 16).await;
    // Every other block: segments half dead, above the high watermark: nothing to do.
    for &id in ids.iter().filter(|&&id| id % 2 == 1) {
        s.delete(id).await.unwrap();
    }
    s.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(s.stats().cleaned_segments, 0, "{:?}", s.stats());
    // The rest of the first 80 blocks (two segments of ~41): those segments are empty now.
    for &id in ids.iter().filter(|&&id| id % 2 == 0 && id < 80) {
        s.delete(id).await.unwrap();
    }
    s.flush().await.unwrap();
    wait_for("cleaning ahead to free the emptied segments", || s.stats().cleaned_segments_ahead >= 1).await;
    let st = s.stats();
    assert!(st.segments_free >= 16, "{st:?}");
    for &id in ids.iter().filter(|&&id| id % 2 == 0 && id >= 80) {
        check(&s, id, 20_000).await;
    }
    s.close().await.unwrap();
}

/// A device whose writes wait while its gate is closed.
struct Gated {
    inner: Dev,
    open: tokio::sync::watch::Sender<bool>,
}

impl BlockDevice for Gated {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        let mut open = self.open.subscribe();
        Box::pin(async move {
            let _ = open.wait_for(|o| *o).await;
            self.inner.write(offset, buf).await
        })
    }
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        self.inner.flush()
    }
}

/// A put, a delete and a flush whose callers stop waiting while their writes are on the
/// device (an S3 client hanging up mid-PUT) still run to their end: the next flush returns,
/// the put's block reads back, the deleted block is gone, and all of it survives a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_abandoned_mid_write_run_to_their_end() {
    use std::time::Duration;
    let base = mem(64 * MIB);
    let (open, _) = tokio::sync::watch::channel(true);
    let gated = Arc::new(Gated { inner: Arc::clone(&base), open });
    let dev: Dev = gated.clone();
    let o = opts(8 * MIB, 1 << 20);
    let s = BlockStore::format(Arc::clone(&dev), o.clone()).await.unwrap();
    put_n(&s, 0..40, 5000).await;
    s.flush().await.unwrap();

    gated.open.send_replace(false);
    let quick = Duration::from_millis(100);
    assert!(tokio::time::timeout(quick, s.put(100, &data(100, 300_000))).await.is_err(), "the put waits at the gate");
    // Enough deletes to fill a page of tombstones, so the last one writes.
    let mut dropped_delete = false;
    for id in 0..40 {
        if tokio::time::timeout(quick, s.delete(id)).await.is_err() {
            dropped_delete = true;
            break;
        }
    }
    assert!(tokio::time::timeout(quick, s.flush()).await.is_err(), "the flush waits at the gate");
    gated.open.send_replace(true);

    tokio::time::timeout(Duration::from_secs(20), s.flush())
        .await
        .expect("a flush after abandoned operations returns")
        .unwrap();
    check(&s, 100, 300_000).await;
    let deleted: Vec<u64> = (0..40).filter(|&id| s.block_len(id).is_none()).collect();
    assert!(!deleted.is_empty(), "some deletes ran (one abandoned: {dropped_delete})");
    drop(s);
    let s = BlockStore::open(base, o).await.unwrap();
    check(&s, 100, 300_000).await;
    for id in 0..40 {
        if deleted.contains(&id) {
            assert_eq!(s.block_len(id), None, "block {id} deleted before the reopen");
        } else {
            check(&s, id, 5000).await;
        }
    }
}

/// Segments whose only dead space is the tail no entry fits in are not worth cleaning: moving
/// their blocks would leave the same tail in the segment they move to. Before this rule the
/// background cleaner could move the same blocks round and round without end (a tiering test
/// on a 24 MiB device with 2 MiB segments spun for minutes).
#[tokio::test]
async fn segments_whose_dead_space_is_an_unusable_tail_are_not_cleaned() {
    let dev = mem(SEG0 + 8 * MIB); // 4 segments of 2 MiB
    let s = BlockStore::format(dev, opts(2 * MIB, MIB as usize)).await.unwrap();
    s.set_background_cleaning(false);
    // Two 700 KB blocks per segment: a third does not fit, so each sealed segment is ~1/3
    // "dead" tail, more than `clean()`'s quarter, yet less than one largest entry.
    put_n(&s, 0..6, 700_000).await;
    s.flush().await.unwrap();
    let cs = s.clean().await.unwrap();
    assert_eq!((cs.segments_freed, cs.blocks_moved), (0, 0), "{cs:?}");
    for id in 0..6 {
        check(&s, id, 700_000).await;
    }
    // Real dead space still gets cleaned.
    s.delete(0).await.unwrap();
    s.flush().await.unwrap();
    let cs = s.clean().await.unwrap();
    assert_eq!(cs.segments_freed, 1, "{cs:?}");
    for id in 1..6 {
        check(&s, id, 700_000).await;
    }
}
