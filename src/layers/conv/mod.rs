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
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`conv2d`], the custom op, the scratch buffers |
//! | `geometry.rs` | the sizes of one convolution, its column blocks and channel tiles, the batch's split over threads |
//! | `im2col.rs` | im2col and col2im |
//! | `forward.rs` | the forward pass by im2col and gemm |
//! | `backward.rs` | the weight, bias and input gradients |
//! | `winograd.rs` | Winograd's F(2x2, 3x3) for 3x3 stride-1 layers on AVX2 |

use std::cell::Cell;

use candle_core::{DType, Result, Shape, Tensor};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

use super::cpu::{apply, WeightOp};

mod backward;
mod device;
mod forward;
mod geometry;
mod im2col;
mod winograd;

use geometry::Geometry;

/// The op's name in error messages.
const OP: &str = "conv2d";

/// `relu(conv2d(x, weight) + bias)` (the ReLU when `relu` is true), with the semantics of
/// candle's `Tensor::conv2d` and `candle_nn::Conv2d`: `x` is `(N, C_in, H, W)`, `weight` is
/// `(C_out, C_in / groups, KH, KW)`, `bias` is `(C_out)`, and `cfg` gives padding, stride,
/// dilation and groups (its cuDNN algorithm is passed on where candle's conv runs).
///
/// On the CPU with f32 tensors and dilation 1 this is one custom op with a gemm backward (design
/// notes in `src/layers/conv/mod.rs`); the gradient of a fused ReLU is PyTorch's (zero
/// where the output is zero), and a tensor that is not tracked (an image, rather than a [`candle_core::Var`] or a
/// result of one) gets no gradient. With the `cudnn` feature, a CUDA tensor in f32, f16 or bf16
/// goes to cuDNN the same way (`src/layers/cudnn/`). Anywhere else it is candle's ops, with
/// candle's gradients.
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
    #[cfg(feature = "cudnn")]
    {
        use super::cudnn::{handles, CONV_DTYPES};
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
        if handles(x, CONV_DTYPES)
            && same(weight)
            && bias.is_none_or(same)
            && geometry.n > 0
            && geometry.k() > 0
        {
            let out = [geometry.n, geometry.cout, geometry.oh, geometry.ow];
            return super::cudnn::conv2d(x, weight, bias, cfg, out, relu);
        }
    }
    if !fast {
        return conv2d_candle(x, weight, bias, cfg, relu);
    }
    apply(Conv2dOp { geometry, relu }, x, weight, bias)
}

/// The same convolution as candle's ops: `conv2d`, `broadcast_add` of the bias, `relu`. Off the
/// CPU the conv's backward is this crate's, which hands candle contiguous operands only
/// (`device.rs`: candle 0.11.1's Metal conv computes wrong weight gradients otherwise).
pub(crate) fn conv2d_candle(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
    relu: bool,
) -> Result<Tensor> {
    let y = if x.device().is_cpu() {
        x.conv2d_with_algo(
            weight,
            cfg.padding,
            cfg.stride,
            cfg.dilation,
            cfg.groups,
            cfg.cudnn_fwd_algo,
        )?
    } else {
        device::conv2d_contiguous_grad(
            x,
            weight,
            cfg.padding,
            cfg.stride,
            cfg.dilation,
            cfg.groups,
        )?
    };
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

// Below this many elements a piece of im2col is not worth a rayon task.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

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
    use std::ops::Range;

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
        crate::layers::cpu::narrow::available()
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
