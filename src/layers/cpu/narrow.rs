//! Narrow products for x86-64 with AVX2 and FMA, the shapes of a fully connected layer over a
//! small batch, where the `gemm` crate copies (packs) the whole weight matrix (151 MB for fc6)
//! for every product or reads it across its rows:
//! - [`narrow_gemm`]: `c[m x n] = a[m x k] * b[k x n]` where `a`'s rows and `b`'s columns both
//!   run contiguously along `k` and `n` is small, the forward `W x^T` over a batch of `n`. Here
//!   `a` is read in place, once from memory: up to 4 columns as dot products (3 x 4 in
//!   registers, eight lanes along `k`), which runs at the memory bandwidth at batch 1; wider as
//!   6 x 16 broadcast tiles over `b` packed in 16-column panels that stay in L2, 1.2-1.3x the
//!   `gemm` crate's speed at 16 and 32 columns (`benches/NOTES.md`).
//! - [`wide_gemm`]: `c[m x n] = a[m x k] * b[k x n]` with `m` small and `b` row-major, the input
//!   gradient `g W` over a batch of `m`: 6 x 16 broadcast tiles reading `W`'s rows in place.
//!
//! Elsewhere [`super::cpu::matmul`] keeps the `gemm` crate.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of `a` per register tile.
const R: usize = 3;
/// Columns of `b` per register tile.
const C: usize = 4;
/// Widest product this module takes: from about 64 columns on, the `gemm` crate's packed
/// kernel is as fast.
pub(crate) const MAX_N: usize = 48;
/// Widest product done as dot products; wider ones go through [`panels`].
const DOT_MAX_N: usize = 4;
/// Rows of a broadcast register tile.
const MR: usize = 6;
/// Columns of a broadcast register tile, and of a packed panel of `b`.
const NR: usize = 16;
/// How far ahead (in elements) a broadcast tile prefetches the rows of `a`.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 128;
/// Bytes of `b` meant to stay in L2 while the rows of `a` stream past: sets the `k` block.
const B_BLOCK_BYTES: usize = 256 * 1024;

