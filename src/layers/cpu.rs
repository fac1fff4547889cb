//! What the CPU custom ops share: checked f32 views of candle's storages, a gemm split over
//! threads, and [`WeightOp`], the custom-op plumbing of the conv and linear ops.

use std::borrow::Cow;

use super::narrow;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
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

/// The threads the CPU ops split their work into: candle's count (`RAYON_NUM_THREADS`, else the
/// physical cores), read once. Candle's `get_num_threads` re-reads the environment and parses
/// `/proc/cpuinfo` on every call (61 us on a 2-core machine, more with more cores): called
/// per op, that was 2% of a batch-1 forward pass. Rayon's pool is fixed once built, so a later
/// change of the variable would not take effect anyway.
pub(crate) fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// The gradient through an optional ReLU: `grad` where the ReLU's output `res` is positive
/// (PyTorch's choice, 0 at 0), else 0; `grad` itself without one.
pub(crate) fn relu_grad<'a>(relu: bool, grad: &'a [f32], res: &[f32]) -> Cow<'a, [f32]> {
    if !relu {
        return Cow::Borrowed(grad);
    }
    let mut masked = vec![0f32; grad.len()];
    relu_grad_into(&mut masked, grad, res);
    Cow::Owned(masked)
}

/// [`relu_grad`] of a ReLU into `dst`.
pub(crate) fn relu_grad_into(dst: &mut [f32], grad: &[f32], res: &[f32]) {
    for ((d, &g), &r) in dst.iter_mut().zip(grad).zip(res) {
        *d = if r > 0.0 { g } else { 0.0 };
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

/// A layer `y = f(x, weight, bias?)` computed by CPU kernels on contiguous f32 data: the conv and
/// linear ops. [`apply`] runs it as a candle custom op (a `CustomOp2` without a bias, a
/// `CustomOp3` with one); this trait holds what differs between them, the op the checks, the
/// storage access and the gradient tensors that do not.
pub(crate) trait WeightOp: Clone + Send + Sync + 'static {
    /// The op's name in error messages.
    const OP: &'static str;
    /// The custom ops' names without and with a bias.
    const NAMES: [&'static str; 2];

    /// Elements of the input, the weight, the bias and the output.
    fn lens(&self) -> [usize; 4];

    fn out_shape(&self) -> Shape;

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32>;

    /// `[dx, dW, db]` from the input, the weight, the output and its gradient, each only where
    /// `want` asks for it.
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        want: [bool; 3],
    ) -> [Option<Vec<f32>>; 3];
}

/// `op` on `x`, `weight` and `bias` as one custom op. The kernels read plain row-major data;
/// `contiguous` is free where it already is.
pub(crate) fn apply<T: WeightOp>(
    op: T,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, Fused(op)),
        None => x.apply_op2(&weight, Fused(op)),
    }
}

/// A [`WeightOp`] as candle's custom op.
struct Fused<T>(T);

impl<T: WeightOp> Fused<T> {
    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let [x_len, w_len, b_len, _] = self.0.lens();
        let xs = cpu_f32(x.0, x.1, x_len, T::OP, "input")?;
        let ws = cpu_f32(w.0, w.1, w_len, T::OP, "weight")?;
        let bs = b
            .map(|(s, l)| cpu_f32(s, l, b_len, T::OP, "bias"))
            .transpose()?;
        Ok((
            CpuStorage::F32(self.0.forward(xs, ws, bs)),
            self.0.out_shape(),
        ))
    }

    /// Gradients of `x`, `w` and `b` (the last only when there is a bias), each only when its
    /// tensor is tracked: an image, or a frozen layer, costs nothing.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = [x.track_op(), w.track_op(), b.is_some_and(|b| b.track_op())];
        if want == [false; 3] {
            return Ok((None, None, None));
        }
        // The gradient arrives broadcast when the loss is a plain sum.
        let grad = grad.contiguous()?;
        let [x_len, w_len, _, out_len] = self.0.lens();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = tensor_f32(&xs, xl, x_len, T::OP, "input")?;
        let wv = tensor_f32(&ws, wl, w_len, T::OP, "weight")?;
        let rv = tensor_f32(&rs, rl, out_len, T::OP, "output")?;
        let gv = tensor_f32(&gs, gl, out_len, T::OP, "output gradient")?;
        let [dx, dw, db] = self.0.backward(xv, wv, rv, gv, want);
        let tensor = |d: Option<Vec<f32>>, like: &Tensor| {
            d.map(|d| Tensor::from_vec(d, like.shape(), x.device()))
                .transpose()
        };
        let db = match b {
            Some(b) => tensor(db, b)?,
            None => None,
        };
        Ok((tensor(dx, x)?, tensor(dw, w)?, db))
    }
}

impl<T: WeightOp> CustomOp2 for Fused<T> {
    fn name(&self) -> &'static str {
        T::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Fused::bwd(self, x, w, None, res, grad)?;
        Ok((dx, dw))
    }
}

impl<T: WeightOp> CustomOp3 for Fused<T> {
    fn name(&self) -> &'static str {
        T::NAMES[1]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Fused::bwd(self, x, w, Some(b), res, grad)
    }
}
