//! The fast engine: io_uring with O_DIRECT on a regular file or a raw block device.
//!
//! One dedicated thread owns the ring ([`engine`]). Callers hand it requests through a channel
//! and wake it through an eventfd that the ring itself polls, so a new request is picked up at
//! once even while the thread is blocked waiting for completions; results come back on a
//! oneshot. The thread batches: it drains every queued request into SQEs, then submits once.
//!
//! Buffers are owned by the request until its completion arrives: the kernel may write into
//! them until then, so a caller that drops its future only gives up the result, never the memory.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, types};
use tokio::sync::oneshot;

use super::posix::{Backing, open_backing};
use super::{
    BlockDevice, DeviceError, DeviceInfo, EngineKind, IoFuture, IoResult, OpenOptions, check_io,
};
use crate::buf::AlignedBuf;

mod engine;

use engine::{Engine, Op, Request};

/// Largest queue depth we ask the kernel for (its own limit is 32768 SQ entries).
const MAX_QUEUE_DEPTH: usize = 4096;

/// io_uring + O_DIRECT device. Dropping it stops the engine thread after every in-flight I/O
/// has completed; requests not yet submitted fail with [`DeviceError::Stopped`].
pub struct UringDevice {
    info: DeviceInfo,
    tx: mpsc::Sender<Request>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

/// The doorbell: an eventfd the ring polls, plus a flag so that a burst of requests costs one
/// eventfd write rather than one each.
pub(crate) struct Wake {
    fd: OwnedFd,
    rung: AtomicBool,
}

impl Wake {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; on success we own the returned fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        Ok(Wake {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            rung: AtomicBool::new(false),
        })
    }

    /// Caller side, after sending a request: ring unless someone rang since the engine last looked.
    fn ring(&self) {
        if !self.rung.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd. It can only fail with
            // EAGAIN when the counter is saturated, in which case the engine is awake anyway.
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// Engine side, before draining the channel: later requests must ring again.
    pub(crate) fn rearm(&self) {
        self.rung.store(false, Ordering::SeqCst);
    }

    /// Engine side, after the ring's poll on the eventfd fired: reset the counter.
    pub(crate) fn clear(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; the fd is non-blocking, EAGAIN is harmless.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl UringDevice {
    /// Open a file (created and sized per `opts`) or a raw block device with O_DIRECT and start
    /// the engine thread. Fails with [`DeviceError::Open`] when O_DIRECT is refused or io_uring
    /// does not work here, which is what makes [`super::open_device`] fall back to posix.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self, DeviceError> {
        let open_err = |source: io::Error| DeviceError::Open {
            path: path.display().to_string(),
            source,
        };
        let backing = open_backing(path, opts, true)?;
        let queue_depth = opts.queue_depth.clamp(1, MAX_QUEUE_DEPTH);
        // One extra entry for the eventfd poll that is always armed.
        let entries = u32::try_from((queue_depth + 1).next_power_of_two())
            .map_err(|_| open_err(io::ErrorKind::InvalidInput.into()))?;
        let wake = Arc::new(Wake::new().map_err(open_err)?);
        let info = DeviceInfo {
            size_bytes: backing.size_bytes,
            align_bytes: backing.align_bytes,
            queue_depth,
            engine: EngineKind::Uring,
        };
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let engine_wake = Arc::clone(&wake);
        let thread = std::thread::Builder::new()
            .name("tidepool-uring".into())
            .spawn(move || {
                // The ring is created on its own thread: with SINGLE_ISSUER only the creator submits.
                let ring = match new_ring(entries)
                    .and_then(|mut ring| probe(&mut ring, &backing).map(|()| ring))
                {
                    Ok(ring) => ring,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                Engine::new(ring, backing.file, engine_wake, rx, queue_depth).run();
            })
            .map_err(open_err)?;
        let setup = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("io_uring engine thread died during setup")));
        match setup {
            Ok(()) => Ok(UringDevice {
                info,
                tx,
                wake,
                thread: Some(thread),
            }),
            Err(e) => {
                let _ = thread.join();
                Err(open_err(e))
            }
        }
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
        if let Err(mpsc::SendError(req)) = self.tx.send(Request::Io {
            op,
            offset,
            buf,
            done,
        }) {
            return match req {
                Request::Io { buf, .. } => (buf, Err(DeviceError::Stopped)),
                _ => (AlignedBuf::zeroed(len), Err(DeviceError::Stopped)),
            };
        }
        self.wake.ring();
        // The engine only drops `done` unanswered if it died; the buffer is then gone with it.
        rx.await
            .unwrap_or_else(|_| (AlignedBuf::zeroed(len), Err(DeviceError::Stopped)))
    }
}

/// A ring tuned for one submitting thread (completions run when that thread waits, fewer
/// interrupts), or a plain one on kernels older than 6.1 that lack those flags.
fn new_ring(entries: u32) -> io::Result<IoUring> {
    let tuned = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .build(entries);
    tuned.or_else(|_| IoUring::new(entries))
}

/// Prove that the ring works on this file before committing to it: a NOP round trip, then a
/// read of the first block (some filesystems accept O_DIRECT at open and refuse it on I/O).
fn probe(ring: &mut IoUring, backing: &Backing) -> io::Result<()> {
    let nop = opcode::Nop::new().build().user_data(0);
    let mut buf = AlignedBuf::zeroed(backing.align_bytes);
    let len = u32::try_from(buf.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let read = opcode::Read::new(types::Fd(backing.file.as_raw_fd()), buf.as_mut_ptr(), len)
        .offset(0)
        .build()
        .user_data(1);
    let want = if backing.size_bytes >= backing.align_bytes as u64 {
        2
    } else {
        1
    };
    // SAFETY: `buf` outlives the completion: we wait below for every pushed entry before
    // returning, and on a submit error nothing was handed to the kernel.
    unsafe {
        let mut sq = ring.submission();
        sq.push(&nop)
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        if want == 2 {
            sq.push(&read)
                .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
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
            self.tx
                .send(Request::Flush { done })
                .map_err(|_| DeviceError::Stopped)?;
            self.wake.ring();
            rx.await.unwrap_or(Err(DeviceError::Stopped))
        })
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // A send error means the engine already exited; joining is still right.
        let _ = self.tx.send(Request::Stop);
        self.wake.ring();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("io_uring engine thread panicked");
        }
    }
}
