//! The fast engine: io_uring with O_DIRECT on a regular file or a raw block device.
//!
//! No engine thread sits between callers and the kernel ([`engine`]): a caller's task pushes its
//! SQE under a short mutex and submits it with one non-waiting `io_uring_enter` on its own
//! thread. Completions are reaped by a reaper task on the caller's tokio runtime, woken through
//! an eventfd registered with the ring and watched by tokio's reactor: a completion wakes the
//! worker that is parked in the reactor (or is picked up by a busy one), which answers the
//! waiting tasks on that worker, with no hop through another thread. Submitters also reap
//! completions they find posted. Outside a tokio runtime with I/O enabled, or if that runtime
//! shuts down while I/O is in flight, a fallback thread reaps instead.
//!
//! Buffers are owned by the request until its completion arrives: the kernel may write into
//! them until then, so a caller that drops its future only gives up the result, never the
//! memory. Dropping the device waits for every submitted I/O to complete.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use io_uring::{IoUring, opcode, types};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::posix::{Backing, open_backing};
use super::{BlockDevice, DeviceError, DeviceInfo, EngineKind, IoFuture, IoResult, OpenOptions, check_io};
use crate::buf::{AlignedBuf, PageArena};

mod engine;

use engine::{Core, Op, Registered, Request};

/// Largest queue depth we ask the kernel for (its own limit is 32768 SQ entries).
const MAX_QUEUE_DEPTH: usize = 4096;
/// Pages of the registered arena single-page I/O runs on (2 MiB: one huge page). Registered
/// memory counts against RLIMIT_MEMLOCK for users without CAP_IPC_LOCK (often 8 MiB); where the
/// kernel refuses it, the device runs without.
const ARENA_PAGES: usize = 512;
/// How long the fallback reaper thread sleeps between checks that the device still exists.
const THREAD_REAPER_TICK: Duration = Duration::from_millis(100);

/// io_uring + O_DIRECT device. Dropping it waits until every submitted I/O has completed.
pub struct UringDevice {
    info: DeviceInfo,
    shared: Arc<Shared>,
}

struct Shared {
    core: Core,
    /// A reaper task is running on some tokio runtime.
    tokio_reaper: AtomicBool,
    /// The fallback reaper thread is running.
    thread_reaper: AtomicBool,
    /// Serialises starting reapers.
    starting: Mutex<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.core.shutdown();
        // Wake the reapers so they see the device is gone and exit.
        signal(&self.core.efd);
    }
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success we own the returned fd.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd. It can only fail with EAGAIN when the
    // counter is saturated, in which case it is signalled anyway.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Reset an eventfd's counter (non-blocking; EAGAIN when it was zero is harmless).
fn clear(fd: i32) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a valid u64.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

impl Shared {
    /// Make sure some reaper will see completions: a task on the current tokio runtime if there
    /// is one with I/O enabled, else the fallback thread.
    fn ensure_reaper(self: &Arc<Self>) {
        if self.tokio_reaper.load(Ordering::Acquire) || self.thread_reaper.load(Ordering::Acquire) {
            return;
        }
        let _g = self.starting.lock().unwrap_or_else(PoisonError::into_inner);
        if self.tokio_reaper.load(Ordering::Acquire) || self.thread_reaper.load(Ordering::Acquire) {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            match self.core.efd.try_clone() {
                Ok(fd) => {
                    let _enter = handle.enter();
                    // Registering panics (rather than failing) on a runtime without I/O enabled.
                    let afd = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        // SAFETY: `fd` is an OwnedFd: open, and owned by the AsyncFd for its whole life.
                        unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.to_string())
                    }));
                    match afd {
                        Ok(Ok(afd)) => {
                            self.tokio_reaper.store(true, Ordering::Release);
                            let guard = ReaperGuard(Arc::downgrade(self));
                            handle.spawn(reaper_task(Arc::downgrade(self), afd, guard));
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "io_uring reaper: cannot register with tokio; using a thread")
                        }
                        Err(_) => tracing::debug!("io_uring reaper: tokio runtime without I/O; using a thread"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "io_uring reaper: cannot dup eventfd; using a thread"),
            }
        }
        self.start_thread_reaper();
    }

    fn start_thread_reaper(self: &Arc<Self>) {
        if self.thread_reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = self.core.efd.try_clone().and_then(|fd| {
            std::thread::Builder::new().name("tidepool-uring-reap".into()).spawn(move || thread_reaper(weak, fd))
        });
        if let Err(e) = spawned {
            // Nothing else can reap: the next submission tries again.
            tracing::error!(error = %e, "io_uring: cannot start the reaper thread");
            self.thread_reaper.store(false, Ordering::Release);
        }
    }
}

