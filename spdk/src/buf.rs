//! Owned, aligned I/O buffers: what O_DIRECT and io_uring need. The engine takes a
//! buffer by value and gives it back with the result, so no borrow outlives a submission.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use crate::store::state::IntHasher;

/// Alignment of every buffer: the largest logical block size we meet (4 KiB).
pub const ALIGN: usize = 4096;

/// A heap buffer whose start and capacity are multiples of [`ALIGN`].
/// `len` is the number of valid bytes (the I/O size); it never exceeds `capacity`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    origin: Origin,
}

/// Where a buffer's memory comes from, and so where it goes on drop.
enum Origin {
    Heap,
    /// Mapped by [`huge_map`] (and unmapped on drop).
    Huge,
    /// A page of a [`PageArena`]; it goes back to the arena on drop.
    Arena(Arc<PageArena>),
}

/// Buffers of at least this capacity are mapped on 2 MiB boundaries with transparent huge
/// pages asked for (MADV_HUGEPAGE; the kernel's default `madvise` mode gives them to no one
/// else). A 4 MiB I/O on 4 KiB pages is 1024 scattered pages: the kernel pins each one per
/// I/O and the virtio queue carries up to 254 segments per request, so the block layer splits
/// it into five requests; on huge pages it is a handful of segments and one request, and the
/// CRC and copy passes touch two TLB entries instead of 1024. Small buffers stay on the heap:
/// faulting in a 2 MiB page to hold 4 KiB would cost more than it saves.
pub const HUGE_MIN: usize = 2 << 20;

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; capacity is `len` rounded up to [`ALIGN`] (at least one page).
    pub fn zeroed(len: usize) -> Self {
        let cap = round_up(len.max(1), ALIGN);
        if cap >= HUGE_MIN
            && let Some(ptr) = huge_map(cap)
        {
            return AlignedBuf { ptr, len, cap, origin: Origin::Huge };
        }
        let layout = Layout::from_size_align(cap, ALIGN).expect("aligned layout: cap is a multiple of ALIGN");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap, origin: Origin::Heap }
    }

    /// A buffer holding a copy of `data`, zero-padded to the next [`ALIGN`] boundary in capacity.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Set the valid length. Panics if `len > capacity` (a caller bug, not an I/O condition).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity len={len} cap={}", self.cap);
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The arena this buffer is a page of, if any.
    pub fn arena(&self) -> Option<&Arc<PageArena>> {
        match &self.origin {
            Origin::Arena(a) => Some(a),
            _ => None,
        }
    }
}

/// Anonymous zeroed memory of `cap` bytes starting on a 2 MiB boundary, with huge pages asked
/// for; None if the kernel refuses the mapping (the caller falls back to the heap). The pages
/// are zeroed by the kernel when first touched.
#[cfg(target_os = "linux")]
fn huge_map(cap: usize) -> Option<NonNull<u8>> {
    let span = cap.checked_add(HUGE_MIN)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = round_up(start, HUGE_MIN);
    let (head, tail) = (aligned - start, span - (aligned - start) - cap);
    // SAFETY: both ranges lie inside the mapping made above and outside [aligned, aligned+cap),
    // and nothing refers to them. A failure only leaves them mapped (a leak, never unsound).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + cap) as *mut libc::c_void, tail);
        }
        // Advice only: without huge pages the buffer still works, on 4 KiB pages.
        libc::madvise(aligned as *mut libc::c_void, cap, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8)
}

