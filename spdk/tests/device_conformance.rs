//! One conformance suite for [`BlockDevice`], run against every engine: memory, posix on a
//! file, io_uring on a file, `open_device` on tmpfs and on ramfs (where O_DIRECT is refused and
//! the posix fallback must kick in) and io_uring on a loop block device.
//!
//! The ramfs and loop-device cases need root (mount, losetup); without it they print a
//! "skipped: ..." line and pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tidepool_spdk::device::mem::MemDevice;
use tidepool_spdk::device::posix::PosixDevice;
use tidepool_spdk::device::uring::UringDevice;
use tidepool_spdk::{AlignedBuf, BlockDevice, DeviceError, EngineKind, OpenOptions, open_device};
use tokio::task::JoinSet;

const DEV_BYTES: u64 = 64 << 20;

type Dev = Arc<dyn BlockDevice>;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Bytes that depend on the absolute device offset and a salt, so a misplaced or stale block
/// is caught.
fn pattern(offset: u64, len: usize, salt: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(len);
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let word = splitmix((offset + 8 * i as u64) ^ salt.rotate_left(17)).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    buf
}

async fn write_ok(dev: &Dev, offset: u64, buf: AlignedBuf) -> AlignedBuf {
    let len = buf.len();
    let (buf, res) = dev.write(offset, buf).await;
    if let Err(e) = res {
        panic!("write offset={offset} len={len} failed: {e}");
    }
    assert_eq!(buf.len(), len, "write must hand the buffer back unchanged");
    buf
}

async fn read_ok(dev: &Dev, offset: u64, len: usize) -> AlignedBuf {
    let (buf, res) = dev.read(offset, AlignedBuf::zeroed(len)).await;
    if let Err(e) = res {
        panic!("read offset={offset} len={len} failed: {e}");
    }
    assert_eq!(buf.len(), len);
    buf
}

async fn assert_reads(dev: &Dev, offset: u64, len: usize, salt: u64) {
    let got = read_ok(dev, offset, len).await;
    let want = pattern(offset, len, salt);
    if got[..] != want[..] {
        let first = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(0);
        panic!("data mismatch offset={offset} len={len} salt={salt} first_bad_byte={first}");
    }
}

fn round_down(n: u64, align: usize) -> u64 {
    n / align as u64 * align as u64
}

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

/// Run every conformance case on `dev`, which must be at least 16 MiB and served by `engine`.
async fn run_suite(dev: Dev, engine: EngineKind) {
    check_info(&dev, engine);
    round_trip(&dev).await;
    rejects_unaligned(&dev).await;
    rejects_out_of_range(&dev).await;
    concurrent_io(&dev, 256).await;
    flush_ok(&dev).await;
    abandoned_futures(&dev).await;
}

fn check_info(dev: &Dev, engine: EngineKind) {
    let info = dev.info();
    assert_eq!(info.engine, engine, "engine kind");
    assert!(info.align_bytes.is_power_of_two(), "align_bytes={}", info.align_bytes);
    assert!(info.align_bytes >= 512 && info.align_bytes <= 4096, "align_bytes={}", info.align_bytes);
    assert!(info.size_bytes >= 16 << 20, "size_bytes={}", info.size_bytes);
    assert_eq!(info.size_bytes % info.align_bytes as u64, 0, "size is a multiple of the alignment");
    assert!(info.queue_depth >= 1);
}

/// Write then read back at many offsets and sizes, 4 KiB .. 4 MiB (and one alignment unit).
async fn round_trip(dev: &Dev) {
    let info = dev.info().clone();
    let align = info.align_bytes;
    let mut sizes =
        vec![align, 4 << 10, 8 << 10, 12 << 10, 64 << 10, 132 << 10, 1 << 20, (3 << 20) + (4 << 10), 4 << 20];
    sizes.dedup();
    for (n, &len) in sizes.iter().enumerate() {
        let offsets = [
            0,
            7 * align as u64,
            (1 << 20) + 3 * align as u64,
            round_down(info.size_bytes / 2 + 12345, align),
            info.size_bytes - len as u64,
        ];
        for (k, &offset) in offsets.iter().enumerate() {
            let salt = (n * 16 + k) as u64;
            write_ok(dev, offset, pattern(offset, len, salt)).await;
            assert_reads(dev, offset, len, salt).await;
        }
    }
}

