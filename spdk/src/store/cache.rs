//! A bounded cache of per-page crcs of stored blocks, so a small read of a block whose crcs
//! are cached costs one device read (the data pages) instead of two.
//!
//! Keyed by `(segment generation, entry offset, header page)`: gens are never reused, so an entry of
//! a cleaned and reused segment can never be mistaken for the old one; stale keys just age out.
//! Eviction is first-in first-out, which is enough for a cache that only saves a small read.
//!
//! The crcs live in large chunks filled in insertion order (2 MiB each, on a huge page where the
//! kernel gives one), not in one heap allocation per slice. A random 4 KiB read copies one crc
//! out of megabytes of them: spread over 4 KiB heap pages, that copy was a TLB miss as well as a
//! cache miss (in a VM, a two-level page walk), ~5 % of a random read's CPU in `tidepool bench
//! device`. FIFO eviction frees the chunks in the order they were filled.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use super::state::IntHasher;
use crate::buf::{AlignedBuf, HUGE_MIN};

/// `(segment generation, entry offset in pages, header page)`.
pub(super) type CrcKey = (u64, u32, u32);

/// Bookkeeping bytes charged per cached slice on top of its crcs.
const OVERHEAD: usize = 64;

/// Crcs per chunk of a cache large enough for several (one huge page each).
const BIG_CHUNK: usize = HUGE_MIN / 4;
/// Crcs per chunk at least: a header page's worth.
const MIN_CHUNK: usize = 1024;

/// Where a slice lives: chunk sequence number (counted from the first chunk ever), start, length.
#[derive(Clone, Copy)]
struct Slot {
    chunk: u64,
    at: u32,
    len: u32,
}

struct Chunk {
    mem: AlignedBuf,
    /// Crcs written so far (the next slice starts here).
    used: usize,
    /// Slices of this chunk still in the map.
    live: usize,
}

impl Chunk {
    fn crcs(&self) -> &[u32] {
        // SAFETY: the buffer is initialised, page-aligned (so aligned for u32) and at least
        // `cap / 4` u32s long; it lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr().cast::<u32>(), self.mem.capacity() / 4) }
    }