#[cfg(not(target_os = "linux"))]
fn huge_map(_cap: usize) -> Option<NonNull<u8>> {
    None
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Heap => {}
            Origin::Huge => {
                // SAFETY: mapped by `huge_map` with exactly this start and length; owned by us.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
                return;
            }
            Origin::Arena(a) => {
                a.give_back(self.ptr);
                return;
            }
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("layout was valid at allocation");
        // SAFETY: allocated with this exact layout in `zeroed`.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

/// A fixed set of single pages in one mapping that stays put, and mapped, for as long as any
/// of its pages or any holder of the arena lives: what io_uring's registered buffers need. The
/// io_uring device registers its arena with the kernel once (the kernel pins its pages then),
/// and a read into one of its pages skips pinning the page for every I/O (`READ_FIXED`).
///
/// Pages are handed out as [`AlignedBuf`]s that go back to the arena when dropped; a
/// [`BufPool`] may keep and reuse them like any other page buffer meanwhile.
pub struct PageArena {
    base: NonNull<u8>,
    pages: usize,
    /// Mapped by [`huge_map`] rather than taken from the heap.
    huge: bool,
    /// Indexes of the pages nobody holds.
    free: Mutex<Vec<u32>>,
}

// SAFETY: the arena's memory is only ever touched through the page buffers it hands out, each
// owned by one holder; the free list is behind a mutex.
unsafe impl Send for PageArena {}
// SAFETY: as above.
unsafe impl Sync for PageArena {}

impl PageArena {
    /// An arena of `pages` zeroed pages (at most `u32::MAX`), on huge pages when it is large
    /// enough for one.
    pub fn new(pages: usize) -> Arc<Self> {
        let pages = pages.clamp(1, u32::MAX as usize);
        let bytes = pages * ALIGN;
        let (base, huge) = match (bytes >= HUGE_MIN).then(|| huge_map(bytes)).flatten() {
            Some(p) => (p, true),
            None => {
                let layout = Layout::from_size_align(bytes, ALIGN).expect("aligned layout");
                // SAFETY: layout has non-zero size.
                let raw = unsafe { alloc_zeroed(layout) };
                (NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout)), false)
            }
        };
        // Handed out from the end of the list: the lowest pages first.
        let free = (0..pages as u32).rev().collect();
        Arc::new(PageArena { base, pages, huge, free: Mutex::new(free) })
    }

    /// A page of the arena with `len` (at most one page) valid bytes of unspecified, initialised
    /// content; `None` when every page is held.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<AlignedBuf> {
        assert!(len <= ALIGN, "PageArena::take({len}): more than one page");
        let idx = self.free.lock().unwrap_or_else(PoisonError::into_inner).pop()?;
        // SAFETY: idx < pages, so the page lies inside the arena's memory.
        let ptr = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(idx as usize * ALIGN)) };
        Some(AlignedBuf { ptr, len, cap: ALIGN, origin: Origin::Arena(Arc::clone(self)) })
    }

    fn give_back(&self, page: NonNull<u8>) {
        let idx = (page.as_ptr() as usize - self.base.as_ptr() as usize) / ALIGN;
        self.free.lock().unwrap_or_else(PoisonError::into_inner).push(idx as u32);
    }

    /// The arena's memory: its start and length in bytes (what the device registers).
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.pages * ALIGN)
    }

    /// Pages nobody holds.
    pub fn free_pages(&self) -> usize {
        self.free.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for PageArena {
    fn drop(&mut self) {
        // Every page buffer holds the arena: none is left when this runs.
        let bytes = self.pages * ALIGN;
        if self.huge {
            // SAFETY: mapped by `huge_map` with exactly this start and length; owned by us.
            unsafe { libc::munmap(self.base.as_ptr().cast(), bytes) };
        } else {
            let layout = Layout::from_size_align(bytes, ALIGN).expect("layout was valid at allocation");
            // SAFETY: allocated with this exact layout in `new`.
            unsafe { dealloc(self.base.as_ptr(), layout) }
        }
    }
}

impl std::fmt::Debug for PageArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageArena").field("pages", &self.pages).field("free", &self.free_pages()).finish()
    }
}

/// Single-page buffers each thread keeps for itself, on top of any pool: a 4 KiB read takes and
/// gives back one per I/O, and at tens of thousands of reads per second the shared pool's mutex,
/// bounced between cores, was a visible part of a random read's CPU. At most
/// `THREAD_PAGES` pages (128 KiB) per thread, shared by every pool of the process (a page
/// buffer is the same whichever pool it came from); what does not fit goes to the pool.
const THREAD_PAGES: usize = 32;

