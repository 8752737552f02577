//! The 16-lane kernel: each MD5 step on 16 lanes at once in 512-bit registers.
//!
//! Per block, the 16 lanes' 64-byte blocks are loaded (one register each) and transposed so
//! that register `j` holds message word `j` of every lane (64 shuffles); then the 64 steps
//! run with the round function as one `vpternlogd` and the rotate as one `vprold`. The
//! critical path is ~4 instructions per step, the same as scalar MD5's, for 16 blocks.

use std::arch::x86_64::*;

use super::{LaneState, MAX_LANES, ZERO_BLOCK, md5_steps};

/// See [`super::Kernel::compress`].
///
/// # Safety
/// AVX-512F is available; for every lane `i` in `mask`, `ptrs[i]` is valid for reads of
/// `blocks * 64` bytes.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn compress16(state: &mut LaneState, ptrs: &[*const u8; MAX_LANES], mask: u16, blocks: usize) {
    // Lanes outside the mask read the zero block again and again: a step of 0 for them.
    let mut p = [ZERO_BLOCK.as_ptr(); MAX_LANES];
    let mut stride = [0usize; MAX_LANES];
    for i in (0..MAX_LANES).filter(|i| mask & (1 << i) != 0) {
        p[i] = ptrs[i];
        stride[i] = 64;
    }
    // SAFETY: LaneState is 64-byte aligned, each row 64 bytes.
    let (mut a, mut b, mut c, mut d) = unsafe {
        (
            _mm512_load_si512(state.w[0].as_ptr().cast()),
            _mm512_load_si512(state.w[1].as_ptr().cast()),
            _mm512_load_si512(state.w[2].as_ptr().cast()),
            _mm512_load_si512(state.w[3].as_ptr().cast()),
        )
    };
    for _ in 0..blocks {
        // SAFETY: each p[i] is readable for the 64 bytes of this block (the caller's contract,
        // or the zero block).
        // (Plain loops, not `array::from_fn`: a closure's call from a generic function without
        // the target feature would not be inlined.)
        let mut rows = [_mm512_setzero_si512(); 16];
        for i in 0..MAX_LANES {
            rows[i] = unsafe { _mm512_loadu_si512(p[i].cast()) };
        }
        let m = transpose(rows);
        let (a0, b0, c0, d0) = (a, b, c, d);
        md5_steps!(step, a, b, c, d, m);
        a = _mm512_add_epi32(a, a0);
        b = _mm512_add_epi32(b, b0);
        c = _mm512_add_epi32(c, c0);
        d = _mm512_add_epi32(d, d0);
        for i in 0..MAX_LANES {
            p[i] = p[i].wrapping_add(stride[i]);
        }
    }
    for (row, v) in state.w.iter_mut().zip([a, b, c, d]) {
        // SAFETY: 64 writable bytes, aligned; only the lanes of `mask` are written.
        unsafe { _mm512_mask_storeu_epi32(row.as_mut_ptr().cast(), mask, v) };
    }
}

/// `a = b + ((a + f(b, c, d) + m[g] + k) <<< s)`, with f's truth table as the `vpternlogd`
/// immediate (bit `4b + 2c + d`): F = 0xca, G = 0xe4, H = 0x96, I = 0x39.
macro_rules! step {
    (F, $($t:tt)*) => { step!(@ 0xca, $($t)*) };
    (G, $($t:tt)*) => { step!(@ 0xe4, $($t)*) };
    (H, $($t:tt)*) => { step!(@ 0x96, $($t)*) };
    (I, $($t:tt)*) => { step!(@ 0x39, $($t)*) };
    (@ $f:literal, $a:ident, $b:ident, $c:ident, $d:ident, $m:ident, $g:literal, $k:literal, $s:literal) => {
        let t = _mm512_add_epi32($m[$g], _mm512_set1_epi32($k as u32 as i32));
        let t = _mm512_add_epi32(t, $a);
        let t = _mm512_add_epi32(t, _mm512_ternarylogic_epi32::<$f>($b, $c, $d));
        $a = _mm512_add_epi32(_mm512_rol_epi32::<$s>(t), $b);
    };
}
use step;

/// 16 rows of 16 u32 (lane `i`'s block in row `i`) to 16 columns (word `j` of every lane in
/// register `j`): interleave 32-bit, then 64-bit elements, then 128-bit quarters twice.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let o = 4 * i;
        u[o] = _mm512_unpacklo_epi64(t[o], t[o + 2]);
        u[o + 1] = _mm512_unpackhi_epi64(t[o], t[o + 2]);
        u[o + 2] = _mm512_unpacklo_epi64(t[o + 1], t[o + 3]);
        u[o + 3] = _mm512_unpackhi_epi64(t[o + 1], t[o + 3]);
    }
    for h in 0..2 {
        let o = 8 * h;
        for j in 0..4 {
            t[o + j] = _mm512_shuffle_i32x4::<0x88>(u[o + j], u[o + j + 4]);
            t[o + j + 4] = _mm512_shuffle_i32x4::<0xdd>(u[o + j], u[o + j + 4]);
        }
    }
    for j in 0..8 {
        u[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[j + 8]);
        u[j + 8] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[j + 8]);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_is_a_transpose() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let rows: [[u32; 16]; 16] = std::array::from_fn(|i| std::array::from_fn(|j| (i * 100 + j) as u32));
        // SAFETY: AVX-512F checked above; loads and stores of 64-byte arrays.
        let cols = unsafe {
            let t = transpose(rows.map(|r| _mm512_loadu_si512(r.as_ptr().cast())));
            t.map(|v| {
                let mut out = [0u32; 16];
                _mm512_storeu_si512(out.as_mut_ptr().cast(), v);
                out
            })
        };
        for (j, col) in cols.iter().enumerate() {
            assert_eq!(*col, std::array::from_fn(|i| (i * 100 + j) as u32), "column {j}");
        }
    }
}
