//! The in-memory state of the block store, guarded by one short-held mutex: the block index,
//! the per-segment table (state, generation, live bytes), the segments open for writing with their
//! summaries-to-be, the write tickets that `flush` waits on, and pending tombstones.
//! No I/O happens here; `imp` does the I/O and calls in before and after it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use super::BlockId;
use super::cache::CrcCache;
use super::format::{PAGE_U64, Rec, entry_bytes, summary_pages};

/// Where a block lives: 12 bytes, so an index slot (key + value, aligned) is 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub seg: u32,
    /// Offset of the entry from the segment start, in 4 KiB pages.
    pub off_pages: u32,
    pub len: u32,
}

/// Hasher for the store's own integer keys (block ids in the index; `(generation, offset,
/// page)` in the crc cache): a cheap multiplicative mix instead of SipHash, which is slower
/// and whose DoS resistance these keys do not need. Mixing on every write keeps both the
/// table's control bytes (top 7 hash bits) and bucket bits (low bits) varied for dense ids.
#[derive(Default)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ *b as u64;
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0xFF51_AFD7_ED55_8CCD).rotate_left(23);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0xC4CE_B9FE_1A85_EC53).rotate_left(29);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

pub(super) type Index = HashMap<BlockId, Loc, BuildHasherDefault<IntHasher>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SegState {
    Free,
    /// Open for writing (being opened, active, or waiting for its last writes to be sealed).
    Open,
    Sealed,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct SegMeta {
    pub state: SegState,
    pub generation: u64,
    /// On-device bytes of the live entries in it (what cleaning would have to copy).
    pub live_bytes: u64,
}

/// A segment open for writing.
#[derive(Debug)]
pub(super) struct OpenSeg {
    pub generation: u64,
    /// Next free byte, from the segment start.
    pub next_off: u64,
    /// Records reserved so far (their summary space is reserved at the segment end).
    pub reserved_recs: usize,
    /// Records of completed writes, in completion order: the summary.
    pub recs: Vec<Rec>,
    pub inflight: u32,
    /// No more reservations: seal once `inflight` reaches 0.
    pub sealing: bool,
}

/// Space handed out by [`State::try_reserve`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Reservation {
    pub seg: u32,
    pub generation: u64,
    /// Byte offset from the segment start.
    pub off: u64,
    pub ticket: u64,
}

/// A segment whose last write finished after it stopped taking reservations.
#[derive(Debug)]
pub(super) struct SealJob {
    pub seg: u32,
    pub generation: u64,
    pub recs: Vec<Rec>,
}

pub(super) struct State {
    pub index: Index,
    pub segs: Vec<SegMeta>,
    pub open: HashMap<u32, OpenSeg>,
    pub active: Option<u32>,
    /// The next segment, opened ahead of need: marked Open with its generation, its header
    /// durable, no entries yet. The next rotation activates it without any I/O. Counted as free.
    pub prepared: Option<(u32, u64)>,
    /// The active segment was the last free one (the cleaner's reserve): puts may not use it,
    /// or they would eat the space that lets cleaning make progress.
    active_is_reserve: bool,
    pub next_gen: u64,
    next_ticket: u64,
    inflight: BTreeSet<u64>,
    /// Ids whose put is between reservation and completion (so a second put sees `Exists`).
    pub putting: HashSet<BlockId>,
    pub pending_tombs: Vec<(BlockId, u64)>,
    /// Payload bytes of live blocks.
    pub live_bytes: u64,
    pub cleaned_segments: u64,
    /// Of `cleaned_segments`: freed by a put that found no free segment.
    pub cleaned_segments_for_puts: u64,
    /// Of `cleaned_segments`: freed by cleaning ahead (the background task).
    pub cleaned_segments_ahead: u64,
    pub torn_entries_discarded: u64,
    seg_bytes: u64,
    /// Crcs of stored blocks, by header page. Under the state lock so that a get finds its
    /// block and the crcs of the pages it reads with one shared lock.
    pub crcs: CrcCache,
}

impl State {
    pub(super) fn new(segs: Vec<SegMeta>, next_gen: u64, seg_bytes: u64) -> Self {
        State {
            index: Index::default(),
            segs,
            open: HashMap::new(),
            active: None,
            prepared: None,
            active_is_reserve: false,
            next_gen,
            next_ticket: 0,
            inflight: BTreeSet::new(),
            putting: HashSet::new(),
            pending_tombs: Vec::new(),
            live_bytes: 0,
            cleaned_segments: 0,
            cleaned_segments_for_puts: 0,
            cleaned_segments_ahead: 0,
            torn_entries_discarded: 0,
            seg_bytes,
            crcs: CrcCache::new(0),
        }
    }