/// Whether this CPU runs [`narrow_gemm`] (std caches the answer).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m x n] = (c if accumulate) + a[m x k] * b[k x n]`: row `i` of `a` at `a + i * lda`,
/// column `j` of `b` at `b + j * ldb`, both contiguous along `k`; `c` row-major with row stride
/// `ldc`.
///
/// # Safety
/// [`available`] must be true; the operands must hold every element these sizes and strides
/// reach, and `c`'s elements must overlap neither operand nor be accessed by another thread
/// during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn narrow_gemm(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    (a, lda): (*const f32, usize),
    (b, ldb): (*const f32, usize),
) {
    if !accumulate {
        for i in 0..m {
            std::ptr::write_bytes(c.add(i * ldc), 0, n);
        }
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    if n > DOT_MAX_N {
        panels((m, n, k), c, ldc, (a, lda), (b, ldb));
        return;
    }
    // A block of `k` small enough that the block of all `n` columns of `b` stays in L2 while
    // every row of `a` passes; each row of `a` is then read from memory once.
    let kb = ((B_BLOCK_BYTES / 4 / n).max(256).min(k.next_multiple_of(8)) / 8 * 8).max(8);
    for p0 in (0..k).step_by(kb) {
        let len = kb.min(k - p0);
        for i0 in (0..m).step_by(R) {
            let rows = R.min(m - i0);
            let a = a.add(i0 * lda + p0);
            for j0 in (0..n).step_by(C) {
                let cols = C.min(n - j0);
                let b = b.add(j0 * ldb + p0);
                let c = c.add(i0 * ldc + j0);
                match (rows, cols) {
                    (3, 4) => tile::<3, 4>(len, a, lda, b, ldb, c, ldc),
                    (3, 3) => tile::<3, 3>(len, a, lda, b, ldb, c, ldc),
                    (3, 2) => tile::<3, 2>(len, a, lda, b, ldb, c, ldc),
                    (3, 1) => tile::<3, 1>(len, a, lda, b, ldb, c, ldc),
                    (2, 4) => tile::<2, 4>(len, a, lda, b, ldb, c, ldc),
                    (2, 3) => tile::<2, 3>(len, a, lda, b, ldb, c, ldc),
                    (2, 2) => tile::<2, 2>(len, a, lda, b, ldb, c, ldc),
                    (2, 1) => tile::<2, 1>(len, a, lda, b, ldb, c, ldc),
                    (1, 4) => tile::<1, 4>(len, a, lda, b, ldb, c, ldc),
                    (1, 3) => tile::<1, 3>(len, a, lda, b, ldb, c, ldc),
                    (1, 2) => tile::<1, 2>(len, a, lda, b, ldb, c, ldc),
                    _ => tile::<1, 1>(len, a, lda, b, ldb, c, ldc),
                }
            }
        }
    }
}

/// Most rows of a product [`wide_gemm`] takes: at 64 the `gemm` crate (which then packs `b`)
/// is as fast, and at 1 its matrix-vector kernel is faster.
pub(crate) const WIDE_MAX_SIDE: usize = 32;
/// Rows of `b` per block of [`wide_gemm`] (at most). Fewer than 256: `W`'s rows lie a multiple
/// of 4 KiB apart in AlexNet, so the block's lines share L1 sets: 128 measured 5-15% faster
/// than 256 or 512, and a contiguous copy of each block ~2x slower.
const WIDE_KB: usize = 128;
/// Floats of `b` per block of [`wide_gemm`] (16 KiB): rows x columns.
const WIDE_BLOCK: usize = 4096;

/// `c[m x n] = (c if accumulate) + a[m x k] * b[k x n]` with `b` row-major (row stride `ldb`,
/// contiguous along `n`) read in place, `a` at any strides (`a_rs`, `a_cs`), `c` row-major (row
/// stride `ldc`): for a short `m` and a long `n`, a fully connected layer's input gradient
/// `g W` (`m` = the batch).
///
/// Why not the `gemm` crate: with `m <= 32` it reads `b` unpacked down its columns, a new page
/// per step of `k` (fc6's `g W` at batch 32 ran at ~40 GFLOP/s); with more rows it packs all of
/// `b`, a copy of fc6's 151 MB weight. Here 6 x 16 register tiles broadcast `a` and load `b`'s
/// rows as they lie, in blocks of [`WIDE_KB`] rows by [`WIDE_BLOCK`] floats that the row tiles
/// after the first read from cache (fc6's input gradient at batch 32: 61 -> 33-35 ms,
/// `benches/NOTES.md`).
///
/// # Safety
/// [`available`] must be true; the operands must hold every element these sizes and strides
/// reach, and `c`'s elements must overlap neither operand nor be accessed by another thread
/// during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn wide_gemm(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, ldb): (*const f32, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * ldc), 0, n);
            }
        }
        return;
    }
    let kb = WIDE_KB.min(k);
    let nb = (WIDE_BLOCK / kb).max(NR) / NR * NR;
    for p0 in (0..k).step_by(kb) {
        let len = kb.min(k - p0);
        let store = p0 == 0 && !accumulate;
        for j_block in (0..n).step_by(nb) {
            for i0 in (0..m).step_by(MR) {
                let a = a.add(i0 * a_rs + p0 * a_cs);
                for j0 in (j_block..(j_block + nb).min(n)).step_by(NR) {
                    let cols = NR.min(n - j0);
                    let (b, c) = (b.add(p0 * ldb + j0), c.add(i0 * ldc + j0));
                    let tile = (len, (a, a_rs, a_cs), (b, ldb), (c, ldc), cols, store);
                    match MR.min(m - i0) {
                        6 => wide_tile::<6>(tile),
                        5 => wide_tile::<5>(tile),
                        4 => wide_tile::<4>(tile),
                        3 => wide_tile::<3>(tile),
                        2 => wide_tile::<2>(tile),
                        _ => wide_tile::<1>(tile),
                    }
                }
            }
        }
    }
}

/// Operands of one [`wide_tile`]: `k`, `a` with its strides, `b` with its row stride, `c` with
/// its row stride, the tile's columns (up to 16) and whether to store (else add to) `c`.
type WideTile = (
    usize,
    (*const f32, usize, usize),
    (*const f32, usize),
    (*mut f32, usize),
    usize,
    bool,
);

