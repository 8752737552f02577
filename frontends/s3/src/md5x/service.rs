//! The hashing service: one thread owns the lanes and hashes every submitted stream's whole
//! blocks in lockstep.
//!
//! Why one thread: the lanes pay off only when many streams' blocks go through the same
//! instructions, so the blocks must meet in one place; a 16-lane AVX-512 kernel hashes
//! ~5.5 GB/s of 16 bodies on one core (the md5x_bench example, on a Zen 4 EPYC), more than
//! the server receives, so one thread is not a bottleneck (a scalar thread per body, as
//! before, needed a core per ~0.63 GB/s). On a 2-core machine a second lane thread would
//! only compete with the receive loops.
//!
//! How a stream moves:
//! - [`Md5Stream::update`] queues a chunk (`Bytes`: shared with the receive loop, not copied)
//!   under the service's lock. A stream holds at most [`QUEUED_BYTES`] queued; past that the
//!   caller waits (its waker is kept) until the service takes the queue: the receive loop is
//!   back-pressured as with a bounded channel, and a body is never buffered whole.
//! - A stream with queued data and no lane waits in `ready` (FIFO). The service gives each
//!   free lane the next ready stream: the stream's state goes into the lane and its whole
//!   queue moves to the lane (one lock per queue, not per chunk).
//! - Each turn the service finds, for every lane with data, the run of whole blocks left in
//!   its current chunk (a block split across two chunks is put together in the stream's
//!   64-byte partial block and compressed scalar: one block per chunk boundary at most), and
//!   runs the kernel over the shortest run (capped at [`VECTOR_RUN`] blocks so new streams
//!   get lanes soon) for all of them. With only one lane holding data the scalar block
//!   function runs instead (as fast for one stream, without the transposes).
//! - A turn costs the same whatever the number of lanes with data, so the service gathers:
//!   it starts hashing when every lane the open streams could fill has data, or after
//!   [`GATHER`], or at once when a stream is finishing or a queue is half full, and goes on
//!   while half the lanes have data ([`worth_a_turn`]).
//! - A lane whose data is used up takes the stream's newly queued chunks if no other stream
//!   is waiting, else goes back to the end of `ready` (so 32 streams share 16 lanes fairly).
//! - [`Md5Stream::finish`] marks the stream closed; once its queue is hashed the service pads
//!   the last block(s) and sends the digest. Dropping a stream unfinished (the client hung
//!   up) marks it abandoned: the service drops its data and frees its lane at its next turn.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use tokio::sync::oneshot;

use super::{Kernel, LaneState, MAX_LANES, Md5State};

/// Bytes a stream may have queued before [`Md5Stream::update`] waits. The service may hold
/// as much again in the stream's lane, so a stream pins at most ~2 MiB of body.
pub const QUEUED_BYTES: usize = 1 << 20;

/// Blocks per kernel call at most (64 KiB per lane), so a stream waiting for a free lane
/// waits at most ~0.2 ms (at ~5.5 GB/s) after one frees.
const VECTOR_RUN: usize = 1024;

/// How long the service waits for more streams' data before hashing with few lanes (see
/// [`worth_a_turn`]). A stream at ~13 MB/s (32 clients sharing 420 MB/s) brings ~26 KB in
/// that time; a queue holds 1 MiB, so the wait never holds a receive loop up.
const GATHER: Duration = Duration::from_millis(2);

/// Blocks per scalar call at most (16 KiB): as above, at scalar speed.
const SCALAR_RUN: usize = 256;

/// The hashing service was stopped (its [`Md5Lanes`] dropped) before the stream finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// The lanes and their thread; dropping it stops the thread (unfinished streams then fail
/// with [`Stopped`]).
pub struct Md5Lanes {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    kernel: Kernel,
}

/// One stream being hashed by the service.
pub struct Md5Stream {
    shared: Arc<Shared>,
    id: usize,
    done: Option<oneshot::Receiver<[u8; 16]>>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// The service waits here when no lane has work.
    work: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Streams by id; a freed id is reused.
    streams: Vec<Option<Rec>>,
    free: Vec<usize>,
    /// Streams with a record (created and not yet freed).
    open: usize,
    /// Streams with something for the service to do (data queued, or closed), not in a lane.
    ready: VecDeque<usize>,
    /// The service is waiting on `work`: whoever adds work notifies it.
    idle: bool,
    stop: bool,
    /// Tests only ([`Md5Lanes::hold`]): the service takes no new work.
    hold: bool,
}