    pub(super) fn active_gen(&self) -> Option<u64> {
        self.active.and_then(|s| self.open.get(&s)).map(|o| o.generation)
    }

    /// Reserve `bytes` for an entry carrying `nrecs` summary records in the active segment,
    /// or `None` if there is no active segment, it is too full, or it is the cleaner's
    /// reserve and this is a put (the caller rotates).
    pub(super) fn try_reserve(&mut self, bytes: u64, nrecs: usize, for_put: bool) -> Option<Reservation> {
        let seg = self.active?;
        if for_put && self.active_is_reserve {
            return None;
        }
        let seg_bytes = self.seg_bytes;
        let o = self.open.get_mut(&seg)?;
        let end = o.next_off + bytes + summary_pages(o.reserved_recs + nrecs) * PAGE_U64;
        if o.sealing || end > seg_bytes {
            return None;
        }
        let off = o.next_off;
        o.next_off += bytes;
        o.reserved_recs += nrecs;
        o.inflight += 1;
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.inflight.insert(ticket);
        Some(Reservation { seg, generation: o.generation, off, ticket })
    }

    /// Bytes still free: free segments (entry space) plus what is left in the active one.
    pub(super) fn free_bytes(&self) -> u64 {
        let usable = self.seg_bytes - 2 * PAGE_U64;
        let free_segs = self.free_segments() as u64;
        let active = self.active.and_then(|s| self.open.get(&s)).map_or(0, |o| {
            let used = o.next_off + summary_pages(o.reserved_recs + 1) * PAGE_U64;
            self.seg_bytes.saturating_sub(used)
        });
        free_segs * usable + active
    }

    /// Free segments, counting the prepared one (it holds nothing yet).
    pub(super) fn free_segments(&self) -> usize {
        self.unprepared_free_segments() + usize::from(self.prepared.is_some())
    }

    /// Segments in state Free (not counting the prepared one).
    pub(super) fn unprepared_free_segments(&self) -> usize {
        self.segs.iter().filter(|s| s.state == SegState::Free).count()
    }

    /// A write finished (successfully or not): release its ticket and, if its segment has
    /// stopped taking reservations and this was its last write, hand back the seal job.
    pub(super) fn finish(&mut self, r: &Reservation, recs: &[Rec], ok: bool) -> Option<SealJob> {
        self.inflight.remove(&r.ticket);
        let o = self.open.get_mut(&r.seg).expect("a reserved segment stays open until its writes finish");
        o.inflight -= 1;
        if ok {
            o.recs.extend_from_slice(recs);
        } else {
            // A hole in the segment: a scan would stop there, so stop appending after it.
            o.sealing = true;
            if self.active == Some(r.seg) {
                self.active = None;
            }
        }
        (o.sealing && o.inflight == 0).then(|| SealJob {
            seg: r.seg,
            generation: o.generation,
            recs: std::mem::take(&mut o.recs),
        })
    }

    /// True once every ticket below `t` has finished.
    pub(super) fn done_below(&self, t: u64) -> bool {
        self.inflight.first().is_none_or(|&m| m >= t)
    }

    pub(super) fn ticket_mark(&self) -> u64 {
        self.next_ticket
    }

    /// Make `seg` (already marked Open, with `generation`) the active segment; the previous one
    /// stops taking reservations and is returned as a seal job if nothing is in flight in it.
    pub(super) fn activate(&mut self, seg: u32, generation: u64, is_reserve: bool) -> Option<SealJob> {
        let job = self.active.take().and_then(|old| self.stop_writing(old));
        self.active_is_reserve = is_reserve;
        self.open.insert(
            seg,
            OpenSeg { generation, next_off: PAGE_U64, reserved_recs: 0, recs: Vec::new(), inflight: 0, sealing: false },
        );
        self.active = Some(seg);
        job
    }

