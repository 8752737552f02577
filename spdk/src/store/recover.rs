//! Formatting a device, and opening a formatted one: read the superblock and every segment
//! header, index sealed segments from their summaries and scan open ones entry by entry
//! (the first entry that fails its checks ends the scan: a torn tail), apply tombstones,
//! then resume appending to the newest open segment and seal the other open ones.
//!
//! Recovery rules: a tombstone `(X, d)` kills every copy of X in a segment with generation <= d;
//! among surviving copies the highest generation wins (blocks are immutable, so copies are equal).

use std::collections::HashMap;
use std::sync::Arc;

use super::format::{
    DATA_START, EntryHead, EntryKind, PAGE, PAGE_U64, Rec, SegHeader, Superblock, crc_at, decode_summary, entry_bytes,
    get_u32, hdr_pages, new_uuid, page_crc, read_tombs, summary_pages, trailer_pages,
};
use super::imp::{Inner, Layout};
use super::state::{Loc, SealJob, SegMeta, SegState, State};
use super::{BlockId, StoreError, StoreOptions};
use crate::buf::AlignedBuf;
use crate::device::BlockDevice;

/// Read-ahead of the segment scan.
const SCAN_WINDOW: usize = 1 << 20;

/// Check the geometry and work out the segment count.
fn layout(size: u64, seg_bytes: u64, max_block: u64, uuid: u64) -> Result<Layout, StoreError> {
    let invalid = |reason: String| Err(StoreError::InvalidOptions { reason });
    if max_block == 0 || max_block > (u32::MAX / 2) as u64 {
        return invalid(format!("max_block_bytes out of range max_block_bytes={max_block}"));
    }
    let min_seg = PAGE_U64 + entry_bytes(max_block as u32) + summary_pages(1) * PAGE_U64;
    if !seg_bytes.is_multiple_of(PAGE_U64) || seg_bytes < min_seg || seg_bytes / PAGE_U64 > u32::MAX as u64 {
        return invalid(format!(
            "segment size must be a multiple of 4 KiB and hold a largest block segment_bytes={seg_bytes} min={min_seg}"
        ));
    }
    let nsegs = size.saturating_sub(DATA_START) / seg_bytes;
    if nsegs < 3 || nsegs > u32::MAX as u64 {
        return Err(StoreError::DeviceTooSmall { size, segment: seg_bytes });
    }
    Ok(Layout { seg_bytes, nsegs: nsegs as u32, max_block: max_block as usize, uuid })
}

fn check_align(dev: &dyn BlockDevice) -> Result<(), StoreError> {
    let align = dev.info().align_bytes;
    if align == 0 || !PAGE.is_multiple_of(align) {
        return Err(StoreError::InvalidOptions {
            reason: format!("device alignment does not divide 4 KiB align_bytes={align}"),
        });
    }
    Ok(())
}

/// Write a fresh superblock with a new store uuid. Old segment contents need no wiping:
/// every header, entry and summary carries the uuid, so another store's bytes never match.
pub(super) async fn format(dev: Arc<dyn BlockDevice>, opts: StoreOptions) -> Result<Arc<Inner>, StoreError> {
    check_align(dev.as_ref())?;
    let size = dev.info().size_bytes;
    let lay = layout(size, opts.segment_bytes, opts.max_block_bytes as u64, new_uuid())?;
    let sb = Superblock {
        device_size: size,
        segment_bytes: lay.seg_bytes,
        max_block_bytes: lay.max_block as u64,
        uuid: lay.uuid,
    };
    let segs = vec![SegMeta { state: SegState::Free, generation: 0, live_bytes: 0 }; lay.nsegs as usize];
    let inner = Inner::new(dev, lay, State::new(segs, 1, lay.seg_bytes), &opts);
    inner.write_at(0, sb.encode()).await?;
    inner.dev.flush().await?;
    Ok(inner)
}

