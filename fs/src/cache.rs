//! The read cache: verified 4 KiB pages of blocks, in RAM, below every front end.
//!
//! `Fs::read` and `Fs::read_bytes` ask it first (`rw.rs`, `read_block_into`, `read_block_bytes`);
//! a range whose pages are all here is answered from it without touching the device, a peer or
//! the bucket: `read_bytes` hands out a slice of a cached buffer (no copy) when the range
//! lies in one, else one copy (a large answer into a reused buffer). On a miss the page-aligned
//! range covering the request (clipped to the block) is read from the source, and its pages go
//! in: a large read (at least [`SHARE_MIN`]) copied whole into a buffer of the cache's own, a
//! small one page by page into slots. Only bytes that were verified go in: the block
//! store checks the crc32c of every page it returns, a peer's store checks its own, the cold
//! tier checks the block's crc before it answers (invariant 11). A read that fails its
//! checksum returns an error and caches nothing.
//!
//! **Why nothing but a free ever invalidates a page.** The key is (block id, page index), and
//! a block id names the same bytes forever (ARCHITECTURE.md, invariant 2):
//! - Blocks are immutable: an overwrite writes new blocks and moves extents (copy-on-write,
//!   `cluster/src/meta/data.rs`); no command changes the bytes of an existing block.
//! - Ids are never reused: `AllocBlockIds` hands out `next_block_id..` and only moves it up
//!   (`alloc_block_ids`, checked add); `next_block_id` is in every snapshot, and a write or
//!   publish naming an id at or above it, or one already in the block table, is refused
//!   (`check_new_blocks`). Each writer uses each id of its range once (`Fs::alloc_ids`).
//! - Moving a block keeps its id and bytes: the store's cleaner copies it forward, the cold
//!   tier's read-through puts the bytes it fetched and verified back under the same id
//!   (`tiering/src/engine/evict.rs`, `fetch_block_once` / `cache`), rehydration likewise, and
//!   a replica on a peer is the same id and bytes. Eviction from NVMe does not change what
//!   the id names, so its pages may stay here (serving a cold block from RAM is right).
//!
//! So a cached page is stale only if its block was freed, and a freed block is never asked
//! for again (no extent points at it). Freed blocks are dropped anyway, to give the memory
//! back: by the meta group's apply observer on every node and by local deletes. A read that
//! was already in flight when its block was freed may put the block's pages back after the
//! drop; they are never read (no extent names the id) and age out like any cold page.
//!
//! **Eviction: S3-FIFO** (Yang et al., SOSP '23), per shard: new pages enter a small FIFO
//! (a tenth of the shard); a page read again while there moves to the main FIFO when it
//! reaches the head, others leave and their keys go to a ghost FIFO; a miss on a ghost key
//! enters main directly. Main is a CLOCK (a page read since its last pass is put back with
//! its count lowered). So a sequential scan (a 2 GiB `nfs-cp`, an S3 GET of a big object)
//! passes through the small FIFO without pushing out pages that are read again and again,
//! and a hit is a map lookup and a counter bump, with no list to reorder under the lock.
//! While the cache is not full nothing is evicted, whatever the queue.
//!
//! **Writes: only an S3 PUT's whole blocks, without a copy.** `Fs::stage_owned` (the S3 PUT
//! and UploadPart body, block by block) hands the block's buffer over after the store wrote
//! it, and the cache keeps that buffer as it is ([`ReadCache::insert_kept`]): no copy on the
//! write path, and a GET soon after the PUT (a checkpoint read back, a dataset uploaded then
//! read by the job) reads from RAM instead of refilling the cache from the device at the
//! device's speed (on this VM a cold fill of 4 GiB under 32 GETs ran at ~0.4 GB/s). The pages
//! enter the small FIFO like read ones, so a write larger than the cache passes through it
//! without pushing out pages read again and again (the main FIFO); a stale page is impossible
//! for the same reason as for reads (a block id names the same bytes forever), and staged
//! blocks that are discarded are dropped with them. Other writes (`Fs::write`: NFS, `tidepool
//! fs`) do not insert: they come as borrowed slices, and copying a 2 GiB sequential write
//! into RAM on the write path would cost the writer for a read that may never come.
//!
//! **Bounded**: each shard holds at most `capacity / shards` bytes, counting every page as a
//! whole 4 KiB slot plus [`ENTRY_OVERHEAD`] (map entry, queue slot), so the whole never
//! exceeds `capacity`. Pages of one block live in one shard (dropping a block is one lock).
//!
//! **Memory**: a large read's pages live in one buffer of the cache's own, copied once from
//! the source's (the store's pooled read buffer goes back to its pool at once, and huge-page
//! buffers there are slow to touch the first time on this VM); a hit on a range of it is a
//! slice (no copy), and the buffer is reused for a later insert once its last page left
//! ([`Spares`]). Under 32 GET clients filling a cold cache the server's CPU went to clearing
//! freshly touched pages (47 % in a perf profile with pages copied into slots and the answers
//! copied out into new 4 MiB buffers; 81 % when the store's huge-page read buffers were kept
//! instead of copied). Other pages live in 4 KiB slots of large
//! slabs (up to 32 MiB each, allocated as the shard fills), not in a heap allocation each: no
//! malloc/free per page, no fragmentation, and a miss copies its page once, into its slot. Slots of dropped pages are reused; the
//! slabs stay allocated (at most the capacity), as a page cache keeps its memory. Filling the
//! cache costs a page fault (and the kernel's zeroing) per 4 KiB the first time a slot is
//! used. Transparent huge pages (MADV_HUGEPAGE on the slabs) were tried and looked worse: in
//! a profile under random reads of a cold 2 GiB file, zeroing 2 MiB pages took 7.5 % of the
//! server's CPU, against 0.8 % for 4 KiB pages in a profile of the same run before (the two
//! at similar loads, not back to back).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tidepool_cluster::meta::BlockId;

