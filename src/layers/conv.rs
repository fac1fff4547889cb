//! 2-D convolution with its bias and an optional ReLU fused: on the CPU a custom op whose
//! forward and backward are gemms.
//!
//! Why: candle 0.11's CPU conv backward computes the input gradient with `conv_transpose2d`, a
//! direct loop several times slower than the forward, and computes it even for the image, which
//! needs none; the bias add and the ReLU are two more passes over the output, each with its own
//! backward. A training step ran at a quarter of PyTorch's speed (issue #5).
//!
//! [`conv2d`] on the CPU in f32 with dilation 1:
//! - forward: per image and group, im2col of the `[cin/groups * kh * kw, oh * ow]` patch matrix
//!   and a gemm by the group's weights, written straight into the NCHW output; the bias and the
//!   ReLU are applied in one pass over each output block while it is in cache. A 3x3 stride-1
//!   convolution with enough channels and at least a block of tiles per thread (AlexNet's
//!   conv3-5 from batch 2 on two threads) goes through Winograd's F(2x2, 3x3) instead, on AVX2
//!   CPUs (`conv/winograd.rs`): 1.2-1.9x those layers;
//! - backward: the output gradient is masked by the ReLU (where the output is > 0, as PyTorch),
//!   then `dW += g * col^T` (im2col recomputed), `db` = sums of `g`, and the input gradient
//!   only when the input is tracked (a plain image gets no gradient, and costs none): with stride
//!   1, a square kernel, `pad < k` and at least 128 input channels per group (AlexNet's
//!   conv3-5) as the forward convolution of `g` with the flipped kernel, at the forward's speed
//!   (by Winograd where the forward would be); else `col2im(W^T * g)`.
//!
//! The patch matrix is built a tile of whole input channels at a time (about 384 KiB), and each
//! tile's gemm adds to the output, so that the gemm reads what im2col just wrote from cache
//! (6 to 25% faster than whole-image buffers on AlexNet's layers); strided convolutions (conv1)
//! gather through per-row phase buffers rather than element by element, and where their channel
//! tiles would be far above that size (few channels, a wide output: conv1) all channels go in
//! one tile and the columns in blocks of whole output rows.
//!
//! A batch of at least as many images as threads is split into one run of images per thread, each
//! with single-threaded gemms, its own reused scratch and its own weight-gradient partial sums
//! (added up in a fixed order, so results do not depend on scheduling): 15 to 20% faster than
//! threading each image's gemms. A smaller batch runs image by image with each gemm split by
//! columns over the threads (faster than gemm's own threading for these shapes), or, for a
//! grouped convolution, its groups side by side. Elsewhere (other
//! devices and dtypes, dilation > 1) [`conv2d`] is candle's `conv2d`, bias add and ReLU, so CUDA
//! and Metal keep their kernels.

use std::cell::Cell;
use std::ops::Range;

use candle_core::{DType, Result, Shape, Tensor};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

use super::cpu::{apply, matmul, relu_grad, relu_grad_into, Split, WeightOp};

mod winograd;

/// The op's name in error messages.
const OP: &str = "conv2d";

/// `relu(conv2d(x, weight) + bias)` (the ReLU when `relu` is true), with the semantics of
/// candle's `Tensor::conv2d` and `candle_nn::Conv2d`: `x` is `(N, C_in, H, W)`, `weight` is
/// `(C_out, C_in / groups, KH, KW)`, `bias` is `(C_out)`, and `cfg` gives padding, stride,
/// dilation and groups (its cuDNN algorithm is passed on where candle's conv runs).
///
/// On the CPU with f32 tensors and dilation 1 this is one custom op with a gemm backward (design
/// notes at the top of `src/layers/conv.rs`); the gradient of a fused ReLU is PyTorch's (zero
/// where the output is zero), and a tensor that is not tracked (an image, rather than a [`candle_core::Var`] or a
/// result of one) gets no gradient. Anywhere else it is candle's ops, with candle's gradients.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::Conv2dConfig;
/// use candle_zoo::layers::conv2d;
///
/// let dev = Device::Cpu;
/// let x = Tensor::arange(0f32, 2. * 4. * 4., &dev)?.reshape((1, 2, 4, 4))?;
/// let w = Var::from_tensor(&Tensor::ones((2, 1, 3, 3), candle_core::DType::F32, &dev)?)?;
/// let b = Var::new(&[-100f32, 0.], &dev)?;
/// let cfg = Conv2dConfig { padding: 1, groups: 2, ..Default::default() };
/// let y = conv2d(&x, w.as_tensor(), Some(b.as_tensor()), &cfg, true)?;
/// assert_eq!(y.dims(), &[1, 2, 4, 4]);
/// // Channel 1 is the 3x3 box sum of input channel 1 (16..32); channel 0 is ReLU'd to zero
/// // where its box sum is below 100.
/// assert_eq!(y.get(0)?.get(1)?.get(1)?.get(1)?.to_scalar::<f32>()?, 9. * 21.);
/// assert_eq!(y.get(0)?.get(0)?.get(0)?.get(0)?.to_scalar::<f32>()?, 0.);
///
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(w.as_tensor()).is_some() && grads.get(b.as_tensor()).is_some());
/// assert!(grads.get(&x).is_none()); // the image needs no gradient: none is computed
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
    relu: bool,
) -> Result<Tensor> {
    let geometry = Geometry::new(x, weight, bias, cfg)?;
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let fast = cfg.dilation == 1
        && f32_cpu(x)
        && f32_cpu(weight)
        && bias.is_none_or(f32_cpu)
        // Empty batches and kernels go to candle, which knows its own rules for them.
        && geometry.n > 0
        && geometry.k() > 0;
    if !fast {
        return conv2d_candle(x, weight, bias, cfg, relu);
    }
    apply(Conv2dOp { geometry, relu }, x, weight, bias)
}