async fn rejects_unaligned(dev: &Dev) {
    let align = dev.info().align_bytes;
    let cases = [(align as u64 / 2, align), (0, align + align / 2), (3, 4096), (0, 1)];
    for (offset, len) in cases {
        let (buf, res) = dev.write(offset, AlignedBuf::zeroed(len)).await;
        assert!(matches!(res, Err(DeviceError::Unaligned { .. })), "write offset={offset} len={len}: {res:?}");
        assert_eq!(buf.len(), len);
        let (buf, res) = dev.read(offset, AlignedBuf::zeroed(len)).await;
        assert!(matches!(res, Err(DeviceError::Unaligned { .. })), "read offset={offset} len={len}: {res:?}");
        assert_eq!(buf.len(), len);
    }
}

async fn rejects_out_of_range(dev: &Dev) {
    let size = dev.info().size_bytes;
    let align = dev.info().align_bytes;
    let cases = [
        (size, align),
        (size - align as u64, 2 * align),
        (size + (1 << 30), 4096),
        (round_down(u64::MAX, align), align),
    ];
    for (offset, len) in cases {
        let (buf, res) = dev.write(offset, AlignedBuf::zeroed(len)).await;
        assert!(matches!(res, Err(DeviceError::OutOfRange { .. })), "write offset={offset} len={len}: {res:?}");
        assert_eq!(buf.len(), len);
        let (_, res) = dev.read(offset, AlignedBuf::zeroed(len)).await;
        assert!(matches!(res, Err(DeviceError::OutOfRange { .. })), "read offset={offset} len={len}: {res:?}");
    }
}