/// The page size of the cache (and of the block store's crcs).
pub const PAGE: usize = 4096;

/// Bytes each cached page is charged beyond its slot: its map entry, queue and free-list
/// slots and its block's count, rounded up.
pub const ENTRY_OVERHEAD: usize = 128;

/// Shards at most; fewer for a small cache, so that a shard holds at least 64 pages.
const MAX_SHARDS: usize = 16;

/// The small FIFO's share of a shard (S3-FIFO's 10 %).
const SMALL_PERCENT: usize = 10;

/// Highest read count a page keeps (main's CLOCK passes it over this many times).
const MAX_FREQ: u8 = 3;

/// Counters of the read cache, shared with `FsMetrics` (which reports them).
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) inserted_pages: AtomicU64,
    pub(crate) held_bytes: AtomicU64,
    pub(crate) capacity_bytes: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    block: BlockId,
    page: u32,
}

/// A multiply-fold hasher for integer keys (std's SipHash is several times slower, and the
/// keys are not attacker-chosen: block ids come from the meta group).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// Where a page's bytes are.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Loc {
    /// A slot of the shard's slabs (`Slabs::slot`): the page was copied in.
    Slot(u32),
    /// Bytes `at..` of a shared buffer of the shard (`Shared`): the source's own read buffer,
    /// kept instead of copied (a large insert).
    Shared { buf: u32, at: u32 },
}

struct Entry {
    /// Where its bytes are, and how many (a block's last page may be short).
    loc: Loc,
    len: u16,
    /// Reads since it entered its queue or was last passed over (capped at `MAX_FREQ`).
    freq: u8,
    main: bool,
    /// The sequence number of its live queue slot: queue slots with another one are stale
    /// (the page was dropped, moved or put in again) and skipped.
    seq: u64,
}

#[derive(Default)]
struct Shard {
    slabs: Slabs,
    shared: Shared,
    map: Map<Key, Entry>,
    /// Pages held and highest page index + 1, per block: a drop looks up exactly those.
    blocks: Map<BlockId, (u32, u32)>,
    small: VecDeque<(Key, u64)>,
    main: VecDeque<(Key, u64)>,
    ghost: VecDeque<(Key, u64)>,
    ghost_map: Map<Key, u64>,
    small_bytes: usize,
    main_bytes: usize,
    seq: u64,
}

/// What one page is charged against the bound: its whole slot and its bookkeeping.
const CHARGE: usize = PAGE + ENTRY_OVERHEAD;

fn charge(_: &Entry) -> usize {
    CHARGE
}

/// Pages per slab at most (32 MiB).
const SLAB_SLOTS: usize = 8192;

/// A shard's page memory: slabs of 4 KiB slots, allocated as needed up to `max_slots`.
#[derive(Default)]
struct Slabs {
    slabs: Vec<Vec<u8>>,
    free: Vec<u32>,
    slots: usize,
    max_slots: usize,
}

impl Slabs {
    /// A free slot; `None` only when all `max_slots` are taken.
    fn take(&mut self) -> Option<u32> {
        if self.free.is_empty() && self.slots < self.max_slots {
            let n = SLAB_SLOTS.min(self.max_slots - self.slots);
            // Zeroed memory from the allocator is fresh mmap'd memory for a slab this size:
            // not touched until a page is written into it.
            let slab = vec![0u8; n * PAGE];
            let first = self.slabs.len() * SLAB_SLOTS;
            self.free.extend((first..first + n).rev().map(|i| i as u32));
            self.slabs.push(slab);
            self.slots += n;
        }
        self.free.pop()
    }

    fn give(&mut self, slot: u32) {
        self.free.push(slot);
    }

    fn slot(&self, slot: u32) -> &[u8] {
        let (s, i) = (slot as usize / SLAB_SLOTS, slot as usize % SLAB_SLOTS);
        &self.slabs[s][i * PAGE..(i + 1) * PAGE]
    }

    fn slot_mut(&mut self, slot: u32) -> &mut [u8] {
        let (s, i) = (slot as usize / SLAB_SLOTS, slot as usize % SLAB_SLOTS);
        &mut self.slabs[s][i * PAGE..(i + 1) * PAGE]
    }
}

/// A shard's shared buffers: large inserts, kept whole in a buffer of the cache's own (one
/// copy, see [`ReadCache::insert`]) rather than page by page in slots, each with the number of
/// pages that point into it; it goes to [`Spares`] with its last page.
#[derive(Default)]
struct Shared {
    bufs: Vec<Option<(Bytes, u32)>>,
    free: Vec<u32>,
    /// Buffers let go of under the lock, for the caller to hand to [`Spares`] after it.
    gone: Vec<Bytes>,
}

impl Shared {
    /// Keeps `data` with no page pointing into it yet; its index.
    fn add(&mut self, data: Bytes) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.bufs[i as usize] = Some((data, 0));
                i
            }
            None => {
                self.bufs.push(Some((data, 0)));
                (self.bufs.len() - 1) as u32
            }
        }
    }

    fn get(&self, buf: u32) -> &Bytes {
        // Every `Loc::Shared` names a kept buffer: pages are counted in and out under the
        // shard's lock, and a buffer goes only when its count is back to zero.
        &self.bufs[buf as usize].as_ref().expect("a page points into a kept buffer").0
    }

    fn hold(&mut self, buf: u32) {
        if let Some((_, n)) = &mut self.bufs[buf as usize] {
            *n += 1;
        }
    }

    /// `pages` holders (pages, or the insert that added it) let go of `buf`; the buffer goes
    /// with the last.
    fn release(&mut self, buf: u32, pages: u32) {
        let slot = &mut self.bufs[buf as usize];
        if let Some((_, n)) = slot {
            *n -= pages.min(*n);
            if *n == 0 {
                if let Some((b, _)) = slot.take() {
                    self.gone.push(b);
                }
                self.free.push(buf);
            }
        }
    }
}

