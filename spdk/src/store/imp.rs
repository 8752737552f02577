//! The block store engine: the write path (reserve under a short lock, write outside it,
//! complete under the lock), reads verified per 4 KiB page, deletes, and the flush barrier.
//! Opening and recovery live in `recover`, segment cleaning in `cleaner`.
//!
//! Concurrency: every entry write holds a ticket from reservation to completion; `flush`
//! waits until all tickets taken before it have completed, so no acknowledged entry sits
//! behind a hole that a recovery scan would stop at.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

use super::ahead::{Ahead, Watermarks};
use super::cache::CrcCache;
use super::cleaner::nearly_empty;
use super::format::{
    DATA_START, EntryHead, EntryKind, PAGE, PAGE_U64, Rec, SegHeader, TOMBS_PER_ENTRY, build_tomb_entry, crc_at,
    crc_page_span, data_pages, entry_bytes, fill_data_entry, get_u32, hdr_pages, page_crc,
};
use super::state::{Loc, Reservation, SealJob, SegState, State};
use super::{BlockId, CleanStats, StoreError, StoreOptions, StoreStats};
use crate::buf::{AlignedBuf, BufPool};
use crate::device::{BlockDevice, DeviceError};

/// Header pages and data pages this far apart are fetched with one read instead of two.
const MAX_GAP_PAGES: u32 = 8;

/// Reads of up to this many pages keep the crcs they check on the stack.
const INLINE_CRCS: usize = 16;

/// Copies into `want` (the crcs of data pages `first..=last`) those that header page `h`
/// holds; `crcs` are that header page's crcs, of data pages `crc_page_span(h, pages)`.
fn copy_crcs(crcs: &[u32], h: u32, pages: u32, first: u32, last: u32, want: &mut [u32]) {
    let (lo, hi) = crc_page_span(h, pages);
    let (from, to) = (lo.max(first), hi.saturating_sub(1).min(last));
    if lo < hi && from <= to {
        want[(from - first) as usize..=(to - first) as usize]
            .copy_from_slice(&crcs[(from - lo) as usize..=(to - lo) as usize]);
    }
}

/// Copies the cached crcs of data pages `first..=last` of the entry at `loc` into `want`; the
/// span of header pages whose crcs are not cached, if any.
fn cached_crcs(
    cache: &CrcCache,
    loc: Loc,
    generation: u64,
    first: u32,
    last: u32,
    want: &mut [u32],
) -> Option<(u32, u32)> {
    let pages = data_pages(loc.len);
    let (h_first, h_last) = ((crc_at(first) / PAGE) as u32, (crc_at(last) / PAGE) as u32);
    let mut missing: Option<(u32, u32)> = None;
    for h in h_first..=h_last {
        match cache.get(&(generation, loc.off_pages, h)) {
            Some(crcs) => copy_crcs(crcs, h, pages, first, last, want),
            None => missing = Some((missing.map_or(h, |m| m.0), h)),
        }
    }
    missing
}

/// A put checked and built, not yet reserved or written (see [`Inner::prepare_put`]).
pub(crate) struct PreparedPut {
    id: BlockId,
    len: u32,
    buf: AlignedBuf,
    crcs: Vec<u32>,
}

/// A read buffer handed out as [`Bytes`]; back to the pool when the last reference drops.
struct Pooled {
    buf: Option<AlignedBuf>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], AlignedBuf::as_slice)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give(b);
        }
    }
}

/// Idle buffers the store keeps for reuse: enough for a full device queue of largest entries
/// plus a few, at least 16 MiB. Only buffers that were in use at the same time are ever kept.
fn pool_bytes(queue_depth: usize, max_block: usize) -> usize {
    let entry = entry_bytes(max_block as u32) as usize;
    (queue_depth.saturating_add(8)).saturating_mul(entry).clamp(16 << 20, 1 << 30)
}

/// Where things are on the device; fixed at format time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub seg_bytes: u64,
    pub nsegs: u32,
    pub max_block: usize,
    pub uuid: u64,
}

impl Layout {
    pub(super) fn seg_addr(&self, seg: u32) -> u64 {
        DATA_START + seg as u64 * self.seg_bytes
    }
}

pub(crate) struct Inner {
    pub(super) dev: Arc<dyn BlockDevice>,
    pub(super) lay: Layout,
    /// Read-write so that gets (index lookups) do not exclude each other.
    st: RwLock<State>,
    /// Reused I/O buffers (entry buffers of puts, read buffers of gets, which go back when
    /// the `Bytes` handed out of them drop).
    pool: Arc<BufPool>,
    /// Signalled whenever a write completes (for `flush` waiting on tickets).
    done: Notify,
    rotate_lock: tokio::sync::Mutex<()>,
    /// Device flushes in one file: see [`Inner::sync_device`].
    syncs: SyncGroup,
    pub(super) clean_lock: tokio::sync::Mutex<()>,
    /// Cleaning ahead: its control block (shared with the task) and watermarks.
    pub(super) ahead: Arc<Ahead>,
    pub(super) marks: Watermarks,
    /// This store, for starting the background task (which holds it weakly).
    pub(super) me: Weak<Inner>,
}