pub(super) async fn open(dev: Arc<dyn BlockDevice>, opts: StoreOptions) -> Result<Arc<Inner>, StoreError> {
    check_align(dev.as_ref())?;
    let (page, r) = dev.read(0, AlignedBuf::zeroed(PAGE)).await;
    r?;
    let sb = Superblock::decode(&page)?;
    let size = dev.info().size_bytes;
    if sb.device_size > size {
        let reason = format!("device smaller than when formatted size_bytes={size} formatted_bytes={}", sb.device_size);
        return Err(StoreError::CorruptSuperblock { reason });
    }
    let lay = layout(sb.device_size, sb.segment_bytes, sb.max_block_bytes, sb.uuid)
        .map_err(|e| StoreError::CorruptSuperblock { reason: e.to_string() })?;
    let mut segs = Vec::with_capacity(lay.nsegs as usize);
    let mut max_gen = 0;
    for s in 0..lay.nsegs {
        let (hdr, r) = dev.read(lay.seg_addr(s), AlignedBuf::zeroed(PAGE)).await;
        r?;
        let h = SegHeader::decode(&hdr, lay.uuid);
        let generation = h.map_or(0, |h| h.generation);
        max_gen = max_gen.max(generation);
        let state = if h.is_some_and(|h| h.in_use) { SegState::Sealed } else { SegState::Free };
        segs.push(SegMeta { state, generation, live_bytes: 0 });
    }
    let inner = Inner::new(dev, lay, State::new(segs.clone(), max_gen + 1, lay.seg_bytes), &opts);
    let mut loaded = Vec::new();
    for (s, m) in segs.iter().enumerate().filter(|(_, m)| m.state == SegState::Sealed) {
        let l = inner.load_records(s as u32, m.generation).await?;
        inner.st().torn_entries_discarded += l.torn;
        loaded.push(l);
    }
    rebuild_index(&mut inner.st(), &mut loaded);
    settle_open_segments(&inner, loaded).await?;
    inner.dev.flush().await?;
    Ok(inner)
}

/// Segments that were open at the crash: the newest non-empty one becomes the active segment
/// again (appending after its last valid entry; sealing it would waste its free space, and
/// if the crash came while the cleaner was using the reserve segment, no segment would be
/// left free to clean with). The others are sealed, or freed if nothing valid is in them.
async fn settle_open_segments(inner: &Inner, loaded: Vec<Loaded>) -> Result<(), StoreError> {
    let resume = loaded.iter().filter(|l| !l.sealed && !l.recs.is_empty()).max_by_key(|l| l.generation).map(|l| l.seg);
    for l in loaded {
        if l.sealed {
            continue;
        }
        if Some(l.seg) == resume {
            inner.st().resume(l.seg, l.generation, l.end, l.recs);
        } else if l.recs.is_empty() {
            // Opened but never written: give it back (keeping its generation, see format.rs).
            let hdr = SegHeader { in_use: false, generation: l.generation }.encode(inner.lay.uuid);
            inner.write_at(inner.lay.seg_addr(l.seg), hdr).await?;
            inner.st().segs[l.seg as usize].state = SegState::Free;
        } else {
            inner.seal(SealJob { seg: l.seg, generation: l.generation, recs: l.recs }).await;
        }
    }
    Ok(())
}

/// What recovery found in one in-use segment.
pub(super) struct Loaded {
    pub seg: u32,
    pub generation: u64,
    pub recs: Vec<Rec>,
    /// Read from a valid summary (else scanned).
    pub sealed: bool,
    pub torn: u64,
    /// Where the scan stopped: the next entry offset of an open segment.
    pub end: u64,
}

/// Apply the recovery rules to the records of every in-use segment.
fn rebuild_index(st: &mut State, loaded: &mut [Loaded]) {
    let mut killed: HashMap<BlockId, u64> = HashMap::new();
    for rec in loaded.iter().flat_map(|l| l.recs.iter()) {
        if let Rec::Tomb { id, data_gen } = *rec {
            let d = killed.entry(id).or_insert(data_gen);
            *d = (*d).max(data_gen);
        }
    }
    loaded.sort_by_key(|l| l.generation);
    for Loaded { seg, generation, recs, .. } in loaded.iter() {
        for rec in recs {
            if let Rec::Data { id, off_pages, len } = *rec
                && killed.get(&id).is_none_or(|&d| d < *generation)
            {
                // Ascending generation order: a later copy replaces an earlier one.
                st.index.insert(id, Loc { seg: *seg, off_pages, len });
            }
        }
    }
    let locs: Vec<Loc> = st.index.values().copied().collect();
    for loc in locs {
        st.segs[loc.seg as usize].live_bytes += entry_bytes(loc.len);
        st.live_bytes += loc.len as u64;
    }
}