/// The bytes of a page at `loc` (`len` of them).
fn page_at<'a>(slabs: &'a Slabs, shared: &'a Shared, loc: Loc, len: u16) -> &'a [u8] {
    match loc {
        Loc::Slot(slot) => &slabs.slot(slot)[..usize::from(len)],
        Loc::Shared { buf, at } => &shared.get(buf)[at as usize..at as usize + usize::from(len)],
    }
}

impl Shard {
    fn bytes(&self) -> usize {
        self.small_bytes + self.main_bytes
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Removes `key`'s entry and its block's page count; returns the bytes it was charged.
    fn remove(&mut self, key: Key) -> Option<usize> {
        let e = self.map.remove(&key)?;
        match e.loc {
            Loc::Slot(slot) => self.slabs.give(slot),
            Loc::Shared { buf, .. } => self.shared.release(buf, 1),
        }
        let c = charge(&e);
        if e.main {
            self.main_bytes -= c;
        } else {
            self.small_bytes -= c;
        }
        if let Some(b) = self.blocks.get_mut(&key.block) {
            b.0 -= 1;
            if b.0 == 0 {
                self.blocks.remove(&key.block);
            }
        }
        Some(c)
    }

    /// Evicts one page (moving others between queues on the way). Returns the bytes freed,
    /// or `None` if the shard is empty.
    fn evict_one(&mut self, cap: usize) -> Option<usize> {
        loop {
            let from_small = self.small_bytes > cap * SMALL_PERCENT / 100 || self.main_bytes == 0;
            if from_small {
                let (key, seq) = self.small.pop_front()?;
                let Some(e) = self.map.get_mut(&key).filter(|e| e.seq == seq && !e.main) else { continue };
                if e.freq > 0 {
                    // Read again while on probation: into main, in a slot of its own if it
                    // was in a shared buffer, so that main never keeps a large read buffer
                    // alive for a few of its pages (the rest of it leaves the small FIFO).
                    if let Loc::Shared { buf, at } = e.loc {
                        // Within the bound, a slot is free: slots <= shard_cap / CHARGE.
                        let slot = self.slabs.take()?;
                        let src = &self.shared.get(buf)[at as usize..at as usize + usize::from(e.len)];
                        self.slabs.slot_mut(slot)[..src.len()].copy_from_slice(src);
                        self.shared.release(buf, 1);
                        e.loc = Loc::Slot(slot);
                    }
                    let seq = {
                        self.seq += 1;
                        self.seq
                    };
                    let c = charge(e);
                    (e.freq, e.main, e.seq) = (0, true, seq);
                    self.small_bytes -= c;
                    self.main_bytes += c;
                    self.main.push_back((key, seq));
                    continue;
                }
                let freed = self.remove(key);
                let seq = self.next_seq();
                self.ghost.push_back((key, seq));
                self.ghost_map.insert(key, seq);
                return freed;
            }
            let (key, seq) = self.main.pop_front()?;
            let Some(e) = self.map.get_mut(&key).filter(|e| e.seq == seq && e.main) else { continue };
            if e.freq > 0 {
                e.freq -= 1;
                self.main.push_back((key, seq));
                continue;
            }
            return self.remove(key);
        }
    }

    /// Drops queue slots that no longer name a live entry once they outnumber the entries
    /// (many pages were dropped with their blocks while nothing had to be evicted).
    fn compact(&mut self) {
        if self.small.len() + self.main.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            let live = |(k, s): &(Key, u64)| map.get(k).is_some_and(|e| e.seq == *s);
            self.small.retain(live);
            self.main.retain(live);
        }
    }
}

/// Inserts this long or longer keep their buffer rather than copy it ([`ReadCache::insert`]).
pub const SHARE_MIN: usize = 1 << 20;

/// What [`ReadCache::shared_run`] found.
enum Run {
    Whole(Bytes),
    Miss,
    Mixed,
}

/// Answers of [`ReadCache::read_bytes`] this long or longer use reused buffers.
pub const REUSE_MIN: usize = 256 << 10;

/// Idle answer buffers kept for reuse at most (with 4 MiB blocks, 64 MiB: a few GETs' worth of
/// read-ahead). They are outside the cache's bound, as the answers themselves are.
const REUSE_MAX_IDLE: usize = 16;

/// Large answer buffers for reuse: glibc gives a freed 4 MiB buffer back to the kernel (unmap,
/// or trim of a thread's heap), so a fresh one per hit cost a page fault and a page clearing
/// per 4 KiB (about a tenth of the server's CPU under 64 MiB GETs from the cache).
#[derive(Default)]
struct Recycler {
    idle: Mutex<Vec<Vec<u8>>>,
}

impl Recycler {
    /// An empty buffer with room for `len` bytes: an idle one if any is big enough.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match idle.iter().position(|b| b.capacity() >= len) {
            Some(i) => idle.swap_remove(i),
            None => Vec::with_capacity(len),
        }
    }

    /// Keeps `buf` (emptied) for reuse, or frees it if enough are idle or it is small.
    fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < REUSE_MIN {
            return;
        }
        buf.clear();
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < REUSE_MAX_IDLE {
            idle.push(buf);
        }
    }
}

/// An answer in a reused buffer; back to the recycler when the last `Bytes` of it drops.
struct Recycled {
    buf: Vec<u8>,
    to: Arc<Recycler>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        self.to.give(std::mem::take(&mut self.buf));
    }
}

/// Idle buffers of large inserts kept at most (with 4 MiB blocks, 32 MiB). Outside the bound.
const SPARES_MAX: usize = 8;

