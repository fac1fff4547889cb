//! The convolution through cuDNN: bias and ReLU fused into the forward where cuDNN allows, and a
//! backward of one cuDNN call per gradient, each only for a tracked operand.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use candle_nn::Conv2dConfig;

use super::desc::{ActDesc, ConvDesc, ConvParams, FilterDesc, TensorDesc};
use super::handle::{
    check, handle, not_on_cpu, run, scalar, shape, with_workspace, Handle, ONE, ZERO,
};
use super::plan::dims_i32;

const OP: &str = "conv2d (cuDNN)";

/// `relu(conv2d(x, weight) + bias)` on CUDA by cuDNN; `out` is the output's `(N, C_out, OH,
/// OW)` (the caller's checked geometry). The operands are made contiguous here.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
    out: [usize; 4],
    relu: bool,
) -> Result<Tensor> {
    let int = |v: usize, what: &str| {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: {what} {v} is too large")))
    };
    let conv = Conv {
        x: dims_i32(OP, "input", x.dims())?,
        w: dims_i32(OP, "weight", weight.dims())?,
        y: dims_i32(OP, "output", &out)?,
        params: ConvParams {
            padding: int(cfg.padding, "padding")?,
            stride: int(cfg.stride, "stride")?,
            dilation: int(cfg.dilation, "dilation")?,
            groups: int(cfg.groups, "groups")?,
            tf32: super::tf32(),
        },
        relu,
    };
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, conv),
        None => x.apply_op2(&weight, conv),
    }
}

/// One convolution's sizes and settings: the forward op, and the plan of its backward ops.
#[derive(Debug, Clone, Copy)]
struct Conv {
    x: [i32; 4],
    w: [i32; 4],
    y: [i32; 4],
    params: ConvParams,
    relu: bool,
}