/// The group commit of device flushes ([`Inner::sync_device`]).
#[derive(Default)]
struct SyncGroup {
    /// Tickets handed out: one per `sync_device` call.
    asked: AtomicU64,
    /// Every ticket up to this one is covered by a completed flush.
    done: AtomicU64,
    /// Held while a flush runs.
    running: tokio::sync::Mutex<()>,
}

/// What an entry write is for.
pub(super) enum Req {
    Put {
        id: BlockId,
        len: u32,
    },
    /// The cleaner re-appending a live block found at `old`.
    Move {
        id: BlockId,
        old: Loc,
    },
    Tombs,
}

enum Attempt {
    Got(Reservation, Vec<(BlockId, u64)>),
    Nothing,
    /// No room in the active segment (whose generation, if any, is given).
    Full(Option<u64>),
}

impl Inner {
    pub(super) fn new(dev: Arc<dyn BlockDevice>, lay: Layout, mut st: State, opts: &StoreOptions) -> Arc<Inner> {
        st.crcs = CrcCache::new(opts.crc_cache_bytes);
        Arc::new_cyclic(|me| Inner {
            pool: Arc::new(BufPool::new(pool_bytes(dev.info().queue_depth, lay.max_block))),
            dev,
            lay,
            st: RwLock::new(st),
            done: Notify::new(),
            rotate_lock: tokio::sync::Mutex::new(()),
            syncs: SyncGroup::default(),
            clean_lock: tokio::sync::Mutex::new(()),
            ahead: Ahead::new(),
            marks: Watermarks::new(lay.nsegs),
            me: me.clone(),
        })
    }