    /// After recovery: make `seg` (an open segment holding `recs`, next entry at `next_off`)
    /// the active segment again. If no segment is free it counts as the cleaner's reserve.
    pub(super) fn resume(&mut self, seg: u32, generation: u64, next_off: u64, recs: Vec<Rec>) {
        self.segs[seg as usize].state = SegState::Open;
        let reserved_recs = recs.len();
        self.open.insert(seg, OpenSeg { generation, next_off, reserved_recs, recs, inflight: 0, sealing: false });
        self.active = Some(seg);
        self.active_is_reserve = self.free_segments() == 0;
    }

    fn stop_writing(&mut self, seg: u32) -> Option<SealJob> {
        let o = self.open.get_mut(&seg)?;
        o.sealing = true;
        (o.inflight == 0).then(|| SealJob { seg, generation: o.generation, recs: std::mem::take(&mut o.recs) })
    }

    /// A data entry was written at `r`: index it, count it live.
    pub(super) fn insert_block(&mut self, id: BlockId, r: &Reservation, len: u32) {
        let loc = Loc { seg: r.seg, off_pages: (r.off / PAGE_U64) as u32, len };
        self.index.insert(id, loc);
        self.segs[r.seg as usize].live_bytes += entry_bytes(len);
        self.live_bytes += len as u64;
    }

    /// A block moved by the cleaner was written at `r`: point the index at it if the block is
    /// still where the cleaner found it; if it was deleted meanwhile, the new copy needs its
    /// own tombstone (the old one names the old, lower generation).
    pub(super) fn moved_block(&mut self, id: BlockId, old: Loc, r: &Reservation) {
        let eb = entry_bytes(old.len);
        match self.index.get_mut(&id) {
            Some(loc) if *loc == old => {
                *loc = Loc { seg: r.seg, off_pages: (r.off / PAGE_U64) as u32, len: old.len };
                self.segs[old.seg as usize].live_bytes -= eb;
                self.segs[r.seg as usize].live_bytes += eb;
            }
            _ => self.pending_tombs.push((id, r.generation)),
        }
    }

    /// Remove a block from the index and queue its tombstone `(id, gen of its segment)`.
    /// Block ids are never reused (contract of `BlockId`): a put of a deleted id into the same
    /// segment would be killed on recovery by this tombstone.
    pub(super) fn remove_block(&mut self, id: BlockId) -> Option<Loc> {
        let loc = self.index.remove(&id)?;
        let meta = &mut self.segs[loc.seg as usize];
        meta.live_bytes -= entry_bytes(loc.len);
        self.live_bytes -= loc.len as u64;
        self.pending_tombs.push((id, meta.generation));
        Some(loc)
    }

    /// Heap bytes of the index: hash table slots (key + value + one control byte each, at the
    /// table's real bucket count) plus the per-segment table.
    pub(super) fn index_bytes(&self) -> u64 {
        let cap = self.index.capacity();
        // hashbrown keeps buckets a power of two, at most 7/8 full (small tables: cap + 1).
        let buckets = if cap < 8 { cap + 1 } else { (cap * 8 / 7).next_power_of_two() };
        let slot = std::mem::size_of::<(BlockId, Loc)>() + 1;
        (buckets * slot + self.segs.capacity() * std::mem::size_of::<SegMeta>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_respects_summary_space_and_seals() {
        let seg_bytes = 64 * PAGE_U64;
        let segs = vec![SegMeta { state: SegState::Open, generation: 1, live_bytes: 0 }; 2];
        let mut st = State::new(segs, 2, seg_bytes);
        assert!(st.try_reserve(8192, 1, true).is_none());
        assert!(st.activate(0, 1, false).is_none());
        let mut rs = Vec::new();
        while let Some(r) = st.try_reserve(8192, 1, true) {
            rs.push(r);
        }
        // header page + 31 entries of 2 pages = 63 pages, 1 summary page.
        assert_eq!(rs.len(), 31);
        assert!(!st.done_below(1));
        assert!(st.activate(1, 3, false).is_none(), "writes still in flight in segment 0");
        let jobs: Vec<SealJob> =
            rs.iter().filter_map(|r| st.finish(r, &[Rec::Tomb { id: 1, data_gen: 1 }], true)).collect();
        assert!(st.done_below(st.ticket_mark()));
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].seg, jobs[0].generation, jobs[0].recs.len()), (0, 1, 31));
    }

    #[test]
    fn index_slot_is_small() {
        assert_eq!(std::mem::size_of::<Loc>(), 12);
        assert!(std::mem::size_of::<(BlockId, Loc)>() < 32);
    }
}