struct Rec {
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    /// The hash state; `None` while the stream is in a lane (the service holds it there).
    state: Option<Box<Md5State>>,
    /// In `ready` or in a lane: the service will look at it without being told.
    listed: bool,
    closed: bool,
    abandoned: bool,
    /// The submitter waiting for room in `queue`.
    waker: Option<Waker>,
    done: Option<oneshot::Sender<[u8; 16]>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug in this module; the state is still
        // consistent enough to stop cleanly, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn rec(&mut self, id: usize) -> Option<&mut Rec> {
        self.streams.get_mut(id).and_then(Option::as_mut)
    }

    fn free_id(&mut self, id: usize) {
        self.streams[id] = None;
        self.free.push(id);
        self.open -= 1;
    }

    /// Wake the service if it waits: for new work, or for a reason to stop gathering.
    fn nudge(&self, shared: &Shared) {
        if self.idle {
            shared.work.notify_one();
        }
    }

    /// Put `id` on `ready` unless the service already looks at it; wake the service.
    fn list(&mut self, id: usize, shared: &Shared) {
        let Some(rec) = self.rec(id) else { return };
        if !rec.listed {
            rec.listed = true;
            self.ready.push_back(id);
            self.nudge(shared);
        }
    }
}

impl Md5Lanes {
    /// Start the service thread with `kernel` (which must be [`Kernel::available`]).
    pub fn start(kernel: Kernel) -> std::io::Result<Md5Lanes> {
        if !kernel.available() {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, format!("md5 kernel {kernel:?}")));
        }
        let shared = Arc::new(Shared { inner: Mutex::new(Inner::default()), work: Condvar::new() });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("s3-md5-lanes".into()).spawn(move || run(&s, kernel))?;
        Ok(Md5Lanes { shared, thread: Some(thread), kernel })
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// A new stream continuing from `state` (the bytes already hashed inline).
    pub fn stream(&self, state: Md5State) -> Result<Md5Stream, Stopped> {
        let mut g = self.shared.lock();
        if g.stop {
            return Err(Stopped);
        }
        let (tx, rx) = oneshot::channel();
        let rec = Rec {
            queue: VecDeque::new(),
            queued_bytes: 0,
            state: Some(Box::new(state)),
            listed: false,
            closed: false,
            abandoned: false,
            waker: None,
            done: Some(tx),
        };
        g.open += 1;
        let id = match g.free.pop() {
            Some(id) => {
                g.streams[id] = Some(rec);
                id
            }
            None => {
                g.streams.push(Some(rec));
                g.streams.len() - 1
            }
        };
        Ok(Md5Stream { shared: self.shared.clone(), id, done: Some(rx) })
    }

    /// Tests: while held, the service takes no new work (queues fill up).
    #[cfg(test)]
    pub(crate) fn hold(&self, on: bool) {
        self.shared.lock().hold = on;
        self.shared.work.notify_one();
    }

    /// Streams not yet finished and freed (for tests: an abandoned stream must not stay).
    pub fn open_streams(&self) -> usize {
        let g = self.shared.lock();
        debug_assert_eq!(g.open, g.streams.iter().filter(|r| r.is_some()).count());
        g.open
    }
}