/// The conv algorithms found for one shape, dtype and setting, by direction: the algorithm,
/// its workspace in bytes and the math type cuDNN timed it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key {
    dtype: DType,
    x: [i32; 4],
    w: [i32; 4],
    params: ConvParams,
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Algos {
    fwd: Option<Found<sys::cudnnConvolutionFwdAlgo_t>>,
    data: Option<Found<sys::cudnnConvolutionBwdDataAlgo_t>>,
    filter: Option<Found<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

/// An algorithm cuDNN timed, the workspace it needs in bytes and the math type it ran with.
#[derive(Debug, Clone, Copy)]
struct Found<A> {
    algo: A,
    bytes: usize,
    math: sys::cudnnMathType_t,
}

/// What the three directions' searches share: their result structs, and where a result is
/// kept.
trait Perf: Copy {
    type Algo: Copy;
    const WHAT: &'static str;
    fn found(&self) -> Option<Found<Self::Algo>>;
    fn slot(algos: &mut Algos) -> &mut Option<Found<Self::Algo>>;
}

macro_rules! perf {
    ($perf:ty, $algo:ty, $what:literal, $field:ident) => {
        impl Perf for $perf {
            type Algo = $algo;
            const WHAT: &'static str = $what;
            fn found(&self) -> Option<Found<$algo>> {
                (self.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS).then_some(Found {
                    algo: self.algo,
                    bytes: self.memory,
                    math: self.mathType,
                })
            }
            fn slot(algos: &mut Algos) -> &mut Option<Found<$algo>> {
                &mut algos.$field
            }
        }
    };
}

perf!(
    sys::cudnnConvolutionFwdAlgoPerf_t,
    sys::cudnnConvolutionFwdAlgo_t,
    "forward",
    fwd
);
perf!(
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    sys::cudnnConvolutionBwdDataAlgo_t,
    "backward-data",
    data
);
perf!(
    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
    sys::cudnnConvolutionBwdFilterAlgo_t,
    "backward-filter",
    filter
);

/// The descriptors of one call.
struct Descs {
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
}

/// cuDNN's timed search returns up to this many algorithms, fastest first.
const FIND: usize = 8;

impl Conv {
    fn key(&self, dtype: DType) -> Key {
        Key {
            dtype,
            x: self.x,
            w: self.w,
            params: self.params,
        }
    }

    /// The descriptors, checked: cuDNN's own output size must be the caller's.
    fn descs(&self, dtype: DType) -> Result<Descs> {
        let d = Descs {
            x: TensorDesc::nchw(dtype, self.x, OP)?,
            w: FilterDesc::kcrs(dtype, self.w, OP)?,
            y: TensorDesc::nchw(dtype, self.y, OP)?,
            conv: ConvDesc::new(self.params, dtype, OP)?,
        };
        let mut y = [0i32; 4];
        // SAFETY: valid descriptors; four plain outputs.
        check(
            unsafe {
                sys::cudnnGetConvolution2dForwardOutputDim(
                    d.conv.0, d.x.0, d.w.0, &mut y[0], &mut y[1], &mut y[2], &mut y[3],
                )
            },
            "cudnnGetConvolution2dForwardOutputDim",
        )?;
        if y != self.y {
            candle_core::bail!(
                "{OP}: cuDNN computes an output of {y:?} for input {:?}, weight {:?} and {:?}, \
                 expected {:?}",
                self.x,
                self.w,
                self.params,
                self.y
            );
        }
        Ok(d)
    }

    /// The fastest algorithm of one direction for this shape: timed by `find` (a
    /// `cudnnFind*Algorithm` call filling up to `FIND` results, fastest first) once per thread
    /// and device, then kept. Sets the descriptor's math type to the one it was timed with.
    fn algo<P: Perf>(
        &self,
        h: &Handle,
        d: &Descs,
        dtype: DType,
        find: impl FnOnce(*mut P, &mut i32) -> Result<()>,
    ) -> Result<Found<P::Algo>> {
        let key = self.key(dtype);
        let kept = h.algos.borrow_mut().get_mut(&key).and_then(|a| *P::slot(a));
        let found = match kept {
            Some(f) => f,
            None => {
                // SAFETY: cuDNN's perf structs are plain C data whose all-zero value is valid.
                let mut perf: [P; FIND] = unsafe { std::mem::zeroed() };
                let mut n = 0;
                find(perf.as_mut_ptr(), &mut n)?;
                let f = perf[..n.clamp(0, FIND as i32) as usize]
                    .iter()
                    .find_map(P::found)
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "{OP}: cuDNN found no {} algorithm for input {:?}, weight {:?}, {:?}",
                            P::WHAT,
                            self.x,
                            self.w,
                            self.params
                        ))
                    })?;
                *P::slot(h.algos.borrow_mut().entry(key).or_default()) = Some(f);
                f
            }
        };
        // SAFETY: a valid descriptor.
        check(
            unsafe { sys::cudnnSetConvolutionMathType(d.conv.0, found.math) },
            "cudnnSetConvolutionMathType",
        )?;
        Ok(found)
    }

    /// The forward: `x`, `w`, and the bias when there is one.
    fn forward(
        &self,
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dtype = x.0.dtype();
        if w.0.dtype() != dtype || b.is_some_and(|b| b.0.dtype() != dtype) {
            candle_core::bail!("{OP}: input, weight and bias must have one dtype")
        }
        let dev = x.0.device();
        let h = handle(dev)?;
        let d = self.descs(dtype)?;
        let found = self.algo(&h, &d, dtype, |perf, n| {
            // SAFETY: valid handle and descriptors; cuDNN allocates its own test buffers and
            // writes at most FIND results.
            check(
                unsafe {
                    sys::cudnnFindConvolutionForwardAlgorithm(
                        h.raw,
                        d.x.0,
                        d.w.0,
                        d.conv.0,
                        d.y.0,
                        FIND as i32,
                        n,
                        perf,
                    )
                },
                "cudnnFindConvolutionForwardAlgorithm",
            )
        })?;
        let algo = found.algo;
        let bias_desc = TensorDesc::nchw(dtype, [1, self.y[1], 1, 1], OP)?;
        // cuDNN's fused conv + bias + activation runs with this algorithm only (and in f32
        // here, where its bias type is documented); with another, the bias and the ReLU are
        // passes of their own over the output.
        let fused = b.is_some()
            && dtype == DType::F32
            && algo
                == sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
        let act = ActDesc::new(self.relu)?;
        let relu = ActDesc::new(true)?;
        let mut srcs = vec![(x.0, x.1, "input"), (w.0, w.1, "weight")];
        srcs.extend(b.map(|(s, l)| (s, l, "bias")));
        // The bias pointer is null without a bias (and then unread).
        let srcs: [(&CudaStorage, &Layout, &str); 3] = match srcs.as_slice() {
            [x, w, b] => [*x, *w, *b],
            [x, w] => [*x, *w, *w],
            _ => unreachable!("two or three operands"),
        };
        let has_bias = b.is_some();
        run(&h, dev, dtype, srcs, shape(self.y), |[xp, wp, bp], yp| {
            with_workspace(&h, dev, found.bytes, |ws, ws_bytes| {
                // SAFETY: descriptors match the buffers' sizes (checked in `descs`), the pointers
                // are live for the calls, scalars are f32 as cuDNN expects; `y` doubles as the
                // unread `z` (its scale is 0, its memory zeroed).
                unsafe {
                    if fused {
                        return check(
                            sys::cudnnConvolutionBiasActivationForward(
                                h.raw,
                                scalar(&ONE),
                                d.x.0,
                                xp,
                                d.w.0,
                                wp,
                                d.conv.0,
                                algo,
                                ws,
                                ws_bytes,
                                scalar(&ZERO),
                                d.y.0,
                                yp,
                                bias_desc.0,
                                bp,
                                act.0,
                                d.y.0,
                                yp,
                            ),
                            "cudnnConvolutionBiasActivationForward",
                        );
                    }
                    check(
                        sys::cudnnConvolutionForward(
                            h.raw,
                            scalar(&ONE),
                            d.x.0,
                            xp,
                            d.w.0,
                            wp,
                            d.conv.0,
                            algo,
                            ws,
                            ws_bytes,
                            scalar(&ZERO),
                            d.y.0,
                            yp,
                        ),
                        "cudnnConvolutionForward",
                    )?;
                    if has_bias {
                        check(
                            sys::cudnnAddTensor(
                                h.raw,
                                scalar(&ONE),
                                bias_desc.0,
                                bp,
                                scalar(&ONE),
                                d.y.0,
                                yp,
                            ),
                            "cudnnAddTensor",
                        )?;
                    }
                    if self.relu {
                        check(
                            sys::cudnnActivationForward(
                                h.raw,
                                relu.0,
                                scalar(&ONE),
                                d.y.0,
                                yp,
                                scalar(&ZERO),
                                d.y.0,
                                yp,
                            ),
                            "cudnnActivationForward",
                        )?;
                    }
                    Ok(())
                }
            })
        })
    }

    /// Gradients of `x`, `w` and `b` (when there is a bias), each only for a tracked tensor:
    /// an image or a frozen layer costs nothing.
    fn backward(
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
        let mut g = grad.contiguous()?;
        // The ReLU's mask and the bias gradient go through cuDNN in f32; in f16 and bf16
        // (whose support in these two legacy calls cuDNN does not document) through candle's
        // ops, the sum accumulated in f32.
        let f32 = g.dtype() == DType::F32;
        if self.relu {
            g = if f32 {
                res.apply_op2_no_bwd(&g, &Step::ReluGrad(*self))?
            } else {
                (g * res.gt(0.0)?.to_dtype(res.dtype())?)?
            };
        }
        let dx = if want[0] {
            Some(w.apply_op2_no_bwd(&g, &Step::Data(*self))?)
        } else {
            None
        };
        let dw = if want[1] {
            Some(x.apply_op2_no_bwd(&g, &Step::Filter(*self))?)
        } else {
            None
        };
        let db = match want[2] {
            false => None,
            true if f32 => Some(g.apply_op1_no_bwd(&BiasGrad(*self))?),
            true => Some(
                g.to_dtype(DType::F32)?
                    .sum((0, 2, 3))?
                    .to_dtype(g.dtype())?,
            ),
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(not_on_cpu(OP))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.forward((x, xl), (w, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, None, res, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(not_on_cpu(OP))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.forward((x, xl), (w, wl), Some((b, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, Some(b), res, grad)
    }
}

/// The backward's two-operand steps: the ReLU's mask `(y, dy) -> dy * (y > 0)`, the input
/// gradient `(w, dy) -> dx` and the weight gradient `(x, dy) -> dw`.
enum Step {
    ReluGrad(Conv),
    Data(Conv),
    Filter(Conv),
}

impl CustomOp2 for Step {
    fn name(&self) -> &'static str {
        match self {
            Self::ReluGrad(_) => "cudnn-relu-grad",
            Self::Data(_) => "cudnn-conv2d-grad-input",
            Self::Filter(_) => "cudnn-conv2d-grad-weight",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(not_on_cpu(OP))
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (dtype, dev) = (dy.dtype(), dy.device());
        let h = handle(dev)?;
        let (c, out_dims, what) = match self {
            Self::ReluGrad(c) => (c, c.y, "output"),
            Self::Data(c) => (c, c.x, "weight"),
            Self::Filter(c) => (c, c.w, "input"),
        };
        let d = c.descs(dtype)?;
        let srcs = [(a, al, what), (dy, dyl, "output gradient")];
        run(&h, dev, dtype, srcs, shape(out_dims), |[ap, dyp], op| {
            // SAFETY: as in the forward; each call reads `ap` and `dyp` and writes `op`, three
            // distinct buffers of the descriptors' sizes.
            unsafe {
                match self {
                    Self::ReluGrad(_) => {
                        let relu = ActDesc::new(true)?;
                        // With the output as cuDNN's `x`: the mask is `y > 0`, PyTorch's.
                        check(
                            sys::cudnnActivationBackward(
                                h.raw,
                                relu.0,
                                scalar(&ONE),
                                d.y.0,
                                ap,
                                d.y.0,
                                dyp,
                                d.y.0,
                                ap,
                                scalar(&ZERO),
                                d.y.0,
                                op,
                            ),
                            "cudnnActivationBackward",
                        )
                    }
                    Self::Data(c) => {
                        let found = c.algo(&h, &d, dtype, |perf, n| {
                            check(
                                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                                    h.raw,
                                    d.w.0,
                                    d.y.0,
                                    d.conv.0,
                                    d.x.0,
                                    FIND as i32,
                                    n,
                                    perf,
                                ),
                                "cudnnFindConvolutionBackwardDataAlgorithm",
                            )
                        })?;
                        with_workspace(&h, dev, found.bytes, |ws, bytes| {
                            check(
                                sys::cudnnConvolutionBackwardData(
                                    h.raw,
                                    scalar(&ONE),
                                    d.w.0,
                                    ap,
                                    d.y.0,
                                    dyp,
                                    d.conv.0,
                                    found.algo,
                                    ws,
                                    bytes,
                                    scalar(&ZERO),
                                    d.x.0,
                                    op,
                                ),
                                "cudnnConvolutionBackwardData",
                            )
                        })
                    }
                    Self::Filter(c) => {
                        let found = c.algo(&h, &d, dtype, |perf, n| {
                            check(
                                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                                    h.raw,
                                    d.x.0,
                                    d.y.0,
                                    d.conv.0,
                                    d.w.0,
                                    FIND as i32,
                                    n,
                                    perf,
                                ),
                                "cudnnFindConvolutionBackwardFilterAlgorithm",
                            )
                        })?;
                        with_workspace(&h, dev, found.bytes, |ws, bytes| {
                            check(
                                sys::cudnnConvolutionBackwardFilter(
                                    h.raw,
                                    scalar(&ONE),
                                    d.x.0,
                                    ap,
                                    d.y.0,
                                    dyp,
                                    d.conv.0,
                                    found.algo,
                                    ws,
                                    bytes,
                                    scalar(&ZERO),
                                    d.w.0,
                                    op,
                                ),
                                "cudnnConvolutionBackwardFilter",
                            )
                        })
                    }
                }
            }
        })
    }
}

/// The bias gradient: `dy` summed over the batch and the positions.
struct BiasGrad(Conv);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "cudnn-conv2d-grad-bias"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(not_on_cpu(OP))
    }

    fn cuda_fwd(&self, dy: &CudaStorage, dyl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (dtype, dev) = (dy.dtype(), dy.device());
        let h = handle(dev)?;
        let cout = self.0.y[1];
        let dy_desc = TensorDesc::nchw(dtype, self.0.y, OP)?;
        let db_desc = TensorDesc::nchw(dtype, [1, cout, 1, 1], OP)?;
        let out = Shape::from(cout as usize);
        run(
            &h,
            dev,
            dtype,
            [(dy, dyl, "output gradient")],
            out,
            |[dyp], dbp| {
                // SAFETY: descriptors of the buffers' sizes; f32 scalars.
                check(
                    unsafe {
                        sys::cudnnConvolutionBackwardBias(
                            h.raw,
                            scalar(&ONE),
                            dy_desc.0,
                            dyp,
                            scalar(&ZERO),
                            db_desc.0,
                            dbp,
                        )
                    },
                    "cudnnConvolutionBackwardBias",
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conv of AlexNet's: input, weight, padding, stride, groups, and the output the crate
    /// computes for it.
    fn conv(x: [i32; 4], w: [i32; 4], padding: i32, stride: i32, groups: i32, y: [i32; 4]) -> Conv {
        Conv {
            x,
            w,
            y,
            params: ConvParams {
                padding,
                stride,
                dilation: 1,
                groups,
                tf32: true,
            },
            relu: true,
        }
    }

    /// With the real cuDNN library, which sets up descriptors without a GPU: every conv of
    /// both layouts (the two-tower model's grouped ones too) is accepted in f32 (TF32 on and
    /// off), f16 and bf16, cuDNN's output sizes are the crate's, and a disagreement is an error
    /// naming both.
    #[test]
    fn alexnets_convs_have_the_crates_sizes_in_cudnn() {
        let n = 256;
        let layers = [
            // torchvision
            conv([n, 3, 224, 224], [64, 3, 11, 11], 2, 4, 1, [n, 64, 55, 55]),
            conv([n, 64, 27, 27], [192, 64, 5, 5], 2, 1, 1, [n, 192, 27, 27]),
            conv(
                [n, 192, 13, 13],
                [384, 192, 3, 3],
                1,
                1,
                1,
                [n, 384, 13, 13],
            ),
            conv(
                [n, 384, 13, 13],
                [256, 384, 3, 3],
                1,
                1,
                1,
                [n, 256, 13, 13],
            ),
            conv(
                [n, 256, 13, 13],
                [256, 256, 3, 3],
                1,
                1,
                1,
                [n, 256, 13, 13],
            ),
            // bvlc_alexnet and CaffeNet
            conv([n, 3, 227, 227], [96, 3, 11, 11], 0, 4, 1, [n, 96, 55, 55]),
            conv([n, 96, 27, 27], [256, 48, 5, 5], 2, 1, 2, [n, 256, 27, 27]),
            conv(
                [n, 256, 13, 13],
                [384, 256, 3, 3],
                1,
                1,
                1,
                [n, 384, 13, 13],
            ),
            conv(
                [n, 384, 13, 13],
                [384, 192, 3, 3],
                1,
                1,
                2,
                [n, 384, 13, 13],
            ),
            conv(
                [n, 384, 13, 13],
                [256, 192, 3, 3],
                1,
                1,
                2,
                [n, 256, 13, 13],
            ),
        ];
        for layer in layers {
            for (dtype, tf32) in [
                (DType::F32, true),
                (DType::F32, false),
                (DType::F16, true),
                (DType::BF16, true),
            ] {
                let layer = Conv {
                    params: ConvParams {
                        tf32,
                        ..layer.params
                    },
                    ..layer
                };
                if let Err(e) = layer.descs(dtype) {
                    panic!("{layer:?} in {dtype:?}: {e}");
                }
            }
        }
        let mut wrong = layers[0];
        wrong.y[2] = 56;
        let err = wrong
            .descs(DType::F32)
            .err()
            .expect("a wrong size")
            .to_string();
        assert!(
            err.contains("[256, 64, 55, 55]") && err.contains("[256, 64, 56, 55]"),
            "{err}"
        );
    }
}