/// `c[RR x cols] (+)= a[RR x k] * b[k x cols]`, `cols <= 16`: loads and stores past `cols`
/// are masked, so a partial tile touches nothing beyond its columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wide_tile<const RR: usize>(
    (k, (a, a_rs, a_cs), (b, ldb), (c, ldc), cols, store): WideTile,
) {
    let lane = |first: i32| {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        // All ones where `first + lane < cols`.
        _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32 - first), idx)
    };
    let (m0, m1) = (lane(0), lane(8));
    let full = cols == NR;
    let mut acc = [[_mm256_setzero_ps(); 2]; RR];
    for p in 0..k {
        let row = b.add(p * ldb);
        // The next tile's line of this row, which the next block reads from memory. A hint
        // only: the address may lie past the row's end (`wrapping_add`: no pointer past an
        // allocation is ever formed with `add`).
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(NR).cast());
        let (b0, b1) = if full {
            (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
        } else {
            // With 8 columns or fewer, `m1` is all zeros and the second half is past the row:
            // masked-off lanes are never read, and `wrapping_add` forms the address without
            // `add`'s in-bounds requirement.
            (
                _mm256_maskload_ps(row, m0),
                _mm256_maskload_ps(row.wrapping_add(8), m1),
            )
        };
        let a = a.add(p * a_cs);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(r * a_rs));
            acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let out = c.add(r * ldc);
        let (mut v0, mut v1) = (acc[0], acc[1]);
        if !store {
            let (c0, c1) = if full {
                (_mm256_loadu_ps(out), _mm256_loadu_ps(out.add(8)))
            } else {
                (
                    _mm256_maskload_ps(out, m0),
                    _mm256_maskload_ps(out.wrapping_add(8), m1),
                )
            };
            v0 = _mm256_add_ps(v0, c0);
            v1 = _mm256_add_ps(v1, c1);
        }
        if full {
            _mm256_storeu_ps(out, v0);
            _mm256_storeu_ps(out.add(8), v1);
        } else {
            _mm256_maskstore_ps(out, m0, v0);
            _mm256_maskstore_ps(out.wrapping_add(8), m1, v1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn wide_tile<const RR: usize>(_: WideTile) {
    unreachable!("wide_gemm: only called where `available()`")
}

thread_local! {
    /// This thread's packed panels of `b`, in 32-byte units, kept between calls.
    static PANELS: std::cell::RefCell<Vec<Lanes>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Eight f32 lanes, 32-byte aligned: the unit of the packed panels.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Lanes([f32; 8]);

/// [`narrow_gemm`] for wider `b`: per block of `k`, `b` packed into 16-column panels (in L2), and
/// 6 x 16 register tiles that broadcast `a` straight from its rows (no copy of `a`: each of its
/// rows is read from memory once per block and from L1 for the other panels).
unsafe fn panels(
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    ldc: usize,
    (a, lda): (*const f32, usize),
    (b, ldb): (*const f32, usize),
) {
    let np = n.div_ceil(NR);
    // All panels of a block in L2, the 6 rows of `a` of a block in L1.
    let kb = (B_BLOCK_BYTES / 4 / (np * NR)).clamp(256, 2048).min(k);
    PANELS.with(|buf| {
        let mut buf = buf.borrow_mut();
        let units = (np * NR * kb).div_ceil(8);
        if buf.len() < units {
            buf.resize(units, Lanes([0.0; 8]));
        }
        let packed: *mut f32 = buf.as_mut_ptr().cast();
        let mut edge = [0f32; MR * NR];
        for p0 in (0..k).step_by(kb) {
            let len = kb.min(k - p0);
            // panel `q`, step `p`, lane `j`: b[p0 + p, q * NR + j], zero past `n`.
            for q in 0..np {
                let panel = packed.add(q * kb * NR);
                for j in 0..NR {
                    let col = q * NR + j;
                    if col < n {
                        let src = b.add(col * ldb + p0);
                        for p in 0..len {
                            *panel.add(p * NR + j) = *src.add(p);
                        }
                    } else {
                        for p in 0..len {
                            *panel.add(p * NR + j) = 0.0;
                        }
                    }
                }
            }
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                let a = a.add(i0 * lda + p0);
                for q in 0..np {
                    let cols = NR.min(n - q * NR);
                    let panel = packed.add(q * kb * NR);
                    let c = c.add(i0 * ldc + q * NR);
                    // Rows past `m` repeat the last row of `a` (their results are dropped).
                    let a_rows = std::array::from_fn(|r| a.add(r.min(rows - 1) * lda));
                    if rows == MR && cols == NR {
                        broadcast_tile(len, &a_rows, panel, c, ldc);
                    } else {
                        // A partial tile, into a zeroed buffer whose valid part is then added:
                        // the panel's columns past `n` are zero.
                        edge.fill(0.0);
                        broadcast_tile(len, &a_rows, panel, edge.as_mut_ptr(), NR);
                        for r in 0..rows {
                            for j in 0..cols {
                                *c.add(r * ldc + j) += edge[r * NR + j];
                            }
                        }
                    }
                }
            }
        }
    });
}

/// `c[6 x 16] += a[6 x k] * panel[k x 16]`, row `r` of `a` at `rows[r]`, `c`'s rows at `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn broadcast_tile(
    k: usize,
    rows: &[*const f32; MR],
    panel: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let step = |p: usize, acc: &mut [[__m256; 2]; MR]| {
        let b0 = _mm256_load_ps(panel.add(p * NR));
        let b1 = _mm256_load_ps(panel.add(p * NR + 8));
        for (acc, row) in acc.iter_mut().zip(rows) {
            let av = _mm256_broadcast_ss(&*row.add(p));
            acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
        }
    };
    let lines = k / 16 * 16;
    let mut p = 0;
    while p < lines {
        // One cache line of each row of `a` per 16 steps: fetch the line PREFETCH steps ahead.
        for row in rows {
            // A hint, possibly past the row's end: `wrapping_add`, as above.
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(p + PREFETCH).cast());
        }
        for q in p..p + 16 {
            step(q, &mut acc);
        }
        p += 16;
    }
    for q in lines..k {
        step(q, &mut acc);
    }
    for (r, acc) in acc.iter().enumerate() {
        let out = c.add(r * ldc);
        _mm256_storeu_ps(out, _mm256_add_ps(acc[0], _mm256_loadu_ps(out)));
        _mm256_storeu_ps(
            out.add(8),
            _mm256_add_ps(acc[1], _mm256_loadu_ps(out.add(8))),
        );
    }
}

