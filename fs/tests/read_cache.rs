//! The read cache through the filesystem API: a second read of a range does not touch the
//! device, a cache of 0 bytes is off, freed blocks leave it, and bytes that fail their
//! checksum never enter it. A device wrapper counts reads and can corrupt what it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tidepool_cluster::{ManualClock, MetaGroup, MetaState, RaftOptions};
use tidepool_fs::{ErrorKind, Fs, FsOptions, MetricsSnapshot, ROOT_INO};
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::device::{IoFuture, IoResult};
use tidepool_spdk::{AlignedBuf, BlockDevice, BlockStore, DeviceError, DeviceInfo, StoreOptions};

const BLOCK: usize = 1 << 20;

/// Counts reads; with `corrupt` set, flips a byte in every buffer it reads.
struct Device {
    inner: MemDevice,
    reads: AtomicU64,
    corrupt: AtomicBool,
}

impl BlockDevice for Device {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let (mut buf, res) = self.inner.read(offset, buf).await;
            if self.corrupt.load(Ordering::SeqCst) && !buf.is_empty() {
                let n = buf.len();
                buf[n - 1] ^= 0x5a;
            }
            (buf, res)
        })
    }
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        self.inner.write(offset, buf)
    }
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        self.inner.flush()
    }
}

struct Env {
    _dir: tempfile::TempDir,
    fs: Fs,
    dev: Arc<Device>,
}

async fn env(read_cache_bytes: u64) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let dev =
        Arc::new(Device { inner: MemDevice::new(64 << 20), reads: AtomicU64::new(0), corrupt: AtomicBool::new(false) });
    let opts = StoreOptions { segment_bytes: 4 << 20, max_block_bytes: BLOCK, crc_cache_bytes: 1 << 20 };
    let store = Arc::new(BlockStore::format(dev.clone(), opts).await.unwrap());
    let meta = MetaGroup::open(&dir.path().join("meta"), RaftOptions::default(), MetaState::new()).unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000_000));
    let fopts = FsOptions { block_size: BLOCK, id_batch: 64, read_cache_bytes, ..FsOptions::default() };
    let (fs, _) = Fs::open(meta, store, clock, fopts).await.unwrap();
    Env { _dir: dir, fs, dev }
}

fn bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