    /// The state lock. Critical sections do not await and only panic on a broken invariant,
    /// so a poisoned lock still guards consistent data.
    pub(super) fn st(&self) -> RwLockWriteGuard<'_, State> {
        self.st.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state lock, shared: for lookups that change nothing.
    pub(super) fn st_read(&self) -> RwLockReadGuard<'_, State> {
        self.st.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) async fn read_at(&self, addr: u64, len: usize) -> Result<AlignedBuf, StoreError> {
        // A pooled buffer's old bytes are all overwritten by a successful read; on an error
        // the buffer goes back to the pool unseen.
        let (buf, r) = self.dev.read(addr, self.pool.take(len)).await;
        if let Err(e) = r {
            self.pool.give(buf);
            return Err(e.into());
        }
        Ok(buf)
    }

    pub(super) async fn write_at(&self, addr: u64, buf: AlignedBuf) -> Result<(), StoreError> {
        let (buf, r) = self.dev_write(addr, buf).await;
        self.pool.give(buf);
        Ok(r?)
    }

    /// Every device write of the store goes through here: none starts once the store is closed.
    async fn dev_write(&self, addr: u64, buf: AlignedBuf) -> (AlignedBuf, Result<(), DeviceError>) {
        if self.ahead.closed() {
            return (buf, Err(DeviceError::Stopped));
        }
        self.dev.write(addr, buf).await
    }

    /// Check a put and build its entry (a copy of `data` with its header and crcs); nothing
    /// is reserved or written yet. [`Inner::put_prepared`] does the rest.
    pub(crate) fn prepare_put(&self, id: BlockId, data: &[u8]) -> Result<PreparedPut, StoreError> {
        if data.is_empty() {
            return Err(StoreError::Empty(id));
        }
        if data.len() > self.lay.max_block {
            return Err(StoreError::TooLarge { len: data.len(), max: self.lay.max_block });
        }
        if self.block_len(id).is_some() {
            return Err(StoreError::Exists(id));
        }
        let len = data.len() as u32;
        let mut buf = self.pool.take(entry_bytes(len) as usize);
        let crcs = fill_data_entry(&mut buf, id, data, self.lay.uuid);
        Ok(PreparedPut { id, len, buf, crcs })
    }

    pub(crate) async fn put_prepared(&self, p: PreparedPut) -> Result<(), StoreError> {
        let PreparedPut { id, len, buf, crcs } = p;
        let req = Req::Put { id, len };
        let r = match self.reserve_put(&req).await {
            Ok(r) => r,
            Err(e) => {
                self.pool.give(buf);
                return Err(e);
            }
        };
        self.write_reserved(r, buf, req, Vec::new()).await?;
        self.cache_crcs(r.generation, (r.off / PAGE_U64) as u32, len, &crcs);
        self.prepare_next().await;
        Ok(())
    }

    fn cache_crcs(&self, generation: u64, off_pages: u32, len: u32, crcs: &[u32]) {
        let mut st = self.st();
        for h in 0..hdr_pages(len) {
            let (lo, hi) = crc_page_span(h, data_pages(len));
            st.crcs.insert((generation, off_pages, h), &crcs[lo as usize..hi as usize]);
        }
    }

    /// Under the state lock: reserve for `req` if the active segment has room.
    fn attempt(st: &mut State, req: &Req) -> Result<Attempt, StoreError> {
        let (bytes, nrecs) = match req {
            Req::Put { id, len } => {
                if st.index.contains_key(id) || st.putting.contains(id) {
                    return Err(StoreError::Exists(*id));
                }
                (entry_bytes(*len), 1)
            }
            Req::Move { old, .. } => (entry_bytes(old.len), 1),
            Req::Tombs if st.pending_tombs.is_empty() => return Ok(Attempt::Nothing),
            Req::Tombs => (PAGE_U64, st.pending_tombs.len().min(TOMBS_PER_ENTRY)),
        };
        let Some(r) = st.try_reserve(bytes, nrecs, matches!(req, Req::Put { .. })) else {
            return Ok(Attempt::Full(st.active_gen()));
        };
        let tombs = match req {
            Req::Put { id, .. } => {
                st.putting.insert(*id);
                Vec::new()
            }
            Req::Move { .. } => Vec::new(),
            // Taken in the same critical section as the reservation, so a flush that starts
            // after a delete returned either finds its tombstone pending or waits for its ticket.
            Req::Tombs => st.pending_tombs.drain(..nrecs).collect(),
        };
        Ok(Attempt::Got(r, tombs))
    }

    /// Reserve space for `req`, opening new segments as needed; never cleans (the cleaner
    /// itself reserves through here). Puts leave the last free segment to the cleaner.
    /// `None` only for tombstones when none are pending.
    pub(super) async fn reserve(&self, req: &Req) -> Result<Option<(Reservation, Vec<(BlockId, u64)>)>, StoreError> {
        let use_reserve = !matches!(req, Req::Put { .. });
        loop {
            let seen = match Self::attempt(&mut self.st(), req)? {
                Attempt::Got(r, tombs) => return Ok(Some((r, tombs))),
                Attempt::Nothing => return Ok(None),
                Attempt::Full(seen) => seen,
            };
            self.rotate(seen, use_reserve).await?;
        }
    }

    /// Reserve space for a put; if no segment is free, clean just enough for it and retry
    /// (another put may take what was freed first: then clean again), NoSpace once cleaning
    /// frees nothing.
    async fn reserve_put(&self, req: &Req) -> Result<Reservation, StoreError> {
        let mut tries = 0;
        let r = loop {
            match self.reserve(req).await {
                Err(StoreError::NoSpace { .. }) if tries < self.lay.nsegs => {
                    tries += 1;
                    let freed = super::cleaner::clean_for_put(self).await?.segments_freed;
                    if freed == 0 && self.st_read().free_segments() < 2 {
                        break self.reserve(req).await;
                    }
                }
                r => break r,
            }
        };
        Ok(r?.expect("data reservations yield space or an error").0)
    }

    /// Open the next free segment as the active one, unless another task already replaced
    /// the active segment we saw full. Normal puts leave the last free segment to the cleaner.
    /// A segment prepared ahead (see [`Inner::prepare_next`]) is taken first, with no I/O.
    async fn rotate(&self, seen: Option<u64>, use_reserve: bool) -> Result<(), StoreError> {
        let _g = self.rotate_lock.lock().await;
        let is_reserve;
        let (seg, generation, prepared) = {
            let mut st = self.st();
            if st.active_gen() != seen {
                return Ok(());
            }
            let free = st.free_segments();
            if free == 0 || (!use_reserve && free <= 1) {
                let need = self.lay.max_block as u64;
                return Err(StoreError::NoSpace { need, free: st.free_bytes() });
            }
            is_reserve = free == 1;
            if let Some((seg, generation)) = st.prepared.take() {
                (seg, generation, true)
            } else {
                let seg = st.segs.iter().position(|s| s.state == SegState::Free).expect("free > 0") as u32;
                let generation = st.next_gen;
                st.next_gen += 1;
                let meta = &mut st.segs[seg as usize];
                (meta.state, meta.generation, meta.live_bytes) = (SegState::Open, generation, 0);
                (seg, generation, false)
            }
        };
        if !prepared {
            self.open_segment(seg, generation).await?;
        }
        let job = self.st().activate(seg, generation, is_reserve);
        if let Some(job) = job {
            self.seal(job).await;
            // Deletes may have left the segment dead while it was still open.
            self.ahead.start(&self.me);
        }
        if !prepared {
            // A prepared segment was already counted used when it was opened (and checked then).
            self.clean_ahead_if_low();
        }
        Ok(())
    }

    /// Write the in-use header of `seg` (already marked Open with `generation`) and make it
    /// durable; on failure the segment is free again.
    async fn open_segment(&self, seg: u32, generation: u64) -> Result<(), StoreError> {
        // The header must be durable before any entry of this generation is: recovery derives the
        // next generation from headers, and must never reuse a generation that entries on the device carry.
        let hdr = SegHeader { in_use: true, generation }.encode(self.lay.uuid);
        let res = match self.write_at(self.lay.seg_addr(seg), hdr).await {
            Ok(()) => self.dev.flush().await.map_err(StoreError::from),
            Err(e) => Err(e),
        };
        if res.is_err() {
            self.st().segs[seg as usize].state = SegState::Free;
        }
        res
    }

    /// Open the next segment ahead of need, so that the rotation when the active one fills costs
    /// no I/O: its header write would otherwise queue behind a device queue full of large
    /// entry writes (tens of ms) while every put waits. Only when two or more segments are free
    /// (the last one stays the cleaner's reserve, opened only on demand), none is prepared yet
    /// and no rotation is under way. A failure is only logged: the rotation then opens one itself.
    async fn prepare_next(&self) {
        let want = |st: &State| st.prepared.is_none() && st.active.is_some() && st.unprepared_free_segments() >= 2;
        if !want(&self.st()) {
            return;
        }
        let Ok(_g) = self.rotate_lock.try_lock() else { return };
        let (seg, generation) = {
            let mut st = self.st();
            if !want(&st) {
                return;
            }
            let seg = st.segs.iter().position(|s| s.state == SegState::Free).expect("free >= 2") as u32;
            let generation = st.next_gen;
            st.next_gen += 1;
            let meta = &mut st.segs[seg as usize];
            (meta.state, meta.generation, meta.live_bytes) = (SegState::Open, generation, 0);
            (seg, generation)
        };
        match self.open_segment(seg, generation).await {
            Ok(()) => self.st().prepared = Some((seg, generation)),
            Err(e) => tracing::warn!(segment = seg, error = %e, "opening the next segment ahead failed"),
        }
        self.clean_ahead_if_low();
    }

    /// Write the summary of a segment whose writes have all finished. Entries are flushed
    /// first so a summary never names an entry that is not on the device. A failed seal is
    /// logged, not returned: the segment is then recovered by scanning.
    pub(super) async fn seal(&self, job: SealJob) {
        let buf = super::format::encode_summary(&job.recs, job.generation, self.lay.uuid);
        let addr = self.lay.seg_addr(job.seg) + self.lay.seg_bytes - buf.len() as u64;
        let res = match self.dev.flush().await {
            Ok(()) => self.write_at(addr, buf).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = res {
            tracing::error!(segment = job.seg, generation = job.generation, error = %e, "segment summary write failed; recovery will scan it");
        }
        let mut st = self.st();
        st.open.remove(&job.seg);
        st.segs[job.seg as usize].state = SegState::Sealed;
    }

    /// Write a prepared entry at its reservation, then record the outcome.
    pub(super) async fn write_reserved(
        &self,
        r: Reservation,
        mut buf: AlignedBuf,
        req: Req,
        tombs: Vec<(BlockId, u64)>,
    ) -> Result<(), StoreError> {
        EntryHead::set_gen(&mut buf, r.generation);
        let (buf, res) = self.dev_write(self.lay.seg_addr(r.seg) + r.off, buf).await;
        self.pool.give(buf);
        let ok = res.is_ok();
        let off_pages = (r.off / PAGE_U64) as u32;
        let job = {
            let mut st = self.st();
            let recs: Vec<Rec> = match req {
                Req::Put { id, len } => {
                    st.putting.remove(&id);
                    if ok {
                        st.insert_block(id, &r, len);
                    }
                    vec![Rec::Data { id, off_pages, len }]
                }
                Req::Move { id, old } => {
                    if ok {
                        st.moved_block(id, old, &r);
                    }
                    vec![Rec::Data { id, off_pages, len: old.len }]
                }
                Req::Tombs => {
                    let recs = tombs.iter().map(|&(id, data_gen)| Rec::Tomb { id, data_gen }).collect();
                    if !ok {
                        st.pending_tombs.extend_from_slice(&tombs);
                    }
                    recs
                }
            };
            st.finish(&r, &recs, ok)
        };
        self.done.notify_waiters();
        if let Some(job) = job {
            self.seal(job).await;
            // Deletes may have left the segment dead while it was still open.
            self.ahead.start(&self.me);
        }
        Ok(res?)
    }

    /// `[offset, offset+len)` of block `id`, verified. The bytes are the device read's own
    /// buffer (no copy); it goes back to the store's pool when the last `Bytes` of it drops.
    ///
    /// The hot case (a small read whose crcs are cached) allocates nothing and takes one shared
    /// lock: the index entry and the crcs of the pages read are copied out of the state (onto
    /// the stack) together, the read buffer comes from the pool and is handed out as the answer.
    pub(crate) async fn get(&self, id: BlockId, offset: u32, len: u32) -> Result<Bytes, StoreError> {
        let Some(end) = offset.checked_add(len) else {
            let block_len = self.block_len(id).ok_or(StoreError::NotFound(id))?;
            return Err(StoreError::Range { id, offset, len, block_len });
        };
        let (first, last) = (offset / PAGE as u32, end.saturating_sub(1).max(offset) / PAGE as u32);
        let npages = (last - first + 1) as usize;
        let (mut inline, mut heap) = ([0u32; INLINE_CRCS], Vec::new());
        let want: &mut [u32] = if npages <= INLINE_CRCS {
            &mut inline[..npages]
        } else {
            heap.resize(npages, 0);
            &mut heap
        };
        let mut attempts = 0;
        loop {
            let (loc, generation, missing) = {
                let st = self.st_read();
                let loc = *st.index.get(&id).ok_or(StoreError::NotFound(id))?;
                if end > loc.len {
                    return Err(StoreError::Range { id, offset, len, block_len: loc.len });
                }
                if len == 0 {
                    return Ok(Bytes::new());
                }
                let generation = st.segs[loc.seg as usize].generation;
                (loc, generation, cached_crcs(&st.crcs, loc, generation, first, last, want))
            };
            match self.read_range(id, loc, generation, offset, len, want, missing).await {
                // The cleaner may have moved the block and reused its old segment meanwhile
                // (perhaps moving it back to the same place later, in a new generation).
                Err(StoreError::Checksum { .. }) if attempts < 3 && self.moved_since(id, loc, generation) => {
                    attempts += 1;
                }
                r => return r,
            }
        }
    }

    /// Whether block `id` is no longer at `loc` in the segment generation `generation`.
    fn moved_since(&self, id: BlockId, loc: Loc, generation: u64) -> bool {
        let st = self.st_read();
        st.index.get(&id) != Some(&loc) || st.segs[loc.seg as usize].generation != generation
    }

    /// Read and verify `[offset, offset+len)` of the block at `loc`: the data pages covering
    /// it, plus the header pages `missing` (those holding crcs not in `want` yet).
    #[allow(clippy::too_many_arguments)]
    async fn read_range(
        &self,
        id: BlockId,
        loc: Loc,
        generation: u64,
        offset: u32,
        len: u32,
        want: &mut [u32],
        missing: Option<(u32, u32)>,
    ) -> Result<Bytes, StoreError> {
        let (pages, hp) = (data_pages(loc.len), hdr_pages(loc.len));
        let (first, last) = (offset / PAGE as u32, (offset + len - 1) / PAGE as u32);
        let entry = self.lay.seg_addr(loc.seg) + loc.off_pages as u64 * PAGE_U64;
        let npages = (last - first + 1) as usize;
        let data_addr = entry + (hp + first) as u64 * PAGE_U64;
        let data_len = npages * PAGE;
        let (data, data_off) = match missing {
            Some((m0, m1)) => {
                let hdr_addr = entry + m0 as u64 * PAGE_U64;
                let hdr_len = (m1 - m0 + 1) as usize * PAGE;
                let gap = hp - 1 - m1 + first;
                let (hdr, data, data_off) = if gap <= MAX_GAP_PAGES {
                    let all = self.read_at(hdr_addr, hdr_len + gap as usize * PAGE + data_len).await?;
                    (None, all, hdr_len + gap as usize * PAGE)
                } else {
                    let (h, d) = tokio::join!(self.read_at(hdr_addr, hdr_len), self.read_at(data_addr, data_len));
                    let (h, d) = match (h, d) {
                        (Ok(h), Ok(d)) => (h, d),
                        (Err(e), other) | (other, Err(e)) => {
                            if let Ok(b) = other {
                                self.pool.give(b);
                            }
                            return Err(e);
                        }
                    };
                    (Some(h), d, 0)
                };
                let hdr_bytes = hdr.as_ref().map_or(&data.as_slice()[..hdr_len], |h| &h.as_slice()[..hdr_len]);
                let mut parsed = Vec::with_capacity((m1 - m0 + 1) as usize);
                for h in m0..=m1 {
                    let page = &hdr_bytes[(h - m0) as usize * PAGE..][..PAGE];
                    match self.crcs_from_header(id, loc, generation, h, page) {
                        Some(crcs) => parsed.push((h, crcs)),
                        None => {
                            self.pool.give(data);
                            if let Some(h) = hdr {
                                self.pool.give(h);
                            }
                            return Err(StoreError::Checksum { id, page: first });
                        }
                    }
                }
                if let Some(h) = hdr {
                    self.pool.give(h);
                }
                let mut st = self.st();
                for (h, crcs) in parsed {
                    copy_crcs(&crcs, h, pages, first, last, want);
                    st.crcs.insert((generation, loc.off_pages, h), &crcs);
                }
                (data, data_off)
            }
            None => (self.read_at(data_addr, data_len).await?, 0),
        };
        for (i, want) in want.iter().enumerate() {
            let at = data_off + i * PAGE;
            if page_crc(&data.as_slice()[at..at + PAGE]) != *want {
                self.pool.give(data);
                return Err(StoreError::Checksum { id, page: first + i as u32 });
            }
        }
        let start = data_off + (offset - first * PAGE as u32) as usize;
        let owner = Pooled { buf: Some(data), pool: Arc::clone(&self.pool) };
        Ok(Bytes::from_owner(owner).slice(start..start + len as usize))
    }

    /// The crcs in header page `h` of the entry for `id`; `None` if page 0 is not that entry's
    /// header (corruption, or the segment was reused since the index was read).
    fn crcs_from_header(&self, id: BlockId, loc: Loc, generation: u64, h: u32, page: &[u8]) -> Option<Vec<u32>> {
        if h == 0 {
            let head = EntryHead::read(page)?;
            let expect = (EntryKind::Data, id, loc.len, generation, self.lay.uuid);
            if (head.kind, head.id, head.len, head.generation, head.uuid) != expect {
                return None;
            }
        }
        let (lo, hi) = crc_page_span(h, data_pages(loc.len));
        Some((lo..hi).map(|p| get_u32(page, crc_at(p) - h as usize * PAGE)).collect())
    }

    /// Remove block `id` from the index (its tombstone waits in `pending_tombs`); true if a
    /// page of tombstones is full and should be written now ([`Inner::write_tombs`]).
    pub(crate) fn delete_in_memory(&self, id: BlockId) -> Result<bool, StoreError> {
        let (page_full, sealed, emptied) = {
            let mut st = self.st();
            let loc = st.remove_block(id).ok_or(StoreError::NotFound(id))?;
            let meta = st.segs[loc.seg as usize];
            let sealed = meta.state == SegState::Sealed;
            (st.pending_tombs.len() >= TOMBS_PER_ENTRY, sealed, sealed && nearly_empty(&self.lay, meta.live_bytes))
        };
        // Dead space in a sealed segment: maybe a victim for cleaning ahead now.
        if emptied {
            self.ahead.start(&self.me);
        } else if sealed {
            self.clean_ahead_if_low();
        }
        Ok(page_full)
    }

    /// Write one entry of pending tombstones; false if none were pending.
    pub(crate) async fn write_tombs(&self) -> Result<bool, StoreError> {
        let Some((r, tombs)) = self.reserve(&Req::Tombs).await? else { return Ok(false) };
        let buf = build_tomb_entry(&tombs, self.lay.uuid);
        self.write_reserved(r, buf, Req::Tombs, tombs).await?;
        Ok(true)
    }

    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let batches = self.st().pending_tombs.len().div_ceil(TOMBS_PER_ENTRY);
        for _ in 0..batches {
            if !self.write_tombs().await? {
                break;
            }
        }
        let mark = self.st().ticket_mark();
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.st().done_below(mark) {
                break;
            }
            notified.await;
        }
        self.sync_device().await
    }

    /// A device flush that covers every write completed before this call. Concurrent callers
    /// share flushes (group commit): one flush runs at a time, and a caller that finds one
    /// running waits for it and then for at most one more, which every caller that came in
    /// meanwhile shares. 32 S3 PUTs at once then cost a few flushes instead of 32 (each an
    /// io-wq wake-up and a device cache flush; session 8 measured it in BENCHMARKS.md).
    async fn sync_device(&self) -> Result<(), StoreError> {
        let ticket = self.syncs.asked.fetch_add(1, Ordering::AcqRel) + 1;
        // Uncontended, take the lock without an await: `lock().await` spends the task's
        // coop budget and can yield even then, which a flush on a device that completes at
        // once (the memory device) never did.
        let _one = match self.syncs.running.try_lock() {
            Ok(g) => g,
            Err(_) => self.syncs.running.lock().await,
        };
        if self.syncs.done.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        // Every ticket up to `upto` was taken after its caller's writes completed, and so
        // before this flush starts: the flush covers them all.
        let upto = self.syncs.asked.load(Ordering::Acquire);
        self.dev.flush().await?;
        self.syncs.done.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) async fn clean(&self) -> Result<CleanStats, StoreError> {
        super::cleaner::clean(self).await
    }

    pub(crate) fn block_len(&self, id: BlockId) -> Option<u32> {
        self.st_read().index.get(&id).map(|l| l.len)
    }

    pub(crate) fn ids(&self) -> Vec<BlockId> {
        self.st_read().index.keys().copied().collect()
    }

    pub(crate) fn stats(&self) -> StoreStats {
        let st = self.st_read();
        let free = st.free_segments() as u64;
        let total = self.lay.nsegs as u64;
        StoreStats {
            capacity_bytes: total * self.lay.seg_bytes,
            used_bytes: (total - free) * self.lay.seg_bytes,
            live_bytes: st.live_bytes,
            blocks: st.index.len() as u64,
            segments_total: total,
            segments_free: free,
            index_bytes: st.index_bytes(),
            cleaned_segments: st.cleaned_segments,
            cleaned_segments_for_puts: st.cleaned_segments_for_puts,
            cleaned_segments_ahead: st.cleaned_segments_ahead,
            torn_entries_discarded: st.torn_entries_discarded,
        }
    }

    pub(crate) fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    pub(crate) async fn format(dev: Arc<dyn BlockDevice>, opts: StoreOptions) -> Result<Arc<Inner>, StoreError> {
        super::recover::format(dev, opts).await
    }

    pub(crate) async fn open(dev: Arc<dyn BlockDevice>, opts: StoreOptions) -> Result<Arc<Inner>, StoreError> {
        super::recover::open(dev, opts).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::BlockStore;
    use super::*;
    use crate::device::mem::MemDevice;
    use crate::store::StoreError;

    fn pattern(id: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (id as usize * 131 + i * 7 + i / 4096) as u8).collect()
    }

    /// Pooled buffers carry old bytes; none may reach the device (padding) or a reader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pooled_buffers_leak_no_old_bytes() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        let opts = StoreOptions { max_block_bytes: 1 << 20, segment_bytes: 8 << 20, crc_cache_bytes: 1 << 20 };
        let s = Arc::new(BlockStore::format(Arc::clone(&dev), opts).await.unwrap());
        // Big blocks first, so the pool fills with buffers full of their bytes.
        let lens = [1 << 20, (1 << 20) - 1, 4096, 1, 5000, 8191, 4097, 100_000, 1 << 20, 12_345];
        let mut set = tokio::task::JoinSet::new();
        for (id, &len) in lens.iter().enumerate() {
            let s = Arc::clone(&s);
            set.spawn(async move { s.put(id as u64, &pattern(id as u64, len)).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        for round in 0..3 {
            for (id, &len) in lens.iter().enumerate() {
                let id = id as u64;
                assert_eq!(s.get(id, 0, len as u32).await.unwrap(), pattern(id, len), "round {round} block {id}");
                let (off, n) = ((len / 3) as u32, (len - len / 3).min(9000) as u32);
                let want = &pattern(id, len)[off as usize..(off + n) as usize];
                assert_eq!(s.get(id, off, n).await.unwrap(), want, "round {round} block {id} range");
            }
        }
        // On the device: every entry's tail padding and header padding are zeros.
        let st = s.inner.st();
        for (id, &len) in lens.iter().enumerate() {
            let loc = st.index[&(id as u64)];
            let addr = s.inner.lay.seg_addr(loc.seg) + loc.off_pages as u64 * PAGE_U64;
            let bytes = entry_bytes(len as u32) as usize;
            let (raw, r) = futures_lite_block(dev.read(addr, AlignedBuf::zeroed(bytes)));
            r.unwrap();
            let hp = hdr_pages(len as u32) as usize * PAGE;
            assert!(raw[hp + len..].iter().all(|&b| b == 0), "block {id}: tail padding not zero");
            let crc_end = crc_at(data_pages(len as u32));
            assert!(raw[crc_end..hp].iter().all(|&b| b == 0), "block {id}: header padding not zero");
        }
    }

    /// The next segment is opened ahead; rotations use it; the cleaner's reserve is never
    /// prepared; everything survives a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn next_segment_is_prepared_ahead_but_never_the_reserve() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new((1 << 20) + 6 * (1 << 20)));
        let opts = StoreOptions { max_block_bytes: 64 << 10, segment_bytes: 1 << 20, crc_cache_bytes: 1 << 20 };
        let s = BlockStore::format(Arc::clone(&dev), opts.clone()).await.unwrap();
        let mut ids = Vec::new();
        let mut seen_prepared = std::collections::HashSet::new();
        for id in 0.. {
            match s.put(id, &pattern(id, 60_000)).await {
                Ok(()) => ids.push(id),
                Err(StoreError::NoSpace { .. }) => break,
                Err(e) => panic!("put {id}: {e}"),
            }
            let st = s.inner.st();
            if let Some((seg, generation)) = st.prepared {
                assert_eq!(st.segs[seg as usize].state, SegState::Open);
                assert_eq!(st.segs[seg as usize].generation, generation);
                assert_ne!(st.active, Some(seg));
                assert!(st.unprepared_free_segments() >= 1, "the reserve was prepared");
                seen_prepared.insert(seg);
            }
            assert!(st.free_segments() >= 1);
        }
        assert!(seen_prepared.len() >= 3, "segments prepared ahead: {seen_prepared:?}");
        {
            let st = s.inner.st();
            assert_eq!(
                (st.free_segments(), st.unprepared_free_segments()),
                (1, 1),
                "only the reserve is left, unopened"
            );
        }
        s.flush().await.unwrap();
        drop(s);
        let s = BlockStore::open(dev, opts).await.unwrap();
        for &id in &ids {
            assert_eq!(s.get(id, 0, 60_000).await.unwrap(), pattern(id, 60_000), "block {id} after reopen");
        }
    }

    fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
        // MemDevice completes synchronously: one poll is enough.
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("MemDevice I/O pending"),
        }
    }

    /// A crc cache that holds two header pages' crcs: 32 concurrent range reads over 24
    /// blocks, whose reads yield, keep evicting what others just cached, so reads take both
    /// paths (crcs cached, or read with the data) and all return the right bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_are_right_when_the_crc_cache_evicts_under_them() {
        let dev: Arc<dyn BlockDevice> = Arc::new(YieldingReads(MemDevice::new(16 << 20)));
        let opts =
            StoreOptions { max_block_bytes: 64 << 10, segment_bytes: 1 << 20, crc_cache_bytes: 2 * (4 * 16 + 64) };
        let s = Arc::new(BlockStore::format(dev, opts).await.unwrap());
        let len = 16 * PAGE;
        for id in 0..24u64 {
            s.put(id, &pattern(id, len)).await.unwrap();
        }
        let tasks: Vec<_> = (0..32u64)
            .map(|t| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    for i in 0..200u64 {
                        let id = (t * 7 + i * 5) % 24;
                        let off = ((t + i) % 16) as usize * PAGE + (i % 3) as usize * 100;
                        let n = (len - off).min(1 + (i as usize * 997) % (3 * PAGE));
                        let got = s.get(id, off as u32, n as u32).await.unwrap();
                        assert_eq!(got, pattern(id, len)[off..off + n], "block {id} at {off}+{n}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// A memory device whose reads let other tasks run before they complete, as a disk's do.
    struct YieldingReads(MemDevice);

    impl BlockDevice for YieldingReads {
        fn info(&self) -> &crate::device::DeviceInfo {
            self.0.info()
        }
        fn read(&self, offset: u64, buf: AlignedBuf) -> crate::device::IoFuture<'_, crate::device::IoResult> {
            Box::pin(async move {
                tokio::task::yield_now().await;
                self.0.read(offset, buf).await
            })
        }
        fn write(&self, offset: u64, buf: AlignedBuf) -> crate::device::IoFuture<'_, crate::device::IoResult> {
            self.0.write(offset, buf)
        }
        fn flush(&self) -> crate::device::IoFuture<'_, Result<(), DeviceError>> {
            self.0.flush()
        }
    }

    /// A device whose flush takes a while and says what it made durable: every write that had
    /// completed when the flush started (as a disk's cache flush does).
    struct SlowFlush {
        mem: MemDevice,
        completed: std::sync::atomic::AtomicU64,
        durable: std::sync::atomic::AtomicU64,
        flushes: std::sync::atomic::AtomicU64,
    }

    impl BlockDevice for SlowFlush {
        fn info(&self) -> &crate::device::DeviceInfo {
            self.mem.info()
        }
        fn read(&self, offset: u64, buf: AlignedBuf) -> crate::device::IoFuture<'_, crate::device::IoResult> {
            self.mem.read(offset, buf)
        }
        fn write(&self, offset: u64, buf: AlignedBuf) -> crate::device::IoFuture<'_, crate::device::IoResult> {
            Box::pin(async move {
                let r = self.mem.write(offset, buf).await;
                self.completed.fetch_add(1, Ordering::SeqCst);
                r
            })
        }
        fn flush(&self) -> crate::device::IoFuture<'_, Result<(), DeviceError>> {
            Box::pin(async move {
                let covers = self.completed.load(Ordering::SeqCst);
                self.flushes.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                self.durable.fetch_max(covers, Ordering::SeqCst);
                Ok(())
            })
        }
    }

    /// 32 puts, each followed by a flush, at once: every flush returns only once the put before
    /// it is durable, and the flushes share a few device flushes instead of one each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_share_device_flushes_and_each_covers_its_put() {
        let dev = Arc::new(SlowFlush {
            mem: MemDevice::new(8 << 20),
            completed: Default::default(),
            durable: Default::default(),
            flushes: Default::default(),
        });
        let opts = StoreOptions { max_block_bytes: 64 << 10, segment_bytes: 1 << 20, crc_cache_bytes: 1 << 20 };
        let s = Arc::new(BlockStore::format(Arc::clone(&dev) as Arc<dyn BlockDevice>, opts).await.unwrap());
        let before = dev.flushes.load(Ordering::SeqCst);
        let tasks: Vec<_> = (0..32u64)
            .map(|id| {
                let (s, dev) = (Arc::clone(&s), Arc::clone(&dev));
                tokio::spawn(async move {
                    s.put(id, &pattern(id, 5000)).await.unwrap();
                    let written = dev.completed.load(Ordering::SeqCst);
                    s.flush().await.unwrap();
                    assert!(
                        dev.durable.load(Ordering::SeqCst) >= written,
                        "flush of put {id} returned before it was durable"
                    );
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let flushes = dev.flushes.load(Ordering::SeqCst) - before;
        assert!((1..=8).contains(&flushes), "32 concurrent flushes took {flushes} device flushes");
    }
}
