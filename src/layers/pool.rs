use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use candle_nn::Module;

use super::cpu::checked_elems;
use rayon::prelude::*;
use std::ops::Range;

/// Output length of a pooling window sweep, with PyTorch's and Caffe's rules.
///
/// Floor mode (PyTorch's default) drops a last partial window; ceil mode (Caffe, and PyTorch's
/// `ceil_mode=True`) keeps it as long as it starts inside the input. Returns `None` when the
/// input is shorter than the kernel, or the stride is 0.
///
/// ```
/// use candle_zoo::layers::pooled_size;
/// assert_eq!(pooled_size(55, 3, 2, false), Some(27));
/// assert_eq!(pooled_size(54, 3, 2, false), Some(26));
/// assert_eq!(pooled_size(54, 3, 2, true), Some(27));
/// assert_eq!(pooled_size(2, 3, 2, true), None);
/// ```
pub fn pooled_size(input: usize, kernel: usize, stride: usize, ceil_mode: bool) -> Option<usize> {
    let span = input.checked_sub(kernel)?;
    if stride == 0 {
        return None;
    }
    let mut out = if ceil_mode {
        span.div_ceil(stride)
    } else {
        span / stride
    } + 1;
    // A last window must start inside the input (it can only start past it with padding,
    // but keep PyTorch's rule so that the two agree for every size).
    if ceil_mode && (out - 1) * stride >= input {
        out -= 1;
    }
    Some(out)
}

/// Max pooling of an `(N, C, H, W)` tensor with a square window, in floor or ceil mode, with a
/// backward pass for every kernel and stride (candle's own pool has none when they differ, as in
/// AlexNet's overlapping 3x3/2 pools).
///
/// In ceil mode the last window of a row or column may hang over the edge; it is clipped to the
/// input, as in PyTorch and Caffe. The input must be at least `kernel` high and wide.
///
/// - On the CPU this is a custom op. Its gradient follows PyTorch: each window sends its
///   gradient to the first maximal element in row-major order (a NaN counts as maximal), and
///   gradients add up where windows overlap. Float dtypes only (f16, bf16, f32, f64).
/// - On other devices (CUDA, Metal) it is a composition of candle ops (`index_select` and
///   `maximum`): the same forward result, and the same gradient unless a window holds tied
///   maxima, which then share its gradient instead of the first one taking all of it.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_zoo::layers::max_pool2d;
///
/// // 5x5 input, 3x3 windows with stride 2: the windows overlap on row and column 2.
/// let x = Var::from_tensor(&Tensor::arange(0f32, 25., &Device::Cpu)?.reshape((1, 1, 5, 5))?)?;
/// let y = max_pool2d(x.as_tensor(), 3, 2, false)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, [12., 14., 22., 24.]);
/// let grads = y.sum_all()?.backward()?;
/// let g = grads.get(&x).expect("gradient of x").flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!((g[12], g[14], g[22], g[24], g.iter().sum::<f32>()), (1., 1., 1., 1., 4.));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, ceil_mode: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    checked_elems("max pool", "input", x.dims())?;
    // Validates the arguments for both paths.
    Geometry::new(h, w, kernel, stride, ceil_mode)?;
    let op = MaxPool2d {
        kernel,
        stride,
        ceil_mode,
    };
    #[cfg(feature = "cudnn")]
    if super::cudnn::handles(x, super::cudnn::NORM_DTYPES) && x.elem_count() > 0 {
        let g = Geometry::new(h, w, kernel, stride, ceil_mode)?;
        return super::cudnn::max_pool2d(x, kernel, stride, (g.oh, g.ow));
    }
    if x.device().is_cpu() {
        // The kernels read plain row-major planes; `contiguous` is free when x already is one.
        x.contiguous()?.apply_op1(op)
    } else {
        max_pool2d_generic(x, kernel, stride, ceil_mode)
    }
}