thread_local! {
    static PAGES: std::cell::RefCell<Vec<AlignedBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A bounded pool of reusable [`AlignedBuf`]s, one free list per capacity (a multiple of
/// [`ALIGN`]). Taking a pooled buffer costs no allocation, page faults or zeroing: what a
/// fresh multi-MiB buffer costs (an mmap, a fault and a kernel clear per page, a memset, an
/// munmap on drop).
///
/// A buffer from [`BufPool::take`] is initialised memory (every pool buffer was zeroed when it
/// was first allocated) but holds **unspecified bytes**, typically those of its previous user:
/// the caller must overwrite every byte it will expose or write to a device. A buffer is owned
/// by exactly one holder at a time (it moves by value), so the pool can never hand out a buffer
/// that is still in use: one only comes back through [`BufPool::give`], by its owner.
pub struct BufPool {
    inner: Mutex<PoolInner>,
    max_bytes: usize,
}

struct PoolInner {
    /// By capacity; few distinct keys, looked up on every take and give.
    free: HashMap<usize, Vec<AlignedBuf>, BuildHasherDefault<IntHasher>>,
    bytes: usize,
}

impl BufPool {
    /// A pool that keeps at most `max_bytes` of idle buffers (capacity counted).
    pub fn new(max_bytes: usize) -> Self {
        BufPool { inner: Mutex::new(PoolInner { free: HashMap::default(), bytes: 0 }), max_bytes }
    }

    /// A buffer of `len` valid bytes with unspecified (but initialised) contents: a pooled one
    /// of capacity `round_up(len, ALIGN)` if any is idle, else a fresh zeroed one.
    pub fn take(&self, len: usize) -> AlignedBuf {
        let cap = round_up(len.max(1), ALIGN);
        if cap == ALIGN
            && let Some(mut b) = PAGES.try_with(|p| p.borrow_mut().pop()).ok().flatten()
        {
            b.set_len(len);
            return b;
        }
        let pooled = {
            let mut p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            let b = p.free.get_mut(&cap).and_then(Vec::pop);
            if b.is_some() {
                p.bytes -= cap;
            }
            b
        };
        match pooled {
            Some(mut b) => {
                b.set_len(len);
                b
            }
            None => AlignedBuf::zeroed(len),
        }
    }

    /// Return a buffer for reuse (a single page goes to the calling thread's stash first); it is
    /// freed instead if the pool is full.
    pub fn give(&self, buf: AlignedBuf) {
        let cap = buf.capacity();
        let mut slot = Some(buf);
        if cap == ALIGN {
            // Fails only while the thread exits (its stash is gone): the shared pool takes it.
            let _ = PAGES.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < THREAD_PAGES {
                    p.extend(slot.take());
                }
            });
        }
        let Some(buf) = slot else { return };
        self.give_shared(buf)
    }

    fn give_shared(&self, buf: AlignedBuf) {
        let cap = buf.capacity();
        let mut p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if p.bytes + cap <= self.max_bytes {
            p.bytes += cap;
            p.free.entry(cap).or_default().push(buf);
        } else {
            drop(p);
            drop(buf);
        }
    }

    /// Bytes of idle buffers held.
    pub fn idle_bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).bytes
    }
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool").field("idle_bytes", &self.idle_bytes()).field("max_bytes", &self.max_bytes).finish()
    }
}

