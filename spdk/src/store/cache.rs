//! A bounded cache of per-page crcs of stored blocks, so a small read of a block whose crcs
//! are cached costs one device read (the data pages) instead of two.
//!
//! Keyed by `(segment generation, entry offset, header page)`: gens are never reused, so an entry of
//! a cleaned and reused segment can never be mistaken for the old one; stale keys just age out.
//! Eviction is first-in first-out, which is enough for a cache that only saves a small read.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use super::state::IntHasher;
use std::sync::Arc;

/// `(segment generation, entry offset in pages, header page)`.
pub(super) type CrcKey = (u64, u32, u32);

/// Bookkeeping bytes charged per cached slice on top of its crcs.
const OVERHEAD: usize = 64;

pub(super) struct CrcCache {
    map: HashMap<CrcKey, Arc<[u32]>, BuildHasherDefault<IntHasher>>,
    order: VecDeque<CrcKey>,
    bytes: usize,
    limit: usize,
}

impl CrcCache {
    pub(super) fn new(limit_bytes: usize) -> Self {
        CrcCache { map: HashMap::default(), order: VecDeque::new(), bytes: 0, limit: limit_bytes }
    }

    pub(super) fn get(&self, key: &CrcKey) -> Option<&[u32]> {
        self.map.get(key).map(|v| &v[..])
    }

    pub(super) fn insert(&mut self, key: CrcKey, crcs: Arc<[u32]>) {
        let cost = crcs.len() * 4 + OVERHEAD;
        if cost > self.limit || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + cost > self.limit {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(v) = self.map.remove(&old) {
                self.bytes -= v.len() * 4 + OVERHEAD;
            }
        }
        self.bytes += cost;
        self.map.insert(key, crcs);
        self.order.push_back(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fifo() {
        let mut c = CrcCache::new(3 * (4 + OVERHEAD));
        for i in 0..5u64 {
            c.insert((i, 0, 0), Arc::from(vec![i as u32]));
        }
        assert!(c.get(&(0, 0, 0)).is_none() && c.get(&(1, 0, 0)).is_none());
        assert_eq!(c.get(&(4, 0, 0)).unwrap()[0], 4);
        assert!(c.bytes <= c.limit);
        let mut none = CrcCache::new(0);
        none.insert((1, 1, 1), Arc::from(vec![1]));
        assert!(none.get(&(1, 1, 1)).is_none());
    }
}