/// The device-independent max pool: for each window offset `d` along an axis, `index_select`
/// picks rows `o * stride + d` (clamped to the last row, which every clipped window contains),
/// and `maximum` folds them; rows first, then columns (a max over a rectangle is separable).
/// Everything is a differentiable candle op, so gradients flow on every device; where a window's
/// maximum is tied, candle's `maximum` splits the gradient between the tied elements.
pub(crate) fn max_pool2d_generic(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    ceil_mode: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let g = Geometry::new(h, w, kernel, stride, ceil_mode)?;
    // candle's index_select reads only contiguous sources.
    let x = x.contiguous()?;
    let rows = max_over_offsets(&x, 2, h, g.oh, kernel, stride)?;
    max_over_offsets(&rows, 3, w, g.ow, kernel, stride)
}

fn max_over_offsets(
    x: &Tensor,
    dim: usize,
    input: usize,
    out: usize,
    kernel: usize,
    stride: usize,
) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for d in 0..kernel {
        let rows: Vec<u32> = (0..out)
            .map(|o| (o * stride + d).min(input - 1) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, out, x.device())?;
        let picked = x.index_select(&rows, dim)?;
        acc = Some(match acc {
            None => picked,
            Some(a) => a.maximum(&picked)?,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("max pool: kernel size 0".into()))
}

/// Sizes of one pooling: input `h x w`, output `oh x ow`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kernel: usize,
    stride: usize,
}

