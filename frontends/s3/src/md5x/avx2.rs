//! The 8-lane kernel for CPUs with AVX2 but not AVX-512F: the same steps in 256-bit
//! registers, with the round functions and rotates spelled out (no `vpternlogd`/`vprold`).

use std::arch::x86_64::*;

use super::{LaneState, MAX_LANES, ZERO_BLOCK, md5_steps};

/// See [`super::Kernel::compress`]; lanes 0..8 only.
///
/// # Safety
/// AVX2 is available; for every lane `i` in `mask`, `ptrs[i]` is valid for reads of
/// `blocks * 64` bytes.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn compress8(state: &mut LaneState, ptrs: &[*const u8; MAX_LANES], mask: u8, blocks: usize) {
    let mut p = [ZERO_BLOCK.as_ptr(); 8];
    let mut stride = [0usize; 8];
    for i in (0..8).filter(|i| mask & (1 << i) != 0) {
        p[i] = ptrs[i];
        stride[i] = 64;
    }
    // SAFETY: each row is 64 bytes, 64-byte aligned; lanes 0..8 are its first 32 bytes.
    let (mut a, mut b, mut c, mut d) = unsafe {
        (
            _mm256_load_si256(state.w[0].as_ptr().cast()),
            _mm256_load_si256(state.w[1].as_ptr().cast()),
            _mm256_load_si256(state.w[2].as_ptr().cast()),
            _mm256_load_si256(state.w[3].as_ptr().cast()),
        )
    };
    let ones = _mm256_set1_epi32(-1);
    for _ in 0..blocks {
        // SAFETY: each p[i] is readable for the 64 bytes of this block.
        // (Plain loops, not `array::from_fn`: a closure's call from a generic function without
        // the target feature would not be inlined.)
        let (mut lo, mut hi) = ([_mm256_setzero_si256(); 8], [_mm256_setzero_si256(); 8]);
        for i in 0..8 {
            lo[i] = unsafe { _mm256_loadu_si256(p[i].cast()) };
            hi[i] = unsafe { _mm256_loadu_si256(p[i].wrapping_add(32).cast()) };
        }
        let (lo, hi) = (transpose(lo), transpose(hi));
        let mut m = [_mm256_setzero_si256(); 16];
        m[..8].copy_from_slice(&lo);
        m[8..].copy_from_slice(&hi);
        let (a0, b0, c0, d0) = (a, b, c, d);
        macro_rules! step {
            (F, $a:ident, $b:ident, $c:ident, $d:ident, $m:ident, $g:literal, $k:literal, $s:literal) => {
                // d ^ (b & (c ^ d))
                let f = _mm256_xor_si256($d, _mm256_and_si256($b, _mm256_xor_si256($c, $d)));
                step!(@ f, $a, $b, $m, $g, $k, $s)
            };
            (G, $a:ident, $b:ident, $c:ident, $d:ident, $m:ident, $g:literal, $k:literal, $s:literal) => {
                // c ^ (d & (b ^ c))
                let f = _mm256_xor_si256($c, _mm256_and_si256($d, _mm256_xor_si256($b, $c)));
                step!(@ f, $a, $b, $m, $g, $k, $s)
            };
            (H, $a:ident, $b:ident, $c:ident, $d:ident, $m:ident, $g:literal, $k:literal, $s:literal) => {
                let f = _mm256_xor_si256(_mm256_xor_si256($b, $c), $d);
                step!(@ f, $a, $b, $m, $g, $k, $s)
            };
            (I, $a:ident, $b:ident, $c:ident, $d:ident, $m:ident, $g:literal, $k:literal, $s:literal) => {
                // c ^ (b | !d)
                let f = _mm256_xor_si256($c, _mm256_or_si256($b, _mm256_xor_si256($d, ones)));
                step!(@ f, $a, $b, $m, $g, $k, $s)
            };
            (@ $f:ident, $a:ident, $b:ident, $m:ident, $g:literal, $k:literal, $s:literal) => {
                let t = _mm256_add_epi32($m[$g], _mm256_set1_epi32($k as u32 as i32));
                let t = _mm256_add_epi32(_mm256_add_epi32(t, $a), $f);
                let t = _mm256_or_si256(_mm256_slli_epi32::<$s>(t), _mm256_srli_epi32::<{ 32 - $s }>(t));
                $a = _mm256_add_epi32(t, $b);
            };
        }
        md5_steps!(step, a, b, c, d, m);
        a = _mm256_add_epi32(a, a0);
        b = _mm256_add_epi32(b, b0);
        c = _mm256_add_epi32(c, c0);
        d = _mm256_add_epi32(d, d0);
        for i in 0..8 {
            p[i] = p[i].wrapping_add(stride[i]);
        }
    }
    let keep = _mm256_setr_epi32(
        (mask & 1) as i32,
        (mask >> 1 & 1) as i32,
        (mask >> 2 & 1) as i32,
        (mask >> 3 & 1) as i32,
        (mask >> 4 & 1) as i32,
        (mask >> 5 & 1) as i32,
        (mask >> 6 & 1) as i32,
        (mask >> 7 & 1) as i32,
    );
    let keep = _mm256_sub_epi32(_mm256_setzero_si256(), keep); // 1 -> all ones
    for (row, v) in state.w.iter_mut().zip([a, b, c, d]) {
        // SAFETY: the first 32 bytes of a 64-byte row; only the lanes of `mask` are written.
        unsafe { _mm256_maskstore_epi32(row.as_mut_ptr().cast(), keep, v) };
    }
}

/// 8 rows of 8 u32 to 8 columns: interleave 32-bit, then 64-bit elements, then halves.
#[target_feature(enable = "avx2")]
#[inline]
fn transpose(r: [__m256i; 8]) -> [__m256i; 8] {
    let t = [
        _mm256_unpacklo_epi32(r[0], r[1]),
        _mm256_unpackhi_epi32(r[0], r[1]),
        _mm256_unpacklo_epi32(r[2], r[3]),
        _mm256_unpackhi_epi32(r[2], r[3]),
        _mm256_unpacklo_epi32(r[4], r[5]),
        _mm256_unpackhi_epi32(r[4], r[5]),
        _mm256_unpacklo_epi32(r[6], r[7]),
        _mm256_unpackhi_epi32(r[6], r[7]),
    ];
    let s = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    [
        _mm256_permute2x128_si256::<0x20>(s[0], s[4]),
        _mm256_permute2x128_si256::<0x20>(s[1], s[5]),
        _mm256_permute2x128_si256::<0x20>(s[2], s[6]),
        _mm256_permute2x128_si256::<0x20>(s[3], s[7]),
        _mm256_permute2x128_si256::<0x31>(s[0], s[4]),
        _mm256_permute2x128_si256::<0x31>(s[1], s[5]),
        _mm256_permute2x128_si256::<0x31>(s[2], s[6]),
        _mm256_permute2x128_si256::<0x31>(s[3], s[7]),
    ]
}
