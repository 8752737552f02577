//! Segment cleaning: give the space of dead blocks back by copying the live blocks of a
//! sealed segment forward into the active one, then freeing the segment.
//!
//! Steps for one victim, and what holds if the process dies between them:
//! 1. re-append each live block (crc verified on read) with a new, higher generation; carry forward
//!    the victim's tombstones `(X, d)` while another in-use segment with generation <= d could still
//!    hold a copy of X. Crash: the copies are duplicates; the highest generation wins on recovery.
//! 2. `flush`: the copies and carried tombstones are durable.
//! 3. write the victim's header as free (keeping its generation) and flush: the commit point.
//!    Before it the victim is an in-use segment with duplicates; after it, free space.
//!
//! Who cleans (one at a time, under `clean_lock`): `BlockStore::clean` (every victim that
//! qualifies), a put that found no free segment (only until a put can open one again), and
//! the background task of `ahead` (one victim per lock hold, while one qualifies for the free
//! space left).

use super::ahead::Watermarks;
use super::format::{EntryHead, EntryKind, PAGE_U64, Rec, SegHeader, entry_bytes};
use super::imp::{Inner, Layout, Req};
use super::recover::verify_entry;
use super::state::{Loc, SegState, State};
use super::{BlockId, CleanStats, StoreError};

/// Who is cleaning: what the victims may be, when to stop, and which counter is credited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// `BlockStore::clean`: every victim that qualifies.
    All,
    /// A put found no free segment: only until a put can open a segment again.
    ForPut,
    /// The background task: while a victim qualifies for the free space left (see
    /// `ahead::Watermarks`).
    Ahead,
}

/// `BlockStore::clean`: every victim that qualifies, the put path waiting meanwhile.
pub(super) async fn clean(inner: &Inner) -> Result<CleanStats, StoreError> {
    let _g = inner.clean_lock.lock().await;
    let mut stats = CleanStats::default();
    // Every round frees one segment or stops; the bound only guards against a bug looping.
    for _ in 0..inner.lay.nsegs {
        let Some(victim) = pick_victim(&inner.st(), &inner.lay, Need::Normal) else { break };
        if !clean_one(inner, victim, &mut stats, Mode::All).await? {
            break;
        }
    }
    log(&stats, Mode::All);
    Ok(stats)
}

/// A put found no free segment: free just enough for it (normally one segment) and return,
/// instead of cleaning every victim while the put waits. Does nothing if someone else freed
/// a segment meanwhile (cleaning ahead, or another put).
pub(super) async fn clean_for_put(inner: &Inner) -> Result<CleanStats, StoreError> {
    let _g = inner.clean_lock.lock().await;
    let mut stats = CleanStats::default();
    for _ in 0..inner.lay.nsegs {
        let victim = {
            let st = inner.st();
            // A put can open a segment once two are free (the last one is the cleaner's).
            if st.free_segments() >= 2 {
                break;
            }
            pick_victim(&st, &inner.lay, Need::Normal)
        };
        let Some(victim) = victim else { break };
        if !clean_one(inner, victim, &mut stats, Mode::ForPut).await? {
            break;
        }
    }
    log(&stats, Mode::ForPut);
    Ok(stats)
}

/// One pass of the background task: victims one at a time, each under the `clean_lock`
/// (a put cleaning on demand can step in between), while one qualifies for the free segments
/// left (see `ahead::Watermarks`), or until the store stops cleaning ahead.
pub(super) async fn clean_ahead(inner: &Inner) -> Result<CleanStats, StoreError> {
    let mut stats = CleanStats::default();
    let res = async {
        for _ in 0..inner.lay.nsegs {
            let _g = inner.clean_lock.lock().await;
            if inner.ahead.stopping() {
                break;
            }
            let victim = {
                let st = inner.st();
                let need = ahead_need(st.free_segments(), inner.marks);
                pick_victim(&st, &inner.lay, need)
            };
            let Some(victim) = victim else { break };
            if !clean_one(inner, victim, &mut stats, Mode::Ahead).await? {
                break;
            }
        }
        Ok(())
    }
    .await;
    log(&stats, Mode::Ahead);
    res.map(|()| stats)
}

/// What cleaning ahead accepts with `free` segments free.
fn ahead_need(free: usize, marks: Watermarks) -> Need {
    if free < marks.low {
        Need::Normal
    } else if free < marks.high {
        Need::Half
    } else {
        Need::NearlyEmpty
    }
}

/// A segment whose live entries take `live_bytes` is worth cleaning ahead whatever the free
/// space (at least 90% dead: at most one byte moved per nine freed).
pub(super) fn nearly_empty(lay: &Layout, live_bytes: u64) -> bool {
    let usable = lay.seg_bytes - 2 * PAGE_U64;
    live_bytes * 10 <= usable
}

fn log(stats: &CleanStats, mode: Mode) {
    if stats.segments_freed > 0 {
        let trigger = match mode {
            Mode::All => "clean",
            Mode::ForPut => "put",
            Mode::Ahead => "background",
        };
        tracing::info!(
            trigger,
            segments_freed = stats.segments_freed,
            blocks_moved = stats.blocks_moved,
            bytes_moved = stats.bytes_moved,
            "cleaned segments"
        );
    }
}

