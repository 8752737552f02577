//! On-disk encodings of the block store: superblock, segment header, entries and the
//! segment summary. Pure functions over byte slices; no I/O here.
//!
//! Device layout (all little-endian, every structure 4 KiB aligned):
//!
//! ```text
//! [0, 4 KiB)         superblock: "TPBS", version, device size, segment size, max block,
//!                    store uuid, crc32c of the page with the crc field zeroed
//! [1 MiB + i*seg)    segment i: header page | entries ... | summary pages (sealed only)
//! ```
//!
//! A segment header says "in use, generation G" or "free, last generation G" (a freed segment keeps its
//! generation so that recovery never hands out a generation that stale entries on the device still carry).
//! An entry is a header (64 fixed bytes, then one crc32c per 4 KiB data page for a data entry,
//! or `(block id, data generation)` records for a tombstone entry) padded to 4 KiB, then the data
//! padded to 4 KiB. The summary of a sealed segment is a list of 24-byte records at the start
//! of its last pages and a trailer in the last 40 bytes of the segment.

use super::{BlockId, StoreError};
use crate::buf::AlignedBuf;

pub(super) const PAGE: usize = 4096;
pub(super) const PAGE_U64: u64 = PAGE as u64;
pub(super) const FORMAT_VERSION: u32 = 1;
/// Where segment 0 starts; the superblock lives in the first page before it.
pub(super) const DATA_START: u64 = 1 << 20;

const SB_MAGIC: &[u8; 4] = b"TPBS";
const SEG_MAGIC: &[u8; 4] = b"TPSG";
const ENTRY_MAGIC: &[u8; 4] = b"TPEN";
const TRAILER_MAGIC: &[u8; 4] = b"TPSM";

/// Fixed part of an entry header; page crcs or tombstone records follow it.
pub(super) const ENTRY_FIXED: usize = 64;
const ENTRY_CRC_AT: usize = 60;
pub(super) const SUM_REC: usize = 24;
pub(super) const TRAILER_LEN: usize = 40;
const TOMB_REC: usize = 16;
/// Tombstones per tombstone entry (one 4 KiB page).
pub(super) const TOMBS_PER_ENTRY: usize = (PAGE - ENTRY_FIXED) / TOMB_REC;

const KIND_DATA: u8 = 1;
const KIND_TOMB: u8 = 2;

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub(super) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4-byte slice"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8-byte slice"))
}