/// The same convolution as candle's ops: `conv2d`, `broadcast_add` of the bias, `relu`.
pub(crate) fn conv2d_candle(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
    relu: bool,
) -> Result<Tensor> {
    let y = x.conv2d_with_algo(
        weight,
        cfg.padding,
        cfg.stride,
        cfg.dilation,
        cfg.groups,
        cfg.cudnn_fwd_algo,
    )?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Sizes of one convolution, checked: `n` images of `cin x h x w` to `cout x oh x ow`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    groups: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, cfg: &Conv2dConfig) -> Result<Self> {
        let (n, cin, h, w) = x.dims4()?;
        let (cout, cin_g, kh, kw) = weight.dims4()?;
        let (groups, stride, pad, dilation) = (cfg.groups, cfg.stride, cfg.padding, cfg.dilation);
        if groups == 0 || stride == 0 || dilation == 0 {
            candle_core::bail!(
                "conv2d: groups ({groups}), stride ({stride}) and dilation ({dilation}) must be >= 1"
            );
        }
        if cin != cin_g * groups || cout % groups != 0 {
            candle_core::bail!(
                "conv2d: input {:?} and weight {:?} do not fit groups={groups} (input channels \
                 must be weight.dim(1) * groups, output channels a multiple of groups)",
                x.dims(),
                weight.dims()
            );
        }
        if let Some(b) = bias {
            if b.dims() != [cout] {
                candle_core::bail!("conv2d: bias {:?} should be ({cout})", b.dims());
            }
        }
        let out = |input: usize, k: usize| {
            let span = dilation * k.saturating_sub(1) + 1;
            (input + 2 * pad).checked_sub(span).map(|s| s / stride + 1)
        };
        let (Some(oh), Some(ow)) = (out(h, kh), out(w, kw)) else {
            candle_core::bail!(
                "conv2d: input {h}x{w} with padding {pad} is smaller than the {kh}x{kw} kernel \
                 (dilation {dilation})"
            );
        };
        Ok(Self {
            n,
            cin,
            h,
            w,
            cout,
            groups,
            kh,
            kw,
            stride,
            pad,
            oh,
            ow,
        })
    }

    fn cin_g(&self) -> usize {
        self.cin / self.groups
    }

    fn cout_g(&self) -> usize {
        self.cout / self.groups
    }

    /// Rows of an im2col buffer: one per weight of an output channel.
    fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }

    /// Columns of an im2col buffer: one per output pixel.
    fn p(&self) -> usize {
        self.oh * self.ow
    }

    fn in_image(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn out_image(&self) -> usize {
        self.cout * self.p()
    }

    fn out_shape(&self) -> Shape {
        (self.n, self.cout, self.oh, self.ow).into()
    }

    /// Outputs `lo..hi` along an axis whose input `o * stride + kpos - pad` lies in `0..input`.
    fn valid(&self, kpos: usize, input: usize, out: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kpos).div_ceil(self.stride).min(out);
        let hi = match (input + self.pad).checked_sub(kpos + 1) {
            Some(last) => (last / self.stride + 1).min(out),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Output rows `y0..y1` of `oys` whose input row through kernel row `ki` is inside the input.
    fn valid_rows(&self, ki: usize, oys: &Range<usize>) -> (usize, usize) {
        let (y0, y1) = self.valid(ki, self.h, self.oh);
        let y0 = y0.clamp(oys.start, oys.end);
        (y0, y1.clamp(y0, oys.end))
    }

    /// Fills row `(ki, kj)` of one input channel's block of an im2col buffer, for the output
    /// rows `oys` (`oys.len() * ow` columns): the input pixel each output pixel sees through
    /// that kernel tap, zero in the padding.
    fn im2col_row(&self, plane: &[f32], ki: usize, kj: usize, oys: &Range<usize>, row: &mut [f32]) {
        let (s, ow) = (self.stride, self.ow);
        let (y0, y1) = self.valid_rows(ki, oys);
        let (x0, x1) = self.valid(kj, self.w, self.ow);
        // Output row `oy` is `row[(oy - base) * ow..]`.
        let base = oys.start;
        row[..(y0 - base) * ow].fill(0.0);
        row[(y1 - base) * ow..].fill(0.0);
        if x0 == x1 || y0 == y1 {
            row[(y0 - base) * ow..(y1 - base) * ow].fill(0.0);
            return;
        }
        if s == 1 && ow == self.w {
            // "Same" padding: output rows y0..y1 are one run of input rows shifted by
            // `kj - pad`, so copy the run at once, then zero the columns that wrapped around.
            let shift = (ki * self.w + kj) as isize - (self.pad * self.w + self.pad) as isize;
            let (start, end) = ((y0 * ow) as isize + shift, (y1 * ow) as isize + shift);
            let (lo, hi) = (
                start.max(0) as usize,
                end.min(plane.len() as isize) as usize,
            );
            let dst_lo = (lo as isize - shift) as usize - base * ow;
            row[dst_lo..dst_lo + (hi - lo)].copy_from_slice(&plane[lo..hi]);
            for oy in y0..y1 {
                let dst = &mut row[(oy - base) * ow..(oy - base + 1) * ow];
                dst[..x0].fill(0.0);
                dst[x1..].fill(0.0);
            }
            return;
        }
        for oy in y0..y1 {
            let dst = &mut row[(oy - base) * ow..(oy - base + 1) * ow];
            dst[..x0].fill(0.0);
            dst[x1..].fill(0.0);
            let iy = oy * s + ki - self.pad;
            let first = iy * self.w + x0 * s + kj - self.pad;
            let src = &plane[first..first + (x1 - x0 - 1) * s + 1];
            if s == 1 {
                dst[x0..x1].copy_from_slice(src);
            } else {
                for (d, c) in dst[x0..x1].iter_mut().zip(src.chunks(s)) {
                    *d = c[0];
                }
            }
        }
    }

    /// Adds row `(ki, kj)` of an im2col-shaped gradient of output rows `oys` back onto the
    /// input pixels it came from.
    fn col2im_row(&self, row: &[f32], ki: usize, kj: usize, oys: &Range<usize>, plane: &mut [f32]) {
        let (s, ow) = (self.stride, self.ow);
        let (y0, y1) = self.valid_rows(ki, oys);
        let (x0, x1) = self.valid(kj, self.w, self.ow);
        if x0 == x1 {
            return;
        }
        for oy in y0..y1 {
            let at = (oy - oys.start) * ow;
            let src = &row[at + x0..at + x1];
            let iy = oy * s + ki - self.pad;
            let dst = &mut plane[iy * self.w + x0 * s + kj - self.pad..(iy + 1) * self.w];
            for (d, &v) in dst.iter_mut().step_by(s).zip(src) {
                *d += v;
            }
        }
    }

    /// Output rows per column block of the im2col buffer. Tiles of whole input channels (see
    /// [`Self::tiles`]) over all output pixels are far above [`COL_TILE`] for a strided
    /// convolution with a wide output and few input channels (AlexNet's conv1: 11x11 taps over
    /// 55x55 outputs, 2.9 MB per 2-channel tile, in two gemm passes over the output). There
    /// one tile takes all input channels and the columns go in blocks of whole output rows,
    /// about [`COL_TILE`] floats each (conv1 forward at batch 16 and 64: 1.1-1.3x; training
    /// step at batch 32: 1.07-1.18x). Elsewhere one block holds all rows, and so where a batch
    /// has fewer images than threads: each block's gemm would be split over the threads, and
    /// their synchronisation cost more than the blocks saved (conv1 at batch 1: 0.84-0.9x).
    fn block_rows(&self) -> usize {
        let k = self.k();
        let split_gemms = self.split().1 > 1;
        if split_gemms || self.stride == 1 || k > MAX_BLOCK_K {
            return self.oh;
        }
        (COL_TILE / (k * self.ow)).clamp(1, self.oh)
    }

    /// The column blocks: ranges of output rows of [`Self::block_rows`] rows each.
    fn blocks(&self) -> impl Iterator<Item = Range<usize>> {
        let (oh, rows) = (self.oh, self.block_rows());
        (0..oh).step_by(rows).map(move |y0| y0..(y0 + rows).min(oh))
    }

    /// Input channels per im2col tile, and the tiles: the im2col buffer holds the rows of
    /// whole input channels, about [`COL_TILE`] floats (at least [`MIN_TILE_ROWS`] rows), so
    /// that the gemm reads it from cache right after im2col wrote it; all of them when the
    /// columns go in blocks ([`Self::block_rows`]).
    fn tiles(&self) -> impl Iterator<Item = Range<usize>> {
        let (cin_g, kk) = (self.cin_g(), self.kh * self.kw);
        let blocked = self.block_rows() < self.oh;
        let rows = if blocked {
            usize::MAX
        } else {
            (COL_TILE / self.p()).max(MIN_TILE_ROWS)
        };
        let per = rows.div_ceil(kk).min(cin_g).max(1);
        // Even tiles rather than full ones and a small remainder.
        let per = cin_g.div_ceil(cin_g.div_ceil(per));
        (0..cin_g)
            .step_by(per)
            .map(move |c0| c0..(c0 + per).min(cin_g))
    }

    /// Floats of the largest im2col tile.
    fn tile_len(&self) -> usize {
        let channels = self.tiles().map(|c| c.len()).max().unwrap_or(0);
        channels * self.kh * self.kw * self.block_rows() * self.ow
    }

    /// im2col of input channels `chans` of one group of one image (`x`: the group's planes)
    /// for the output rows `oys`, into the first `chans.len() * kh * kw` rows (of
    /// `oys.len() * ow` columns) of `col`; in parallel when `parallel`, one task per (channel,
    /// kernel row), or per channel when strided.
    fn im2col(
        &self,
        x: &[f32],
        chans: Range<usize>,
        oys: &Range<usize>,
        col: &mut [f32],
        parallel: bool,
    ) {
        let (p, hw, kh) = (oys.len() * self.ow, self.h * self.w, self.kh);
        let col = &mut col[..chans.len() * kh * self.kw * p];
        let plane = |c: usize| &x[(chans.start + c) * hw..(chans.start + c + 1) * hw];
        if self.stride == 1 {
            for_tasks(col, self.kw * p, parallel, |t, rows| {
                for (kj, row) in rows.chunks_exact_mut(p).enumerate() {
                    self.im2col_row(plane(t / kh), t % kh, kj, oys, row);
                }
            });
        } else {
            for_tasks(col, kh * self.kw * p, parallel, |c, rows| {
                self.im2col_strided(plane(c), oys, rows)
            });
        }
    }

    /// The `kh * kw` rows of one input channel's block of an im2col buffer, for strides above
    /// one. A strided gather is slow; instead each (zero-padded) input row is split once into
    /// its `stride` phases, `phases[j % s][j / s] = row[j]`: the output row `oy` of tap
    /// `(ki, kj)`, where `oy * s + ki` is that input row, is the contiguous run of phase `kj % s`
    /// from `kj / s`.
    fn im2col_strided(&self, plane: &[f32], oys: &Range<usize>, rows: &mut [f32]) {
        if oys.is_empty() {
            return;
        }
        let (s, p, ow, kw) = (self.stride, oys.len() * self.ow, self.ow, self.kw);
        let phase_len = (self.w + 2 * self.pad).div_ceil(s);
        // The padding stays zero: only the input's columns are written below.
        let mut phases = vec![0f32; s * phase_len];
        // The (padded) input rows that output rows `oys` read.
        let last = (oys.end.max(1) - 1) * s + self.kh;
        for iy in oys.start * s..last.min(self.h + 2 * self.pad) {
            let inside = (self.pad..self.pad + self.h).contains(&iy);
            if inside {
                let y = iy - self.pad;
                let src = &plane[y * self.w..(y + 1) * self.w];
                for (ph, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
                    // Phase `ph` starts at input column `skip` (padded column `pad + skip`).
                    let skip = (ph + s - self.pad % s) % s;
                    if skip < self.w {
                        let dst = &mut phase[(self.pad + skip) / s..];
                        for (d, &v) in dst.iter_mut().zip(src[skip..].iter().step_by(s)) {
                            *d = v;
                        }
                    }
                }
            }
            // Every (oy, ki) with oy in `oys` and oy * s + ki == iy.
            let first_oy = (iy + 1).saturating_sub(self.kh).div_ceil(s).max(oys.start);
            for oy in first_oy..=(iy / s).min(oys.end - 1) {
                let ki = iy - oy * s;
                let out = (oy - oys.start) * ow..(oy - oys.start + 1) * ow;
                let taps = rows[ki * kw * p..(ki + 1) * kw * p].chunks_exact_mut(p);
                for (kj, row) in taps.enumerate() {
                    if inside {
                        let start = (kj % s) * phase_len + kj / s;
                        row[out.clone()].copy_from_slice(&phases[start..start + ow]);
                    } else {
                        row[out.clone()].fill(0.0);
                    }
                }
            }
        }
    }

    /// col2im of input channels `chans` of one group of one image, output rows `oys`: adds the
    /// first `chans.len() * kh * kw` rows of `col` onto the group's planes `dx`; one plane per
    /// task when `parallel` (a plane's rows are all its own).
    fn col2im(
        &self,
        col: &[f32],
        chans: Range<usize>,
        oys: &Range<usize>,
        dx: &mut [f32],
        parallel: bool,
    ) {
        let (p, hw, kk) = (oys.len() * self.ow, self.h * self.w, self.kh * self.kw);
        let planes = &mut dx[chans.start * hw..chans.end * hw];
        let col = &col[..chans.len() * kk * p];
        let add = |(plane, rows): (&mut [f32], &[f32])| {
            for (t, row) in rows.chunks_exact(p).enumerate() {
                self.col2im_row(row, t / self.kw, t % self.kw, oys, plane);
            }
        };
        if parallel {
            planes
                .par_chunks_mut(hw)
                .zip(col.par_chunks(kk * p))
                .for_each(add);
        } else {
            planes.chunks_mut(hw).zip(col.chunks(kk * p)).for_each(add);
        }
    }

    /// How a batch is split: runs of `per` images, one run per thread with single-threaded
    /// gemms when the batch has at least as many images as threads (`threads` = 1 for each run);
    /// else one run, each gemm split over `threads` threads.
    fn split(&self) -> (usize, usize) {
        let threads = super::cpu::threads();
        if threads > 1 && self.n >= threads {
            (self.n.div_ceil(threads), 1)
        } else {
            (self.n, threads)
        }
    }

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, relu: bool) -> Vec<f32> {
        if winograd::applies(self) {
            return winograd::forward(self, x, w, b, relu);
        }
        self.forward_im2col(x, w, b, relu)
    }

    /// [`Self::forward`] by im2col and gemm.
    fn forward_im2col(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, relu: bool) -> Vec<f32> {
        let out_image = self.out_image();
        let mut out = vec![0f32; self.n * out_image];
        let (per, threads) = self.split();
        let run = |first: usize, out: &mut [f32]| {
            for (i, out) in out.chunks_exact_mut(out_image).enumerate() {
                let img = first + i;
                let x = &x[img * self.in_image()..(img + 1) * self.in_image()];
                self.forward_image(x, w, b, relu, out, threads);
            }
        };
        if per >= self.n {
            run(0, &mut out);
        } else {
            out.par_chunks_mut(per * out_image)
                .enumerate()
                .for_each(|(t, out)| run(t * per, out));
        }
        out
    }

    /// One image on `threads` threads, group by group; with several threads and groups, the
    /// groups side by side, each on its share of the threads (two-tower conv2, 4 and 5 at
    /// batch 1 on two threads: 1.1-1.3x against splitting each gemm over both).
    fn forward_image(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        relu: bool,
        out: &mut [f32],
        threads: usize,
    ) {
        let group_out = self.cout_g() * self.p();
        let group = |(g, out): (usize, &mut [f32]), threads: usize| {
            with_scratch(self.tile_len(), |col| {
                self.forward_group(x, w, b, relu, g, out, col, threads)
            })
        };
        if threads > 1 && self.groups > 1 {
            let threads = (threads / self.groups).max(1);
            out.par_chunks_mut(group_out)
                .enumerate()
                .for_each(|g| group(g, threads));
        } else {
            out.chunks_mut(group_out)
                .enumerate()
                .for_each(|g| group(g, threads));
        }
    }

    /// Group `g` of one image `x` into `out`: block by block, im2col and gemm tile by tile,
    /// then bias and ReLU while the block is in cache.
    #[allow(clippy::too_many_arguments)]
    fn forward_group(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        relu: bool,
        g: usize,
        out: &mut [f32],
        col: &mut [f32],
        threads: usize,
    ) {
        let (k, p, cout_g) = (self.k(), self.p(), self.cout_g());
        let x_group = self.cin_g() * self.h * self.w;
        let kk = self.kh * self.kw;
        let x = &x[g * x_group..(g + 1) * x_group];
        let w = &w[g * cout_g * k..(g + 1) * cout_g * k];
        for oys in self.blocks() {
            let cols = oys.start * self.ow..oys.end * self.ow;
            for chans in self.tiles() {
                let (k0, krows) = (chans.start * kk, chans.len() * kk);
                let first = chans.start == 0;
                self.im2col(x, chans, &oys, col, threads > 1);
                // out[cout_g, cols] (+)= w[cout_g, k0..k0 + krows] * col[krows, cols]
                let (lhs, rhs) = ((&w[k0..], k, 1), (&col[..], cols.len(), 1));
                matmul(
                    (&mut out[cols.start..], p),
                    !first,
                    (cout_g, cols.len(), krows),
                    lhs,
                    rhs,
                    (threads, Split::Cols),
                );
            }
            for_tasks(out, p, threads > 1, |c, row| {
                let row = &mut row[cols.clone()];
                let bias = b.map_or(0.0, |b| b[g * cout_g + c]);
                if relu {
                    row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0));
                } else if bias != 0.0 {
                    row.iter_mut().for_each(|v| *v += bias);
                }
            });
        }
    }

    /// Gradients of the weight and bias (when asked for) and of the input (when `dx` is given,
    /// zeroed, for the whole batch), from the output `res` and its gradient `grad`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        relu: bool,
        want_dw: bool,
        want_db: bool,
        dx: Option<&mut [f32]>,
    ) -> (Vec<f32>, Vec<f64>) {
        let (per, threads) = self.split();
        let in_image = self.in_image();
        // Each group's weight transposed once, `k x cout_g`, for the input gradient's gemm:
        // the gemm crate reads a row-major left operand faster than a transposed one, and
        // every image and tile would transpose it again (conv2-5 input gradients: ~1.4x their
        // forward time before this).
        let wt = if dx.is_some() {
            let (k, cout_g) = (self.k(), self.cout_g());
            let mut wt = vec![0f32; w.len()];
            for (wg, wtg) in w
                .chunks_exact(cout_g * k)
                .zip(wt.chunks_exact_mut(cout_g * k))
            {
                for (o, row) in wg.chunks_exact(k).enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        wtg[i * cout_g + o] = v;
                    }
                }
            }
            wt
        } else {
            Vec::new()
        };
        let wt = &wt[..];
        let run = |images: Range<usize>, dx: Option<&mut [f32]>| {
            let mut dw = vec![0f32; if want_dw { self.cout * self.k() } else { 0 }];
            let mut db = vec![0f64; if want_db { self.cout } else { 0 }];
            let scratch = self.tile_len() + if relu { self.out_image() } else { 0 };
            with_scratch(scratch, |buf| {
                let (col, masked) = buf.split_at_mut(self.tile_len());
                let mut dx = dx;
                for (i, img) in images.enumerate() {
                    let dx_image = dx
                        .as_deref_mut()
                        .map(|dx| &mut dx[i * in_image..(i + 1) * in_image]);
                    let grads = Grads {
                        dw: &mut dw,
                        first: i == 0,
                        db: &mut db,
                        dx: dx_image,
                    };
                    self.backward_image(x, wt, res, grad, img, relu, grads, col, masked, threads);
                }
            });
            (dw, db)
        };
        if per >= self.n {
            return run(0..self.n, dx);
        }
        // One run of images per thread, each with its slice of dx (if any).
        let runs = self.n.div_ceil(per);
        let slices: Vec<Option<&mut [f32]>> = match dx {
            Some(dx) => dx.chunks_mut(per * in_image).map(Some).collect(),
            None => (0..runs).map(|_| None).collect(),
        };
        let partials: Vec<(Vec<f32>, Vec<f64>)> = slices
            .into_par_iter()
            .enumerate()
            .map(|(t, dx)| run(t * per..((t + 1) * per).min(self.n), dx))
            .collect();
        // Sum the partials in run order, so that the result does not depend on scheduling.
        let mut iter = partials.into_iter();
        let (mut dw, mut db) = iter.next().unwrap_or_default();
        for (pw, pb) in iter {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        (dw, db)
    }

    /// The convolution whose output is this one's input gradient, where there is one: with
    /// stride 1, a square kernel and padding `pad < k`, the gradient is the correlation of the
    /// output gradient, padded by `k - 1 - pad`, with the flipped kernel (input and output
    /// channels swapped within each group).
    ///
    /// Taken only when its gemm has at least [`MIN_ROWS_BY_CONV`] rows (input channels per
    /// group): with fewer (AlexNet's conv2, 64), packing its wide im2col costs more than the gemm
    /// + col2im path.
    fn input_grad_geometry(&self) -> Option<Geometry> {
        let square = self.kh == self.kw && self.pad < self.kh;
        let rows = self.cin_g() >= MIN_ROWS_BY_CONV;
        (self.stride == 1 && square && rows).then(|| Geometry {
            n: self.n,
            cin: self.cout,
            h: self.oh,
            w: self.ow,
            cout: self.cin,
            groups: self.groups,
            kh: self.kh,
            kw: self.kw,
            stride: 1,
            pad: self.kh - 1 - self.pad,
            oh: self.h,
            ow: self.w,
        })
    }

    /// The input gradient as the forward convolution `t` ([`Self::input_grad_geometry`]) of the
    /// (ReLU-masked) output gradient: its im2col + gemm runs at the forward pass's speed, where
    /// the gemm + col2im path ran at about 0.7x of it (conv3-5 of AlexNet at batch 32).
    fn input_grad_by_conv(
        &self,
        t: &Geometry,
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        relu: bool,
    ) -> Vec<f32> {
        let (cin_g, cout_g, kk) = (self.cin_g(), self.cout_g(), self.kh * self.kw);
        // flipped[g, ci, co] = w[g, co, ci] with the taps reversed: reversing a row-major
        // kh x kw block flips both of its axes.
        let mut flipped = vec![0f32; w.len()];
        for g in 0..self.groups {
            for co in 0..cout_g {
                for ci in 0..cin_g {
                    let src = &w[((g * cout_g + co) * cin_g + ci) * kk..][..kk];
                    let dst = &mut flipped[((g * cin_g + ci) * cout_g + co) * kk..][..kk];
                    dst.iter_mut()
                        .zip(src.iter().rev())
                        .for_each(|(d, &s)| *d = s);
                }
            }
        }
        t.forward(&relu_grad(relu, grad, res), &flipped, None, false)
    }

    /// Adds image `img`'s contributions to `grads`. `col` is the scratch of an im2col tile;
    /// `masked` holds the ReLU-masked output gradient of the image (empty without ReLU).
    #[allow(clippy::too_many_arguments)]
    fn backward_image(
        &self,
        x: &[f32],
        wt: &[f32],
        res: &[f32],
        grad: &[f32],
        img: usize,
        relu: bool,
        grads: Grads<'_>,
        col: &mut [f32],
        masked: &mut [f32],
        threads: usize,
    ) {
        let (k, p, cout_g) = (self.k(), self.p(), self.cout_g());
        let out = img * self.out_image()..(img + 1) * self.out_image();
        let g: &[f32] = if relu {
            relu_grad_into(masked, &grad[out.clone()], &res[out]);
            masked
        } else {
            &grad[out]
        };
        for (db, row) in grads.db.iter_mut().zip(g.chunks_exact(p)) {
            *db += row.iter().map(|&v| v as f64).sum::<f64>();
        }
        let x_group = self.cin_g() * self.h * self.w;
        let x = &x[img * self.in_image()..(img + 1) * self.in_image()];
        let mut dx = grads.dx;
        // Already zero, but written before col2im reads it: a fresh allocation then faults each
        // page in once rather than twice (a read maps the zero page, the write copies it).
        if let Some(dx) = dx.as_deref_mut() {
            dx.fill(0.0);
        }
        let kk = self.kh * self.kw;
        for grp in 0..self.groups {
            let g = &g[grp * cout_g * p..(grp + 1) * cout_g * p];
            let x = &x[grp * x_group..(grp + 1) * x_group];
            for oys in self.blocks() {
                let cols = oys.start * self.ow..oys.end * self.ow;
                let (g, bp) = (&g[cols.start..], cols.len());
                for chans in self.tiles() {
                    let (k0, rows) = (chans.start * kk, chans.len() * kk);
                    if !grads.dw.is_empty() {
                        self.im2col(x, chans.clone(), &oys, col, threads > 1);
                        // dw[cout_g, k0..k0 + rows] (+)= g[cout_g, cols] * col^T[cols, rows]
                        let dw = &mut grads.dw[grp * cout_g * k + k0..(grp + 1) * cout_g * k];
                        let acc = !grads.first || oys.start > 0;
                        matmul(
                            (dw, k),
                            acc,
                            (cout_g, rows, bp),
                            (g, p, 1),
                            (&col[..], 1, bp),
                            (threads, Split::Cols),
                        );
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        // col[rows, cols] = w^T[k0..k0 + rows, cout_g] * g[cout_g, cols], then
                        // back onto the input planes.
                        let wt = &wt[grp * k * cout_g + k0 * cout_g..(grp + 1) * k * cout_g];
                        matmul(
                            (col, bp),
                            false,
                            (rows, bp, cout_g),
                            (wt, cout_g, 1),
                            (g, p, 1),
                            (threads, Split::Cols),
                        );
                        let dx = &mut dx[grp * x_group..(grp + 1) * x_group];
                        self.col2im(col, chans, &oys, dx, threads > 1);
                    }
                }
            }
        }
    }
}