/// `c[RR x CC] += a[RR x k] * b[k x CC]` (layout as in [`narrow_gemm`]): `RR * CC` dot products
/// of length `k`, eight lanes at a time, the last `k % 8` terms in scalar code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const RR: usize, const CC: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); CC]; RR];
    let body = k / 8 * 8;
    let mut p = 0;
    while p < body {
        let mut bv = [_mm256_setzero_ps(); CC];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm256_loadu_ps(b.add(j * ldb + p));
        }
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_loadu_ps(a.add(i * lda + p));
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm256_fmadd_ps(av, bv, *acc);
            }
        }
        p += 8;
    }
    for (i, acc) in acc.iter().enumerate() {
        for (j, &v) in acc.iter().enumerate() {
            // Horizontal sum of the eight lanes, then the tail.
            let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
            let mut s = _mm_cvtss_f32(q);
            for t in body..k {
                s += *a.add(i * lda + t) * *b.add(j * ldb + t);
            }
            *c.add(i * ldc + j) += s;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn broadcast_tile(_: usize, _: &[*const f32; MR], _: *const f32, _: *mut f32, _: usize) {
    unreachable!("narrow_gemm: only called where `available()`")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const RR: usize, const CC: usize>(
    _: usize,
    _: *const f32,
    _: usize,
    _: *const f32,
    _: usize,
    _: *mut f32,
    _: usize,
) {
    unreachable!("narrow_gemm: only called where `available()`")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect()
    }

    /// Checks `c` (`m` rows of `ldc`, `c0` before the product) against `dot(i, j)`, the f64
    /// product, plus `c0` where `accumulate`, and that the padding past column `n` is untouched.
    fn check(
        (c, c0): (&[f32], &[f32]),
        (m, n, k, ldc): (usize, usize, usize, usize),
        accumulate: bool,
        dot: impl Fn(usize, usize) -> f64,
        case: &str,
    ) {
        for i in 0..m {
            for j in 0..ldc {
                let got = c[i * ldc + j];
                if j >= n {
                    assert_eq!(got, c0[i * ldc + j], "{case}: padding of c written");
                    continue;
                }
                let base = if accumulate {
                    c0[i * ldc + j] as f64
                } else {
                    0.0
                };
                let want = base + dot(i, j);
                let err = (got as f64 - want).abs();
                assert!(
                    err <= 1e-5 * (k as f64).sqrt(),
                    "{case}: c[{i}, {j}] = {got}, want {want}"
                );
            }
        }
    }

    /// Full and partial row and column tiles, several `k` blocks with a tail, both layouts of
    /// `a` (row- and column-major, padded), adding or not, against an f64 reference; the
    /// padding of `c` past `n` stays untouched (the masked stores).
    #[test]
    fn wide_gemm_matches_f64_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (2, 16, 3),
            (6, 17, 128),
            (7, 40, 300),
            (32, 100, 257),
        ] {
            for (accumulate, a_col_major) in [(false, false), (true, false), (false, true)] {
                let (ldb, ldc) = (n + 5, n + 3);
                let (a_rs, a_cs) = if a_col_major { (1, m + 2) } else { (k + 3, 1) };
                let a = data((m + 2) * (k + 3), 1);
                let b = data(k * ldb, 2);
                let mut c = data(m * ldc, 3);
                let c0 = c.clone();
                // SAFETY: `a` holds (m + 2) x (k + 3) >= every element of either layout, `b`
                // holds `k` rows of `ldb` and `c` `m` rows of `ldc`.
                unsafe {
                    wide_gemm(
                        (m, n, k),
                        c.as_mut_ptr(),
                        ldc,
                        accumulate,
                        (a.as_ptr(), a_rs, a_cs),
                        (b.as_ptr(), ldb),
                    )
                };
                let dot = |i: usize, j: usize| {
                    (0..k)
                        .map(|p| a[i * a_rs + p * a_cs] as f64 * b[p * ldb + j] as f64)
                        .sum::<f64>()
                };
                let case =
                    format!("({m}, {n}, {k}) accumulate {accumulate} col-major a {a_col_major}");
                check((&c, &c0), (m, n, k, ldc), accumulate, dot, &case);
            }
        }
    }

    /// Every path (dot tiles of each shape, broadcast tiles with partial rows and columns, several
    /// `k` blocks with a tail) against an f64 reference, with padded strides, adding or not.
    #[test]
    fn matches_f64_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2/FMA");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (7, 1, 300),
            (5, 3, 13),
            (4, 4, 8),
            (6, 16, 256),
            (13, 5, 3000),
            (20, 33, 700),
            (8, 48, 5000),
        ] {
            for accumulate in [false, true] {
                let (lda, ldb, ldc) = (k + 3, k + 5, n + 2);
                let a = data(m * lda, 1);
                let b = data(n * ldb, 2);
                let mut c = data(m * ldc, 3);
                let c0 = c.clone();
                // SAFETY: the buffers hold `m` rows of `a`, `n` columns of `b` and `m` rows of
                // `c` at these strides.
                unsafe {
                    narrow_gemm(
                        (m, n, k),
                        c.as_mut_ptr(),
                        ldc,
                        accumulate,
                        (a.as_ptr(), lda),
                        (b.as_ptr(), ldb),
                    )
                };
                let dot = |i: usize, j: usize| {
                    (0..k)
                        .map(|p| a[i * lda + p] as f64 * b[j * ldb + p] as f64)
                        .sum::<f64>()
                };
                let case = format!("({m}, {n}, {k}) accumulate {accumulate}");
                check((&c, &c0), (m, n, k, ldc), accumulate, dot, &case);
            }
        }
    }
}