/// Marks the tokio reaper gone when its task ends or is dropped (its runtime shut down). If
/// I/O is still in flight then, the fallback thread takes over so it still completes.
struct ReaperGuard(Weak<Shared>);

impl Drop for ReaperGuard {
    fn drop(&mut self) {
        if let Some(sh) = self.0.upgrade() {
            sh.tokio_reaper.store(false, Ordering::Release);
            if sh.core.in_flight() > 0 {
                sh.start_thread_reaper();
            }
        }
    }
}

async fn reaper_task(weak: Weak<Shared>, afd: AsyncFd<OwnedFd>, _guard: ReaperGuard) {
    loop {
        let Ok(mut ready) = afd.readable().await else { return };
        // tokio watches the eventfd edge-triggered: every completion the kernel signals makes a
        // new event whether or not the counter was read, so it is never read here (one syscall
        // per wake-up saved). Readiness is cleared only if no new event arrived since
        // `readable` returned (tokio checks that).
        ready.clear_ready();
        let Some(sh) = weak.upgrade() else { return };
        sh.core.reap();
    }
}

fn thread_reaper(weak: Weak<Shared>, fd: OwnedFd) {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, THREAD_REAPER_TICK.as_millis() as i32) };
        clear(fd.as_raw_fd());
        let Some(sh) = weak.upgrade() else { return };
        sh.core.reap();
    }
}

impl UringDevice {
    /// Open a file (created and sized per `opts`) or a raw block device with O_DIRECT and set
    /// up the ring. Fails with [`DeviceError::Open`] when O_DIRECT is refused or io_uring
    /// does not work here, which is what makes [`super::open_device`] fall back to posix.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, DeviceError> {
        let open_err = |source: io::Error| DeviceError::Open { path: path.display().to_string(), source };
        let backing = open_backing(path, opts, true)?;
        let queue_depth = opts.queue_depth.clamp(1, MAX_QUEUE_DEPTH);
        // Twice the queue depth: see `engine::Core::start` for why one per slot is not enough.
        let entries = u32::try_from((2 * queue_depth).next_power_of_two())
            .map_err(|_| open_err(io::ErrorKind::InvalidInput.into()))?;
        let info = DeviceInfo {
            size_bytes: backing.size_bytes,
            align_bytes: backing.align_bytes,
            queue_depth,
            engine: EngineKind::Uring,
        };
        let mut ring = new_ring(entries).map_err(open_err)?;
        probe(&mut ring, &backing).map_err(open_err)?;
        let efd = new_eventfd().map_err(open_err)?;
        ring.submitter().register_eventfd(efd.as_raw_fd()).map_err(open_err)?;
        let reg = register(&ring, &backing.file);
        let shared = Arc::new(Shared {
            core: Core::new(ring, backing.file, reg, efd, queue_depth),
            tokio_reaper: AtomicBool::new(false),
            thread_reaper: AtomicBool::new(false),
            starting: Mutex::new(()),
        });
        Ok(UringDevice { info, shared })
    }

    async fn submit_io(&self, op: Op, offset: u64, buf: AlignedBuf) -> IoResult {
        if let Err(e) = check_io(&self.info, offset, buf.len()) {
            return (buf, Err(e));
        }
        if buf.is_empty() {
            return (buf, Ok(()));
        }
        let len = buf.len();
        let (done, rx) = oneshot::channel();
        self.shared.ensure_reaper();
        let buf = self.shared.core.adopt(op, buf);
        self.shared.core.submit(Request::Io { op, offset, buf, done });
        // The core answers every request (with `Stopped` if the ring broke); a dropped sender
        // would mean a bug, and the buffer is then gone with it.
        rx.await.unwrap_or_else(|_| (AlignedBuf::zeroed(len), Err(DeviceError::Stopped)))
    }
}