/// Pages of data of a block of `len` bytes.
pub(super) fn data_pages(len: u32) -> u32 {
    (len as usize).div_ceil(PAGE) as u32
}
/// Pages of the header of a data entry of `len` bytes (fixed part + one crc per data page).
pub(super) fn hdr_pages(len: u32) -> u32 {
    (ENTRY_FIXED + 4 * data_pages(len) as usize).div_ceil(PAGE) as u32
}
/// Bytes a data entry of `len` bytes takes on the device.
pub(super) fn entry_bytes(len: u32) -> u64 {
    (hdr_pages(len) + data_pages(len)) as u64 * PAGE_U64
}
/// Pages the summary of `n` records takes (at least one: the trailer).
pub(super) fn summary_pages(n: usize) -> u64 {
    (n * SUM_REC + TRAILER_LEN).div_ceil(PAGE) as u64
}
/// Byte offset, inside the entry header, of the crc of data page `p`.
pub(super) fn crc_at(p: u32) -> usize {
    ENTRY_FIXED + 4 * p as usize
}
/// Data pages whose crcs live in header page `h`: `[lo, hi)`, clipped to `pages`.
pub(super) fn crc_page_span(h: u32, pages: u32) -> (u32, u32) {
    let lo = if h == 0 { 0 } else { ((h as usize * PAGE - ENTRY_FIXED) / 4) as u32 };
    let hi = (((h as usize + 1) * PAGE - ENTRY_FIXED) / 4) as u32;
    (lo.min(pages), hi.min(pages))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Superblock {
    pub device_size: u64,
    pub segment_bytes: u64,
    pub max_block_bytes: u64,
    pub uuid: u64,
}

impl Superblock {
    pub(super) fn encode(&self) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(PAGE);
        b[0..4].copy_from_slice(SB_MAGIC);
        put_u32(&mut b, 4, FORMAT_VERSION);
        put_u64(&mut b, 8, self.device_size);
        put_u64(&mut b, 16, self.segment_bytes);
        put_u64(&mut b, 24, self.max_block_bytes);
        put_u64(&mut b, 32, self.uuid);
        let crc = crc32c::crc32c(&b);
        put_u32(&mut b, 40, crc);
        b
    }

    /// The version is checked before the crc: a later version may lay the page out differently.
    pub(super) fn decode(page: &[u8]) -> Result<Self, StoreError> {
        if &page[0..4] != SB_MAGIC {
            return Err(StoreError::NotFormatted);
        }
        let version = get_u32(page, 4);
        if version != FORMAT_VERSION {
            return Err(StoreError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        let mut copy = page[..PAGE].to_vec();
        let stored = get_u32(&copy, 40);
        put_u32(&mut copy, 40, 0);
        let computed = crc32c::crc32c(&copy);
        if stored != computed {
            return Err(StoreError::CorruptSuperblock {
                reason: format!("crc mismatch stored={stored:#x} computed={computed:#x}"),
            });
        }
        Ok(Superblock {
            device_size: get_u64(page, 8),
            segment_bytes: get_u64(page, 16),
            max_block_bytes: get_u64(page, 24),
            uuid: get_u64(page, 32),
        })
    }
}

/// A segment header: in use with `generation`, or free (keeping the last generation it had).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SegHeader {
    pub in_use: bool,
    pub generation: u64,
}

impl SegHeader {
    pub(super) fn encode(&self, uuid: u64) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(PAGE);
        b[0..4].copy_from_slice(SEG_MAGIC);
        put_u32(&mut b, 4, FORMAT_VERSION);
        put_u32(&mut b, 8, if self.in_use { 1 } else { 2 });
        put_u64(&mut b, 16, self.generation);
        put_u64(&mut b, 24, uuid);
        let crc = crc32c::crc32c(&b[0..32]);
        put_u32(&mut b, 32, crc);
        b
    }

    /// `None` for anything that is not a valid header of this store (zeroes, garbage,
    /// another store's header): such a segment is free.
    pub(super) fn decode(page: &[u8], uuid: u64) -> Option<Self> {
        if &page[0..4] != SEG_MAGIC || get_u32(page, 32) != crc32c::crc32c(&page[0..32]) {
            return None;
        }
        if get_u64(page, 24) != uuid || get_u32(page, 4) != FORMAT_VERSION {
            return None;
        }
        let in_use = match get_u32(page, 8) {
            1 => true,
            2 => false,
            _ => return None,
        };
        Some(SegHeader { in_use, generation: get_u64(page, 16) })
    }
}

/// The fixed part of an entry header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EntryHead {
    pub kind: EntryKind,
    /// Block id (data) or number of records (tombstones).
    pub id: u64,
    pub len: u32,
    pub body_crc: u32,
    pub generation: u64,
    pub uuid: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EntryKind {
    Data,
    Tomb,
}

impl EntryHead {
    fn write(&self, b: &mut [u8]) {
        b[..ENTRY_FIXED].fill(0);
        b[0..4].copy_from_slice(ENTRY_MAGIC);
        b[4] = match self.kind {
            EntryKind::Data => KIND_DATA,
            EntryKind::Tomb => KIND_TOMB,
        };
        put_u64(b, 8, self.id);
        put_u32(b, 16, self.len);
        put_u32(b, 20, self.body_crc);
        put_u64(b, 24, self.generation);
        put_u64(b, 32, self.uuid);
        let crc = crc32c::crc32c(&b[0..ENTRY_CRC_AT]);
        put_u32(b, ENTRY_CRC_AT, crc);
    }

