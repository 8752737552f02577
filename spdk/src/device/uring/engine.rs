//! The shared core of [`super::UringDevice`]: the ring, the file, and every buffer the kernel
//! may touch, behind one short mutex.
//!
//! Submission happens on the caller's thread: under the mutex a request takes a slot (up to the
//! queue depth; beyond it, it waits in a FIFO) and its SQE is pushed; after the mutex is released
//! one `io_uring_enter` hands the pushed SQEs to the kernel (no GETEVENTS: it never waits).
//! Several threads may do this at once; the kernel serialises submission itself.
//!
//! Completions are reaped by [`Core::reap`] under the mutex, by whoever gets there first: the
//! reaper (see `super`), woken through an eventfd registered with the ring, or a submitter that
//! finds completions waiting. Reaping resubmits short transfers and EAGAIN/EINTR, promotes waiting
//! requests into freed slots, and answers finished requests after the mutex is released.
//!
//! Ordering: a flush is an fdatasync SQE submitted when `flush` is called. Every write that
//! completed (was answered) before that call had finished in the kernel before the fsync was
//! submitted, so the fsync covers it.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;

use crate::buf::{ALIGN, AlignedBuf, PageArena};
use crate::device::{DeviceError, IoResult};

/// Largest transfer per SQE (aligned to any block size); a larger buffer continues like a short I/O.
const MAX_SQE_BYTES: usize = 1 << 30;
/// A completed read of at most this many bytes has its buffer prefetched into the cache before
/// its caller is woken (see [`prefetch`]).
const PREFETCH_MAX_BYTES: usize = 16 << 10;
/// How often one request is resubmitted after EAGAIN/EINTR before the error is reported.
const MAX_RETRIES: u32 = 64;
/// How often a failing `io_uring_enter` is retried (EINTR/EAGAIN/EBUSY) before the ring is
/// declared unusable.
const MAX_ENTER_RETRIES: u32 = 10_000;

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

/// A request from a caller.
pub(crate) enum Request {
    Io { op: Op, offset: u64, buf: AlignedBuf, done: oneshot::Sender<IoResult> },
    Flush { done: oneshot::Sender<Result<(), DeviceError>> },
}

/// A submitted request. It stays in [`State::slots`] (and so keeps its buffer alive) until
/// its final completion has been reaped.
enum Slot {
    Io { op: Op, offset: u64, buf: AlignedBuf, done_bytes: usize, retries: u32, done: oneshot::Sender<IoResult> },
    Fsync { retries: u32, done: oneshot::Sender<Result<(), DeviceError>> },
}

/// An answer to send once the mutex is released (sending wakes a task).
enum Answer {
    Io(oneshot::Sender<IoResult>, IoResult),
    Flush(oneshot::Sender<Result<(), DeviceError>>, Result<(), DeviceError>),
}