impl Geometry {
    fn new(h: usize, w: usize, kernel: usize, stride: usize, ceil_mode: bool) -> Result<Self> {
        if kernel == 0 || stride == 0 {
            candle_core::bail!("max pool: kernel ({kernel}) and stride ({stride}) must be >= 1");
        }
        let size = |n: usize| {
            pooled_size(n, kernel, stride, ceil_mode).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "max pool {kernel}x{kernel}: input {h}x{w} is smaller than the window"
                ))
            })
        };
        Ok(Self {
            h,
            w,
            oh: size(h)?,
            ow: size(w)?,
            kernel,
            stride,
        })
    }

    /// Input rows (or columns) `start..end` of output row `o`, clipped at the border.
    fn window(&self, o: usize, input: usize) -> (usize, usize) {
        let start = o * self.stride;
        (start, (start + self.kernel).min(input))
    }

    /// Offset in a plane of the first maximal element of window `(i, j)`, and its value, with
    /// PyTorch's scan: start at the window's first element with `-inf` (`neg_inf`, hoisted out
    /// of the loops by the callers), take `v > max || isnan(v)`.
    #[inline(always)]
    fn argmax<T: WithDType>(&self, plane: &[T], i: usize, j: usize, neg_inf: T) -> (usize, T) {
        let (r0, r1) = self.window(i, self.h);
        let (c0, c1) = self.window(j, self.w);
        let mut best = r0 * self.w + c0;
        let mut max = neg_inf;
        for r in r0..r1 {
            let start = r * self.w + c0;
            let row = &plane[start..r * self.w + c1];
            for (c, &v) in row.iter().enumerate() {
                if replaces(v, max) {
                    max = v;
                    best = start + c;
                }
            }
        }
        (best, max)
    }

    /// Adds the gradient `g` of output row `i` onto the maxima of its windows for as many
    /// windows from the left as are whole `K x K` squares; returns how many. [`Self::argmax`]'s
    /// scan on fixed-size rows: unrolled, without bounds checks (torchvision's three pool
    /// backwards at batch 32, with the test loss's own backward: 104 -> 82 ms).
    #[inline(always)]
    fn argmax_row<T: WithDType, const K: usize>(
        &self,
        plane: &[T],
        i: usize,
        neg_inf: T,
        g: &[T],
        grad: &mut [T],
    ) -> usize {
        let (r0, w, s) = (i * self.stride, self.w, self.stride);
        if r0 + K > self.h {
            return 0;
        }
        let whole = pooled_size(w, K, s, false).unwrap_or(0).min(g.len());
        let rows: [&[T]; K] = std::array::from_fn(|r| &plane[(r0 + r) * w..(r0 + r + 1) * w]);
        for (j, &g) in g[..whole].iter().enumerate() {
            let c0 = j * s;
            let mut best = r0 * w + c0;
            let mut max = neg_inf;
            for (r, row) in rows.iter().enumerate() {
                let win: &[T; K] = row[c0..c0 + K].try_into().expect("K elements");
                for (c, &v) in win.iter().enumerate() {
                    if replaces(v, max) {
                        max = v;
                        best = (r0 + r) * w + c0 + c;
                    }
                }
            }
            grad[best] += g;
        }
        whole
    }

    /// The pooled planes. A max over a rectangle is separable: per output row, the max of the
    /// window's input rows column by column (a pass the compiler vectorizes), then the max of
    /// each window's columns of that; NaN propagates as in [`Self::argmax`]'s scan, so the values
    /// are the scan's (pool1 of a torchvision forward: 2.5 -> 1.0 ms at batch 1, 19 -> 8.5 ms at
    /// batch 16, against scanning each window; then 0.40 -> 0.16 ms and 4.1 -> 2.5 ms in
    /// isolation with [`window_maxes`] and rayon's threads instead of spawned ones).
    fn forward<T: WithDType>(&self, x: &[T], planes: usize) -> Vec<T> {
        let out_plane = self.oh * self.ow;
        let mut out = vec![T::zero(); planes * out_plane];
        let work = out_plane * self.kernel * self.kernel;
        for_plane_chunks(planes, &mut out, out_plane, work, |range, out| {
            self.pool_planes(x, range, out)
        });
        out
    }

    /// Pools planes `range` of `x` into `out`.
    fn pool_planes<T: WithDType>(&self, x: &[T], range: Range<usize>, out: &mut [T]) {
        let (in_plane, out_plane, w) = (self.h * self.w, self.oh * self.ow, self.w);
        let mut cols = vec![T::zero(); w];
        for (p, out) in range.zip(out.chunks_exact_mut(out_plane)) {
            let plane = &x[p * in_plane..(p + 1) * in_plane];
            for (i, out) in out.chunks_exact_mut(self.ow).enumerate() {
                let (r0, r1) = self.window(i, self.h);
                cols.copy_from_slice(&plane[r0 * w..(r0 + 1) * w]);
                for r in r0 + 1..r1 {
                    for (c, &v) in cols.iter_mut().zip(&plane[r * w..(r + 1) * w]) {
                        *c = nan_max(*c, v);
                    }
                }
                let done = match (self.kernel, self.stride) {
                    (3, 2) => window_maxes::<T, 3, 2>(&cols, out),
                    (2, 2) => window_maxes::<T, 2, 2>(&cols, out),
                    _ => 0,
                };
                for (j, o) in out.iter_mut().enumerate().skip(done) {
                    let (c0, c1) = self.window(j, w);
                    *o = cols[c0 + 1..c1]
                        .iter()
                        .fold(cols[c0], |m, &v| nan_max(m, v));
                }
            }
        }
    }

    fn backward<T: WithDType>(&self, x: &[T], grad_out: &[T], planes: usize) -> Vec<T> {
        let (in_plane, out_plane) = (self.h * self.w, self.oh * self.ow);
        let mut grad = vec![T::zero(); planes * in_plane];
        let neg_inf = T::from_f64(f64::NEG_INFINITY);
        let work = out_plane * self.kernel * self.kernel;
        for_plane_chunks(planes, &mut grad, in_plane, work, |range, grad| {
            for (p, grad) in range.zip(grad.chunks_exact_mut(in_plane)) {
                let plane = &x[p * in_plane..(p + 1) * in_plane];
                let g = &grad_out[p * out_plane..(p + 1) * out_plane];
                for i in 0..self.oh {
                    let g = &g[i * self.ow..(i + 1) * self.ow];
                    let done = match self.kernel {
                        3 => self.argmax_row::<T, 3>(plane, i, neg_inf, g, grad),
                        2 => self.argmax_row::<T, 2>(plane, i, neg_inf, g, grad),
                        _ => 0,
                    };
                    for (j, &g) in g.iter().enumerate().skip(done) {
                        grad[self.argmax(plane, i, j, neg_inf).0] += g;
                    }
                }
            }
        });
        grad
    }
}

/// The larger of `a` and `b`, or NaN if `b` is NaN (and `a` if `a` is: NaN is never below).
#[inline(always)]
fn nan_max<T: PartialOrd + Copy>(a: T, b: T) -> T {
    if replaces(b, a) {
        b
    } else {
        a
    }
}