/// Buffers for large inserts: one whose last page left (evicted, or its block freed) and that
/// no answer still holds comes back here, and the next large insert copies into it. A full
/// cache then fills new blocks into memory it already touched: a fresh buffer costs a page
/// fault and a kernel clear per 4 KiB the first time (on this VM first touch runs at ~1.8 GB/s
/// on 4 KiB pages, 0.4 GB/s with huge pages, against ~20 GB/s for a copy into warm memory).
#[derive(Default)]
struct Spares {
    idle: Mutex<Vec<BytesMut>>,
}

impl Spares {
    /// `data` copied into a spare buffer of about its size, else into a new one. Not into a
    /// much larger one: its pages would be charged for less memory than the buffer holds.
    fn copy_of(&self, data: &[u8]) -> Bytes {
        let fits = |b: &BytesMut| (data.len()..=data.len() + data.len() / 8).contains(&b.capacity());
        let spare = {
            let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            idle.iter().position(fits).map(|i| idle.swap_remove(i))
        };
        let mut b = spare.unwrap_or_else(|| BytesMut::with_capacity(data.len()));
        b.clear();
        b.extend_from_slice(data);
        b.freeze()
    }

    /// Keeps `buf` for reuse if nothing else holds it and there is room.
    fn give(&self, buf: Bytes) {
        let Ok(b) = buf.try_into_mut() else { return };
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < SPARES_MAX {
            idle.push(b);
        }
    }

    fn give_all(&self, bufs: Vec<Bytes>) {
        bufs.into_iter().for_each(|b| self.give(b));
    }
}

/// The cache. Cheap to share (`Arc`); every method takes `&self`.
pub struct ReadCache {
    recycler: Arc<Recycler>,
    spares: Spares,
    shards: Box<[Mutex<Shard>]>,
    /// Bytes one shard may hold.
    shard_cap: usize,
    /// Ghost keys one shard remembers (as many as it holds full pages).
    ghost_cap: usize,
    counters: Arc<CacheCounters>,
}

impl ReadCache {
    /// A cache of at most `capacity_bytes`; `None` for 0 (disabled) or for less than one page.
    pub fn new(capacity_bytes: u64, counters: Arc<CacheCounters>) -> Option<Self> {
        let cap = usize::try_from(capacity_bytes).unwrap_or(usize::MAX);
        let per_page = PAGE + ENTRY_OVERHEAD;
        if cap < per_page {
            return None;
        }
        let shards = (cap / (64 * per_page)).clamp(1, MAX_SHARDS);
        let shard_cap = cap / shards;
        counters.capacity_bytes.store((shard_cap * shards) as u64, Ordering::Relaxed);
        let shard = || {
            let slabs = Slabs { max_slots: shard_cap / CHARGE, ..Slabs::default() };
            Mutex::new(Shard { slabs, ..Shard::default() })
        };
        Some(ReadCache {
            shards: (0..shards).map(|_| shard()).collect(),
            shard_cap,
            ghost_cap: (shard_cap / per_page).max(1),
            counters,
            recycler: Arc::default(),
            spares: Spares::default(),
        })
    }