/// Where one image's gradients go.
struct Grads<'a> {
    /// `cout x k` weight gradient, empty when not wanted.
    dw: &'a mut [f32],
    /// Whether `dw` is yet to be written: the image's gemm overwrites it rather than adding to
    /// it (which, on a fresh allocation, also spares the page faults of reading it first).
    first: bool,
    /// Per-channel bias gradient, empty when not wanted.
    db: &'a mut [f64],
    /// The image's input gradient, when wanted.
    dx: Option<&'a mut [f32]>,
}

/// Below this many elements a piece of im2col is not worth a rayon task.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// Target size of an im2col tile in floats (384 KiB: within the 512 KiB L2 of the 2-core Zen 3
/// this was tuned on, next to gemm's packed blocks). Tiles of 125 to 567 rows run 6 to 25%
/// faster than whole-image im2col buffers on AlexNet's layers.
const COL_TILE: usize = 96 * 1024;

/// Most im2col rows (input channels x taps per group) for which a strided convolution's
/// columns go in blocks ([`Geometry::block_rows`]): more would make the blocks too narrow for the
/// gemm, and channel tiles then already bound the buffer.
const MAX_BLOCK_K: usize = 1024;

/// Fewest rows of an im2col tile (a wide image gets a thin tile): fewer make gemm's passes
/// over the output too short.
const MIN_TILE_ROWS: usize = 128;