/// Whether a scan for the maximum takes `v` over the best so far, `max`: PyTorch's rule, `v >
/// max || isnan(v)` (the first of equal maxima stays, a NaN always wins).
#[inline(always)]
// `v != v` is the NaN test of a generic float.
#[allow(clippy::eq_op)]
fn replaces<T: PartialOrd>(v: T, max: T) -> bool {
    v > max || v != v
}

/// The maxima of the whole `K`-wide windows of `cols` at stride `S` into the first outputs of
/// `out`, as many as fit in both; returns how many. With `K` and `S` constants each window is
/// a fixed-size array: the fold unrolls and needs no bounds checks (a whole pool1 at batch 1:
/// 0.33 -> 0.22 ms against the loop with runtime sizes).
#[inline(always)]
fn window_maxes<T: PartialOrd + Copy, const K: usize, const S: usize>(
    cols: &[T],
    out: &mut [T],
) -> usize {
    let n = pooled_size(cols.len(), K, S, false)
        .unwrap_or(0)
        .min(out.len());
    for (j, o) in out[..n].iter_mut().enumerate() {
        let win: &[T; K] = cols[j * S..j * S + K].try_into().expect("K elements");
        *o = win[1..].iter().fold(win[0], |m, &v| nan_max(m, v));
    }
    n
}

/// Below this many element visits a pool runs on the calling thread: spawning costs more.
const MIN_WORK_PER_THREAD: usize = 1 << 16;

/// Runs `f(planes, out_chunk)` over chunks of whole `(n, c)` planes of `out` (`out_plane`
/// elements each), on rayon's threads when there is enough work. Each plane is independent,
/// so the result does not depend on the split.
fn for_plane_chunks<T: Send>(
    planes: usize,
    out: &mut [T],
    out_plane: usize,
    work_per_plane: usize,
    f: impl Fn(Range<usize>, &mut [T]) + Sync,
) {
    let threads = super::cpu::threads()
        .min(planes)
        .min(planes * work_per_plane / MIN_WORK_PER_THREAD);
    if threads <= 1 {
        f(0..planes, out);
        return;
    }
    let per = planes.div_ceil(threads);
    // On rayon's pool, which the conv and linear ops keep warm: spawning threads per call cost
    // more than the pooling itself at batch 1.
    out.par_chunks_mut(per * out_plane)
        .enumerate()
        .for_each(|(k, chunk)| f(k * per..k * per + chunk.len() / out_plane, chunk));
}

/// Contiguous `(N, C, H, W)` data of a CPU storage and its geometry, checked.
fn cpu_input(op: &MaxPool2d, layout: &Layout) -> Result<(usize, usize, usize, Geometry)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    let len = checked_elems("max pool", "input", layout.dims())?;
    let (start, end) = layout
        .contiguous_offsets()
        .filter(|(start, end)| end - start == len)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "max pool: the CPU kernel needs a contiguous input, got shape {:?} strides {:?}",
                layout.dims(),
                layout.stride()
            ))
        })?;
    Ok((start, end, n * c, op.geometry(h, w)?))
}

/// The CPU max-pool op, with PyTorch's backward (see [`max_pool2d`]).
#[derive(Debug, Clone, Copy)]
struct MaxPool2d {
    kernel: usize,
    stride: usize,
    ceil_mode: bool,
}

