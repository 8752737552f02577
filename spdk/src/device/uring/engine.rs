//! The engine thread of [`super::UringDevice`]: owns the ring, the file and every buffer the
//! kernel may touch.
//!
//! Loop: drain the request channel, turn queued requests into SQEs (up to the queue depth,
//! plus one poll on the wake eventfd), submit them all with one `io_uring_enter` that also waits
//! for at least one completion, then handle every completion. With nothing in flight the only
//! armed entry is the eventfd poll, so the thread sleeps in the kernel until a request arrives.
//!
//! Ordering: a flush is a barrier in the queue. It is submitted only once every write submitted
//! before it has completed, and requests queued behind it wait until it is submitted.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;

use super::Wake;
use crate::buf::AlignedBuf;
use crate::device::{DeviceError, IoResult};

/// `user_data` of the eventfd poll; slots use their index, which never gets this large.
const WAKE_TOKEN: u64 = u64::MAX;
/// Largest transfer per SQE (aligned to any block size); a larger buffer continues like a short I/O.
const MAX_SQE_BYTES: usize = 1 << 30;
/// How often one request is resubmitted after EAGAIN/EINTR before the error is reported.
const MAX_RETRIES: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read,
    Write,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// What callers send to the engine thread.
pub(crate) enum Request {
    Io {
        op: Op,
        offset: u64,
        buf: AlignedBuf,
        done: oneshot::Sender<IoResult>,
    },
    Flush {
        done: oneshot::Sender<Result<(), DeviceError>>,
    },
    Stop,
}

/// A submitted request. It stays in [`Engine::slots`] (and so keeps its buffer alive) until
/// its final completion has been reaped.
enum Slot {
    Io {
        op: Op,
        offset: u64,
        buf: AlignedBuf,
        done_bytes: usize,
        retries: u32,
        done: oneshot::Sender<IoResult>,
    },
    Fsync {
        retries: u32,
        done: oneshot::Sender<Result<(), DeviceError>>,
    },
}

pub(crate) struct Engine {
    // Field order matters: the ring is dropped (and torn down) before the file it reads.
    ring: IoUring,
    file: File,
    wake: Arc<Wake>,
    rx: Receiver<Request>,
    /// Received, not yet submitted (`Io` or `Flush`), in arrival order.
    queued: VecDeque<Request>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    writes_in_flight: usize,
    wake_armed: bool,
    stopping: bool,
    queue_depth: usize,
    /// Reused scratch space for the completions of one round.
    cqes: Vec<(u64, i32)>,
}

impl Engine {
    pub(crate) fn new(
        ring: IoUring,
        file: File,
        wake: Arc<Wake>,
        rx: Receiver<Request>,
        queue_depth: usize,
    ) -> Self {
        Engine {
            ring,
            file,
            wake,
            rx,
            queued: VecDeque::new(),
            slots: Vec::with_capacity(queue_depth),
            free: Vec::new(),
            in_flight: 0,
            writes_in_flight: 0,
            wake_armed: false,
            stopping: false,
            queue_depth,
            cqes: Vec::with_capacity(queue_depth + 1),
        }
    }

    /// The thread body. Returns after a stop request once nothing is in flight any more.
    pub(crate) fn run(mut self) {
        loop {
            self.wake.rearm();
            self.drain_channel();
            if self.stopping {
                while let Some(req) = self.queued.pop_front() {
                    fail(req);
                }
                if self.in_flight == 0 {
                    return;
                }
            }
            self.fill();
            if let Err(e) = self.enter() {
                tracing::error!(error = %e, in_flight = self.in_flight, "io_uring_enter failed; stopping the engine");
                self.abandon();
                return;
            }
            self.reap();
        }
    }