/// `count` random, distinct 4 KiB slots written all at once (with a flush racing them), then
/// read all at once, each checked.
async fn concurrent_io(dev: &Dev, count: usize) {
    const BLOCK: usize = 4096;
    let mut rng = SmallRng::seed_from_u64(0x7d1e_9001 ^ count as u64);
    let salt: u64 = rng.r#gen();
    let mut slots: Vec<u64> = (0..dev.info().size_bytes / BLOCK as u64).collect();
    slots.shuffle(&mut rng);
    slots.truncate(count);

    let mut set = JoinSet::new();
    for (i, &slot) in slots.iter().enumerate() {
        let dev = Arc::clone(dev);
        set.spawn(async move {
            let offset = slot * BLOCK as u64;
            write_ok(&dev, offset, pattern(offset, BLOCK, salt)).await;
            if i == count / 2 {
                dev.flush().await.expect("flush racing writes");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("write task panicked");
    }
    let mut set = JoinSet::new();
    for &slot in &slots {
        let dev = Arc::clone(dev);
        set.spawn(async move { assert_reads(&dev, slot * BLOCK as u64, BLOCK, salt).await });
    }
    while let Some(r) = set.join_next().await {
        r.expect("read task panicked");
    }
}

async fn flush_ok(dev: &Dev) {
    dev.flush().await.expect("flush with nothing written");
    write_ok(dev, 0, pattern(0, 8192, 99)).await;
    dev.flush().await.expect("flush after a write");
    assert_reads(dev, 0, 8192, 99).await;
}

/// Futures polled once (request handed to the engine) and then dropped must not break the
/// device or its memory; the engine keeps the buffer until the kernel is done with it.
async fn abandoned_futures(dev: &Dev) {
    for i in 0..32u64 {
        let offset = (i + 100) * 65536;
        let _ = tokio::time::timeout(Duration::ZERO, dev.write(offset, pattern(offset, 65536, 5))).await;
        let _ = tokio::time::timeout(Duration::ZERO, dev.read(offset, AlignedBuf::zeroed(65536))).await;
    }
    let _ = tokio::time::timeout(Duration::ZERO, dev.flush()).await;
    write_ok(dev, 4096, pattern(4096, 4096, 6)).await;
    assert_reads(dev, 4096, 4096, 6).await;
}

/// Data written and flushed through one handle is there after it is dropped and the path is
/// opened again (with the same or another engine).
async fn survives_reopen(open_a: impl Fn() -> Dev, open_b: impl Fn() -> Dev) {
    let cases = [(0u64, 4096usize), (1 << 20, 1 << 20), (8 << 20, 12288)];
    let dev = open_a();
    for (offset, len) in cases {
        write_ok(&dev, offset, pattern(offset, len, 0xfeed)).await;
    }
    dev.flush().await.expect("flush before drop");
    drop(dev);
    let dev = open_b();
    for (offset, len) in cases {
        assert_reads(&dev, offset, len, 0xfeed).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Engines
// ---------------------------------------------------------------------------------------------

fn file_opts() -> OpenOptions {
    OpenOptions { create_size_bytes: Some(DEV_BYTES), ..OpenOptions::default() }
}

fn open_posix(path: &Path) -> Dev {
    Arc::new(PosixDevice::open(path, &file_opts()).expect("open posix device"))
}

fn open_uring(path: &Path) -> Dev {
    Arc::new(UringDevice::open(path, &file_opts()).expect("open io_uring device"))
}

/// A scratch directory on the ext4 root (not tmpfs), so O_DIRECT works.
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/tmp").expect("tempdir in /tmp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_device() {
    run_suite(Arc::new(MemDevice::new(DEV_BYTES)), EngineKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_on_file() {
    let dir = disk_dir();
    let path = dir.path().join("dev.img");
    let dev = open_posix(&path);
    assert_eq!(dev.info().size_bytes, DEV_BYTES);
    assert_eq!(dev.info().align_bytes, 4096);
    run_suite(dev, EngineKind::Posix).await;
    survives_reopen(|| open_posix(&path), || open_posix(&path)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_on_file() {
    let dir = disk_dir();
    let path = dir.path().join("dev.img");
    let dev = open_uring(&path);
    assert_eq!(dev.info().size_bytes, DEV_BYTES);
    assert_eq!(dev.info().align_bytes, 4096);
    assert_eq!(dev.info().queue_depth, 64);
    run_suite(dev, EngineKind::Uring).await;
    survives_reopen(|| open_uring(&path), || open_uring(&path)).await;
    // Both engines see the same bytes.
    survives_reopen(|| open_uring(&path), || open_posix(&path)).await;
    survives_reopen(|| open_posix(&path), || open_uring(&path)).await;
}

/// A tiny queue depth forces requests to wait in the engine's queue, and flushes to wait
/// behind in-flight writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_small_queue_depth() {
    let dir = disk_dir();
    for qd in [1, 2, 3] {
        let path = dir.path().join(format!("qd{qd}.img"));
        let opts = OpenOptions { queue_depth: qd, ..file_opts() };
        let dev: Dev = Arc::new(UringDevice::open(&path, &opts).expect("open io_uring device"));
        assert_eq!(dev.info().queue_depth, qd);
        concurrent_io(&dev, 256).await;
        flush_ok(&dev).await;
        abandoned_futures(&dev).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_size_rules() {
    let dir = disk_dir();
    let opts = |size: Option<u64>| OpenOptions { create_size_bytes: size, ..OpenOptions::default() };
    type Opener = fn(&Path, &OpenOptions) -> Result<Dev, DeviceError>;
    let openers: [(&str, Opener); 2] = [
        ("posix", |p, o| Ok(Arc::new(PosixDevice::open(p, o)?))),
        ("io_uring", |p, o| Ok(Arc::new(UringDevice::open(p, o)?))),
    ];
    for (name, open) in openers {
        let path = dir.path().join(format!("{name}.img"));
        let missing = open(&path, &opts(None));
        assert!(matches!(missing, Err(DeviceError::Open { .. })), "{name}: missing file without create_size");
        assert_eq!(open(&path, &opts(Some(1 << 20))).expect("create").info().size_bytes, 1 << 20);
        assert_eq!(open(&path, &opts(Some(2 << 20))).expect("grow").info().size_bytes, 2 << 20);
        assert_eq!(open(&path, &opts(Some(1 << 20))).expect("no shrink").info().size_bytes, 2 << 20);
        assert_eq!(open(&path, &opts(None)).expect("existing").info().size_bytes, 2 << 20);
        // An unaligned file size is rounded down to the alignment.
        std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len((3 << 20) + 100)).expect("set_len");
        assert_eq!(open(&path, &opts(None)).expect("unaligned size").info().size_bytes, 3 << 20);
    }
}

fn o_direct_accepted(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).is_ok()
}

/// `open_device` on tmpfs. Since Linux 6.6 tmpfs accepts O_DIRECT (served from the page
/// cache), so the engine chosen depends on the kernel: posix where O_DIRECT is refused,
/// io_uring where it is accepted. The ramfs test below is the one that always refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_device_on_tmpfs() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir in /dev/shm");
    let path = dir.path().join("dev.img");
    let dev = open_device(&path, &file_opts()).expect("open_device on tmpfs");
    let expected = if o_direct_accepted(&path) { EngineKind::Uring } else { EngineKind::Posix };
    println!(
        "tmpfs: O_DIRECT {}; open_device chose {}",
        if expected == EngineKind::Uring { "accepted" } else { "refused" },
        dev.info().engine
    );
    run_suite(dev, expected).await;
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not unmount {}", self.0.display());
        }
    }
}

/// ramfs refuses O_DIRECT (EINVAL): io_uring must fail to open with `Open`, and `open_device`
/// must fall back to the posix engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_device_falls_back_to_posix_on_ramfs() {
    let dir = disk_dir();
    let mnt = dir.path().join("ramfs");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = is_root()
        && Command::new("mount").args(["-t", "ramfs", "tidepool-test"]).arg(&mnt).status().is_ok_and(|s| s.success());
    if !mounted {
        println!("skipped: mounting ramfs not permitted (needs root)");
        return;
    }
    let _guard = Mount(mnt.clone());
    let path = mnt.join("dev.img");
    let refused = UringDevice::open(&path, &file_opts());
    assert!(matches!(refused, Err(DeviceError::Open { .. })), "io_uring on ramfs must be refused: {:?}", refused.err());
    let dev = open_device(&path, &file_opts()).expect("open_device on ramfs");
    assert_eq!(dev.info().engine, EngineKind::Posix);
    run_suite(dev, EngineKind::Posix).await;
}

/// Detaches the loop device on drop.
struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let ok = Command::new("losetup").args(["-d", &self.0]).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not detach {}", self.0);
        }
    }
}

fn losetup(file: &Path, direct: bool) -> Option<String> {
    let mut cmd = Command::new("losetup");
    cmd.args(["--find", "--show"]);
    if direct {
        cmd.arg("--direct-io=on");
    }
    let out = cmd.arg(file).output().ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && name.starts_with("/dev/loop")).then_some(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uring_on_loop_device() {
    let dir = disk_dir();
    let backing = dir.path().join("loop.img");
    std::fs::File::create(&backing).and_then(|f| f.set_len(DEV_BYTES)).expect("backing file");
    let attached = if is_root() { losetup(&backing, true).or_else(|| losetup(&backing, false)) } else { None };
    let Some(name) = attached else {
        println!("skipped: losetup not permitted (needs root and /dev/loop-control)");
        return;
    };
    let guard = LoopDev(name);
    let path = PathBuf::from(&guard.0);
    let opts = OpenOptions::default();
    let dev: Dev = Arc::new(UringDevice::open(&path, &opts).expect("open loop device with io_uring"));
    println!("loop device {} align_bytes={} size_bytes={}", guard.0, dev.info().align_bytes, dev.info().size_bytes);
    assert_eq!(dev.info().size_bytes, DEV_BYTES);
    run_suite(dev, EngineKind::Uring).await;
    let open = || -> Dev { Arc::new(UringDevice::open(&path, &opts).expect("reopen loop device")) };
    survives_reopen(open, open).await;
    // The posix engine on the same block device sees the same bytes.
    let open_posix_blk = || -> Dev { Arc::new(PosixDevice::open(&path, &opts).expect("posix on loop device")) };
    survives_reopen(open, open_posix_blk).await;
}