impl Drop for Md5Lanes {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Md5Stream {
    /// Queue `chunk` for hashing; waits while [`QUEUED_BYTES`] are queued already.
    pub async fn update(&mut self, chunk: Bytes) -> Result<(), Stopped> {
        if chunk.is_empty() {
            return Ok(());
        }
        let mut chunk = Some(chunk);
        std::future::poll_fn(|cx| {
            let mut g = self.shared.lock();
            if g.stop {
                return Poll::Ready(Err(Stopped));
            }
            let Some(rec) = g.rec(self.id) else { return Poll::Ready(Err(Stopped)) };
            if rec.queued_bytes >= QUEUED_BYTES {
                rec.waker = Some(cx.waker().clone());
                g.nudge(&self.shared);
                return Poll::Pending;
            }
            // Invariant: `chunk` is taken only here, right before returning Ready.
            let c = chunk.take().expect("polled after Ready");
            rec.queued_bytes += c.len();
            rec.queue.push_back(c);
            let half_full = rec.queued_bytes >= QUEUED_BYTES / 2;
            g.list(self.id, &self.shared);
            if half_full {
                g.nudge(&self.shared); // a reason not to wait for more streams' data
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// The MD5 of the state passed to [`Md5Lanes::stream`] followed by every chunk queued.
    pub async fn finish(mut self) -> Result<[u8; 16], Stopped> {
        let done = self.done.take();
        {
            let mut g = self.shared.lock();
            if g.stop {
                return Err(Stopped);
            }
            let Some(rec) = g.rec(self.id) else { return Err(Stopped) };
            rec.closed = true;
            g.list(self.id, &self.shared);
            g.nudge(&self.shared); // a reason not to wait for more streams' data
        }
        // From here the service owns the record: it frees it after sending the digest, even
        // if this future is dropped before it arrives.
        match done {
            Some(rx) => rx.await.map_err(|_| Stopped),
            None => Err(Stopped),
        }
    }
}

impl Drop for Md5Stream {
    fn drop(&mut self) {
        if self.done.is_none() {
            return; // finished, or finishing: the service frees the record
        }
        let mut g = self.shared.lock();
        let Some(rec) = g.rec(self.id) else { return };
        rec.abandoned = true;
        rec.queue.clear();
        if !rec.listed {
            g.free_id(self.id);
        }
        // else the service frees it when it next looks (in `ready` or in its lane).
    }
}

/// A stream in a lane: its state (the chaining value is in the lane's column of
/// [`LaneState`] meanwhile) and its chunks, the first of them read up to `pos`.
struct Lane {
    id: usize,
    state: Box<Md5State>,
    chunks: VecDeque<Bytes>,
    pos: usize,
}

impl Lane {
    /// The next run of whole blocks of this lane's data: its start and length in blocks.
    /// Partial blocks at chunk boundaries go through the state's buffer (compressed here,
    /// scalar, when full). `None` when the lane's chunks are used up.
    fn next_run(&mut self, lanes: &mut LaneState, i: usize) -> Option<(*const u8, usize)> {
        loop {
            let chunk = self.chunks.front()?;
            let rest = &chunk[self.pos..];
            if rest.is_empty() {
                self.chunks.pop_front();
                self.pos = 0;
                continue;
            }
            let st = &mut self.state;
            if st.buf_len > 0 || rest.len() < 64 {
                let left = st.fill_buf(rest);
                let took = rest.len() - left.len();
                st.len += took as u64;
                self.pos += took;
                if st.buf_len == 64 {
                    let mut h = lanes.get(i);
                    md5::block_api::compress(&mut h, &[st.buf]);
                    lanes.set(i, h);
                    st.buf_len = 0;
                }
                continue;
            }
            return Some((rest.as_ptr(), rest.len() / 64));
        }
    }

    /// `blocks` whole blocks of the current chunk were hashed.
    fn advance(&mut self, blocks: usize) {
        self.pos += blocks * 64;
        self.state.len += blocks as u64 * 64;
    }
}

/// The service thread.
fn run(shared: &Shared, kernel: Kernel) {
    let n = kernel.lanes();
    let mut lanes: Vec<Option<Lane>> = (0..n).map(|_| None).collect();
    let mut cv = LaneState::default();
    let mut wake: Vec<Waker> = Vec::new();
    // Whether the last thing done was a hash turn (not a wait), and since when the service
    // has been gathering (see `worth_a_turn`).
    let mut in_turn = false;
    let mut short_since: Option<Instant> = None;
    loop {
        {
            let mut g = shared.lock();
            loop {
                if g.stop {
                    stop(&mut g);
                    return;
                }
                if !g.hold {
                    schedule(&mut g, &mut lanes, &mut cv, &mut wake);
                }
                let with_data = lanes.iter().flatten().filter(|l| !l.chunks.is_empty()).count();
                let wait = if with_data == 0 {
                    None
                } else if worth_a_turn(&g, &lanes, with_data, in_turn) {
                    break;
                } else {
                    let since = *short_since.get_or_insert_with(Instant::now);
                    match GATHER.checked_sub(since.elapsed()) {
                        Some(left) if !left.is_zero() => Some(left),
                        _ => break,
                    }
                };
                for w in wake.drain(..) {
                    w.wake();
                }
                in_turn = false;
                g.idle = true;
                g = match wait {
                    None => shared.work.wait(g).unwrap_or_else(|e| e.into_inner()),
                    Some(left) => shared.work.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0,
                };
                g.idle = false;
            }
        }
        (in_turn, short_since) = (true, None);
        for w in wake.drain(..) {
            w.wake();
        }
        hash_turn(kernel, &mut lanes, &mut cv);
    }
}

/// Whether to hash now with `with_data` lanes holding data, or to wait (at most [`GATHER`]
/// in all) for more streams' data. A turn costs the same with 1 lane as with 16, and the
/// service is much faster than bodies arrive, so hashing each chunk as it comes runs mostly
/// 1 or 2 lanes (measured: MD5 was still ~19 % of the server's CPU at 32 clients that way;
/// starting as soon as half the lanes had data, ~10 %). So a turn starts when every lane the
/// open streams could fill has data, and goes on (`in_turn`) while at least half of them do;
/// and it starts at once when waiting would hold someone up: a stream is finishing (its PUT
/// answers after the digest), or a queue is half full (its receive loop would soon wait).
fn worth_a_turn(g: &Inner, lanes: &[Option<Lane>], with_data: usize, in_turn: bool) -> bool {
    let fillable = g.open.min(lanes.len());
    let enough = if in_turn { fillable.div_ceil(2) } else { fillable };
    with_data >= enough
        || lanes.iter().flatten().any(|l| {
            g.streams[l.id]
                .as_ref()
                .is_some_and(|r| r.closed || r.queued_bytes >= QUEUED_BYTES / 2 || r.waker.is_some())
        })
}

/// Under the lock: settle lanes whose data is used up or whose stream was abandoned, then
/// give free lanes to ready streams. Wakers to call after unlocking go to `wake`.
fn schedule(g: &mut Inner, lanes: &mut [Option<Lane>], cv: &mut LaneState, wake: &mut Vec<Waker>) {
    for (i, slot) in lanes.iter_mut().enumerate() {
        let Some(lane) = slot else { continue };
        let id = lane.id;
        // Invariant: a stream in a lane keeps its record until the service frees it.
        let rec = g.streams[id].as_mut().expect("a stream in a lane has its record");
        if rec.abandoned {
            *slot = None;
            g.free_id(id);
            continue;
        }
        if !lane.chunks.is_empty() {
            continue;
        }
        if !rec.queue.is_empty() && g.ready.is_empty() {
            lane.chunks.extend(rec.queue.drain(..));
            rec.queued_bytes = 0;
            wake.extend(rec.waker.take());
            continue;
        }
        // Out of the lane: back into the record with its chaining value.
        let Some(mut lane) = slot.take() else { unreachable!() };
        lane.state.h = cv.get(i);
        if !rec.queue.is_empty() {
            rec.state = Some(lane.state);
            g.ready.push_back(id); // still listed
        } else if rec.closed {
            finalize(g, id, *lane.state);
        } else {
            rec.state = Some(lane.state);
            rec.listed = false;
        }
    }
    for (i, slot) in lanes.iter_mut().enumerate() {
        while slot.is_none() {
            let Some(id) = g.ready.pop_front() else { return };
            let rec = g.streams[id].as_mut().expect("a ready stream has its record");
            if rec.abandoned {
                g.free_id(id);
                continue;
            }
            let state = rec.state.take().expect("a stream out of a lane holds its state");
            if rec.queue.is_empty() {
                // Listed for its close only.
                debug_assert!(rec.closed);
                finalize(g, id, *state);
                continue;
            }
            cv.set(i, state.h);
            let chunks = std::mem::take(&mut rec.queue);
            rec.queued_bytes = 0;
            wake.extend(rec.waker.take());
            *slot = Some(Lane { id, state, chunks, pos: 0 });
        }
    }
}

/// Pad and send the digest of a closed stream with nothing left queued; free its record.
fn finalize(g: &mut Inner, id: usize, state: Md5State) {
    if let Some(tx) = g.streams[id].as_mut().and_then(|r| r.done.take()) {
        let _ = tx.send(state.finalize()); // the receiver may be gone (request dropped)
    }
    g.free_id(id);
}

/// The service is stopping: every stream fails (its digest sender dropped, its waiting
/// submitter woken to see `stop`).
fn stop(g: &mut Inner) {
    for rec in g.streams.iter_mut().filter_map(Option::take) {
        if let Some(w) = rec.waker {
            w.wake();
        }
    }
    g.ready.clear();
    g.open = 0;
}

/// Outside the lock: one run of whole blocks for every lane that has data.
fn hash_turn(kernel: Kernel, lanes: &mut [Option<Lane>], cv: &mut LaneState) {
    let mut ptrs = [super::ZERO_BLOCK.as_ptr(); MAX_LANES];
    let mut run = usize::MAX;
    let mut mask = 0u16;
    for (i, slot) in lanes.iter_mut().enumerate() {
        if let Some(lane) = slot
            && let Some((p, blocks)) = lane.next_run(cv, i)
        {
            ptrs[i] = p;
            run = run.min(blocks);
            mask |= 1 << i;
        }
    }
    match mask.count_ones() {
        0 => {}
        1 => {
            let i = mask.trailing_zeros() as usize;
            let run = run.min(SCALAR_RUN);
            // SAFETY: `next_run` pointed into the lane's current chunk, which holds `run` or
            // more whole blocks from there and is not touched until `advance`.
            let data = unsafe { std::slice::from_raw_parts(ptrs[i], run * 64) };
            let mut h = cv.get(i);
            md5::block_api::compress(&mut h, data.as_chunks::<64>().0);
            cv.set(i, h);
            lanes[i].as_mut().expect("lane in mask").advance(run);
        }
        _ => {
            let run = run.min(VECTOR_RUN);
            // SAFETY: as above, for every lane in `mask`; `kernel` was checked `available`
            // at start and `mask` holds only lanes below `kernel.lanes()`.
            unsafe { kernel.compress(cv, &ptrs, mask, run) };
            for (_, slot) in lanes.iter_mut().enumerate().filter(|(i, _)| mask & (1 << i) != 0) {
                slot.as_mut().expect("lane in mask").advance(run);
            }
        }
    }
}
