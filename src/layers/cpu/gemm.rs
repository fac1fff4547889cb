//! `dst = lhs * rhs` split over threads: the `gemm` crate's single-threaded kernels, or this
//! crate's narrow ones on AVX2 CPUs.

use rayon::prelude::*;

use super::narrow;

/// How [`matmul`] shares a product between threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// Blocks of columns: for products of a few hundred rows and many columns (the convs).
    Cols,
    /// Blocks of rows: for tall products with few columns (the fully connected layers, whose
    /// batch is the narrow side).
    Rows,
}

/// Narrowest block of columns (or rows) worth a thread of its own in a split gemm.
const MIN_PER_TASK: usize = 64;

/// `dst[m x n] = (dst if accumulate) + lhs[m x k] * rhs[k x n]`, with `dst` given as `(data,
/// row stride)` and the operands as `(data, row stride, column stride)`. With `threads > 1`, the
/// columns or rows (`split`) are cut into one block per thread, each a single-threaded gemm of
/// the `gemm` crate (for these shapes that beats gemm's own threading by 10 to 60%), or, on
/// AVX2 CPUs, of [`narrow::narrow_gemm`] for the narrow products of the linear layers' forward.
pub(crate) fn matmul(
    dst: (&mut [f32], usize),
    accumulate: bool,
    sizes: (usize, usize, usize),
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    threads: (usize, Split),
) {
    matmul_with(false, dst, accumulate, sizes, lhs, rhs, threads);
}

/// [`matmul`] of a product with few rows (`m`) and a long row-major `rhs`, a linear layer's
/// input gradient `g W`: on AVX2 CPUs, for 2 to [`narrow::WIDE_MAX_SIDE`] rows and more than
/// [`narrow::MAX_N`] columns, each block is [`narrow::wide_gemm`], which reads `rhs` in place.
pub(crate) fn matmul_few_rows(
    dst: (&mut [f32], usize),
    accumulate: bool,
    sizes: (usize, usize, usize),
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    threads: (usize, Split),
) {
    matmul_with(true, dst, accumulate, sizes, lhs, rhs, threads);
}

/// [`matmul`], or [`matmul_few_rows`] when `few_rows`.
fn matmul_with(
    few_rows: bool,
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    (threads, split): (usize, Split),
) {
    // Last element each operand's strides reach; the asserts keep the raw accesses in bounds.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(m * n == 0 || last(m, n, dst_rs, 1) < dst.len(), "gemm: dst");
    assert!(
        m * k == 0 || last(m, k, lhs_rs, lhs_cs) < lhs.len(),
        "gemm: lhs"
    );
    assert!(
        k * n == 0 || last(k, n, rhs_rs, rhs_cs) < rhs.len(),
        "gemm: rhs"
    );
    let dst = DstPtr::new(dst);
    // A narrow product whose operands both run along `k` (a linear layer's `W x^T`).
    let narrow = n <= narrow::MAX_N && lhs_cs == 1 && rhs_rs == 1 && narrow::available();
    let wide = few_rows
        && !narrow
        && rhs_cs == 1
        && (2..=narrow::WIDE_MAX_SIDE).contains(&m)
        && n > narrow::MAX_N
        && narrow::available();
    // Rows `i0..i0 + rows`, columns `j0..j0 + cols` of the product, single-threaded.
    let block = |(i0, rows): (usize, usize), (j0, cols): (usize, usize)| {
        if narrow {
            // SAFETY: as below; `narrow` checked the CPU and that both operands are
            // contiguous along `k`, the layout `narrow_gemm` reads.
            unsafe {
                narrow::narrow_gemm(
                    (rows, cols, k),
                    dst.get().add(i0 * dst_rs + j0),
                    dst_rs,
                    accumulate,
                    (lhs.as_ptr().add(i0 * lhs_rs), lhs_rs),
                    (rhs.as_ptr().add(j0 * rhs_cs), rhs_cs),
                );
            }
            return;
        }
        if wide {
            // SAFETY: as below; `wide` checked the CPU and that `rhs` is contiguous along
            // its rows, the layout `wide_gemm` reads.
            unsafe {
                narrow::wide_gemm(
                    (rows, cols, k),
                    dst.get().add(i0 * dst_rs + j0),
                    dst_rs,
                    accumulate,
                    (lhs.as_ptr().add(i0 * lhs_rs), lhs_rs, lhs_cs),
                    (rhs.as_ptr().add(j0), rhs_rs),
                );
            }
            return;
        }
        // SAFETY: the asserts above keep every element of the full product's operands inside
        // `lhs` and `rhs`, and of its destination inside `dst`, so any block is in bounds too;
        // `dst` was borrowed mutably, so it overlaps neither operand, and blocks running at the
        // same time write disjoint parts of it.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                dst.get().add(i0 * dst_rs + j0),
                1,
                dst_rs as isize,
                accumulate,
                lhs.as_ptr().add(i0 * lhs_rs),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr().add(j0 * rhs_cs),
                rhs_cs as isize,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    let side = if split == Split::Cols { n } else { m };
    let blocks = threads.min(side / MIN_PER_TASK).max(1);
    if blocks == 1 || m * n * k == 0 {
        block((0, m), (0, n));
        return;
    }
    // Blocks of whole 16-wide panels (a multiple of gemm's f32 micro-kernel sizes).
    let per = side.div_ceil(blocks).next_multiple_of(16);
    (0..side.div_ceil(per)).into_par_iter().for_each(|b| {
        let part = (b * per, per.min(side - b * per));
        match split {
            Split::Cols => block((0, m), part),
            Split::Rows => block(part, (0, n)),
        }
    });
}

/// A destination shared by threads that each write their own disjoint part of it: a split
/// gemm's blocks, the Winograd conv's tiles.
#[derive(Clone, Copy)]
pub(crate) struct DstPtr(*mut f32);

impl DstPtr {
    /// The shared destination `dst`, borrowed mutably by the caller for as long as the pointer
    /// is used.
    pub(crate) fn new(dst: &mut [f32]) -> Self {
        Self(dst.as_mut_ptr())
    }

    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: its users (`matmul`, the Winograd conv) hand each thread a disjoint part of the
// destination to write through the pointer, and the slice it points into is borrowed mutably
// for the whole call.
unsafe impl Sync for DstPtr {}
unsafe impl Send for DstPtr {}