impl Answer {
    fn send(self) {
        // A send error only means the caller dropped its future; the buffer is freed here,
        // after the kernel is done with it.
        match self {
            Answer::Io(tx, r) => {
                let _ = tx.send(r);
            }
            Answer::Flush(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }
}

struct State {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Arrived while the queue was full, in arrival order.
    waiting: VecDeque<Request>,
    /// SQEs pushed and maybe not yet consumed by the kernel.
    unsubmitted: bool,
    /// Slots whose SQE found the ring full (see `start`).
    repush: VecDeque<usize>,
    /// A thread is in [`Core::enter_submit`]'s loop: it will submit what others push.
    submitting: bool,
    /// The ring failed: every request is answered with `Stopped`.
    broken: bool,
    /// Scratch space for one round of completions.
    cqes: Vec<(u64, i32)>,
    /// SQEs submitted on a registered buffer (`READ_FIXED`/`WRITE_FIXED`): what tests check.
    #[cfg(test)]
    fixed_sqes: u64,
}

/// Which of the ring's registered resources the engine may use (see `super::UringDevice::open`).
pub(crate) struct Registered {
    /// The file is registered at index 0: SQEs name it by index, and the kernel skips looking
    /// the descriptor up (and its reference count) for every I/O.
    pub(crate) file: bool,
    /// This arena's memory is registered as buffer 0: I/O on its pages uses the `_FIXED`
    /// opcodes, which skip pinning the buffer's page for every I/O.
    pub(crate) arena: Option<Arc<PageArena>>,
}

/// Evaluate `$e` with `$fd` bound to the device file as an SQE names it: by registered index,
/// or by descriptor.
macro_rules! on_file {
    ($core:expr, |$fd:ident| $e:expr) => {
        if $core.reg.file {
            let $fd = types::Fixed(0);
            $e
        } else {
            let $fd = types::Fd($core.file.as_raw_fd());
            $e
        }
    };
}

pub(crate) struct Core {
    // Field order matters: the ring is dropped (and torn down) before the file it reads and
    // the arena it has registered.
    ring: IoUring,
    file: File,
    pub(crate) reg: Registered,
    /// Registered with the ring: signalled whenever a completion is posted.
    pub(crate) efd: OwnedFd,
    sq_entries: u32,
    queue_depth: usize,
    st: Mutex<State>,
}

impl Core {
    pub(crate) fn new(ring: IoUring, file: File, reg: Registered, efd: OwnedFd, queue_depth: usize) -> Self {
        let sq_entries = ring.params().sq_entries();
        Core {
            ring,
            file,
            reg,
            efd,
            sq_entries,
            queue_depth,
            st: Mutex::new(State {
                slots: Vec::with_capacity(queue_depth),
                free: Vec::new(),
                in_flight: 0,
                waiting: VecDeque::new(),
                unsubmitted: false,
                submitting: false,
                repush: VecDeque::new(),
                broken: false,
                cqes: Vec::with_capacity(queue_depth),
                #[cfg(test)]
                fixed_sqes: 0,
            }),
        }
    }

    /// Critical sections never panic while the state is inconsistent.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The buffer a request should use: a single-page read into memory the ring does not have
    /// registered gets a free page of the registered arena instead (the caller's buffer is
    /// freed; its content does not matter to a read). The caller gets that page back with the
    /// result, and typically reuses it for its next read through its buffer pool, so in steady
    /// state every small read is on a registered buffer and nothing is swapped.
    pub(crate) fn adopt(&self, op: Op, buf: AlignedBuf) -> AlignedBuf {
        match &self.reg.arena {
            Some(arena) if op == Op::Read && buf.capacity() == ALIGN && !registered(arena, &buf) => {
                arena.take(buf.len()).unwrap_or(buf)
            }
            _ => buf,
        }
    }

    /// SQEs submitted on a registered buffer so far.
    #[cfg(test)]
    pub(crate) fn fixed_sqes(&self) -> u64 {
        self.lock().fixed_sqes
    }

    pub(crate) fn in_flight(&self) -> usize {
        let st = self.lock();
        st.in_flight + st.waiting.len()
    }

    /// Take a request: submit it now if the queue has room, else queue it. Also reaps any
    /// completions already posted (cheap, and saves the reaper a wake-up).
    ///
    /// The SQE goes to the kernel at once (unless another thread is submitting: it takes this
    /// one too). Holding submissions back to batch those of the tasks one reaper round wakes
    /// was tried (up to 4, or all of them): one `io_uring_enter` per batch took ~20 % of the
    /// engine's CPU off, but cost 5-15 % of random-read IOPS at queue depth 32, because the
    /// device is bound by latency here and the first reads of a batch waited for the last
    /// task's turn. Tried again in session 9 with the first task of a reaper round entering at
    /// once and the others' SQEs handed over together once the round's tasks had run (one
    /// enter, one plug, one doorbell): the store's CPU per random read fell from 7.0 to 6.3 us,
    /// and its IOPS by 25 %.
    pub(crate) fn submit(&self, req: Request) {
        let mut answers = Vec::new();
        let claimed;
        {
            let mut st = self.lock();
            if st.broken {
                drop(st);
                fail(req);
                return;
            }
            if st.in_flight < self.queue_depth && st.waiting.is_empty() {
                let id = insert(&mut st, slot_of(req));
                self.start(&mut st, id);
            } else {
                st.waiting.push_back(req);
            }
            self.reap_locked(&mut st, &mut answers);
            claimed = self.claim_submission(&mut st);
        }
        answers.into_iter().for_each(Answer::send);
        if claimed {
            self.submit_loop();
        }
    }

    /// Handle every posted completion, then hand any new SQEs to the kernel.
    pub(crate) fn reap(&self) {
        let mut answers = Vec::new();
        {
            let mut st = self.lock();
            self.reap_locked(&mut st, &mut answers);
        }
        answers.into_iter().for_each(Answer::send);
        self.enter_submit();
    }

    fn reap_locked(&self, st: &mut State, answers: &mut Vec<Answer>) {
        let mut cqes = std::mem::take(&mut st.cqes);
        // SAFETY: the completion queue is only ever accessed under the state mutex.
        cqes.extend(unsafe { self.ring.completion_shared() }.map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            self.on_cqe(st, user_data as usize, res, answers);
        }
        cqes.clear();
        st.cqes = cqes;
        // Freed slots go to waiting requests, in order.
        while st.in_flight < self.queue_depth && !st.broken {
            let Some(req) = st.waiting.pop_front() else { break };
            let id = insert(st, slot_of(req));
            self.start(st, id);
        }
    }

    /// `io_uring_enter` for the SQEs pushed so far (by anyone), without waiting. One thread
    /// submits at a time: a caller that finds another one submitting leaves its SQE to it (that
    /// one loops until nothing is left unsubmitted), so threads never queue on the kernel's ring
    /// lock and SQEs pushed meanwhile go in one batch. Transient failures are retried; a ring
    /// that keeps failing is declared broken.
    fn enter_submit(&self) {
        let claimed = self.claim_submission(&mut self.lock());
        if claimed {
            self.submit_loop();
        }
    }

    /// Become the submitting thread if nobody is and something is left to submit (pushing
    /// SQEs that found the ring full first). The caller then runs [`Core::submit_loop`].
    fn claim_submission(&self, st: &mut State) -> bool {
        if st.submitting || !self.take_unsubmitted(st) {
            return false;
        }
        st.submitting = true;
        true
    }

    /// Push what waits for room in the ring; then whether any pushed SQE still needs an
    /// `io_uring_enter` (clearing that mark: the caller enters next).
    fn take_unsubmitted(&self, st: &mut State) -> bool {
        self.repush(st);
        if !st.unsubmitted && st.repush.is_empty() {
            return false;
        }
        st.unsubmitted = false;
        true
    }

    /// The submitting thread's loop (see [`Core::enter_submit`]): enter until nothing is left.
    fn submit_loop(&self) {
        let mut tries = 0;
        loop {
            // SAFETY: no GETEVENTS, no signal mask: a plain submission of whatever the SQ holds
            // (the kernel submits at most what is there).
            let r = unsafe { self.ring.submitter().enter::<libc::sigset_t>(self.sq_entries, 0, 0, None) };
            let mut st = self.lock();
            // SAFETY: the submission queue is only ever accessed under the state mutex.
            let left = !unsafe { self.ring.submission_shared() }.is_empty() || !st.repush.is_empty();
            match r {
                Ok(_) if !left => {
                    // Others may have pushed while we were in the kernel.
                    if self.take_unsubmitted(&mut st) {
                        continue;
                    }
                    st.submitting = false;
                    return;
                }
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; the io_uring device stops");
                    abandon(&mut st);
                    st.submitting = false;
                    return;
                }
            }
            tries += 1;
            if tries > MAX_ENTER_RETRIES {
                tracing::error!("io_uring_enter keeps failing; the io_uring device stops");
                abandon(&mut st);
                st.submitting = false;
                return;
            }
            drop(st);
            // Maybe completions must be reaped first (EBUSY: CQ full); then try again.
            self.reap_no_enter();
            std::thread::yield_now();
            // Try again, with whatever was pushed meanwhile.
            let mut st = self.lock();
            self.repush(&mut st);
            st.unsubmitted = false;
        }
    }

    fn reap_no_enter(&self) {
        let mut answers = Vec::new();
        {
            let mut st = self.lock();
            self.reap_locked(&mut st, &mut answers);
        }
        answers.into_iter().for_each(Answer::send);
    }

    /// Push the SQE for slot `id` (first submission or resubmission).
    fn start(&self, st: &mut State, id: usize) {
        let Some(entry) = self.sqe(st, id) else { return };
        // SAFETY: the entry points into the buffer owned by slot `id`, which stays in `slots`
        // until its final completion is reaped (see `on_cqe`/`finish`); the submission queue is
        // only accessed under the state mutex.
        let pushed = unsafe { self.ring.submission_shared().push(&entry) }.is_ok();
        if pushed {
            st.unsubmitted = true;
        } else {
            // The SQ has room for twice the queue depth, and each slot has at most one SQE
            // outstanding; but the kernel posts inline completions of a submission batch before
            // it publishes the SQ head, so a slot can be reused while its old SQE still seems
            // to occupy the ring. The submitter pushes it once the head moves.
            st.repush.push_back(id);
            st.unsubmitted = true;
        }
    }

    /// Push SQEs that found the ring full earlier, in order, while there is room.
    fn repush(&self, st: &mut State) {
        while let Some(&id) = st.repush.front() {
            let Some(entry) = self.sqe(st, id) else {
                st.repush.pop_front();
                continue;
            };
            // SAFETY: as in `start`.
            if unsafe { self.ring.submission_shared().push(&entry) }.is_err() {
                return;
            }
            st.repush.pop_front();
            st.unsubmitted = true;
        }
    }

    fn sqe(&self, st: &mut State, id: usize) -> Option<squeue::Entry> {
        let entry = match st.slots.get_mut(id)?.as_mut()? {
            Slot::Io { op, offset, buf, done_bytes, .. } => {
                // MAX_SQE_BYTES < u32::MAX, so the cast is exact.
                let len = (buf.len() - *done_bytes).min(MAX_SQE_BYTES) as u32;
                let at = *offset + *done_bytes as u64;
                let fixed = self.reg.arena.as_ref().is_some_and(|a| registered(a, buf));
                // SAFETY: done_bytes < buf.len() <= capacity: the pointer stays in the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(*done_bytes) };
                #[cfg(test)]
                {
                    st.fixed_sqes += u64::from(fixed);
                }
                // A registered buffer is buffer 0: the arena, which holds `ptr..ptr + len`.
                match (op, fixed) {
                    (Op::Read, false) => on_file!(self, |fd| opcode::Read::new(fd, ptr, len).offset(at).build()),
                    (Op::Write, false) => on_file!(self, |fd| opcode::Write::new(fd, ptr, len).offset(at).build()),
                    (Op::Read, true) => {
                        on_file!(self, |fd| opcode::ReadFixed::new(fd, ptr, len, 0).offset(at).build())
                    }
                    (Op::Write, true) => {
                        on_file!(self, |fd| opcode::WriteFixed::new(fd, ptr, len, 0).offset(at).build())
                    }
                }
            }
            Slot::Fsync { .. } => {
                on_file!(self, |fd| opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build())
            }
        };
        Some(entry.user_data(id as u64))
    }

    /// One completion: resubmit the rest of a short transfer or a retryable error, else finish.
    fn on_cqe(&self, st: &mut State, id: usize, res: i32, answers: &mut Vec<Answer>) {
        let retryable = res == -libc::EAGAIN || res == -libc::EINTR;
        let again = match st.slots.get_mut(id).and_then(Option::as_mut) {
            None => {
                tracing::error!(id, res, "io_uring completion for an unknown request");
                return;
            }
            Some(Slot::Io { buf, done_bytes, retries, .. }) => {
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
        if again { self.start(st, id) } else { finish(st, id, res, answers) }
    }

    /// Shutdown, from the last owner: fail what never reached the kernel, then wait (blocking)
    /// until the kernel is done with every submitted request, so no buffer is freed under it.
    pub(crate) fn shutdown(&mut self) {
        let st = self.st.get_mut().unwrap_or_else(PoisonError::into_inner);
        st.broken = true;
        st.waiting.drain(..).for_each(fail);
        // Never reached the kernel: answer them now (their callers are gone anyway).
        let mut answers = Vec::new();
        while let Some(id) = st.repush.pop_front() {
            finish(st, id, -libc::ECANCELED, &mut answers);
        }
        answers.into_iter().for_each(Answer::send);
        let mut errors = 0;
        while st.in_flight > 0 {
            // Submits whatever is still queued, and waits for at least one completion.
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    errors += 1;
                    if errors > 1000 {
                        tracing::error!(error = %e, in_flight = st.in_flight, "io_uring_enter failed at shutdown; leaking in-flight buffers");
                        abandon(st);
                        return;
                    }
                }
            }
            let mut answers = Vec::new();
            for c in self.ring.completion() {
                // Shutting down: no resubmission of short I/O, just answer.
                finish(st, c.user_data() as usize, c.result(), &mut answers);
            }
            answers.into_iter().for_each(Answer::send);
        }
    }
}

/// The ring is unusable: answer everyone with `Stopped`. Buffers the kernel may still hold
/// are leaked on purpose, never freed under it; callers get a fresh buffer instead.
fn abandon(st: &mut State) {
    st.broken = true;
    for slot in st.slots.iter_mut().filter_map(Option::take) {
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
    st.in_flight = 0;
    st.repush.clear();
    st.waiting.drain(..).for_each(fail);
}

/// Whether `buf` is a page of `arena` (the ring's registered one).
fn registered(arena: &Arc<PageArena>, buf: &AlignedBuf) -> bool {
    buf.arena().is_some_and(|a| Arc::ptr_eq(a, arena))
}

fn slot_of(req: Request) -> Slot {
    match req {
        Request::Io { op, offset, buf, done } => Slot::Io { op, offset, buf, done_bytes: 0, retries: 0, done },
        Request::Flush { done } => Slot::Fsync { retries: 0, done },
    }
}

fn insert(st: &mut State, slot: Slot) -> usize {
    st.in_flight += 1;
    match st.free.pop() {
        Some(id) => {
            st.slots[id] = Some(slot);
            id
        }
        None => {
            st.slots.push(Some(slot));
            st.slots.len() - 1
        }
    }
}

/// Remove slot `id` and queue the answer to its caller. `res` is the last CQE result (negative errno).
fn finish(st: &mut State, id: usize, res: i32, answers: &mut Vec<Answer>) {
    let Some(slot) = st.slots.get_mut(id).and_then(Option::take) else { return };
    st.in_flight -= 1;
    st.free.push(id);
    match slot {
        Slot::Io { op, offset, buf, done_bytes, done, .. } => {
            let result = if res < 0 {
                Err(DeviceError::Io { op: op.name(), offset, source: io::Error::from_raw_os_error(-res) })
            } else if done_bytes < buf.len() {
                Err(DeviceError::Short { offset, want: buf.len(), got: done_bytes })
            } else {
                if op == Op::Read && buf.len() <= PREFETCH_MAX_BYTES {
                    prefetch(&buf);
                }
                Ok(())
            };
            answers.push(Answer::Io(done, (buf, result)));
        }
        Slot::Fsync { done, .. } => {
            let result = if res < 0 {
                Err(DeviceError::Io { op: "flush", offset: 0, source: io::Error::from_raw_os_error(-res) })
            } else {
                Ok(())
            };
            answers.push(Answer::Flush(done, result));
        }
    }
}

/// Ask the CPU to bring a freshly read buffer into its cache. The device wrote it behind the
/// cache's back (DMA; in a VM, the host's emulation thread), so the caller's first pass over
/// it (a store's crc check) would otherwise stall on every cache line in turn. Issued when the
/// read is reaped, the loads overlap with whatever runs before the caller does: the callers of
/// the other completions of the same round. Small reads only: a large buffer would not fit in
/// the cache, and its reader streams it anyway.
#[inline]
fn prefetch(buf: &AlignedBuf) {
    #[cfg(target_arch = "x86_64")]
    for at in (0..buf.len()).step_by(64) {
        // SAFETY: PREFETCHT0 reads nothing architecturally and cannot fault; `at` is inside the
        // buffer anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(buf.as_ptr().add(at).cast::<i8>())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = buf;
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
    }
}