    fn shard_of(&self, block: BlockId) -> usize {
        // splitmix64's finaliser: consecutive ids spread over the shards.
        let mut z = block.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % self.shards.len() as u64) as usize
    }

    fn shard(&self, block: BlockId) -> MutexGuard<'_, Shard> {
        let i = self.shard_of(block);
        // A panic while holding a shard leaves plain maps and counters, consistent enough to
        // keep serving: every update below is finished before the next can panic.
        self.shards[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Copies bytes `offset..offset + out.len()` of `block` into `out` if every page they
    /// cover is here (a hit), and counts a hit or a miss. On a miss `out` may hold part of
    /// the range; the caller overwrites it.
    pub fn read(&self, block: BlockId, offset: u32, out: &mut [u8]) -> bool {
        let mut done = 0;
        self.read_with(block, offset, out.len(), |piece| {
            out[done..done + piece.len()].copy_from_slice(piece);
            done += piece.len();
        })
    }

    /// Bytes `offset..offset + len` of `block` if every page they cover is here (a hit), else
    /// `None`; counts a hit or a miss. When the pages are consecutive bytes of one shared buffer
    /// (a large read put in whole, see [`ReadCache::insert`]) the answer is a slice of it: no
    /// copy at all. Otherwise it is one copy, and no zeroing of the answer first; an answer of
    /// [`REUSE_MIN`] bytes or more is copied into a buffer of [`Recycler`] (and goes back to it
    /// when the last `Bytes` of it drops), so that a stream of large hits does not map, fault
    /// in and give back fresh memory for every block.
    pub fn read_bytes(&self, block: BlockId, offset: u32, len: usize) -> Option<Bytes> {
        if len > 0 {
            let (first, last) = pages_of(offset, len);
            let run = self.shared_run(block, first, last, offset, len);
            if !matches!(run, Run::Mixed) {
                let hit = matches!(run, Run::Whole(_));
                let c = if hit { &self.counters.hits } else { &self.counters.misses };
                c.fetch_add(1, Ordering::Relaxed);
            }
            match run {
                Run::Whole(b) => return Some(b),
                Run::Miss => return None,
                // Pages in slots, or in several buffers: copied below (their read counts go
                // up a second time; the CLOCK passes them over once more, no harm).
                Run::Mixed => {}
            }
        }
        let mut out = if len >= REUSE_MIN { self.recycler.take(len) } else { Vec::with_capacity(len) };
        if !self.read_with(block, offset, len, |piece| out.extend_from_slice(piece)) {
            self.recycler.give(out);
            return None;
        }
        Some(if len >= REUSE_MIN {
            Bytes::from_owner(Recycled { buf: out, to: self.recycler.clone() })
        } else {
            Bytes::from(out)
        })
    }

    /// Whether pages `first..=last` of `block`, which cover `offset..offset + len`, are all
    /// here and consecutive bytes of one shared buffer (then the range as a slice of it), or
    /// one is missing or too short, or they are here in other places. Counts the read on each
    /// page found.
    fn shared_run(&self, block: BlockId, first: u32, last: u32, offset: u32, len: usize) -> Run {
        let mut guard = self.shard(block);
        let shard = &mut *guard;
        let mut run: Option<(u32, u32)> = None;
        let mut whole = true;
        let mut done = 0;
        for page in first..=last {
            let Some(e) = shard.map.get_mut(&Key { block, page }) else { return Run::Miss };
            let start = page as usize * PAGE;
            let from = (offset as usize).max(start) - start;
            let n = (len - done).min(PAGE - from);
            if from + n > usize::from(e.len) {
                // The block is shorter than asked: the source answers the error.
                return Run::Miss;
            }
            done += n;
            e.freq = (e.freq + 1).min(MAX_FREQ);
            whole &= match (e.loc, run) {
                (Loc::Shared { buf, at }, None) => {
                    run = Some((buf, at));
                    true
                }
                (Loc::Shared { buf, at }, Some((b0, at0))) => {
                    buf == b0 && at as usize == at0 as usize + start - first as usize * PAGE
                }
                (Loc::Slot(_), _) => false,
            };
        }
        match run {
            Some((buf, at0)) if whole => {
                let from = at0 as usize + offset as usize - first as usize * PAGE;
                Run::Whole(shard.shared.get(buf).slice(from..from + len))
            }
            _ => Run::Mixed,
        }
    }

    #[cfg(test)]
    /// [`ReadCache::read_bytes`] as a `Vec`.
    pub fn read_vec(&self, block: BlockId, offset: u32, len: usize) -> Option<Vec<u8>> {
        self.read_bytes(block, offset, len).map(Vec::from)
    }

    /// Hands the bytes `offset..offset + len` of `block`, in order and page by page, to `put`
    /// while its pages are here; true if all of them were (a hit). Counts a hit or a miss.
    fn read_with(&self, block: BlockId, offset: u32, len: usize, mut put: impl FnMut(&[u8])) -> bool {
        if len == 0 {
            return true;
        }
        let (first, last) = pages_of(offset, len);
        let hit = {
            let mut guard = self.shard(block);
            let shard = &mut *guard;
            let mut done = 0;
            let mut hit = true;
            for page in first..=last {
                let Some(e) = shard.map.get_mut(&Key { block, page }) else {
                    hit = false;
                    break;
                };
                let start = page as usize * PAGE;
                // The part of the wanted range in this page.
                let from = (offset as usize).max(start) - start;
                let n = (len - done).min(PAGE - from);
                if from + n > usize::from(e.len) {
                    // The block is shorter than asked: the source answers the error.
                    hit = false;
                    break;
                }
                put(&page_at(&shard.slabs, &shard.shared, e.loc, e.len)[from..from + n]);
                done += n;
                e.freq = (e.freq + 1).min(MAX_FREQ);
            }
            hit
        };
        let c = if hit { &self.counters.hits } else { &self.counters.misses };
        c.fetch_add(1, Ordering::Relaxed);
        hit
    }

    #[cfg(test)]
    /// [`ReadCache::insert`] of a copy of `data`.
    pub fn insert_slice(&self, block: BlockId, first_page: u32, data: &[u8]) {
        self.insert(block, first_page, &Bytes::copy_from_slice(data));
    }

    /// Puts the pages of `data`, which holds bytes `first_page * PAGE..` of `block`: whole
    /// pages, the last one short only where the block ends. Pages already here are kept.
    ///
    /// `data` of [`SHARE_MIN`] bytes or more is copied whole into one buffer of the cache's
    /// own (a spare one when there is one, see [`Spares`]), and its pages point into it: a
    /// later hit on a range of it is a slice of that buffer, no copy. The source's buffer is
    /// not kept itself: for a local block it is the store's pooled read buffer (huge pages,
    /// whose first touch is slow here), and the pool reuses it at once. The buffer's pages
    /// enter the small FIFO together and leave it in that order, and a page promoted to main
    /// is copied into a slot of its own, so a buffer is not kept alive long for a few pages.
    /// Smaller `data` (and a page going straight to main, a ghost) is copied into slots.
    pub fn insert(&self, block: BlockId, first_page: u32, data: &Bytes) {
        let own = (data.len() >= SHARE_MIN).then(|| self.spares.copy_of(data));
        self.insert_in(block, first_page, data, own);
    }

    /// [`ReadCache::insert`] of a buffer the caller gives up (an S3 PUT's block, as written):
    /// kept as it is, not copied, if it is at least [`SHARE_MIN`] long. The caller makes sure
    /// the memory behind `data` is not much more than `data` (it is what the pages hold).
    pub fn insert_kept(&self, block: BlockId, first_page: u32, data: Bytes) {
        let own = (data.len() >= SHARE_MIN).then(|| data.clone());
        self.insert_in(block, first_page, &data, own);
    }

    /// Puts the pages of `data`, pointing into `own` (a buffer holding the same bytes) if given.
    fn insert_in(&self, block: BlockId, first_page: u32, data: &[u8], own: Option<Bytes>) {
        let mut guard = self.shard(block);
        let shard = &mut *guard;
        let (mut added, mut evicted, mut freed) = (0u64, 0u64, 0usize);
        // Held by this insert until its end, so that evicting its own first pages (a shard
        // smaller than `data`) cannot drop the buffer under it.
        let shared = own.map(|own| {
            let b = shard.shared.add(own);
            shard.shared.hold(b);
            b
        });
        for (i, chunk) in data.chunks(PAGE).enumerate() {
            let key = Key { block, page: first_page + i as u32 };
            if shard.map.contains_key(&key) {
                continue;
            }
            let c = CHARGE;
            if c > self.shard_cap {
                break;
            }
            while shard.bytes() + c > self.shard_cap {
                match shard.evict_one(self.shard_cap) {
                    Some(n) => {
                        evicted += 1;
                        freed += n;
                    }
                    None => break,
                }
            }
            let to_main = shard.ghost_map.remove(&key).is_some();
            let loc = match shared {
                Some(buf) if !to_main => {
                    shard.shared.hold(buf);
                    Loc::Shared { buf, at: (i * PAGE) as u32 }
                }
                _ => {
                    // Within the bound, a slot is free: slots <= shard_cap / CHARGE.
                    let Some(slot) = shard.slabs.take() else { break };
                    shard.slabs.slot_mut(slot)[..chunk.len()].copy_from_slice(chunk);
                    Loc::Slot(slot)
                }
            };
            let seq = shard.next_seq();
            let e = Entry { loc, len: chunk.len() as u16, freq: 0, main: to_main, seq };
            if to_main {
                shard.main_bytes += c;
                shard.main.push_back((key, seq));
            } else {
                shard.small_bytes += c;
                shard.small.push_back((key, seq));
            }
            shard.map.insert(key, e);
            let b = shard.blocks.entry(block).or_insert((0, 0));
            b.0 += 1;
            b.1 = b.1.max(key.page + 1);
            added += c as u64;
        }
        if let Some(b) = shared {
            shard.shared.release(b, 1);
        }
        while shard.ghost_map.len() > self.ghost_cap {
            let Some((k, s)) = shard.ghost.pop_front() else { break };
            if shard.ghost_map.get(&k) == Some(&s) {
                shard.ghost_map.remove(&k);
            }
        }
        if shard.ghost.len() > 2 * shard.ghost_map.len() + 1024 {
            let gm = &shard.ghost_map;
            shard.ghost.retain(|(k, s)| gm.get(k) == Some(s));
        }
        // The gauge moves under the shard's lock, so it never goes below zero.
        let c = &self.counters;
        c.held_bytes.fetch_add(added, Ordering::Relaxed);
        c.held_bytes.fetch_sub(freed as u64, Ordering::Relaxed);
        let gone = std::mem::take(&mut shard.shared.gone);
        drop(guard);
        self.spares.give_all(gone);
        c.inserted_pages.fetch_add(data.len().div_ceil(PAGE) as u64, Ordering::Relaxed);
        c.evictions.fetch_add(evicted, Ordering::Relaxed);
    }

    /// Drops every page of `block` (it was freed).
    pub fn remove_block(&self, block: BlockId) {
        let mut shard = self.shard(block);
        let Some((_, end)) = shard.blocks.get(&block).copied() else { return };
        let mut freed = 0;
        for page in 0..end {
            freed += shard.remove(Key { block, page }).unwrap_or(0);
            if !shard.blocks.contains_key(&block) {
                break;
            }
        }
        shard.compact();
        self.counters.held_bytes.fetch_sub(freed as u64, Ordering::Relaxed);
        let gone = std::mem::take(&mut shard.shared.gone);
        drop(shard);
        self.spares.give_all(gone);
    }

    #[cfg(test)]
    /// Bytes held, counted as the bound counts them (data plus `ENTRY_OVERHEAD` per page).
    pub fn held_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).bytes() as u64).sum()
    }

    #[cfg(test)]
    /// Pages held.
    pub fn pages(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map.len()).sum()
    }

    #[cfg(test)]
    /// Whether page `page` of `block` is here (counts nothing).
    pub fn contains(&self, block: BlockId, page: u32) -> bool {
        self.shard(block).map.contains_key(&Key { block, page })
    }
}