    /// `None` unless the page starts with a well-formed entry header (magic, kind, crc).
    pub(super) fn read(b: &[u8]) -> Option<Self> {
        if &b[0..4] != ENTRY_MAGIC || get_u32(b, ENTRY_CRC_AT) != crc32c::crc32c(&b[0..ENTRY_CRC_AT]) {
            return None;
        }
        let kind = match b[4] {
            KIND_DATA => EntryKind::Data,
            KIND_TOMB => EntryKind::Tomb,
            _ => return None,
        };
        Some(EntryHead {
            kind,
            id: get_u64(b, 8),
            len: get_u32(b, 16),
            body_crc: get_u32(b, 20),
            generation: get_u64(b, 24),
            uuid: get_u64(b, 32),
        })
    }

    /// Rewrite generation (and the header crc) in place: entries are built before their segment is known.
    pub(super) fn set_gen(b: &mut [u8], generation: u64) {
        put_u64(b, 24, generation);
        let crc = crc32c::crc32c(&b[0..ENTRY_CRC_AT]);
        put_u32(b, ENTRY_CRC_AT, crc);
    }
}

/// Build a data entry (generation 0, to be set with [`EntryHead::set_gen`]) and return its page crcs.
#[cfg(test)]
pub(super) fn build_data_entry(id: BlockId, data: &[u8], uuid: u64) -> (AlignedBuf, Vec<u32>) {
    let mut b = AlignedBuf::zeroed(entry_bytes(data.len() as u32) as usize);
    let crcs = fill_data_entry(&mut b, id, data, uuid);
    (b, crcs)
}

/// The crc32c of a data page: the store's hot checksum, taken of every page a put writes and
/// every page a get reads. Computed with `crc-fast` (PCLMULQDQ folding, AVX-512 VPCLMULQDQ
/// where the CPU has it) rather than the `crc32c` crate's SSE4.2 loop used for the store's
/// other checksums: same polynomial and conventions (a test checks they agree), half the time
/// on a 4 KiB page here (89 against 190 ns in cache).
#[inline]
pub(super) fn page_crc(page: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, page) as u32
}

/// Write a data entry for `data` into `b` (exactly `entry_bytes(data.len())` long, any prior
/// contents) and return its page crcs. Every byte of `b` is written: header pages (zero padded),
/// data, zero tail padding. One pass over the data: each page is copied, then its crc taken
/// while it is still in cache.
pub(super) fn fill_data_entry(b: &mut [u8], id: BlockId, data: &[u8], uuid: u64) -> Vec<u32> {
    let len = data.len() as u32;
    let hp = hdr_pages(len) as usize;
    assert_eq!(b.len() as u64, entry_bytes(len), "entry buffer sized for the block");
    let (hdr, body) = b.split_at_mut(hp * PAGE);
    hdr.fill(0);
    let mut crcs = Vec::with_capacity(data_pages(len) as usize);
    for (dst, src) in body.chunks_exact_mut(PAGE).zip(data.chunks(PAGE)) {
        dst[..src.len()].copy_from_slice(src);
        dst[src.len()..].fill(0);
        crcs.push(page_crc(dst));
    }
    for (p, c) in crcs.iter().enumerate() {
        put_u32(hdr, crc_at(p as u32), *c);
    }
    EntryHead { kind: EntryKind::Data, id, len, body_crc: 0, generation: 0, uuid }.write(hdr);
    crcs
}

/// Build a one-page tombstone entry of `(block id, data generation)` records.
pub(super) fn build_tomb_entry(tombs: &[(BlockId, u64)], uuid: u64) -> AlignedBuf {
    assert!(tombs.len() <= TOMBS_PER_ENTRY, "caller batches at most TOMBS_PER_ENTRY tombstones");
    let mut b = AlignedBuf::zeroed(PAGE);
    for (i, (id, d)) in tombs.iter().enumerate() {
        put_u64(&mut b, ENTRY_FIXED + i * TOMB_REC, *id);
        put_u64(&mut b, ENTRY_FIXED + i * TOMB_REC + 8, *d);
    }
    let body_crc = crc32c::crc32c(&b[ENTRY_FIXED..]);
    let head = EntryHead { kind: EntryKind::Tomb, id: tombs.len() as u64, len: 0, body_crc, generation: 0, uuid };
    head.write(&mut b);
    b
}

