//! Multi-buffer MD5: the MD5 of many independent streams at once, one stream per lane of a
//! vector register (16 lanes with AVX-512F, 8 with AVX2), for S3 ETags.
//!
//! MD5 of one stream is a chain of dependent 64-byte block compressions and cannot be split,
//! but the same instruction stream over 16 streams' blocks costs about what one stream's
//! costs: with AVX-512 every MD5 step is a `vpternlogd` (the round function), three adds, a
//! `vprold` and an add, on 16 lanes. On the S3 PUT path at 32 clients MD5 was ~43 % of the
//! server's CPU on 2 cores; hashing the bodies in lanes makes it a few percent.
//!
//! - [`Md5State`]: an incremental scalar MD5 (the `md-5` crate's block function) whose state
//!   can move between the receive loop, the lanes and back; it also hashes a stream's partial
//!   blocks and its final padding.
//! - [`Md5Lanes`] / [`Md5Stream`] (`service.rs`): a hashing service, one thread owning the
//!   lanes; a body submits its chunks (`Bytes`, shared, not copied) with back-pressure.
//! - `avx512.rs`, `avx2.rs`: the lane kernels (`core::arch` intrinsics, chosen at run time).
//!
//! It does not decide when a body is worth offloading (`digest.rs` does), and is not a
//! general-purpose hash library: only what the S3 front end needs.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod service;
#[cfg(test)]
mod tests;

pub use service::{Md5Lanes, Md5Stream, Stopped};

/// Lanes of the widest kernel; the lane state arrays are this wide whatever the kernel.
pub const MAX_LANES: usize = 16;

/// MD5's initial state (RFC 1321).
const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// An incremental MD5: chaining value, bytes hashed, and the partial block not yet
/// compressed.
#[derive(Clone)]
pub struct Md5State {
    h: [u32; 4],
    /// Bytes passed in so far (including those in `buf`).
    len: u64,
    buf: [u8; 64],
    buf_len: usize,
}

impl Default for Md5State {
    fn default() -> Self {
        Md5State { h: INIT, len: 0, buf: [0; 64], buf_len: 0 }
    }
}

impl std::fmt::Debug for Md5State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Md5State").field("len", &self.len).finish_non_exhaustive()
    }
}

impl Md5State {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buf_len > 0 {
            data = self.fill_buf(data);
            if self.buf_len < 64 {
                return;
            }
            md5::block_api::compress(&mut self.h, &[self.buf]);
            self.buf_len = 0;
        }
        let (blocks, tail) = data.as_chunks::<64>();
        md5::block_api::compress(&mut self.h, blocks);
        self.buf[..tail.len()].copy_from_slice(tail);
        self.buf_len = tail.len();
    }

    /// Copy as much of `data` as fits into the partial block; the rest of `data`. `len` is
    /// the caller's to count.
    fn fill_buf<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let take = data.len().min(64 - self.buf_len);
        self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
        self.buf_len += take;
        &data[take..]
    }

    /// The digest: pad (0x80, zeros, the bit length little-endian) and compress the last
    /// one or two blocks.
    pub fn finalize(mut self) -> [u8; 16] {
        let bits = self.len.wrapping_mul(8);
        let mut last = [[0u8; 64]; 2];
        last[0][..self.buf_len].copy_from_slice(&self.buf[..self.buf_len]);
        last[0][self.buf_len] = 0x80;
        let n = if self.buf_len < 56 { 1 } else { 2 };
        last[n - 1][56..].copy_from_slice(&bits.to_le_bytes());
        md5::block_api::compress(&mut self.h, &last[..n]);
        let mut out = [0u8; 16];
        for (o, w) in out.chunks_exact_mut(4).zip(self.h) {
            o.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// The chaining values of the lanes, one array per MD5 word ("structure of arrays"), so a
/// kernel loads each word of all lanes with one vector load.
#[repr(C, align(64))]
#[derive(Clone, Default)]
pub struct LaneState {
    pub(crate) w: [[u32; MAX_LANES]; 4],
}

impl LaneState {
    fn get(&self, lane: usize) -> [u32; 4] {
        [self.w[0][lane], self.w[1][lane], self.w[2][lane], self.w[3][lane]]
    }

    fn set(&mut self, lane: usize, h: [u32; 4]) {
        for (w, v) in self.w.iter_mut().zip(h) {
            w[lane] = v;
        }
    }
}

/// Which block function hashes the lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The `md-5` crate's block function lane after lane: the reference, and what runs where
    /// there is no vector kernel (the service is then not used for bodies, see `digest.rs`).
    Scalar,
    /// 8 lanes in 256-bit registers.
    Avx2,
    /// 16 lanes in 512-bit registers, round functions as `vpternlogd`, rotates as `vprold`.
    Avx512,
}

impl Kernel {
    /// The widest kernel this CPU runs.
    pub fn detect() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2].into_iter().find(|k| k.available()).unwrap_or(Kernel::Scalar)
    }

    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn lanes(self) -> usize {
        match self {
            Kernel::Avx2 => 8,
            Kernel::Scalar | Kernel::Avx512 => MAX_LANES,
        }
    }

    /// Compress `blocks` consecutive 64-byte blocks in every lane of `mask`; the state of the
    /// other lanes is left as it was and their pointers are not read.
    ///
    /// # Safety
    /// For every lane `i` in `mask`, `ptrs[i]` is valid for reads of `blocks * 64` bytes;
    /// `mask` names only lanes below [`Kernel::lanes`]; the kernel is [`Kernel::available`].
    pub unsafe fn compress(self, state: &mut LaneState, ptrs: &[*const u8; MAX_LANES], mask: u16, blocks: usize) {
        debug_assert!(self.available() && (mask as u32) >> self.lanes() == 0);
        match self {
            Kernel::Scalar => {
                for lane in (0..MAX_LANES).filter(|i| mask & (1 << i) != 0) {
                    // SAFETY: the caller's contract: blocks * 64 readable bytes at ptrs[lane].
                    let data = unsafe { std::slice::from_raw_parts(ptrs[lane], blocks * 64) };
                    let mut h = state.get(lane);
                    md5::block_api::compress(&mut h, data.as_chunks::<64>().0);
                    state.set(lane, h);
                }
            }
            // SAFETY (both): the caller's contract, and `available` checked the CPU feature.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::compress8(state, ptrs, mask as u8, blocks) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::compress16(state, ptrs, mask, blocks) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("vector kernels exist only on x86_64 and `available` said no"),
        }
    }
}