/// A ring for callers on any thread (so no SINGLE_ISSUER / DEFER_TASKRUN) that keeps
/// submitting past an SQE that fails to start, with COOP_TASKRUN: a completion does not
/// interrupt the submitting thread with an IPI to post its CQE; the CQE is posted when that
/// thread next enters the kernel (a submission, a wait, an interrupt's return) or, if it
/// sleeps, it is woken for it. Every worker here enters the kernel constantly, and in the
/// device benchmark's random reads (three runs each way, alternated, 2026-11-22) the store
/// spent ~10 % less CPU per read (8.9-9.4 vs 9.8-10.6 us) and reached 90-98 % of fio's IOPS
/// instead of 88-90 %. Each flag is dropped in turn where the kernel refuses it.
fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_submit_all()
        .setup_coop_taskrun()
        .build(entries)
        .or_else(|_| IoUring::builder().setup_submit_all().build(entries))
        .or_else(|_| IoUring::new(entries))
}

/// Register the file and an arena of pages with the ring, each where the kernel allows it
/// (the engine works without either, only with more work per I/O).
///
/// Random 4 KiB reads at queue depth 32 on one thread (`tidepool bench device`), before either
/// was registered: pinning each read's page (`gup_fast`) took 2.4-3.3 % of the samples and
/// looking the file up 0.8 %.
fn register(ring: &IoUring, file: &std::fs::File) -> Registered {
    let file = match ring.submitter().register_files(&[file.as_raw_fd()]) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "io_uring: cannot register the device file; naming it by descriptor");
            false
        }
    };
    let arena = PageArena::new(ARENA_PAGES);
    let (base, len) = arena.region();
    let iov = libc::iovec { iov_base: base.cast(), iov_len: len };
    // SAFETY: the arena's memory stays mapped while the ring lives: the engine keeps the arena
    // (and each page handed out keeps it too), and the ring is dropped first (see `Core`).
    let arena = match unsafe { ring.submitter().register_buffers(&[iov]) } {
        Ok(()) => Some(arena),
        Err(e) => {
            tracing::debug!(error = %e, "io_uring: cannot register buffers; small I/O pins its pages each time");
            None
        }
    };
    Registered { file, arena }
}