    fn crcs_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `crcs`, and we hold `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.mem.as_mut_ptr().cast::<u32>(), self.mem.capacity() / 4) }
    }
}

pub(super) struct CrcCache {
    map: HashMap<CrcKey, Slot, BuildHasherDefault<IntHasher>>,
    order: VecDeque<CrcKey>,
    /// Chunks in the order they were filled; the last one is being filled.
    chunks: VecDeque<Chunk>,
    /// Sequence number of `chunks[0]`.
    first_chunk: u64,
    /// Crcs per chunk.
    chunk_len: usize,
    bytes: usize,
    limit: usize,
}

impl CrcCache {
    pub(super) fn new(limit_bytes: usize) -> Self {
        // Big chunks only where several fit: a small cache would mostly be one idle huge page.
        let chunk_len = if limit_bytes >= 4 * HUGE_MIN { BIG_CHUNK } else { (limit_bytes / 4 / 4).max(MIN_CHUNK) };
        CrcCache {
            map: HashMap::default(),
            order: VecDeque::new(),
            chunks: VecDeque::new(),
            first_chunk: 0,
            chunk_len,
            bytes: 0,
            limit: limit_bytes,
        }
    }

    pub(super) fn get(&self, key: &CrcKey) -> Option<&[u32]> {
        let s = self.map.get(key)?;
        let chunk = &self.chunks[(s.chunk - self.first_chunk) as usize];
        Some(&chunk.crcs()[s.at as usize..][..s.len as usize])
    }

    /// Cache a copy of `crcs` (at most a header page's worth) under `key`.
    pub(super) fn insert(&mut self, key: CrcKey, crcs: &[u32]) {
        let cost = crcs.len() * 4 + OVERHEAD;
        if cost > self.limit || crcs.len() > self.chunk_len || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + cost > self.limit {
            let Some(old) = self.order.pop_front() else { break };
            self.remove(&old);
        }
        let fits = self.chunks.back().is_some_and(|c| c.used + crcs.len() <= self.chunk_len);
        if !fits {
            self.chunks.push_back(Chunk { mem: AlignedBuf::zeroed(self.chunk_len * 4), used: 0, live: 0 });
        }
        let seq = self.first_chunk + self.chunks.len() as u64 - 1;
        let chunk = self.chunks.back_mut().expect("a chunk was just ensured");
        let at = chunk.used;
        chunk.crcs_mut()[at..at + crcs.len()].copy_from_slice(crcs);
        chunk.used += crcs.len();
        chunk.live += 1;
        self.bytes += cost;
        self.map.insert(key, Slot { chunk: seq, at: at as u32, len: crcs.len() as u32 });
        self.order.push_back(key);
        self.free_drained_chunks();
    }

    fn remove(&mut self, key: &CrcKey) {
        let Some(s) = self.map.remove(key) else { return };
        self.bytes -= s.len as usize * 4 + OVERHEAD;
        self.chunks[(s.chunk - self.first_chunk) as usize].live -= 1;
        self.free_drained_chunks();
    }

    /// Free the oldest chunks that no slice refers to any more (never the one being filled).
    fn free_drained_chunks(&mut self) {
        while self.chunks.len() > 1 && self.chunks.front().is_some_and(|c| c.live == 0) {
            self.chunks.pop_front();
            self.first_chunk += 1;
        }
    }

    /// Bytes of chunk memory held.
    #[cfg(test)]
    fn chunk_bytes(&self) -> usize {
        self.chunks.len() * self.chunk_len * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo() {
        let mut c = CrcCache::new(3 * (4 + OVERHEAD));
        for i in 0..5u64 {
            c.insert((i, 0, 0), &[i as u32]);
        }
        assert!(c.get(&(0, 0, 0)).is_none() && c.get(&(1, 0, 0)).is_none());
        assert_eq!(c.get(&(4, 0, 0)).unwrap(), &[4]);
        assert!(c.bytes <= c.limit);
        let mut none = CrcCache::new(0);
        none.insert((1, 1, 1), &[1]);
        assert!(none.get(&(1, 1, 1)).is_none());
    }

    /// Many slices of varied lengths through a cache of big chunks: every cached slice reads
    /// back exactly, evicted ones are gone, and drained chunks are freed (the memory held stays
    /// within the limit plus two chunks).
    #[test]
    fn slices_read_back_across_chunks_and_drained_chunks_are_freed() {
        let limit = 4 * HUGE_MIN + 12_345;
        let mut c = CrcCache::new(limit);
        assert_eq!(c.chunk_len, BIG_CHUNK);
        let slice = |i: u64| -> Vec<u32> {
            let n = 1 + (i as usize * 7919) % MIN_CHUNK;
            (0..n).map(|k| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(k as u32)).collect()
        };
        let mut kept = VecDeque::new();
        for i in 0..20_000u64 {
            let s = slice(i);
            c.insert((i, i as u32, 0), &s);
            kept.push_back((i, s.len()));
            while kept.iter().map(|&(_, n)| n * 4 + OVERHEAD).sum::<usize>() > limit {
                kept.pop_front();
            }
            assert!(c.bytes <= limit);
            assert!(c.chunk_bytes() <= limit + 2 * HUGE_MIN, "chunks held: {}", c.chunk_bytes());
            if i % 997 == 0 {
                for &(j, _) in &kept {
                    assert_eq!(c.get(&(j, j as u32, 0)), Some(&slice(j)[..]), "slice {j} at insert {i}");
                }
                let evicted = kept.front().map_or(0, |&(j, _)| j);
                assert!(evicted == 0 || c.get(&(evicted - 1, evicted as u32 - 1, 0)).is_none());
            }
        }
        assert!(c.first_chunk > 0, "old chunks were freed");
        // A repeated key keeps its first slice.
        let k = kept.back().unwrap().0;
        c.insert((k, k as u32, 0), &[1, 2, 3]);
        assert_eq!(c.get(&(k, k as u32, 0)), Some(&slice(k)[..]));
    }
}