/// Fewest input channels per group for which [`Geometry::input_grad_geometry`] computes an
/// input gradient as a convolution.
const MIN_ROWS_BY_CONV: usize = 128;

/// Runs `f(task, chunk)` over the `len`-float chunks of `data`, on rayon's threads (several
/// small chunks per task) when `parallel`.
fn for_tasks(data: &mut [f32], len: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    if parallel {
        let min_len = (MIN_ELEMS_PER_TASK / len).max(1);
        data.par_chunks_mut(len)
            .enumerate()
            .with_min_len(min_len)
            .for_each(|(t, chunk)| f(t, chunk));
    } else {
        data.chunks_mut(len)
            .enumerate()
            .for_each(|(t, chunk)| f(t, chunk));
    }
}

thread_local! {
    /// Each thread's im2col scratch, kept between calls (rayon's threads live as long as the
    /// process), so that a forward or backward pass allocates none after the first.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch. Every user overwrites what it reads, so
/// the buffer is zeroed only where it grows. The buffer is taken out while in use: a nested call
/// (rayon may run another task on a thread that waits for gemm) gets a fresh one.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(Cell::take);
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| s.set(buf));
    r
}

/// The CPU convolution op (see [`conv2d`]).
#[derive(Debug, Clone, Copy)]
struct Conv2dOp {
    geometry: Geometry,
    relu: bool,
}