/// Prove that the ring works on this file before committing to it: a NOP round trip, then a
/// read of the first block (some filesystems accept O_DIRECT at open and refuse it on I/O).
fn probe(ring: &mut IoUring, backing: &Backing) -> io::Result<()> {
    let nop = opcode::Nop::new().build().user_data(0);
    let mut buf = AlignedBuf::zeroed(backing.align_bytes);
    let len = u32::try_from(buf.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let read =
        opcode::Read::new(types::Fd(backing.file.as_raw_fd()), buf.as_mut_ptr(), len).offset(0).build().user_data(1);
    let want = if backing.size_bytes >= backing.align_bytes as u64 { 2 } else { 1 };
    // SAFETY: `buf` outlives the completion: we wait below for every pushed entry before
    // returning, and on a submit error nothing was handed to the kernel.
    unsafe {
        let mut sq = ring.submission();
        sq.push(&nop).map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        if want == 2 {
            sq.push(&read).map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        }
    }
    let mut seen = 0;
    let mut failure = None;
    let mut errors = 0;
    while seen < want {
        match ring.submit_and_wait(want - seen) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // Nothing reached the kernel: `buf` may be freed.
            Err(e) if seen == 0 && ring.submission().len() == want => return Err(e),
            Err(e) => {
                errors += 1;
                if errors > 1000 {
                    // The kernel may still own `buf`: leak it rather than free memory it can write.
                    std::mem::forget(buf);
                    return Err(e);
                }
            }
        }
        for cqe in ring.completion() {
            seen += 1;
            if cqe.result() < 0 && failure.is_none() {
                failure = Some(io::Error::from_raw_os_error(-cqe.result()));
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        Box::pin(self.submit_io(Op::Read, offset, buf))
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, IoResult> {
        Box::pin(self.submit_io(Op::Write, offset, buf))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            self.shared.ensure_reaper();
            self.shared.core.submit(Request::Flush { done });
            rx.await.unwrap_or(Err(DeviceError::Stopped))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> UringDevice {
        let opts = OpenOptions { create_size_bytes: Some(8 << 20), queue_depth: 4, engine: None };
        UringDevice::open(&dir.path().join("dev.img"), &opts).expect("open io_uring device")
    }

    fn stamp(v: u8) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(64 << 10);
        b.fill(v);
        b
    }

    async fn round_trip(dev: &UringDevice, v: u8) {
        let mut set = Vec::new();
        for i in 0..16u64 {
            set.push(dev.write(i * (64 << 10), stamp(v.wrapping_add(i as u8))));
        }
        for f in set {
            f.await.1.expect("write");
        }
        dev.flush().await.expect("flush");
        for i in 0..16u64 {
            let (b, r) = dev.read(i * (64 << 10), AlignedBuf::zeroed(64 << 10)).await;
            r.expect("read");
            assert!(b.iter().all(|&x| x == v.wrapping_add(i as u8)));
        }
    }

    /// Outside a runtime with I/O enabled, the fallback thread reaps.
    #[test]
    fn reaps_without_a_tokio_reactor() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let dev = open(&dir);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(round_trip(&dev, 1));
        assert!(dev.shared.thread_reaper.load(Ordering::Acquire));
    }

    /// Tasks woken by the reaper submit their next I/O from inside its round (while another
    /// thread may be submitting); on one thread and on two, with more tasks than the queue
    /// depth, every chained I/O must complete with the right bytes.
    #[test]
    fn chained_io_from_many_tasks_completes() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let opts = OpenOptions { create_size_bytes: Some(8 << 20), queue_depth: 8, engine: None };
        let dev = Arc::new(UringDevice::open(&dir.path().join("dev.img"), &opts).expect("open"));
        for round in 0..2 {
            // One runtime at a time: the reaper lives on the runtime it started on, and must
            // die with it for the next one to start its own.
            let rt = match round {
                0 => tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
                _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap(),
            };
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                // More tasks than the queue depth: some wait for a slot as well.
                for t in 0..32u64 {
                    let dev = Arc::clone(&dev);
                    set.spawn(async move {
                        for i in 0..40u64 {
                            let off = (t * 40 + i) * 4096;
                            let v = (t * 7 + i + round as u64) as u8;
                            let mut b = AlignedBuf::zeroed(4096);
                            b.fill(v);
                            dev.write(off, b).await.1.expect("write");
                            let (b, r) = dev.read(off, AlignedBuf::zeroed(4096)).await;
                            r.expect("read");
                            assert!(b.iter().all(|&x| x == v), "task {t} i {i}");
                        }
                    });
                }
                let all = async {
                    while let Some(r) = set.join_next().await {
                        r.expect("task");
                    }
                };
                tokio::time::timeout(Duration::from_secs(60), all).await.expect("every I/O completes");
            });
        }
    }

    /// Single-page reads move onto the registered arena and, once there, run on it (and so do
    /// writes from its pages); the bytes are right whichever way an I/O went. With every page
    /// of the arena held, or with a page of another device's arena, small reads still work.
    #[test]
    fn small_io_runs_on_registered_pages() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let dev = open(&dir);
        let other = UringDevice::open(
            &dir.path().join("other.img"),
            &OpenOptions { create_size_bytes: Some(1 << 20), queue_depth: 4, engine: None },
        )
        .expect("open a second device");
        let (Some(arena), Some(foreign)) = (dev.shared.core.reg.arena.clone(), other.shared.core.reg.arena.clone())
        else {
            // Not a failure: the engine runs without (a user over RLIMIT_MEMLOCK).
            eprintln!("the kernel refused to register buffers here: nothing to check");
            return;
        };
        let core = &dev.shared.core;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            round_trip(&dev, 3).await;
            let page_of = |i: u64| 3u8.wrapping_add((i * 4096 / (64 << 10)) as u8);
            // A heap page is swapped for an arena page, which the kernel fills through READ_FIXED.
            let before = core.fixed_sqes();
            let (mut b, r) = dev.read(5 * 4096, AlignedBuf::zeroed(4096)).await;
            r.expect("read");
            assert!(b.arena().is_some_and(|a| Arc::ptr_eq(a, &arena)), "the read came back on an arena page");
            assert!(b.iter().all(|&x| x == page_of(5)));
            assert_eq!(core.fixed_sqes(), before + 1);
            // Reused for the next reads: no swap, still fixed, the same page each time.
            for i in [17u64, 100, 255, 0] {
                let at = b.as_ptr();
                b.fill(0xee);
                let (nb, r) = dev.read(i * 4096, b).await;
                r.expect("read");
                assert_eq!(nb.as_ptr(), at);
                assert!(nb.iter().all(|&x| x == page_of(i)), "page {i}");
                b = nb;
            }
            assert_eq!(core.fixed_sqes(), before + 5);
            // A write from an arena page goes through WRITE_FIXED and lands where it should.
            b.fill(0x5c);
            let (b, r) = dev.write(9 * 4096, b).await;
            r.expect("write");
            assert_eq!(core.fixed_sqes(), before + 6);
            let (c, r) = dev.read(9 * 4096, AlignedBuf::zeroed(4096)).await;
            r.expect("read");
            assert!(c.iter().all(|&x| x == 0x5c));
            // Every page held: a heap page is read as it is.
            let held: Vec<AlignedBuf> = std::iter::from_fn(|| arena.take(4096)).collect();
            let fixed = core.fixed_sqes();
            let (h, r) = dev.read(17 * 4096, AlignedBuf::zeroed(4096)).await;
            r.expect("read");
            assert!(h.arena().is_none() && h.iter().all(|&x| x == page_of(17)));
            assert_eq!(core.fixed_sqes(), fixed);
            drop((held, b, c));
            // A page of another ring's arena is not registered here: it is swapped for ours.
            let f = foreign.take(4096).expect("a page of the other arena");
            let (f, r) = dev.read(255 * 4096, f).await;
            r.expect("read");
            assert!(f.arena().is_some_and(|a| Arc::ptr_eq(a, &arena)));
            assert!(f.iter().all(|&x| x == page_of(255)));
            // Larger reads are left as they are.
            let (big, r) = dev.read(0, AlignedBuf::zeroed(8192)).await;
            r.expect("read");
            assert!(big.arena().is_none() && big.iter().all(|&x| x == page_of(0)));
        });
    }

    /// The reaper task dies with its runtime; the next runtime gets a new one.
    #[test]
    fn survives_the_runtime_it_started_on() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let dev = open(&dir);
        for v in 0..3u8 {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(round_trip(&dev, v * 40));
            assert!(dev.shared.tokio_reaper.load(Ordering::Acquire));
            drop(rt);
            assert!(!dev.shared.tokio_reaper.load(Ordering::Acquire), "reaper gone with its runtime");
        }
        assert!(!dev.shared.thread_reaper.load(Ordering::Acquire), "no I/O was in flight: no fallback thread needed");
    }
}
