//! The sizes of one convolution and how its work is cut: column blocks, channel tiles, and the
//! split of a batch over threads.

use std::ops::Range;

use candle_core::{Result, Shape, Tensor};
use candle_nn::Conv2dConfig;

use crate::layers::cpu::checked_elems;

/// Sizes of one convolution, checked: `n` images of `cin x h x w` to `cout x oh x ow`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) n: usize,
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) cout: usize,
    pub(super) groups: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
}

impl Geometry {
    pub(super) fn new(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        cfg: &Conv2dConfig,
    ) -> Result<Self> {
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
        checked_elems("conv2d", "input", x.dims())?;
        checked_elems("conv2d", "weight", weight.dims())?;
        // In checked arithmetic: a huge padding or dilation must not wrap around.
        let out = |input: usize, k: usize| -> Result<Option<usize>> {
            let span = dilation
                .checked_mul(k.saturating_sub(1))
                .and_then(|s| s.checked_add(1));
            let padded = pad.checked_mul(2).and_then(|p| p.checked_add(input));
            match (padded, span) {
                (Some(padded), Some(span)) => Ok(padded.checked_sub(span).map(|s| s / stride + 1)),
                _ => candle_core::bail!(
                    "conv2d: padding {pad} or dilation {dilation} is too large for any input"
                ),
            }
        };
        let (Some(oh), Some(ow)) = (out(h, kh)?, out(w, kw)?) else {
            candle_core::bail!(
                "conv2d: input {h}x{w} with padding {pad} is smaller than the {kh}x{kw} kernel \
                 (dilation {dilation})"
            );
        };
        checked_elems("conv2d", "output", &[n, cout, oh, ow])?;
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

    pub(super) fn cin_g(&self) -> usize {
        self.cin / self.groups
    }

    pub(super) fn cout_g(&self) -> usize {
        self.cout / self.groups
    }

    /// Rows of an im2col buffer: one per weight of an output channel.
    pub(super) fn k(&self) -> usize {
        self.cin_g() * self.kh * self.kw
    }

    /// Columns of an im2col buffer: one per output pixel.
    pub(super) fn p(&self) -> usize {
        self.oh * self.ow
    }

    pub(super) fn in_image(&self) -> usize {
        self.cin * self.h * self.w
    }

    pub(super) fn out_image(&self) -> usize {
        self.cout * self.p()
    }

    pub(super) fn out_shape(&self) -> Shape {
        (self.n, self.cout, self.oh, self.ow).into()
    }

    /// Outputs `lo..hi` along an axis whose input `o * stride + kpos - pad` lies in `0..input`.
    pub(super) fn valid(&self, kpos: usize, input: usize, out: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kpos).div_ceil(self.stride).min(out);
        let hi = match (input + self.pad).checked_sub(kpos + 1) {
            Some(last) => (last / self.stride + 1).min(out),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// Output rows `y0..y1` of `oys` whose input row through kernel row `ki` is inside the input.
    pub(super) fn valid_rows(&self, ki: usize, oys: &Range<usize>) -> (usize, usize) {
        let (y0, y1) = self.valid(ki, self.h, self.oh);
        let y0 = y0.clamp(oys.start, oys.end);
        (y0, y1.clamp(y0, oys.end))
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
    pub(super) fn block_rows(&self) -> usize {
        let k = self.k();
        let split_gemms = self.split().1 > 1;
        if split_gemms || self.stride == 1 || k > MAX_BLOCK_K {
            return self.oh;
        }
        (COL_TILE / (k * self.ow)).clamp(1, self.oh)
    }

    /// The column blocks: ranges of output rows of [`Self::block_rows`] rows each.
    pub(super) fn blocks(&self) -> impl Iterator<Item = Range<usize>> {
        let (oh, rows) = (self.oh, self.block_rows());
        (0..oh).step_by(rows).map(move |y0| y0..(y0 + rows).min(oh))
    }

    /// Input channels per im2col tile, and the tiles: the im2col buffer holds the rows of
    /// whole input channels, about [`COL_TILE`] floats (at least [`MIN_TILE_ROWS`] rows), so
    /// that the gemm reads it from cache right after im2col wrote it; all of them when the
    /// columns go in blocks ([`Self::block_rows`]).
    pub(super) fn tiles(&self) -> impl Iterator<Item = Range<usize>> {
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
    pub(super) fn tile_len(&self) -> usize {
        let channels = self.tiles().map(|c| c.len()).max().unwrap_or(0);
        channels * self.kh * self.kw * self.block_rows() * self.ow
    }

    /// How a batch is split: runs of `per` images, one run per thread with single-threaded
    /// gemms when the batch has at least as many images as threads (`threads` = 1 for each run);
    /// else one run, each gemm split over `threads` threads.
    pub(super) fn split(&self) -> (usize, usize) {
        let threads = crate::layers::cpu::threads();
        if threads > 1 && self.n >= threads {
            (self.n.div_ceil(threads), 1)
        } else {
            (self.n, threads)
        }
    }
}

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
