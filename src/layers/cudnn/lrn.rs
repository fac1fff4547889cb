//! Local response normalisation across channels through cuDNN, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::desc::{LrnDesc, TensorDesc};
use super::handle::{check, handle, not_on_cpu, run, scalar, shape, ONE, ZERO};
use super::plan::dims_i32;

const OP: &str = "LocalResponseNorm (cuDNN)";

/// Whether cuDNN computes this LRN as PyTorch does: a window of 1 to 16 channels, centred (an
/// odd size; for an even one cuDNN's window leans the other way from PyTorch's), `k` and `beta`
/// within cuDNN's bounds, on an `(N, C, H, W)` tensor.
pub(crate) fn supports(x: &Tensor, size: usize, beta: f64, k: f64) -> bool {
    x.rank() == 4 && (1..=16).contains(&size) && size % 2 == 1 && k >= 1e-5 && beta >= 0.01
}

/// `x / (k + alpha / size * sum of x^2 over size channels)^beta` (see [`supports`]).
pub(crate) fn lrn(x: &Tensor, size: usize, alpha: f64, beta: f64, k: f64) -> Result<Tensor> {
    let op = Lrn {
        x: dims_i32(OP, "input", x.dims())?,
        size: size as u32,
        alpha,
        beta,
        k,
    };
    x.contiguous()?.apply_op1(op)
}

#[derive(Debug, Clone, Copy)]
struct Lrn {
    x: [i32; 4],
    size: u32,
    alpha: f64,
    beta: f64,
    k: f64,
}

const MODE: sys::cudnnLRNMode_t = sys::cudnnLRNMode_t::CUDNN_LRN_CROSS_CHANNEL_DIM1;

impl CustomOp1 for Lrn {
    fn name(&self) -> &'static str {
        "cudnn-lrn"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(not_on_cpu(OP))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (dtype, dev) = (x.dtype(), x.device());
        let h = handle(dev)?;
        let ld = LrnDesc::new(self.size, self.alpha, self.beta, self.k)?;
        let xd = TensorDesc::nchw(dtype, self.x, OP)?;
        run(
            &h,
            dev,
            dtype,
            [(x, xl, "input")],
            shape(self.x),
            |[xp], yp| {
                // SAFETY: one descriptor for both buffers, of their size; f32 scalars.
                check(
                    unsafe {
                        sys::cudnnLRNCrossChannelForward(
                            h.raw,
                            ld.0,
                            MODE,
                            scalar(&ONE),
                            xd.0,
                            xp,
                            scalar(&ZERO),
                            xd.0,
                            yp,
                        )
                    },
                    "cudnnLRNCrossChannelForward",
                )
            },
        )
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op3_no_bwd(res, &grad, &LrnGrad(*self))?))
    }
}

/// `(x, y, dy) -> dx`.
struct LrnGrad(Lrn);

impl CustomOp3 for LrnGrad {
    fn name(&self) -> &'static str {
        "cudnn-lrn-grad"
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
        y: &CudaStorage,
        yl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let l = &self.0;
        let (dtype, dev) = (x.dtype(), x.device());
        let h = handle(dev)?;
        let ld = LrnDesc::new(l.size, l.alpha, l.beta, l.k)?;
        let d = TensorDesc::nchw(dtype, l.x, OP)?;
        let srcs = [
            (x, xl, "input"),
            (y, yl, "output"),
            (dy, dyl, "output gradient"),
        ];
        run(&h, dev, dtype, srcs, shape(l.x), |[xp, yp, dyp], dxp| {
            // SAFETY: one descriptor for the four buffers, of their size; f32 scalars.
            check(
                unsafe {
                    sys::cudnnLRNCrossChannelBackward(
                        h.raw,
                        ld.0,
                        MODE,
                        scalar(&ONE),
                        d.0,
                        yp,
                        d.0,
                        dyp,
                        d.0,
                        xp,
                        scalar(&ZERO),
                        d.0,
                        dxp,
                    )
                },
                "cudnnLRNCrossChannelBackward",
            )
        })
    }
}