/// A 64-byte block of zeros: what a kernel reads for a lane outside its mask.
static ZERO_BLOCK: [u8; 64] = [0; 64];

/// The 64 steps of MD5 on the lane words `a b c d` and the message words `m`, as calls of a
/// kernel's `step!(round, a, b, c, d, m, message index, constant, rotation)`, which sets
/// `a = b + ((a + round(b, c, d) + m[index] + constant) <<< rotation)` (RFC 1321, 3.4).
macro_rules! md5_steps {
    ($step:ident, $a:ident, $b:ident, $c:ident, $d:ident, $m:ident) => {
        $step!(F, $a, $b, $c, $d, $m, 0, 0xd76aa478, 7);
        $step!(F, $d, $a, $b, $c, $m, 1, 0xe8c7b756, 12);
        $step!(F, $c, $d, $a, $b, $m, 2, 0x242070db, 17);
        $step!(F, $b, $c, $d, $a, $m, 3, 0xc1bdceee, 22);
        $step!(F, $a, $b, $c, $d, $m, 4, 0xf57c0faf, 7);
        $step!(F, $d, $a, $b, $c, $m, 5, 0x4787c62a, 12);
        $step!(F, $c, $d, $a, $b, $m, 6, 0xa8304613, 17);
        $step!(F, $b, $c, $d, $a, $m, 7, 0xfd469501, 22);
        $step!(F, $a, $b, $c, $d, $m, 8, 0x698098d8, 7);
        $step!(F, $d, $a, $b, $c, $m, 9, 0x8b44f7af, 12);
        $step!(F, $c, $d, $a, $b, $m, 10, 0xffff5bb1, 17);
        $step!(F, $b, $c, $d, $a, $m, 11, 0x895cd7be, 22);
        $step!(F, $a, $b, $c, $d, $m, 12, 0x6b901122, 7);
        $step!(F, $d, $a, $b, $c, $m, 13, 0xfd987193, 12);
        $step!(F, $c, $d, $a, $b, $m, 14, 0xa679438e, 17);
        $step!(F, $b, $c, $d, $a, $m, 15, 0x49b40821, 22);
        $step!(G, $a, $b, $c, $d, $m, 1, 0xf61e2562, 5);
        $step!(G, $d, $a, $b, $c, $m, 6, 0xc040b340, 9);
        $step!(G, $c, $d, $a, $b, $m, 11, 0x265e5a51, 14);
        $step!(G, $b, $c, $d, $a, $m, 0, 0xe9b6c7aa, 20);
        $step!(G, $a, $b, $c, $d, $m, 5, 0xd62f105d, 5);
        $step!(G, $d, $a, $b, $c, $m, 10, 0x02441453, 9);
        $step!(G, $c, $d, $a, $b, $m, 15, 0xd8a1e681, 14);
        $step!(G, $b, $c, $d, $a, $m, 4, 0xe7d3fbc8, 20);
        $step!(G, $a, $b, $c, $d, $m, 9, 0x21e1cde6, 5);
        $step!(G, $d, $a, $b, $c, $m, 14, 0xc33707d6, 9);
        $step!(G, $c, $d, $a, $b, $m, 3, 0xf4d50d87, 14);
        $step!(G, $b, $c, $d, $a, $m, 8, 0x455a14ed, 20);
        $step!(G, $a, $b, $c, $d, $m, 13, 0xa9e3e905, 5);
        $step!(G, $d, $a, $b, $c, $m, 2, 0xfcefa3f8, 9);
        $step!(G, $c, $d, $a, $b, $m, 7, 0x676f02d9, 14);
        $step!(G, $b, $c, $d, $a, $m, 12, 0x8d2a4c8a, 20);
        $step!(H, $a, $b, $c, $d, $m, 5, 0xfffa3942, 4);
        $step!(H, $d, $a, $b, $c, $m, 8, 0x8771f681, 11);
        $step!(H, $c, $d, $a, $b, $m, 11, 0x6d9d6122, 16);
        $step!(H, $b, $c, $d, $a, $m, 14, 0xfde5380c, 23);
        $step!(H, $a, $b, $c, $d, $m, 1, 0xa4beea44, 4);
        $step!(H, $d, $a, $b, $c, $m, 4, 0x4bdecfa9, 11);
        $step!(H, $c, $d, $a, $b, $m, 7, 0xf6bb4b60, 16);
        $step!(H, $b, $c, $d, $a, $m, 10, 0xbebfbc70, 23);
        $step!(H, $a, $b, $c, $d, $m, 13, 0x289b7ec6, 4);
        $step!(H, $d, $a, $b, $c, $m, 0, 0xeaa127fa, 11);
        $step!(H, $c, $d, $a, $b, $m, 3, 0xd4ef3085, 16);
        $step!(H, $b, $c, $d, $a, $m, 6, 0x04881d05, 23);
        $step!(H, $a, $b, $c, $d, $m, 9, 0xd9d4d039, 4);
        $step!(H, $d, $a, $b, $c, $m, 12, 0xe6db99e5, 11);
        $step!(H, $c, $d, $a, $b, $m, 15, 0x1fa27cf8, 16);
        $step!(H, $b, $c, $d, $a, $m, 2, 0xc4ac5665, 23);
        $step!(I, $a, $b, $c, $d, $m, 0, 0xf4292244, 6);
        $step!(I, $d, $a, $b, $c, $m, 7, 0x432aff97, 10);
        $step!(I, $c, $d, $a, $b, $m, 14, 0xab9423a7, 15);
        $step!(I, $b, $c, $d, $a, $m, 5, 0xfc93a039, 21);
        $step!(I, $a, $b, $c, $d, $m, 12, 0x655b59c3, 6);
        $step!(I, $d, $a, $b, $c, $m, 3, 0x8f0ccc92, 10);
        $step!(I, $c, $d, $a, $b, $m, 10, 0xffeff47d, 15);
        $step!(I, $b, $c, $d, $a, $m, 1, 0x85845dd1, 21);
        $step!(I, $a, $b, $c, $d, $m, 8, 0x6fa87e4f, 6);
        $step!(I, $d, $a, $b, $c, $m, 15, 0xfe2ce6e0, 10);
        $step!(I, $c, $d, $a, $b, $m, 6, 0xa3014314, 15);
        $step!(I, $b, $c, $d, $a, $m, 13, 0x4e0811a1, 21);
        $step!(I, $a, $b, $c, $d, $m, 4, 0xf7537e82, 6);
        $step!(I, $d, $a, $b, $c, $m, 11, 0xbd3af235, 10);
        $step!(I, $c, $d, $a, $b, $m, 2, 0x2ad7d2bb, 15);
        $step!(I, $b, $c, $d, $a, $m, 9, 0xeb86d391, 21);
    };
}
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
use md5_steps;
