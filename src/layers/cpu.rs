//! What the CPU custom ops share: checked f32 views of candle's storages, and a gemm split over
//! threads.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage};
use rayon::prelude::*;

/// The contiguous f32 data of a CPU storage, checked against the `len` elements that op `op`
/// expects of its operand `what` (both named in the error).
pub(crate) fn cpu_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!(
            "{op}: the CPU op takes f32, got a {:?} {what}",
            storage.dtype()
        );
    };
    match layout.contiguous_offsets() {
        Some((start, end)) if end - start == len => Ok(&data[start..end]),
        _ => candle_core::bail!(
            "{op}: the CPU op needs a contiguous {what} of {len} elements, got shape {:?} \
             strides {:?}",
            layout.dims(),
            layout.stride()
        ),
    }
}

/// [`cpu_f32`] of a tensor's storage (a guard from `storage_and_layout`), which a backward pass
/// gets on the device of its forward.
pub(crate) fn tensor_f32<'a>(
    storage: &'a Storage,
    layout: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => cpu_f32(s, layout, len, op, what),
        _ => candle_core::bail!("{op}: the CPU op's backward got a {what} on another device"),
    }
}

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
/// the `gemm` crate: for these shapes that beats gemm's own threading by 10 to 60%.
pub(crate) fn matmul(
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
    let dst = DstPtr(dst.as_mut_ptr());
    // Rows `i0..i0 + rows`, columns `j0..j0 + cols` of the product, single-threaded.
    let block = |(i0, rows): (usize, usize), (j0, cols): (usize, usize)| {
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

/// The destination of a split gemm, shared by the threads that write its blocks.
#[derive(Clone, Copy)]
struct DstPtr(*mut f32);

impl DstPtr {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: `matmul` hands each thread a disjoint block of the destination to write through the
// pointer, and the slice it points into is borrowed mutably for the whole call.
unsafe impl Sync for DstPtr {}
unsafe impl Send for DstPtr {}