impl MaxPool2d {
    fn geometry(&self, h: usize, w: usize) -> Result<Geometry> {
        Geometry::new(h, w, self.kernel, self.stride, self.ceil_mode)
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end, planes, g) = cpu_input(self, layout)?;
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(g.forward(&x[start..end], planes)),
            CpuStorage::F64(x) => CpuStorage::F64(g.forward(&x[start..end], planes)),
            CpuStorage::F16(x) => CpuStorage::F16(g.forward(&x[start..end], planes)),
            CpuStorage::BF16(x) => CpuStorage::BF16(g.forward(&x[start..end], planes)),
            other => candle_core::bail!(
                "max pool: dtype {:?} is not supported (f16, bf16, f32, f64 are)",
                other.dtype()
            ),
        };
        let (n, c, _, _) = layout.shape().dims4()?;
        Ok((out, Shape::from((n, c, g.oh, g.ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2dBackward(*self))?;
        Ok(Some(grad))
    }
}

/// `(input, grad_output) -> grad_input` of [`MaxPool2d`]; the argmax is recomputed from the
/// input rather than stored, which keeps the forward op a plain `CustomOp1`.
struct MaxPool2dBackward(MaxPool2d);

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (start, end, planes, g) = cpu_input(&self.0, l1)?;
        let (n, c, _, _) = l1.shape().dims4()?;
        if l2.shape().dims() != [n, c, g.oh, g.ow] {
            candle_core::bail!(
                "max pool backward: gradient of shape {:?}, expected {:?}",
                l2.shape().dims(),
                [n, c, g.oh, g.ow]
            );
        }
        let (gs, ge) = l2.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("max pool backward: the gradient must be contiguous".into())
        })?;
        let grad = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(d)) => {
                CpuStorage::F32(g.backward(&x[start..end], &d[gs..ge], planes))
            }
            (CpuStorage::F64(x), CpuStorage::F64(d)) => {
                CpuStorage::F64(g.backward(&x[start..end], &d[gs..ge], planes))
            }
            (CpuStorage::F16(x), CpuStorage::F16(d)) => {
                CpuStorage::F16(g.backward(&x[start..end], &d[gs..ge], planes))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(d)) => {
                CpuStorage::BF16(g.backward(&x[start..end], &d[gs..ge], planes))
            }
            (a, b) => candle_core::bail!(
                "max pool backward: dtypes {:?} (input) and {:?} (gradient) are not supported",
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((grad, l1.shape().clone()))
    }
}

/// Adaptive average pooling to a fixed `(out_h, out_w)`, as PyTorch's `nn.AdaptiveAvgPool2d`.
///
/// Output cell `i` averages input rows `floor(i * H / out_h) .. ceil((i + 1) * H / out_h)`, and
/// likewise for columns. The pooling is two small matrix products (`P_h · x · P_wᵀ`), so it runs
/// on any device and is differentiable. At an input already of the output size it is the identity.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_nn::Module;
/// use candle_zoo::layers::AdaptiveAvgPool2d;
///
/// let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
/// let y = AdaptiveAvgPool2d::new(3, 3).forward(&x)?;
/// // Overlapping bins: rows (and columns) 0..2, 1..3 and 2..4.
/// let want = [2.5, 3.5, 4.5, 6.5, 7.5, 8.5, 10.5, 11.5, 12.5];
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, want);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveAvgPool2d {
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
}

impl AdaptiveAvgPool2d {
    /// Pools any `(N, C, H, W)` input to `(N, C, out_h, out_w)`.
    pub fn new(out_h: usize, out_w: usize) -> Self {
        Self { out_h, out_w }
    }

    /// The `(out, input)` averaging matrix of one axis.
    fn matrix(out: usize, input: usize, x: &Tensor) -> Result<Tensor> {
        let mut m = vec![0f32; out * input];
        for i in 0..out {
            let start = i * input / out;
            let end = ((i + 1) * input).div_ceil(out);
            let weight = 1.0 / (end - start) as f32;
            m[i * input + start..i * input + end].fill(weight);
        }
        Tensor::from_vec(m, (out, input), x.device())?.to_dtype(x.dtype())
    }
}