/// Verify every data page of a whole data entry against the crcs in its header;
/// `Err(page)` names the first bad page.
pub(super) fn verify_entry(buf: &[u8], len: u32) -> Result<(), u32> {
    let hp = hdr_pages(len) as usize;
    for (p, page) in buf[hp * PAGE..].chunks(PAGE).enumerate() {
        if page_crc(page) != get_u32(buf, crc_at(p as u32)) {
            return Err(p as u32);
        }
    }
    Ok(())
}

/// A read-ahead window over one segment, for the entry-by-entry scan.
struct Window {
    base: u64,
    seg_bytes: u64,
    start: u64,
    buf: AlignedBuf,
}

impl Window {
    async fn get(&mut self, inner: &Inner, off: u64, len: usize) -> Result<&[u8], StoreError> {
        let end = off + len as u64;
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let n = (len.max(SCAN_WINDOW) as u64).min(self.seg_bytes - off) as usize;
            self.buf = inner.read_at(self.base + off, n).await?;
            self.start = off;
        }
        let at = (off - self.start) as usize;
        Ok(&self.buf[at..at + len])
    }
}

impl Inner {
    /// The records of an in-use segment: from its summary if it has a valid one for `generation`
    /// (`true`), else by scanning (`false`), with the number of torn entries discarded.
    pub(super) async fn load_records(&self, seg: u32, generation: u64) -> Result<Loaded, StoreError> {
        let end = self.lay.seg_addr(seg) + self.lay.seg_bytes;
        let last = self.read_at(end - PAGE_U64, PAGE).await?;
        let max_pages = self.lay.seg_bytes / PAGE_U64 - 1;
        if let Some(pages) = trailer_pages(&last, generation, self.lay.uuid, max_pages) {
            let region =
                if pages == 1 { last } else { self.read_at(end - pages * PAGE_U64, pages as usize * PAGE).await? };
            if let Some(recs) = decode_summary(&region) {
                return Ok(Loaded { seg, generation, recs, sealed: true, torn: 0, end: self.lay.seg_bytes });
            }
        }
        let (recs, torn, end) = self.scan(seg, generation).await?;
        Ok(Loaded { seg, generation, recs, sealed: false, torn, end })
    }

    /// Scan entries from the start of the segment until one fails its checks. A page that
    /// is a valid entry of another generation or store is stale (left from an earlier use), not torn.
    async fn scan(&self, seg: u32, generation: u64) -> Result<(Vec<Rec>, u64, u64), StoreError> {
        let seg_bytes = self.lay.seg_bytes;
        let mut win = Window { base: self.lay.seg_addr(seg), seg_bytes, start: 0, buf: AlignedBuf::zeroed(0) };
        let (mut recs, mut torn, mut off) = (Vec::new(), 0, PAGE_U64);
        while off + PAGE_U64 <= seg_bytes {
            let page = win.get(self, off, PAGE).await?;
            let Some(head) = EntryHead::read(page) else {
                torn += page.iter().any(|&b| b != 0) as u64;
                break;
            };
            if head.uuid != self.lay.uuid || head.generation != generation {
                break;
            }
            let off_pages = (off / PAGE_U64) as u32;
            if head.kind == EntryKind::Tomb {
                let Some(tombs) = read_tombs(page, &head) else {
                    torn += 1;
                    break;
                };
                recs.extend(tombs.into_iter().map(|(id, data_gen)| Rec::Tomb { id, data_gen }));
                off += PAGE_U64;
                continue;
            }
            let eb = entry_bytes(head.len.max(1));
            if head.len == 0 || head.len as usize > self.lay.max_block || off + eb > seg_bytes {
                torn += 1;
                break;
            }
            if verify_entry(win.get(self, off, eb as usize).await?, head.len).is_err() {
                torn += 1;
                break;
            }
            recs.push(Rec::Data { id: head.id, off_pages, len: head.len });
            off += eb;
        }
        if torn > 0 {
            tracing::warn!(segment = seg, generation, offset = off, "discarded torn tail of open segment");
        }
        Ok((recs, torn, off))
    }
}