    fn drain_channel(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Request::Stop) => self.stopping = true,
                Ok(req) if self.stopping => fail(req),
                Ok(req) => self.queued.push_back(req),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    return;
                }
            }
        }
    }

    /// Arm the wake poll and move queued requests into SQEs, up to the queue depth.
    fn fill(&mut self) {
        if !self.wake_armed && !self.stopping {
            let poll = opcode::PollAdd::new(types::Fd(self.wake.raw_fd()), libc::POLLIN as u32)
                .build()
                .user_data(WAKE_TOKEN);
            // SAFETY: a poll references no memory of ours.
            self.wake_armed = unsafe { self.push(&poll) };
        }
        while self.in_flight < self.queue_depth {
            match self.queued.front() {
                None => return,
                Some(Request::Flush { .. }) if self.writes_in_flight > 0 => return,
                Some(_) => {}
            }
            let slot = match self.queued.pop_front() {
                Some(Request::Io {
                    op,
                    offset,
                    buf,
                    done,
                }) => Slot::Io {
                    op,
                    offset,
                    buf,
                    done_bytes: 0,
                    retries: 0,
                    done,
                },
                Some(Request::Flush { done }) => Slot::Fsync { retries: 0, done },
                Some(Request::Stop) | None => continue,
            };
            let id = self.insert(slot);
            self.start(id);
        }
    }

    /// Submit (or resubmit) the SQE for slot `id`.
    fn start(&mut self, id: usize) {
        let Some(entry) = self.sqe(id) else { return };
        // SAFETY: the entry points into the buffer owned by slot `id`, which stays in `slots`
        // until its final completion is reaped (see `on_cqe`/`finish`).
        if !unsafe { self.push(&entry) } {
            // Not in the kernel, so the buffer can go back to the caller with the error.
            self.finish(id, -libc::EBUSY);
        }
    }

    /// Push one SQE, submitting first if the queue is full (it cannot be: it has room for the
    /// queue depth plus the poll, and each slot has at most one SQE outstanding).
    ///
    /// # Safety
    /// Memory the entry points to must stay valid until its completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: forwarded to the caller.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return true;
        }
        let _ = self.ring.submit();
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    fn sqe(&mut self, id: usize) -> Option<squeue::Entry> {
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = match self.slots.get_mut(id)?.as_mut()? {
            Slot::Io {
                op,
                offset,
                buf,
                done_bytes,
                ..
            } => {
                // MAX_SQE_BYTES < u32::MAX, so the cast is exact.
                let len = (buf.len() - *done_bytes).min(MAX_SQE_BYTES) as u32;
                let at = *offset + *done_bytes as u64;
                // SAFETY: done_bytes < buf.len() <= capacity: the pointer stays in the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(*done_bytes) };
                match op {
                    Op::Read => opcode::Read::new(fd, ptr, len).offset(at).build(),
                    Op::Write => opcode::Write::new(fd, ptr, len).offset(at).build(),
                }
            }
            Slot::Fsync { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        Some(entry.user_data(id as u64))
    }

    /// Submit everything pushed and sleep until at least one completion (or the wake poll) fires.
    fn enter(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            // Interrupted, or the kernel is short of resources / the CQ is full: reap and retry.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            if user_data == WAKE_TOKEN {
                self.wake_armed = false;
                self.wake.clear();
            } else {
                self.on_cqe(user_data as usize, res);
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }

    /// One completion: resubmit the rest of a short transfer or a retryable error, else finish.
    fn on_cqe(&mut self, id: usize, res: i32) {
        let retryable = res == -libc::EAGAIN || res == -libc::EINTR;
        let again = match self.slots.get_mut(id).and_then(Option::as_mut) {
            None => {
                tracing::error!(id, res, "io_uring completion for an unknown request");
                return;
            }
            Some(Slot::Io {
                buf,
                done_bytes,
                retries,
                ..
            }) => {
                if retryable {
                    *retries += 1;
                    *retries <= MAX_RETRIES
                } else if res > 0 {
                    *done_bytes += res as usize;
                    *done_bytes < buf.len()
                } else {
                    false
                }
            }
            Some(Slot::Fsync { retries, .. }) => {
                *retries += u32::from(retryable);
                retryable && *retries <= MAX_RETRIES
            }
        };
        if again {
            self.start(id)
        } else {
            self.finish(id, res)
        }
    }

    /// Remove slot `id` and answer its caller. `res` is the last CQE result (negative errno).
    fn finish(&mut self, id: usize, res: i32) {
        let Some(slot) = self.remove(id) else { return };
        // A send error only means the caller dropped its future; the buffer is freed here,
        // after the kernel is done with it.
        match slot {
            Slot::Io {
                op,
                offset,
                buf,
                done_bytes,
                done,
                ..
            } => {
                let result = if res < 0 {
                    Err(DeviceError::Io {
                        op: op.name(),
                        offset,
                        source: io::Error::from_raw_os_error(-res),
                    })
                } else if done_bytes < buf.len() {
                    Err(DeviceError::Short {
                        offset,
                        want: buf.len(),
                        got: done_bytes,
                    })
                } else {
                    Ok(())
                };
                let _ = done.send((buf, result));
            }
            Slot::Fsync { done, .. } => {
                let result = if res < 0 {
                    Err(DeviceError::Io {
                        op: "flush",
                        offset: 0,
                        source: io::Error::from_raw_os_error(-res),
                    })
                } else {
                    Ok(())
                };
                let _ = done.send(result);
            }
        }
    }

    fn insert(&mut self, slot: Slot) -> usize {
        self.in_flight += 1;
        if matches!(slot, Slot::Io { op: Op::Write, .. }) {
            self.writes_in_flight += 1;
        }
        match self.free.pop() {
            Some(id) => {
                self.slots[id] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, id: usize) -> Option<Slot> {
        let slot = self.slots.get_mut(id)?.take()?;
        self.in_flight -= 1;
        if matches!(slot, Slot::Io { op: Op::Write, .. }) {
            self.writes_in_flight -= 1;
        }
        self.free.push(id);
        Some(slot)
    }

    /// The ring is unusable: answer everyone with `Stopped`. Buffers the kernel may still hold
    /// are leaked on purpose, never freed under it; callers get a fresh buffer instead.
    fn abandon(&mut self) {
        for slot in self.slots.iter_mut().filter_map(Option::take) {
            match slot {
                Slot::Io { buf, done, .. } => {
                    let len = buf.len();
                    std::mem::forget(buf);
                    let _ = done.send((AlignedBuf::zeroed(len), Err(DeviceError::Stopped)));
                }
                Slot::Fsync { done, .. } => {
                    let _ = done.send(Err(DeviceError::Stopped));
                }
            }
        }
        self.in_flight = 0;
        self.writes_in_flight = 0;
        self.stopping = true;
        self.drain_channel();
        while let Some(req) = self.queued.pop_front() {
            fail(req);
        }
    }
}

/// Answer a request that was never submitted.
fn fail(req: Request) {
    match req {
        Request::Io { buf, done, .. } => {
            let _ = done.send((buf, Err(DeviceError::Stopped)));
        }
        Request::Flush { done } => {
            let _ = done.send(Err(DeviceError::Stopped));
        }
        Request::Stop => {}
    }
}