impl Module for AdaptiveAvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        checked_elems("adaptive avg pool", "input", x.dims())?;
        if (h, w) == (self.out_h, self.out_w) {
            return Ok(x.clone());
        }
        if h == 0 || w == 0 {
            candle_core::bail!("adaptive avg pool: empty input {:?}", x.dims());
        }
        #[cfg(feature = "cudnn")]
        if super::cudnn::handles(x, super::cudnn::NORM_DTYPES)
            && h % self.out_h == 0
            && w % self.out_w == 0
            && x.elem_count() > 0
        {
            // Whole bins: an average pool with the bin as window and stride.
            let kernel = (h / self.out_h, w / self.out_w);
            return super::cudnn::avg_pool2d(x, kernel, (self.out_h, self.out_w));
        }
        let ph = Self::matrix(self.out_h, h, x)?;
        let pw = Self::matrix(self.out_w, w, x)?.t()?;
        ph.broadcast_matmul(&x.contiguous()?)?.broadcast_matmul(&pw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Naive adaptive average pool, bin by bin.
    fn reference(x: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for i in 0..oh {
            let (r0, r1) = (i * h / oh, ((i + 1) * h).div_ceil(oh));
            for j in 0..ow {
                let (c0, c1) = (j * w / ow, ((j + 1) * w).div_ceil(ow));
                let mut s = 0f64;
                for r in r0..r1 {
                    for c in c0..c1 {
                        s += x[r * w + c] as f64;
                    }
                }
                out.push((s / ((r1 - r0) * (c1 - c0)) as f64) as f32);
            }
        }
        out
    }

    #[test]
    fn adaptive_matches_bins_for_odd_sizes() -> Result<()> {
        for (h, w) in [(13, 13), (7, 9), (3, 4), (6, 6), (14, 11)] {
            let data: Vec<f32> = (0..h * w)
                .map(|i| ((i * 7919) % 101) as f32 / 10.0)
                .collect();
            let x = Tensor::from_vec(data.clone(), (1, 1, h, w), &Device::Cpu)?;
            let got = AdaptiveAvgPool2d::new(6, 6).forward(&x)?;
            assert_eq!(got.dims(), &[1, 1, 6, 6]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            for (g, r) in got.iter().zip(reference(&data, h, w, 6, 6)) {
                assert!((g - r).abs() < 1e-5, "{h}x{w}: {g} vs {r}");
            }
        }
        Ok(())
    }

    #[test]
    fn ceil_mode_keeps_last_partial_window() -> Result<()> {
        // 4x4 input, 3x3/2: floor gives 1x1, ceil 2x2 with the last window clipped.
        let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        let floor = max_pool2d(&x, 3, 2, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let ceil = max_pool2d(&x, 3, 2, true)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(floor, vec![10.0]);
        assert_eq!(ceil, vec![10.0, 11.0, 14.0, 15.0]);
        Ok(())
    }

    #[test]
    fn adaptive_gradient_spreads_evenly_over_each_bin() -> Result<()> {
        // 3 -> 2 bins on a 3x1 column: rows {0,1} and {1,2}; row 1 is in both.
        let x = Var::from_tensor(&Tensor::ones((1, 1, 3, 1), DType::F32, &Device::Cpu)?)?;
        let y = AdaptiveAvgPool2d::new(2, 1).forward(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        let g = grads
            .get(&x)
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(g, vec![0.5, 1.0, 0.5]);
        Ok(())
    }

    /// Deterministic values in [-1, 1) without ties (a permutation of a grid), or with many
    /// ties when `levels` is small (then ReLU'd, like AlexNet's post-ReLU activations).
    fn data(n: usize, seed: usize, levels: Option<usize>) -> Vec<f32> {
        (0..n)
            .map(|i| {
                // 7919 is prime and coprime with any n used here, so values are distinct.
                let k = (i * 7919 + seed * 104729) % (n.max(1) * 8 + 1);
                match levels {
                    None => k as f32 / (n * 4) as f32 - 1.0,
                    Some(l) => ((k % l) as f32 - (l / 3) as f32).max(0.0),
                }
            })
            .collect()
    }

    fn tensor(v: Vec<f32>, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The pooling this module used before it had a backward: replicate-pad the bottom and
    /// right edges for ceil mode, then candle's floor-mode pool.
    fn padded_candle_pool(x: &Tensor, k: usize, s: usize, ceil: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = (
            pooled_size(h, k, s, ceil).expect("size"),
            pooled_size(w, k, s, ceil).expect("size"),
        );
        let x = x
            .pad_with_same(2, 0, ((oh - 1) * s + k).saturating_sub(h))?
            .pad_with_same(3, 0, ((ow - 1) * s + k).saturating_sub(w))?;
        x.max_pool2d_with_stride(k, s)
    }

    /// Naive input gradient of `sum(pool(x) * g)` with PyTorch's rule, window by window.
    fn reference_grad(
        x: &[f32],
        dims: [usize; 4],
        k: usize,
        s: usize,
        ceil: bool,
        g: &[f32],
    ) -> Vec<f32> {
        let [n, c, h, w] = dims;
        let (oh, ow) = (
            pooled_size(h, k, s, ceil).expect("size"),
            pooled_size(w, k, s, ceil).expect("size"),
        );
        let mut grad = vec![0f32; x.len()];
        for p in 0..n * c {
            for i in 0..oh {
                for j in 0..ow {
                    let mut best: Option<(usize, f32)> = None;
                    for r in i * s..(i * s + k).min(h) {
                        for q in j * s..(j * s + k).min(w) {
                            let idx = p * h * w + r * w + q;
                            let v = x[idx];
                            if best.is_none_or(|(_, m)| v > m || v.is_nan()) {
                                best = Some((idx, v));
                            }
                        }
                    }
                    grad[best.expect("window").0] += g[p * oh * ow + i * ow + j];
                }
            }
        }
        grad
    }

    /// Input gradient of `sum(f(x) * g)` and the output, for `g` of f(x)'s shape from `data`.
    fn grad_of(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let v = Var::from_tensor(x)?;
        let y = f(v.as_tensor())?;
        let g = Tensor::from_vec(data(y.elem_count(), 7, None), y.shape(), &Device::Cpu)?;
        let grads = (&y * &g)?.sum_all()?.backward()?;
        let gx = grads
            .get(&v)
            .expect("gradient of x")
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((y.flatten_all()?.to_vec1()?, gx, g.flatten_all()?.to_vec1()?))
    }

    const SHAPES: [(usize, usize, usize, usize); 5] = [
        (2, 3, 13, 13),
        (1, 2, 14, 15),
        (1, 1, 4, 4),
        (2, 1, 7, 6),
        (1, 3, 3, 5),
    ];
    const POOLS: [(usize, usize); 5] = [(3, 2), (2, 2), (3, 1), (3, 3), (2, 3)];

    #[test]
    fn forward_matches_candle_pool_and_padded_ceil_mode() -> Result<()> {
        for shape in SHAPES {
            for (k, s) in POOLS {
                if k > shape.2.min(shape.3) {
                    continue;
                }
                for levels in [None, Some(5)] {
                    let n = shape.0 * shape.1 * shape.2 * shape.3;
                    let x = tensor(data(n, 1, levels), shape)?;
                    for ceil in [false, true] {
                        let got = max_pool2d(&x, k, s, ceil)?;
                        let want = padded_candle_pool(&x, k, s, ceil)?;
                        assert_eq!(got.dims(), want.dims(), "{shape:?} {k}/{s} ceil={ceil}");
                        assert_eq!(
                            got.flatten_all()?.to_vec1::<f32>()?,
                            want.flatten_all()?.to_vec1::<f32>()?,
                            "{shape:?} {k}/{s} ceil={ceil} levels={levels:?}"
                        );
                        let generic = max_pool2d_generic(&x, k, s, ceil)?;
                        assert_eq!(
                            generic.flatten_all()?.to_vec1::<f32>()?,
                            want.flatten_all()?.to_vec1::<f32>()?,
                            "generic {shape:?} {k}/{s} ceil={ceil}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn cpu_backward_matches_reference_with_and_without_ties() -> Result<()> {
        for shape in SHAPES {
            for (k, s) in POOLS {
                if k > shape.2.min(shape.3) {
                    continue;
                }
                for levels in [None, Some(4), Some(2)] {
                    let n = shape.0 * shape.1 * shape.2 * shape.3;
                    let xs = data(n, 3, levels);
                    let x = tensor(xs.clone(), shape)?;
                    for ceil in [false, true] {
                        let (_, got, g) = grad_of(|t| max_pool2d(t, k, s, ceil), &x)?;
                        let dims = [shape.0, shape.1, shape.2, shape.3];
                        let want = reference_grad(&xs, dims, k, s, ceil, &g);
                        assert_eq!(got, want, "{shape:?} {k}/{s} ceil={ceil} levels={levels:?}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum() -> Result<()> {
        // All equal: each of the four 3x3/2 windows of a 5x5 input picks its top-left element.
        let x = Var::from_tensor(&Tensor::ones((1, 1, 5, 5), DType::F32, &Device::Cpu)?)?;
        let grads = max_pool2d(x.as_tensor(), 3, 2, false)?
            .sum_all()?
            .backward()?;
        let g = grads
            .get(&x)
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut want = vec![0f32; 25];
        for i in [0, 2, 10, 12] {
            want[i] = 1.0;
        }
        assert_eq!(g, want);
        Ok(())
    }

    #[test]
    fn nan_propagates_like_pytorch() -> Result<()> {
        let mut v = data(25, 2, None);
        v[6] = f32::NAN;
        let x = Var::from_tensor(&tensor(v, (1, 1, 5, 5))?)?;
        let y = max_pool2d(x.as_tensor(), 3, 2, false)?;
        let out = y.flatten_all()?.to_vec1::<f32>()?;
        assert!(
            out[0].is_nan() && !out[1].is_nan() && !out[3].is_nan(),
            "{out:?}"
        );
        let grads = y.sum_all()?.backward()?;
        let g = grads
            .get(&x)
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(g[6], 1.0);
        Ok(())
    }

    #[test]
    fn generic_path_gradient_matches_cpu_op_without_ties() -> Result<()> {
        for shape in SHAPES {
            for (k, s) in POOLS {
                if k > shape.2.min(shape.3) {
                    continue;
                }
                let n = shape.0 * shape.1 * shape.2 * shape.3;
                let x = tensor(data(n, 5, None), shape)?;
                for ceil in [false, true] {
                    let (y1, g1, _) = grad_of(|t| max_pool2d(t, k, s, ceil), &x)?;
                    let (y2, g2, _) = grad_of(|t| max_pool2d_generic(t, k, s, ceil), &x)?;
                    assert_eq!(y1, y2, "{shape:?} {k}/{s} ceil={ceil}");
                    // Equal up to the order in which overlapping windows add up.
                    let err = g1
                        .iter()
                        .zip(&g2)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        err <= 1e-6,
                        "{shape:?} {k}/{s} ceil={ceil}: gradients differ by {err}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn generic_path_splits_ties_but_keeps_the_total() -> Result<()> {
        let x = Tensor::ones((1, 1, 5, 5), DType::F32, &Device::Cpu)?;
        let (_, g, _) = grad_of(|t| max_pool2d_generic(t, 3, 2, false), &x)?;
        let (_, want, gout) = grad_of(|t| max_pool2d(t, 3, 2, false), &x)?;
        let total: f32 = gout.iter().sum();
        assert!((g.iter().sum::<f32>() - total).abs() < 1e-5);
        assert_ne!(g, want);
        Ok(())
    }

    #[test]
    fn strided_f64_and_half_inputs() -> Result<()> {
        let xs = data(2 * 3 * 9 * 11, 4, None);
        let x = tensor(xs, (2, 3, 9, 11))?;
        // A transposed (non-contiguous) input, in f64.
        let xt = x.to_dtype(DType::F64)?.transpose(2, 3)?;
        let want = max_pool2d_generic(&xt, 3, 2, true)?;
        let got = max_pool2d(&xt, 3, 2, true)?;
        assert_eq!(
            got.flatten_all()?.to_vec1::<f64>()?,
            want.flatten_all()?.to_vec1::<f64>()?
        );
        for dt in [DType::F16, DType::BF16] {
            let xh = x.to_dtype(dt)?;
            let got = max_pool2d(&xh, 3, 2, false)?.to_dtype(DType::F32)?;
            let want = max_pool2d_generic(&xh, 3, 2, false)?.to_dtype(DType::F32)?;
            assert_eq!(
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?
            );
        }
        let err = max_pool2d(&x.to_dtype(DType::U8)?, 3, 2, false).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        Ok(())
    }

    #[test]
    fn rejects_bad_sizes() -> Result<()> {
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
        assert!(max_pool2d(&x, 5, 2, true)
            .unwrap_err()
            .to_string()
            .contains("smaller"));
        assert!(max_pool2d(&x, 3, 0, false)
            .unwrap_err()
            .to_string()
            .contains("stride"));
        assert!(max_pool2d(&x, 0, 1, false).is_err());
        // Batch of zero planes: an empty output of the right shape.
        let empty = Tensor::zeros((0, 3, 5, 5), DType::F32, &Device::Cpu)?;
        assert_eq!(max_pool2d(&empty, 3, 2, false)?.dims(), &[0, 3, 2, 2]);
        Ok(())
    }
}