/// How dead a victim must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// At least 25% dead (10% when at most one free segment is left).
    Normal,
    /// At least 50% dead: at most one byte moved per byte freed (cleaning ahead while
    /// space is not short yet).
    Half,
    /// At least 90% dead (cleaning ahead with plenty of space free).
    NearlyEmpty,
}

/// The sealed segment with the fewest live bytes, if it is dead enough for `need` and its
/// live blocks fit in the space still free.
fn pick_victim(st: &State, lay: &Layout, need: Need) -> Option<u32> {
    let usable = lay.seg_bytes - 2 * PAGE_U64;
    let scarce = st.free_segments() <= 1;
    let room = st.free_bytes();
    let slack = entry_bytes(lay.max_block as u32);
    st.segs
        .iter()
        .enumerate()
        .filter(|(_, m)| m.state == SegState::Sealed)
        .filter(|(_, m)| {
            let dead = usable.saturating_sub(m.live_bytes);
            // Less dead space than one largest entry may be only the tail no entry fits in:
            // moving the live blocks would leave the same tail in the segment they fill, so
            // cleaning gains nothing, and cleaning ahead would go round moving them for ever.
            if m.live_bytes > 0 && dead < slack {
                return false;
            }
            match need {
                Need::Normal => dead * 4 >= usable || (scarce && dead * 10 >= usable),
                Need::Half => dead * 2 >= usable,
                Need::NearlyEmpty => nearly_empty(lay, m.live_bytes),
            }
        })
        .filter(|(_, m)| m.live_bytes == 0 || m.live_bytes + slack <= room)
        .min_by_key(|(_, m)| m.live_bytes)
        .map(|(i, _)| i as u32)
}

/// Clean one segment; false if it could not be freed (something still lives in it).
///
/// Cleaning ahead checks for a stop before each block it moves and before the commit write:
/// a stopped pass leaves duplicates (step 1-2), never a half-written commit.
async fn clean_one(inner: &Inner, victim: u32, stats: &mut CleanStats, mode: Mode) -> Result<bool, StoreError> {
    let stop = || mode == Mode::Ahead && inner.ahead.stopping();
    let generation = inner.st().segs[victim as usize].generation;
    let recs = inner.load_records(victim, generation).await?.recs;
    let min_other_gen = {
        let st = inner.st();
        let others = st.segs.iter().enumerate().filter(|(i, m)| *i != victim as usize && m.state != SegState::Free);
        others.map(|(_, m)| m.generation).min()
    };
    let mut carried = Vec::new();
    for rec in recs {
        match rec {
            Rec::Data { id, off_pages, len } => {
                let old = Loc { seg: victim, off_pages, len };
                if inner.st().index.get(&id) != Some(&old) {
                    continue;
                }
                if stop() {
                    return Ok(false);
                }
                move_block(inner, id, old, generation).await?;
                stats.blocks_moved += 1;
                stats.bytes_moved += len as u64;
            }
            Rec::Tomb { id, data_gen } => {
                if min_other_gen.is_some_and(|g| g <= data_gen) {
                    carried.push((id, data_gen));
                }
            }
        }
    }
    inner.st().pending_tombs.extend(carried);
    inner.flush().await?;
    let live = inner.st().segs[victim as usize].live_bytes;
    if live != 0 {
        tracing::error!(
            segment = victim,
            live_bytes = live,
            "segment still has live blocks after cleaning; not freeing it"
        );
        return Ok(false);
    }
    if stop() {
        return Ok(false);
    }
    let hdr = SegHeader { in_use: false, generation }.encode(inner.lay.uuid);
    inner.write_at(inner.lay.seg_addr(victim), hdr).await?;
    inner.dev.flush().await?;
    {
        let mut st = inner.st();
        let meta = &mut st.segs[victim as usize];
        (meta.state, meta.live_bytes) = (SegState::Free, 0);
        st.cleaned_segments += 1;
        match mode {
            Mode::All => {}
            Mode::ForPut => st.cleaned_segments_for_puts += 1,
            Mode::Ahead => st.cleaned_segments_ahead += 1,
        }
    }
    stats.segments_freed += 1;
    Ok(true)
}

/// Read a live block's entry, verify it, and re-append it unchanged but for its generation.
async fn move_block(inner: &Inner, id: BlockId, old: Loc, generation: u64) -> Result<(), StoreError> {
    let addr = inner.lay.seg_addr(old.seg) + old.off_pages as u64 * PAGE_U64;
    let buf = inner.read_at(addr, entry_bytes(old.len) as usize).await?;
    let head_ok = EntryHead::read(&buf).is_some_and(|h| {
        (h.kind, h.id, h.len, h.generation, h.uuid) == (EntryKind::Data, id, old.len, generation, inner.lay.uuid)
    });
    if !head_ok {
        return Err(StoreError::Checksum { id, page: 0 });
    }
    verify_entry(&buf, old.len).map_err(|page| StoreError::Checksum { id, page })?;
    let req = Req::Move { id, old };
    let (r, _) = inner.reserve(&req).await?.expect("move reservations yield space or an error");
    inner.write_reserved(r, buf, req, Vec::new()).await
}