/// Records of a tombstone entry page, or `None` if its body crc does not match.
pub(super) fn read_tombs(page: &[u8], head: &EntryHead) -> Option<Vec<(BlockId, u64)>> {
    if head.id as usize > TOMBS_PER_ENTRY || crc32c::crc32c(&page[ENTRY_FIXED..PAGE]) != head.body_crc {
        return None;
    }
    let at = |i: usize| ENTRY_FIXED + i * TOMB_REC;
    Some((0..head.id as usize).map(|i| (get_u64(page, at(i)), get_u64(page, at(i) + 8))).collect())
}

/// One record of a segment summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rec {
    /// A data entry at `off_pages` (4 KiB units from the segment start).
    Data { id: BlockId, off_pages: u32, len: u32 },
    /// A tombstone: copies of `id` in segments with generation <= `data_gen` are dead.
    Tomb { id: BlockId, data_gen: u64 },
}

/// Encode a summary: records, then the trailer in the last 40 bytes of the last page.
pub(super) fn encode_summary(recs: &[Rec], generation: u64, uuid: u64) -> AlignedBuf {
    let pages = summary_pages(recs.len()) as usize;
    let mut b = AlignedBuf::zeroed(pages * PAGE);
    for (i, r) in recs.iter().enumerate() {
        let at = i * SUM_REC;
        match *r {
            Rec::Data { id, off_pages, len } => {
                b[at] = KIND_DATA;
                put_u32(&mut b, at + 4, len);
                put_u64(&mut b, at + 8, id);
                put_u64(&mut b, at + 16, off_pages as u64);
            }
            Rec::Tomb { id, data_gen } => {
                b[at] = KIND_TOMB;
                put_u64(&mut b, at + 8, id);
                put_u64(&mut b, at + 16, data_gen);
            }
        }
    }
    let t = pages * PAGE - TRAILER_LEN;
    b[t..t + 4].copy_from_slice(TRAILER_MAGIC);
    put_u32(&mut b, t + 4, recs.len() as u32);
    put_u32(&mut b, t + 8, pages as u32);
    put_u64(&mut b, t + 16, generation);
    put_u64(&mut b, t + 24, uuid);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..recs.len() * SUM_REC]), &b[t..t + 32]);
    put_u32(&mut b, t + 32, crc);
    b
}

/// From the last page of a segment: how many summary pages to read, if the trailer is
/// valid for this `generation` and store.
pub(super) fn trailer_pages(last_page: &[u8], generation: u64, uuid: u64, max_pages: u64) -> Option<u64> {
    let t = PAGE - TRAILER_LEN;
    let ok = &last_page[t..t + 4] == TRAILER_MAGIC
        && get_u64(last_page, t + 16) == generation
        && get_u64(last_page, t + 24) == uuid;
    let pages = get_u32(last_page, t + 8) as u64;
    let count = get_u32(last_page, t + 4) as usize;
    (ok && pages >= 1 && pages <= max_pages && summary_pages(count) == pages).then_some(pages)
}

/// Decode a whole summary region (`pages` pages, trailer at its end); `None` on a bad crc.
pub(super) fn decode_summary(b: &[u8]) -> Option<Vec<Rec>> {
    let t = b.len() - TRAILER_LEN;
    let count = get_u32(b, t + 4) as usize;
    if count * SUM_REC > t {
        return None;
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..count * SUM_REC]), &b[t..t + 32]);
    if crc != get_u32(b, t + 32) {
        return None;
    }
    let mut recs = Vec::with_capacity(count);
    for i in 0..count {
        let at = i * SUM_REC;
        let id = get_u64(b, at + 8);
        let aux = get_u64(b, at + 16);
        recs.push(match b[at] {
            KIND_DATA => Rec::Data { id, off_pages: u32::try_from(aux).ok()?, len: get_u32(b, at + 4) },
            KIND_TOMB => Rec::Tomb { id, data_gen: aux },
            _ => return None,
        });
    }
    Some(recs)
}