/// First and last page index of `len > 0` bytes at `offset`.
pub(crate) fn pages_of(offset: u32, len: usize) -> (u32, u32) {
    let end = u64::from(offset) + len as u64 - 1;
    (offset / PAGE as u32, (end / PAGE as u64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(block: u64, p: u32, len: usize) -> Vec<u8> {
        (0..len).map(|i| (block as u8).wrapping_mul(7) ^ (p as u8) ^ (i as u8)).collect()
    }

    fn cache(bytes: u64) -> (ReadCache, Arc<CacheCounters>) {
        let c = Arc::new(CacheCounters::default());
        (ReadCache::new(bytes, c.clone()).unwrap(), c)
    }

    #[test]
    fn zero_or_less_than_a_page_is_no_cache() {
        let c = Arc::new(CacheCounters::default());
        assert!(ReadCache::new(0, c.clone()).is_none());
        assert!(ReadCache::new(PAGE as u64, c).is_none());
    }

    #[test]
    fn miss_then_hit_copies_the_range() {
        let (c, n) = cache(1 << 20);
        let mut out = vec![0u8; 100];
        assert!(!c.read(7, 5000, &mut out));
        // Pages 1 and 2 of block 7 (the covering range of 5000..5100 is page 1 only).
        let data: Vec<u8> = [page(7, 1, PAGE), page(7, 2, PAGE)].concat();
        c.insert_slice(7, 1, &data);
        assert!(c.read(7, 5000, &mut out));
        assert_eq!(out, data[5000 - PAGE..5100 - PAGE]);
        // A range over both pages, and one going past them (page 3 missing).
        let mut two = vec![0u8; 2 * PAGE - 10];
        assert!(c.read(7, PAGE as u32 + 10, &mut two));
        assert_eq!(two, data[10..]);
        assert!(!c.read(7, 2 * PAGE as u32, &mut [0u8; PAGE + 1]));
        assert_eq!(n.hits.load(Ordering::Relaxed), 2);
        assert_eq!(n.misses.load(Ordering::Relaxed), 2);
        // The same as new `Vec`s.
        assert_eq!(c.read_vec(7, PAGE as u32 + 10, 2 * PAGE - 10).unwrap(), data[10..]);
        assert_eq!(c.read_vec(7, 5000, 100).unwrap(), data[5000 - PAGE..5100 - PAGE]);
        assert_eq!(c.read_vec(7, 2 * PAGE as u32, PAGE + 1), None);
        assert_eq!(c.read_vec(8, 0, 1), None);
        assert_eq!(n.hits.load(Ordering::Relaxed), 4);
        assert_eq!(n.misses.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn large_answers_reuse_buffers_and_hold_only_their_range() {
        let (c, _) = cache(16 << 20);
        let pages = 2 * REUSE_MIN / PAGE;
        let data: Vec<u8> = (0..pages as u32).flat_map(|p| page(9, p, PAGE)).collect();
        c.insert_slice(9, 0, &data);
        for (off, len) in [(0, data.len()), (5, REUSE_MIN), (PAGE + 1, REUSE_MIN + 3), (0, data.len()), (7, 100)] {
            let a = c.read_bytes(9, off as u32, len).unwrap();
            let b = c.read_bytes(9, off as u32, len).unwrap();
            assert!(a == data[off..off + len] && b == data[off..off + len], "range {off}+{len}");
            drop((a, b));
        }
        assert!(c.recycler.idle.lock().unwrap().len() == 2, "two large buffers, reused over and over");
        assert_eq!(c.read_bytes(10, 0, REUSE_MIN), None, "a miss");
        assert!(c.recycler.idle.lock().unwrap().len() <= REUSE_MAX_IDLE);
    }

    #[test]
    fn short_last_page_and_reads_past_it() {
        let (c, _) = cache(1 << 20);
        let tail = page(3, 0, 100);
        c.insert_slice(3, 0, &tail);
        let mut out = vec![0u8; 50];
        assert!(c.read(3, 50, &mut out));
        assert_eq!(out, tail[50..]);
        assert!(!c.read(3, 50, &mut [0u8; 51]), "past the block's end is the source's error to give");
    }

    #[test]
    fn bytes_never_exceed_the_limit() {
        let limit = 300 * (PAGE + ENTRY_OVERHEAD) as u64;
        let (c, n) = cache(limit);
        let mut rng = 0x1234_5678_u64;
        for i in 0..20_000u64 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let block = (rng >> 33) % 50;
            let p = ((rng >> 20) % 64) as u32;
            let len = if i % 5 == 0 { 1 + (rng >> 40) as usize % PAGE } else { PAGE };
            let pages = 1 + (i % 4) as u32;
            let data: Vec<u8> =
                (0..pages).flat_map(|k| page(block, p + k, PAGE)).take(len + (pages as usize - 1) * PAGE).collect();
            c.insert_slice(block, p, &data);
            if i % 7 == 0 {
                let mut out = [0u8; 10];
                if c.read(block, p * PAGE as u32, &mut out) {
                    assert_eq!(out[..], page(block, p, PAGE)[..10], "a reused slot holds its own page");
                }
            }
            if i % 997 == 0 {
                c.remove_block(block);
            }
            assert!(c.held_bytes() <= limit, "held {} > limit {limit} after {i}", c.held_bytes());
        }
        assert!(n.evictions.load(Ordering::Relaxed) > 0);
        assert_eq!(n.held_bytes.load(Ordering::Relaxed), c.held_bytes(), "the gauge follows the shards");
        for s in c.shards.iter() {
            let s = s.lock().unwrap();
            assert!(s.slabs.slots <= s.slabs.max_slots && s.map.len() + s.slabs.free.len() == s.slabs.slots);
        }
    }

    #[test]
    fn removed_block_is_gone_and_others_stay() {
        let (c, n) = cache(4 << 20);
        for b in [1u64, 2] {
            for p in [0u32, 5, 9] {
                c.insert_slice(b, p, &page(b, p, PAGE));
            }
        }
        c.remove_block(1);
        for p in [0u32, 5, 9] {
            assert!(!c.contains(1, p));
            assert!(c.contains(2, p));
            assert!(!c.read(1, p * PAGE as u32, &mut [0u8; 8]));
        }
        assert_eq!(c.pages(), 3);
        assert_eq!(n.held_bytes.load(Ordering::Relaxed), 3 * (PAGE + ENTRY_OVERHEAD) as u64);
        c.remove_block(42); // nothing there: fine
    }

    #[test]
    fn a_scan_does_not_push_out_pages_read_again() {
        // One shard of 100 pages: 20 hot pages read often, then a scan of 1,000 pages once.
        let per = (PAGE + ENTRY_OVERHEAD) as u64;
        let (c, _) = cache(100 * per);
        assert_eq!(c.shards.len(), 1);
        for p in 0..20u32 {
            c.insert_slice(1, p, &page(1, p, PAGE));
        }
        for p in 0..80u32 {
            c.insert_slice(2, p, &page(2, p, PAGE)); // fills the cache
        }
        for _ in 0..3 {
            for p in 0..20u32 {
                assert!(c.read(1, p * PAGE as u32, &mut [0u8; 16]));
            }
        }
        for p in 0..1000u32 {
            c.insert_slice(3, p, &page(3, p, PAGE));
        }
        let kept = (0..20u32).filter(|p| c.contains(1, *p)).count();
        assert_eq!(kept, 20, "the hot pages survive a scan five times the cache");
    }

    #[test]
    fn queues_do_not_grow_with_drops_alone() {
        let (c, _) = cache(64 << 20);
        for b in 0..2_000u64 {
            c.insert_slice(b, 0, &page(b, 0, PAGE));
            c.remove_block(b);
        }
        let s = c.shards.iter().map(|s| s.lock().unwrap().small.len()).sum::<usize>();
        assert!(s <= 16 * 1024 + 16, "stale queue slots are compacted: {s}");
        assert_eq!(c.pages(), 0);
    }

    fn big(block: u64, pages: u32) -> (Bytes, Vec<u8>) {
        let data: Vec<u8> = (0..pages).flat_map(|p| page(block, p, PAGE)).collect();
        (Bytes::from(data.clone()), data)
    }

    /// Where the pages of `block` are: (in slots, in shared buffers).
    fn locs(c: &ReadCache, block: u64) -> (usize, usize) {
        let s = c.shards[c.shard_of(block)].lock().unwrap();
        let mine = s.map.iter().filter(|(k, _)| k.block == block);
        mine.fold((0, 0), |(a, b), (_, e)| if matches!(e.loc, Loc::Slot(_)) { (a + 1, b) } else { (a, b + 1) })
    }

    #[test]
    fn large_inserts_are_kept_whole_and_hits_on_them_are_slices() {
        let (c, n) = cache(64 << 20);
        let pages = (SHARE_MIN / PAGE) as u32 + 3;
        let (buf, data) = big(5, pages);
        c.insert(5, 0, &buf);
        assert_eq!(n.held_bytes.load(Ordering::Relaxed), u64::from(pages) * (PAGE + ENTRY_OVERHEAD) as u64);
        assert_eq!(locs(&c, 5), (0, pages as usize), "one buffer, no slots");
        assert_ne!(c.read_bytes(5, 0, 1).unwrap().as_ptr(), buf.as_ptr(), "a copy of the source's buffer");
        drop(buf);
        let base = c.read_bytes(5, 0, data.len()).unwrap().as_ptr() as usize;
        for (off, len) in [(0, data.len()), (100, PAGE), (PAGE * 2 + 5, SHARE_MIN), (data.len() - 1, 1)] {
            let b = c.read_bytes(5, off as u32, len).unwrap();
            assert_eq!(b, data[off..off + len], "range {off}+{len}");
            assert_eq!(b.as_ptr() as usize, base + off, "a slice of the cache's buffer, not a copy");
            let mut out = vec![0u8; len];
            assert!(c.read(5, off as u32, &mut out));
            assert_eq!(out, data[off..off + len]);
        }
        assert_eq!(c.read_bytes(5, 0, data.len() + 1), None, "past the block's end");
        // A small insert of another block is copied into a slot.
        c.insert(6, 0, &Bytes::from(page(6, 0, PAGE)));
        assert_eq!(locs(&c, 6), (1, 0));
        assert_eq!(c.read_vec(6, 10, 20).unwrap(), page(6, 0, PAGE)[10..30]);
        // The buffer goes with its block's last page, to the spares unless an answer holds it.
        let held = c.read_bytes(5, 0, 10).unwrap();
        c.remove_block(5);
        assert_eq!(c.read_bytes(5, 0, 10), None);
        assert_eq!(held, data[..10], "an answer outlives the block's pages");
        assert_eq!(c.spares.idle.lock().unwrap().len(), 0, "held by an answer: not reused");
        let (buf, data) = big(7, 2 * pages);
        c.insert(7, 0, &buf);
        c.remove_block(7);
        assert_eq!(c.spares.idle.lock().unwrap().len(), 1, "free: kept for reuse");
        c.insert(9, 0, &big(9, pages).0);
        assert_eq!(c.spares.idle.lock().unwrap().len(), 1, "not for an insert of half its size");
        c.insert(8, 0, &Bytes::from(data.clone()));
        assert_eq!(c.spares.idle.lock().unwrap().len(), 0, "reused");
        assert_eq!(c.read_vec(8, 0, data.len()).unwrap(), data);
        let s = c.shards.iter().map(|s| s.lock().unwrap().shared.bufs.iter().flatten().count()).sum::<usize>();
        assert_eq!(s, 2, "blocks 8 and 9's buffers only");
    }

    #[test]
    fn pages_read_again_leave_their_shared_buffer_for_slots() {
        // Shards of 600 pages: a 300-page buffer, a third of it read again, then a scan of
        // blocks of the same shard pushes the rest of it out; the pages read again stay,
        // copied into slots, and the buffer goes.
        let per = (PAGE + ENTRY_OVERHEAD) as u64;
        let (c, _) = cache(16 * 600 * per);
        assert_eq!(c.shards.len(), 16);
        let (buf, data) = big(1, 300);
        c.insert(1, 0, &buf);
        let hot = 0..100u32;
        for p in hot.clone() {
            assert!(c.read(1, p * PAGE as u32, &mut [0u8; 8]));
        }
        let same: Vec<u64> = (2..).filter(|b| c.shard_of(*b) == c.shard_of(1)).take(10).collect();
        for b in same {
            c.insert(b, 0, &big(b, 300).0);
        }
        assert_eq!(locs(&c, 1), (100, 0), "the pages read again, in slots; no buffer kept for them");
        for p in hot {
            let at = p as usize * PAGE;
            assert_eq!(c.read_vec(1, at as u32, PAGE).unwrap(), data[at..at + PAGE], "page {p} kept, copied");
        }
        assert_eq!(c.read_vec(1, 0, 100 * PAGE).unwrap(), data[..100 * PAGE], "a range over copied pages");
        let s = c.shards[c.shard_of(1)].lock().unwrap();
        assert!(s.shared.bufs.iter().flatten().count() <= 2, "only the newest buffers are kept");
    }

    #[test]
    fn a_shared_insert_larger_than_its_shard_stays_in_bounds() {
        let per = (PAGE + ENTRY_OVERHEAD) as u64;
        let limit = 100 * per;
        let (c, _) = cache(limit);
        for round in 0..3u64 {
            let (buf, data) = big(round, 2 * (SHARE_MIN / PAGE) as u32);
            c.insert(round, 0, &buf);
            drop(buf);
            assert!(c.held_bytes() <= limit, "held {} > {limit}", c.held_bytes());
            let kept: Vec<u32> = (0..data.len() as u32 / PAGE as u32).filter(|p| c.contains(round, *p)).collect();
            assert!(!kept.is_empty());
            for p in kept {
                let at = p as usize * PAGE;
                assert_eq!(c.read_vec(round, at as u32, PAGE).unwrap(), data[at..at + PAGE]);
            }
            if round > 0 {
                c.remove_block(round - 1);
            }
        }
    }
}