impl WeightOp for Conv2dOp {
    const OP: &'static str = OP;
    const NAMES: [&'static str; 2] = ["conv2d-relu", "conv2d-bias-relu"];

    fn lens(&self) -> [usize; 4] {
        let g = &self.geometry;
        [
            g.n * g.in_image(),
            g.cout * g.k(),
            g.cout,
            g.n * g.out_image(),
        ]
    }

    fn out_shape(&self) -> Shape {
        self.geometry.out_shape()
    }

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        self.geometry.forward(x, w, b, self.relu)
    }

    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        [want_dx, want_dw, want_db]: [bool; 3],
    ) -> [Option<Vec<f32>>; 3] {
        let g = &self.geometry;
        let by_conv = want_dx.then(|| g.input_grad_geometry()).flatten();
        let mut dx = (want_dx && by_conv.is_none()).then(|| vec![0f32; g.n * g.in_image()]);
        let (dw, db) = g.backward(
            x,
            w,
            res,
            grad,
            self.relu,
            want_dw,
            want_db,
            dx.as_deref_mut(),
        );
        if let Some(t) = by_conv {
            dx = Some(g.input_grad_by_conv(&t, w, res, grad, self.relu));
        }
        let db = want_db.then(|| db.into_iter().map(|v| v as f32).collect());
        [dx, want_dw.then_some(dw), db]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in [-1, 1), distinct enough that no pre-activation is exactly 0.
    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let k = (i * 7919 + seed * 104729) % 20011;
                k as f32 / 10005.5 - 1.0
            })
            .collect()
    }

    fn tensor(n: usize, seed: usize, dims: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(data(n, seed), dims, &Device::Cpu)
    }

    fn flat(t: &Tensor) -> Result<Vec<f32>> {
        t.flatten_all()?.to_vec1::<f32>()
    }

    /// `max |a - b| / max |b|`.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    /// One case: (batch, cin, h, w), (cout, k), groups, stride, padding.
    struct Case {
        x: [usize; 4],
        cout: usize,
        k: usize,
        groups: usize,
        stride: usize,
        pad: usize,
    }

    /// Square inputs where the stride is above 1: candle's own conv backward (the reference)
    /// takes the output padding of both axes from the height.
    fn cases() -> Vec<Case> {
        let case = |x, cout, k, groups, stride, pad| Case {
            x,
            cout,
            k,
            groups,
            stride,
            pad,
        };
        vec![
            case([1, 3, 9, 9], 4, 3, 1, 1, 1),
            case([3, 4, 7, 8], 6, 3, 2, 1, 1),
            case([3, 3, 23, 23], 4, 11, 1, 4, 2),
            case([1, 3, 19, 19], 5, 11, 1, 4, 0),
            case([3, 4, 9, 10], 4, 5, 2, 1, 2),
            case([1, 6, 6, 5], 8, 3, 2, 1, 0),
            case([2, 4, 10, 10], 6, 3, 2, 2, 1),
            case([3, 2, 5, 5], 3, 1, 1, 1, 0),
            // Padding as wide as the kernel: no input gradient by convolution, gemm + col2im.
            case([2, 3, 6, 6], 4, 1, 1, 1, 1),
            // Enough input channels for the input gradient by convolution, with groups.
            case([2, 256, 5, 5], 6, 3, 2, 1, 1),
            case([3, 128, 6, 7], 4, 3, 1, 1, 0),
            case([2, 128, 5, 5], 4, 5, 1, 1, 2),
            // Batch 1 with >= 128 output pixels or weights per output channel: gemms split
            // over threads by columns.
            case([1, 3, 51, 51], 8, 11, 1, 4, 2),
            case([1, 32, 12, 12], 8, 3, 2, 1, 1),
            // Winograd F(2x2, 3x3) (3x3, stride 1, >= 32 input and >= 16 output channels per
            // group, on AVX2, with at least 48 tiles of 2x2 outputs per thread: all four on 2
            // threads, the first on up to 8): a partial panel of output channels without
            // padding; groups, and input gradients that take it too (by convolution: >= 128
            // channels per group in).
            case([8, 64, 13, 13], 32, 3, 1, 1, 1),
            case([4, 64, 14, 13], 40, 3, 1, 1, 0),
            case([6, 256, 9, 9], 64, 3, 2, 1, 1),
            case([8, 128, 6, 6], 32, 3, 1, 1, 2),
            // Wide images: im2col in several tiles of input channels.
            case([2, 32, 28, 28], 8, 3, 1, 1, 1),
            // Strided with few input channels: all channels in one tile, the columns in blocks
            // of output rows (the last one shorter in the second case).
            case([1, 4, 115, 115], 4, 11, 1, 4, 2),
            case([2, 3, 55, 55], 4, 7, 1, 2, 2),
            // conv1-like, an image per thread (blocks need each gemm on one thread): 15 + 2
            // output rows per block.
            case([super::super::cpu::threads(), 3, 75, 75], 4, 11, 1, 4, 0),
        ]
    }

    struct Setup {
        x: Tensor,
        w: Tensor,
        b: Tensor,
        cfg: Conv2dConfig,
    }

    fn setup(c: &Case) -> Result<Setup> {
        let xn: usize = c.x.iter().product();
        let wdims = [c.cout, c.x[1] / c.groups, c.k, c.k];
        let wn: usize = wdims.iter().product();
        // Weights scaled down so that outputs are O(1) and about half of them are ReLU'd.
        let scale = 1.0 / (wn as f64 / c.cout as f64).sqrt();
        Ok(Setup {
            x: tensor(xn, 1, &c.x)?,
            w: (tensor(wn, 2, &wdims)? * scale)?,
            b: (tensor(c.cout, 3, &[c.cout])? * 0.3)?,
            cfg: Conv2dConfig {
                padding: c.pad,
                stride: c.stride,
                groups: c.groups,
                ..Default::default()
            },
        })
    }

    #[test]
    fn forward_matches_candle() -> Result<()> {
        for c in cases() {
            let s = setup(&c)?;
            for relu in [false, true] {
                for bias in [Some(&s.b), None] {
                    let got = conv2d(&s.x, &s.w, bias, &s.cfg, relu)?;
                    let want = conv2d_candle(&s.x, &s.w, bias, &s.cfg, relu)?;
                    assert_eq!(got.dims(), want.dims());
                    let err = rel_err(&flat(&got)?, &flat(&want)?);
                    assert!(
                        err < 1e-5,
                        "{:?} k{} g{} s{} p{} relu={relu} bias={}: {err:e}",
                        c.x,
                        c.k,
                        c.groups,
                        c.stride,
                        c.pad,
                        bias.is_some()
                    );
                }
            }
        }
        Ok(())
    }

    /// Gradients of `sum(f(x, w, b) * g)` for a fixed `g`, all three tensors as Vars.
    fn grads(
        s: &Setup,
        bias: bool,
        f: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let (x, w, b) = (
            Var::from_tensor(&s.x)?,
            Var::from_tensor(&s.w)?,
            Var::from_tensor(&s.b)?,
        );
        let y = f(x.as_tensor(), w.as_tensor(), bias.then_some(b.as_tensor()))?;
        let g = tensor(y.elem_count(), 4, y.dims())?;
        let store = (y * g)?.sum_all()?.backward()?;
        let mut out = vec![
            flat(store.get(&x).expect("dx"))?,
            flat(store.get(&w).expect("dw"))?,
        ];
        if bias {
            out.push(flat(store.get(&b).expect("db"))?);
        }
        Ok(out)
    }

    #[test]
    fn backward_matches_candle_autograd() -> Result<()> {
        for c in cases() {
            let s = setup(&c)?;
            for relu in [false, true] {
                for bias in [true, false] {
                    let got = grads(&s, bias, |x, w, b| conv2d(x, w, b, &s.cfg, relu))?;
                    let want = grads(&s, bias, |x, w, b| conv2d_candle(x, w, b, &s.cfg, relu))?;
                    for (name, (g, w)) in ["dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
                        let err = rel_err(g, w);
                        assert!(
                            err < 1e-5,
                            "{:?} k{} g{} s{} p{} relu={relu} bias={bias}: {name} {err:e}",
                            c.x,
                            c.k,
                            c.groups,
                            c.stride,
                            c.pad
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn untracked_tensors_get_no_gradient() -> Result<()> {
        let s = setup(&cases()[1])?;
        let sum_grads = |x: &Tensor, w: &Tensor, b: &Tensor, fast: bool| {
            let y = if fast {
                conv2d(x, w, Some(b), &s.cfg, true)?
            } else {
                conv2d_candle(x, w, Some(b), &s.cfg, true)?
            };
            y.sum_all()?.backward()
        };
        // A plain image with a Var weight and bias: dw and db as candle's, no dx.
        let (w, b) = (Var::from_tensor(&s.w)?, Var::from_tensor(&s.b)?);
        let got = sum_grads(&s.x, w.as_tensor(), b.as_tensor(), true)?;
        let want = sum_grads(&s.x, w.as_tensor(), b.as_tensor(), false)?;
        assert!(got.get(&s.x).is_none());
        for t in [w.as_tensor(), b.as_tensor()] {
            let (g, c) = (got.get(t).expect("grad"), want.get(t).expect("grad"));
            assert!(rel_err(&flat(g)?, &flat(c)?) < 1e-5);
        }
        // A frozen (plain) weight with a tracked input: dx and db only.
        let x = Var::from_tensor(&s.x)?;
        let got = sum_grads(x.as_tensor(), &s.w, b.as_tensor(), true)?;
        let want = sum_grads(x.as_tensor(), &s.w, b.as_tensor(), false)?;
        assert!(got.get(&s.w).is_none());
        for t in [x.as_tensor(), b.as_tensor()] {
            let (g, c) = (got.get(t).expect("grad"), want.get(t).expect("grad"));
            assert!(rel_err(&flat(g)?, &flat(c)?) < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn other_dtypes_dilation_and_strided_inputs_fall_back_or_agree() -> Result<()> {
        let s = setup(&cases()[4])?;
        // f64 and dilation 2 go to candle's ops.
        let x64 = s.x.to_dtype(DType::F64)?;
        let w64 = s.w.to_dtype(DType::F64)?;
        let b64 = s.b.to_dtype(DType::F64)?;
        let got = conv2d(&x64, &w64, Some(&b64), &s.cfg, true)?;
        let want = conv2d_candle(&x64, &w64, Some(&b64), &s.cfg, true)?;
        assert_eq!(
            got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            flat(&want.to_dtype(DType::F32)?)?
        );
        let dilated = Conv2dConfig {
            dilation: 2,
            ..s.cfg
        };
        let got = conv2d(&s.x, &s.w, Some(&s.b), &dilated, false)?;
        let want = conv2d_candle(&s.x, &s.w, Some(&s.b), &dilated, false)?;
        assert_eq!(flat(&got)?, flat(&want)?);
        // A transposed (non-contiguous) input takes the fast path after a copy.
        let xt = s.x.transpose(2, 3)?;
        let got = conv2d(&xt, &s.w, Some(&s.b), &s.cfg, true)?;
        let want = conv2d_candle(&xt, &s.w, Some(&s.b), &s.cfg, true)?;
        assert!(rel_err(&flat(&got)?, &flat(&want)?) < 1e-5);
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &dev)?;
        let w = Tensor::zeros((6, 2, 3, 3), DType::F32, &dev)?;
        let b = Tensor::zeros(6, DType::F32, &dev)?;
        let cfg = |groups, padding| Conv2dConfig {
            groups,
            padding,
            ..Default::default()
        };
        assert!(conv2d(&x, &w, Some(&b), &cfg(2, 0), true).is_ok());
        let err = conv2d(&x, &w, Some(&b), &cfg(1, 0), true).unwrap_err();
        assert!(err.to_string().contains("groups=1"), "{err}");
        let err = conv2d(&x, &w, Some(&b.narrow(0, 0, 5)?), &cfg(2, 0), true).unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
        let small = Tensor::zeros((1, 4, 2, 2), DType::F32, &dev)?;
        let err = conv2d(&small, &w, None, &cfg(2, 0), false).unwrap_err();
        assert!(err.to_string().contains("smaller"), "{err}");
        assert!(conv2d(&small, &w, None, &cfg(2, 1), false).is_ok());
        let stride0 = Conv2dConfig {
            stride: 0,
            groups: 2,
            ..Default::default()
        };
        assert!(conv2d(&x, &w, None, &stride0, false).is_err());
        Ok(())
    }

    #[test]
    fn tiles_cover_the_channels_and_blocks_the_rows() -> Result<()> {
        let geometry = |c: &Case| -> Result<Geometry> {
            let s = setup(c)?;
            Geometry::new(&s.x, &s.w, Some(&s.b), &s.cfg)
        };
        let tiles = |c: &Case| -> Result<Vec<Range<usize>>> { Ok(geometry(c)?.tiles().collect()) };
        let case = |x: [usize; 4]| cases().into_iter().find(|c| c.x == x).expect("case");
        // 128 rows of 784 pixels: 15 channels of 3x3, evened out over 3 tiles.
        assert_eq!(tiles(&case([2, 32, 28, 28]))?, [0..11, 11..22, 22..32]);
        // Small images: all channels in one tile.
        let small = tiles(&case([1, 32, 12, 12]))?;
        assert_eq!((small.len(), small[0].clone()), (1, 0..16));
        // Stride 4, 4 channels of 11x11 (484 rows) over 28x28 outputs: one tile, 7 output
        // rows (196 columns, 95 K floats) per block, in a batch of at least one image per
        // thread (each gemm on one thread).
        let mut g = geometry(&case([1, 4, 115, 115]))?;
        if super::super::cpu::threads() > 1 {
            assert_eq!(g.blocks().count(), 1, "gemms split over threads: no blocks");
        }
        g.n = 1 << 20;
        assert_eq!(g.tiles().collect::<Vec<_>>(), vec![0..4]);
        assert_eq!(
            g.blocks().collect::<Vec<_>>(),
            [0..7, 7..14, 14..21, 21..28]
        );
        assert_eq!(g.tile_len(), 484 * 7 * 28);
        // Stride 2, 147 rows over 27x27 outputs: 24 rows per block and 3 left over.
        let mut g = geometry(&case([2, 3, 55, 55]))?;
        g.n = 1 << 20;
        assert_eq!(g.blocks().collect::<Vec<_>>(), [0..24, 24..27]);
        let conv1 = cases().into_iter().last().expect("case");
        let g = geometry(&conv1)?;
        assert_eq!(g.blocks().collect::<Vec<_>>(), [0..15, 15..17]);
        // Stride 1: one block, whatever the size.
        let mut g = geometry(&case([2, 32, 28, 28]))?;
        g.n = 1 << 20;
        assert_eq!(g.blocks().collect::<Vec<_>>(), vec![0..28]);
        Ok(())
    }

    /// im2col and col2im of a block of output rows are that block's columns of the whole
    /// image's, for every case (stride 1 and strided, padded or not), whatever blocks the
    /// layers themselves use.
    #[test]
    fn blocks_of_im2col_and_col2im_match_the_whole() -> Result<()> {
        for c in cases() {
            let s = setup(&c)?;
            let g = Geometry::new(&s.x, &s.w, None, &s.cfg)?;
            let (x, ow, hw) = (flat(&s.x)?, g.ow, g.h * g.w);
            let (chans, rows) = (0..g.cin_g(), g.cin_g() * g.kh * g.kw);
            let whole = 0..g.oh;
            let mut full = vec![0f32; rows * g.p()];
            g.im2col(&x, chans.clone(), &whole, &mut full, false);
            let grad = data(rows * g.p(), 4);
            let mut dx_full = vec![0f32; g.cin_g() * hw];
            g.col2im(&grad, chans.clone(), &whole, &mut dx_full, false);
            let mid = g.oh / 2;
            let mut dx_blocks = vec![0f32; g.cin_g() * hw];
            for oys in [0..mid, mid..g.oh, 1..g.oh, 0..1] {
                let bp = oys.len() * ow;
                let mut col = vec![f32::NAN; rows * bp];
                g.im2col(&x, chans.clone(), &oys, &mut col, false);
                for (row, full) in col.chunks_exact(bp.max(1)).zip(full.chunks_exact(g.p())) {
                    assert_eq!(
                        row,
                        &full[oys.start * ow..oys.end * ow],
                        "{:?} {oys:?}",
                        c.x
                    );
                }
            }
            // The two halves' col2im add up to the whole's.
            for oys in [0..mid, mid..g.oh] {
                let bp = oys.len() * ow;
                let block: Vec<f32> = grad
                    .chunks_exact(g.p())
                    .flat_map(|r| r[oys.start * ow..oys.start * ow + bp].to_vec())
                    .collect();
                g.col2im(&block, chans.clone(), &oys, &mut dx_blocks, false);
            }
            assert!(rel_err(&dx_blocks, &dx_full) < 1e-6, "{:?}", c.x);
        }
        Ok(())
    }

    #[test]
    fn winograd_matches_im2col() -> Result<()> {
        if !narrow_available() {
            return Ok(());
        }
        // AlexNet's conv4 shape at a small width and batch (runs of 245 tiles over the
        // threads, several blocks each, the last panel partial), two-tower grouping, and
        // padding 0 and 2 with odd maps.
        let cases = [
            ([5, 48, 13, 13], 32, 1, 1),
            ([4, 64, 13, 13], 48, 2, 1),
            ([2, 40, 11, 10], 24, 1, 0),
            ([3, 32, 5, 6], 16, 1, 2),
        ];
        // A batch too small to give each thread a block goes to im2col, unless single-threaded.
        let one = geometry_of([1, 384, 13, 13], 256)?;
        assert_eq!(winograd::applies(&one), super::super::cpu::threads() == 1);
        for (x, cout, groups, pad) in cases {
            let c = Case {
                x,
                cout,
                k: 3,
                groups,
                stride: 1,
                pad,
            };
            let s = setup(&c)?;
            let g = Geometry::new(&s.x, &s.w, Some(&s.b), &s.cfg)?;
            let (xs, ws, bs) = (flat(&s.x)?, flat(&s.w)?, flat(&s.b)?);
            for relu in [false, true] {
                let got = winograd::forward(&g, &xs, &ws, Some(&bs), relu);
                let want = g.forward_im2col(&xs, &ws, Some(&bs), relu);
                let err = rel_err(&got, &want);
                assert!(err < 1e-5, "{x:?} g{groups} p{pad} relu={relu}: {err:e}");
            }
        }
        Ok(())
    }

    fn geometry_of(x: [usize; 4], cout: usize) -> Result<Geometry> {
        let x = Tensor::zeros(&x, DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((cout, x.dim(1)?, 3, 3), DType::F32, &Device::Cpu)?;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Geometry::new(&x, &w, None, &cfg)
    }

    fn narrow_available() -> bool {
        super::super::narrow::available()
    }

    #[test]
    fn parallel_and_serial_splits_agree() -> Result<()> {
        // Batch 5 on >= 2 threads runs one run of images per thread; image by image it must
        // give the same numbers as each image alone (batch 1, gemm's threads).
        let c = Case {
            x: [5, 4, 12, 12],
            cout: 6,
            k: 3,
            groups: 2,
            stride: 1,
            pad: 1,
        };
        let s = setup(&c)?;
        let all = flat(&conv2d(&s.x, &s.w, Some(&s.b), &s.cfg, true)?)?;
        for i in 0..5 {
            let one = conv2d(&s.x.narrow(0, i, 1)?, &s.w, Some(&s.b), &s.cfg, true)?;
            let per = all.len() / 5;
            assert!(rel_err(&flat(&one)?, &all[i * per..(i + 1) * per]) < 1e-6);
        }
        Ok(())
    }
}