pub fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20, HUGE_MIN, (4 << 20) + 8192] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.capacity() % ALIGN, 0);
            assert!(b.capacity() >= len);
            assert!(b.iter().all(|&x| x == 0));
        }
        let b = AlignedBuf::from_slice(b"hello");
        assert_eq!(&b[..], b"hello");
    }

    /// Large buffers are mapped on a huge-page boundary, writable to their last byte, and
    /// unmapped on drop without complaint, many times over.
    #[test]
    fn large_buffers_are_huge_page_aligned_and_writable() {
        for _ in 0..64 {
            let mut b = AlignedBuf::zeroed((4 << 20) + 8192);
            if cfg!(target_os = "linux") {
                assert_eq!(b.as_ptr() as usize % HUGE_MIN, 0);
            }
            assert!(b.iter().all(|&x| x == 0));
            let n = b.len();
            b[n - 1] = 7;
            b[0] = 9;
            assert_eq!((b[0], b[n - 1]), (9, 7));
        }
    }

    /// An arena hands out distinct pages of its region until every one is held, takes them back
    /// on drop, and its memory lives as long as any page does.
    #[test]
    fn arena_pages_are_distinct_come_back_on_drop_and_keep_the_arena_alive() {
        for pages in [4, HUGE_MIN / ALIGN] {
            let arena = PageArena::new(pages);
            let (base, len) = arena.region();
            let mut held: Vec<AlignedBuf> = (0..pages).map(|_| arena.take(ALIGN).expect("a free page")).collect();
            assert!(arena.take(100).is_none(), "every page is held");
            let mut starts: Vec<usize> = held.iter().map(|b| b.as_ptr() as usize).collect();
            starts.sort_unstable();
            starts.dedup();
            assert_eq!(starts.len(), pages, "pages are distinct");
            for (i, b) in held.iter_mut().enumerate() {
                let p = b.as_ptr() as usize;
                assert!(p.is_multiple_of(ALIGN) && p >= base as usize && p + ALIGN <= base as usize + len);
                assert!(Arc::ptr_eq(b.arena().expect("an arena page"), &arena));
                b.fill(i as u8);
            }
            for (i, b) in held.iter().enumerate() {
                assert!(b.iter().all(|&x| x == i as u8), "page {i} was written by another holder");
            }
            let back = held.pop().unwrap();
            let at = back.as_ptr();
            drop(back);
            assert_eq!(arena.free_pages(), 1);
            let again = arena.take(7).expect("the page came back");
            assert_eq!((again.as_ptr(), again.len(), again.capacity()), (at, 7, ALIGN));
            held.push(again);
            // The last handle goes; the pages still work, and the memory goes with the last one.
            let weak = Arc::downgrade(&arena);
            drop(arena);
            for b in held.iter_mut() {
                b.fill(0xa5);
            }
            assert!(held.iter().all(|b| b.iter().all(|&x| x == 0xa5)));
            drop(held);
            assert!(weak.upgrade().is_none(), "the arena is freed with its last page");
        }
        assert!(AlignedBuf::zeroed(ALIGN).arena().is_none());
    }

    #[test]
    fn pool_reuses_by_capacity_and_is_bounded() {
        // Multi-page classes: single pages go to the thread's stash first (tested below).
        let (two, three) = (2 * ALIGN, 3 * ALIGN);
        let pool = BufPool::new(5 * ALIGN);
        let a = pool.take(ALIGN + 100);
        assert_eq!((a.len(), a.capacity()), (ALIGN + 100, two));
        assert!(a.iter().all(|&x| x == 0), "a fresh buffer is zeroed");
        let pa = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.idle_bytes(), two);
        // Same capacity class: the same allocation comes back, with the asked length.
        let b = pool.take(two);
        assert_eq!((b.as_ptr(), b.len()), (pa, two));
        assert_eq!(pool.idle_bytes(), 0);
        // Another class does not take it.
        pool.give(b);
        let c = pool.take(three);
        assert_ne!(c.as_ptr(), pa);
        assert_eq!(c.capacity(), three);
        // Bounded: 2 + 3 pages fit, two more do not.
        pool.give(c);
        assert_eq!(pool.idle_bytes(), 5 * ALIGN);
        pool.give(AlignedBuf::zeroed(two));
        assert_eq!(pool.idle_bytes(), 5 * ALIGN);
    }

    #[test]
    fn single_pages_come_back_on_the_same_thread_and_overflow_to_the_pool() {
        let pool = BufPool::new(64 * ALIGN);
        std::thread::scope(|s| {
            // Joined before the second thread starts: each checks `idle_bytes` exactly.
            s.spawn(|| {
                let a = pool.take(100);
                assert_eq!((a.len(), a.capacity()), (100, ALIGN));
                let pa = a.as_ptr();
                pool.give(a);
                assert_eq!(pool.idle_bytes(), 0, "a page stays with its thread");
                let b = pool.take(ALIGN);
                assert_eq!((b.as_ptr(), b.len()), (pa, ALIGN));
                pool.give(b);
                // The stash holds THREAD_PAGES; the rest go to the shared pool.
                let held: Vec<AlignedBuf> = (0..THREAD_PAGES + 3).map(|_| pool.take(ALIGN)).collect();
                held.into_iter().for_each(|b| pool.give(b));
                assert_eq!(pool.idle_bytes(), 3 * ALIGN);
            })
            .join()
            .unwrap();
            // Another thread finds the overflow in the pool.
            s.spawn(|| {
                let held: Vec<AlignedBuf> = (0..3).map(|_| pool.take(ALIGN)).collect();
                assert_eq!(pool.idle_bytes(), 0);
                drop(held);
            });
        });
    }

    #[test]
    fn pool_never_hands_out_a_buffer_twice() {
        let pool = std::sync::Arc::new(BufPool::new(64 * ALIGN));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let pool = std::sync::Arc::clone(&pool);
                std::thread::spawn(move || {
                    for i in 0..2000u32 {
                        let mut held: Vec<AlignedBuf> = (0..3).map(|_| pool.take(ALIGN)).collect();
                        // Each holder stamps its buffers, then checks nobody else wrote them meanwhile.
                        for (k, b) in held.iter_mut().enumerate() {
                            b.fill(t.wrapping_mul(31).wrapping_add(k as u8).wrapping_add(i as u8));
                        }
                        std::thread::yield_now();
                        for (k, b) in held.iter().enumerate() {
                            let v = t.wrapping_mul(31).wrapping_add(k as u8).wrapping_add(i as u8);
                            assert!(b.iter().all(|&x| x == v), "a pooled buffer was shared");
                        }
                        held.into_iter().for_each(|b| pool.give(b));
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert!(pool.idle_bytes() <= 64 * ALIGN);
    }
}