/// A store uuid from the clock and the process's hash seed (no global RNG needed).
pub(super) fn new_uuid() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `page_crc` (crc-fast) and the `crc32c` crate agree: one polynomial, one format, whatever
    /// the length and alignment (pages are 4 KiB, but the check should not depend on it).
    #[test]
    fn page_crc_is_crc32c() {
        assert_eq!(page_crc(b"123456789"), 0xe306_9283, "the CRC-32C check value");
        let data: Vec<u8> = (0..3 * PAGE + 77).map(|i| (i * 131 + i / 251) as u8).collect();
        for (start, len) in [(0, 0), (0, 1), (1, 15), (3, 64), (0, PAGE), (5, PAGE), (0, 3 * PAGE), (77, 3 * PAGE)] {
            let s = &data[start..start + len];
            assert_eq!(page_crc(s), crc32c::crc32c(s), "{start}+{len}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(entry_bytes(1), 8192);
        assert_eq!(entry_bytes(4096), 8192);
        assert_eq!(hdr_pages(4 << 20), 2);
        assert_eq!(entry_bytes(4 << 20), (4 << 20) + 8192);
        assert_eq!(crc_page_span(0, 1024), (0, 1008));
        assert_eq!(crc_page_span(1, 1024), (1008, 1024));
        assert_eq!(crc_at(1008), PAGE);
    }

    #[test]
    fn superblock_roundtrip_and_errors() {
        let sb = Superblock { device_size: 1 << 30, segment_bytes: 1 << 20, max_block_bytes: 4 << 20, uuid: 7 };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        b[33] ^= 1;
        assert!(matches!(Superblock::decode(&b), Err(StoreError::CorruptSuperblock { .. })));
        b[4] = 9;
        assert!(matches!(Superblock::decode(&b), Err(StoreError::UnsupportedVersion { found: 9, .. })));
        assert!(matches!(Superblock::decode(&[0u8; PAGE]), Err(StoreError::NotFormatted)));
    }

    #[test]
    fn summary_roundtrip() {
        let recs: Vec<Rec> = (0..500)
            .map(|i| {
                if i % 3 == 0 {
                    Rec::Tomb { id: i, data_gen: i * 2 }
                } else {
                    Rec::Data { id: i, off_pages: i as u32, len: 77 }
                }
            })
            .collect();
        let b = encode_summary(&recs, 9, 5);
        let pages = trailer_pages(&b[b.len() - PAGE..], 9, 5, 100).unwrap();
        assert_eq!(pages as usize * PAGE, b.len());
        assert_eq!(decode_summary(&b).unwrap(), recs);
        assert!(trailer_pages(&b[b.len() - PAGE..], 8, 5, 100).is_none());
    }

    #[test]
    fn entries_roundtrip() {
        let (mut b, crcs) = build_data_entry(42, &[7u8; 5000], 3);
        EntryHead::set_gen(&mut b, 11);
        let h = EntryHead::read(&b).unwrap();
        assert_eq!((h.kind, h.id, h.len, h.generation, h.uuid), (EntryKind::Data, 42, 5000, 11, 3));
        assert_eq!(get_u32(&b, crc_at(1)), crcs[1]);
        // A reused buffer full of old bytes gives exactly the same entry as a fresh one.
        for len in [1usize, 4095, 4096, 5000, 8192, 1 << 20, (4 << 20) - 1] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let (fresh, crcs) = build_data_entry(9, &data, 3);
            let mut dirty = vec![0xA5u8; fresh.len()];
            assert_eq!(fill_data_entry(&mut dirty, 9, &data, 3), crcs);
            assert!(dirty == fresh[..], "len {len}: stale bytes survived in a reused entry buffer");
            let want: Vec<u32> =
                fresh[hdr_pages(len as u32) as usize * PAGE..].chunks(PAGE).map(crc32c::crc32c).collect();
            assert_eq!(crcs, want);
        }
        let t = build_tomb_entry(&[(1, 2), (3, 4)], 3);
        let h = EntryHead::read(&t).unwrap();
        assert_eq!(read_tombs(&t, &h).unwrap(), vec![(1, 2), (3, 4)]);
    }
}