impl Env {
    fn reads(&self) -> u64 {
        self.dev.reads.load(Ordering::SeqCst)
    }
    fn m(&self) -> MetricsSnapshot {
        self.fs.metrics().snapshot()
    }
    async fn file(&self, name: &str, data: &[u8]) -> u64 {
        let f = self.fs.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0).await.unwrap();
        self.fs.write(f.ino, 0, data).await.unwrap();
        f.ino
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_read_of_a_range_does_not_touch_the_device() {
    let e = env(16 << 20).await;
    let data = bytes(1, 2 * BLOCK + 5000);
    let ino = e.file("f", &data).await;
    assert_eq!(e.m().read_cache_bytes, 0, "a write does not fill the cache");
    // Unaligned, and across the boundary of blocks 1 and 2.
    for (off, len) in [(10_000usize, 7000usize), (BLOCK - 3000, 9000), (2 * BLOCK, 5000)] {
        let (r0, m0) = (e.reads(), e.m());
        assert_eq!(e.fs.read(ino, off as u64, len).await.unwrap(), data[off..off + len]);
        let (r1, m1) = (e.reads(), e.m());
        assert!(r1 > r0, "the first read goes to the device");
        assert!(m1.read_cache_misses > m0.read_cache_misses);
        assert_eq!(m1.read_cache_hits, m0.read_cache_hits);
        // Again, and a part of it: from RAM.
        assert_eq!(e.fs.read(ino, off as u64, len).await.unwrap(), data[off..off + len]);
        assert_eq!(e.fs.read(ino, off as u64 + 100, len - 200).await.unwrap(), data[off + 100..off + len - 100]);
        let m2 = e.m();
        assert_eq!(e.reads(), r1, "no device read for a cached range (offset {off})");
        assert_eq!(m2.read_cache_misses, m1.read_cache_misses);
        assert!(m2.read_cache_hits >= m1.read_cache_hits + 2);
    }
    let m = e.m();
    assert!(m.read_cache_bytes > 0 && m.read_cache_bytes <= m.read_cache_capacity_bytes, "{m:?}");
    // The whole file: the cached pages do not make the other ranges wrong.
    assert_eq!(e.fs.read(ino, 0, data.len()).await.unwrap(), data);
    assert_eq!(e.fs.read(ino, 0, data.len()).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_bytes_turns_the_cache_off() {
    let e = env(0).await;
    let data = bytes(2, BLOCK + 100);
    let ino = e.file("f", &data).await;
    for _ in 0..3 {
        let r0 = e.reads();
        assert_eq!(e.fs.read(ino, 4096, 8192).await.unwrap(), data[4096..4096 + 8192]);
        assert!(e.reads() > r0, "every read goes to the device");
    }
    let m = e.m();
    assert_eq!((m.read_cache_hits, m.read_cache_misses, m.read_cache_bytes, m.read_cache_capacity_bytes), (0, 0, 0, 0));
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_blocks_leave_the_cache() {
    let e = env(16 << 20).await;
    let a = bytes(3, BLOCK + 4096);
    let ino = e.file("a", &a).await;
    let keep = bytes(4, 3 * 4096);
    let other = e.file("b", &keep).await;
    assert_eq!(e.fs.read(ino, 0, a.len()).await.unwrap(), a);
    assert_eq!(e.fs.read(other, 0, keep.len()).await.unwrap(), keep);
    let held_b = {
        let all = e.m().read_cache_bytes;
        assert!(all > a.len() as u64, "{all}");
        all
    };
    // Overwrite the start of `a`: its first block is freed, the new one is read from the device.
    let patch = bytes(5, BLOCK);
    e.fs.write(ino, 0, &patch).await.unwrap();
    let r0 = e.reads();
    assert_eq!(e.fs.read(ino, 0, 4096).await.unwrap(), patch[..4096]);
    assert!(e.reads() > r0, "new block: not cached");
    // Removing `a` frees its blocks, new and old: only `b`'s 3 pages stay.
    e.fs.unlink(ROOT_INO, b"a").await.unwrap();
    let per_page = |n: u64| n * (4096 + 128);
    wait_for("a's pages to go", || e.m().read_cache_bytes == per_page(3)).await;
    assert!(held_b > per_page(3));
    let r1 = e.reads();
    assert_eq!(e.fs.read(other, 0, keep.len()).await.unwrap(), keep);
    assert_eq!(e.reads(), r1, "b's pages stayed");
    e.fs.unlink(ROOT_INO, b"b").await.unwrap();
    wait_for("every page to go", || e.m().read_cache_bytes == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_fails_its_checksum_is_never_cached() {
    let e = env(16 << 20).await;
    let data = bytes(6, 4 * 4096);
    let ino = e.file("f", &data).await;
    // Page 0 read (and cached) while the device is sound; this also caches the block's crcs.
    assert_eq!(e.fs.read(ino, 0, 4096).await.unwrap(), data[..4096]);
    let held = e.m().read_cache_bytes;
    e.dev.corrupt.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let err = e.fs.read(ino, 8192, 4096).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    }
    assert_eq!(e.m().read_cache_bytes, held, "nothing of the corrupt reads went in");
    assert_eq!(e.fs.read(ino, 0, 4096).await.unwrap(), data[..4096], "a page verified before is still served");
    e.dev.corrupt.store(false, Ordering::SeqCst);
    assert_eq!(e.fs.read(ino, 8192, 4096).await.unwrap(), data[8192..12288]);
    assert!(e.m().read_cache_bytes > held);
}

/// `Fs::read_bytes` joined, for comparing with `Fs::read`.
async fn read_joined(fs: &Fs, ino: u64, off: u64, len: usize) -> Vec<u8> {
    let pieces = fs.read_bytes(ino, off, len).await.unwrap();
    assert!(pieces.iter().all(|p| !p.is_empty()), "no empty pieces");
    pieces.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_bytes_answers_what_read_does_with_and_without_the_cache() {
    for cache in [16u64 << 20, 0] {
        let e = env(cache).await;
        // Three blocks, a hole of a block and a half, then a short tail: [data][hole][tail].
        let head = bytes(7, 3 * BLOCK - 1000);
        let ino = e.file("f", &head).await;
        let tail_at = (4 * BLOCK + BLOCK / 2) as u64;
        let tail = bytes(8, 5000);
        e.fs.write(ino, tail_at, &tail).await.unwrap();
        let size = tail_at as usize + tail.len();
        let mut want = vec![0u8; size];
        want[..head.len()].copy_from_slice(&head);
        want[tail_at as usize..].copy_from_slice(&tail);
        let ranges = [
            (0, size),                       // everything, to the end
            (0, size + 12345),               // past the end: clipped
            (BLOCK - 100, 200),              // across a block boundary
            (BLOCK + 3, 2 * BLOCK),          // unaligned, over three blocks
            (3 * BLOCK - 2000, BLOCK),       // data into the hole
            (3 * BLOCK + 10, BLOCK),         // inside the hole only
            (4 * BLOCK, BLOCK),              // hole into the tail
            (tail_at as usize + 4000, 5000), // the short tail, clipped
            (size - 1, 1),
            (size, 10),      // at the end: nothing
            (size + 10, 10), // past the end: nothing
            (12_345, 0),
        ];
        for pass in 0..2 {
            for (off, len) in ranges {
                let end = (off + len).min(size).max(off.min(size));
                let got = read_joined(&e.fs, ino, off as u64, len).await;
                assert_eq!(got.len(), end - off.min(size), "cache {cache} pass {pass} range {off}+{len}");
                assert!(got == want[off.min(size)..end], "cache {cache} pass {pass} range {off}+{len}");
                assert_eq!(got, e.fs.read(ino, off as u64, len).await.unwrap());
            }
        }
        if cache > 0 {
            let m = e.m();
            assert!(m.read_cache_hits > 0 && m.read_cache_misses > 0, "{m:?}");
        }
        // A short file: one piece, shorter than asked.
        let small = e.file("small", b"hello").await;
        let p = e.fs.read_bytes(small, 0, BLOCK).await.unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(&p[0][..], b"hello");
        assert!(e.fs.read_bytes(small, 5, 10).await.unwrap().is_empty());
        let empty = e.fs.create(ROOT_INO, b"empty", 0o644, 0, 0).await.unwrap();
        assert!(e.fs.read_bytes(empty.ino, 0, 10).await.unwrap().is_empty());
        // Not a file.
        let dir = e.fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).await.unwrap();
        assert!(e.fs.read_bytes(dir.ino, 0, 10).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_bytes_reports_a_corrupt_page_and_caches_nothing_of_it() {
    for cache in [16u64 << 20, 0] {
        let e = env(cache).await;
        let data = bytes(9, 2 * BLOCK);
        let ino = e.file("f", &data).await;
        // The crcs of both blocks are read (and cached by the store) while the device is sound.
        assert_eq!(read_joined(&e.fs, ino, 0, 4096).await, data[..4096]);
        assert_eq!(read_joined(&e.fs, ino, BLOCK as u64, 4096).await, data[BLOCK..BLOCK + 4096]);
        let held = e.m().read_cache_bytes;
        e.dev.corrupt.store(true, Ordering::SeqCst);
        for (off, len) in [(8192u64, 4096usize), (BLOCK as u64 - 4096, 8192), (0, 2 * BLOCK)] {
            let err = e.fs.read_bytes(ino, off, len).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "cache {cache} range {off}+{len}: {err}");
        }
        assert_eq!(e.m().read_cache_bytes, held, "nothing of the corrupt reads went in");
        if cache > 0 {
            assert_eq!(read_joined(&e.fs, ino, 0, 4096).await, data[..4096], "a page verified before is still served");
        }
        e.dev.corrupt.store(false, Ordering::SeqCst);
        assert_eq!(read_joined(&e.fs, ino, 0, 2 * BLOCK).await, data);
    }
}

/// An S3 PUT's blocks (`stage_owned`) enter the cache as written: a read after the commit does
/// not touch the device, and its answer is the written bytes. A short tail block and a buffer
/// with much spare room do not go in; discarded staged blocks leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_owned_blocks_are_read_from_ram() {
    let e = env(64 << 20).await;
    let data = bytes(7, 2 * BLOCK + 5000);
    let f = e.fs.create(ROOT_INO, b"put", 0o644, 0, 0).await.unwrap();
    let staged = e.fs.stage_owned(data.clone()).await.unwrap();
    let held = e.m().read_cache_bytes;
    assert_eq!(held, 2 * (BLOCK / 4096) as u64 * 4224, "the two whole blocks, not the tail");
    e.fs.commit_staged(f.ino, 0, staged).await.unwrap();
    let r0 = e.reads();
    let pieces = e.fs.read_bytes(f.ino, 100, 2 * BLOCK - 200).await.unwrap();
    assert_eq!(pieces.concat(), data[100..2 * BLOCK - 100]);
    assert_eq!(e.fs.read(f.ino, BLOCK as u64 - 10, 20).await.unwrap(), data[BLOCK - 10..BLOCK + 10]);
    assert_eq!(e.reads(), r0, "no device read for the written blocks");
    assert_eq!(e.m().read_cache_misses, 0);
    assert_eq!(e.fs.read(f.ino, 0, data.len()).await.unwrap(), data, "the tail from the device");
    // A buffer with room for four times its bytes is not kept; discarded blocks go.
    let mut roomy = Vec::with_capacity(4 * BLOCK);
    roomy.extend_from_slice(&data[..BLOCK]);
    let before = e.m().read_cache_bytes;
    let s = e.fs.stage_owned(roomy).await.unwrap();
    assert_eq!(e.m().read_cache_bytes, before, "a roomy buffer is not kept");
    e.fs.discard_staged(s).await;
    let s = e.fs.stage_owned(bytes(8, BLOCK)).await.unwrap();
    assert!(e.m().read_cache_bytes > before);
    e.fs.discard_staged(s).await;
    assert_eq!(e.m().read_cache_bytes, before, "discarded staged blocks leave the cache");
}
