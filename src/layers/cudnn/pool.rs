//! Max and average pooling through cuDNN, forward and backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::desc::{PoolDesc, TensorDesc};
use super::handle::{check, handle, not_on_cpu, run, scalar, shape, ONE, ZERO};
use super::plan::{ceil_extra, dims_i32};

/// PyTorch's `max_pool2d(x, kernel, stride)` without padding; `out` is the `(OH, OW)` of the
/// mode asked for (the caller's checked geometry). cuDNN pools in floor mode only: for ceil
/// mode the input gets `-inf` rows and columns after it where the last window runs past it
/// (never for AlexNet's shapes, whose windows fit exactly), which no maximum picks and whose
/// gradient the `cat` drops.
pub(crate) fn max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    out: (usize, usize),
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (eh, ew) = (
        ceil_extra(h, kernel, stride, out.0),
        ceil_extra(w, kernel, stride, out.1),
    );
    let mut x = x.clone();
    if eh > 0 {
        let fill =
            Tensor::zeros((n, c, eh, w), x.dtype(), x.device())?.affine(1.0, f64::NEG_INFINITY)?;
        x = Tensor::cat(&[&x, &fill], 2)?;
    }
    if ew > 0 {
        let fill = Tensor::zeros((n, c, h + eh, ew), x.dtype(), x.device())?
            .affine(1.0, f64::NEG_INFINITY)?;
        x = Tensor::cat(&[&x, &fill], 3)?;
    }
    pool(&x, true, (kernel, kernel), (stride, stride), out)
}

/// Average pooling over whole `kernel` windows at `kernel` strides: adaptive average pooling
/// where the output divides the input.
pub(crate) fn avg_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    out: (usize, usize),
) -> Result<Tensor> {
    pool(x, false, kernel, kernel, out)
}

fn pool(
    x: &Tensor,
    max: bool,
    kernel: (usize, usize),
    stride: (usize, usize),
    out: (usize, usize),
) -> Result<Tensor> {
    let op = if max {
        "max pool (cuDNN)"
    } else {
        "avg pool (cuDNN)"
    };
    let (n, c, _, _) = x.dims4()?;
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {v} is too large")))
    };
    let p = Pool {
        op,
        max,
        kernel: [int(kernel.0)?, int(kernel.1)?],
        stride: [int(stride.0)?, int(stride.1)?],
        x: dims_i32(op, "input", x.dims())?,
        y: dims_i32(op, "output", &[n, c, out.0, out.1])?,
    };
    x.contiguous()?.apply_op1(p)
}

#[derive(Debug, Clone, Copy)]
struct Pool {
    op: &'static str,
    max: bool,
    kernel: [i32; 2],
    stride: [i32; 2],
    x: [i32; 4],
    y: [i32; 4],
}

impl Pool {
    /// The pooling and tensor descriptors, checked: cuDNN's output size must be the caller's.
    fn descs(&self, dtype: DType) -> Result<(PoolDesc, TensorDesc, TensorDesc)> {
        let pd = PoolDesc::new(self.max, self.kernel, self.stride)?;
        let xd = TensorDesc::nchw(dtype, self.x, self.op)?;
        let yd = TensorDesc::nchw(dtype, self.y, self.op)?;
        let mut y = [0i32; 4];
        // SAFETY: valid descriptors; four plain outputs.
        check(
            unsafe {
                sys::cudnnGetPooling2dForwardOutputDim(
                    pd.0, xd.0, &mut y[0], &mut y[1], &mut y[2], &mut y[3],
                )
            },
            "cudnnGetPooling2dForwardOutputDim",
        )?;
        if y != self.y {
            candle_core::bail!(
                "{}: cuDNN pools {:?} to {y:?} with window {:?} stride {:?}, expected {:?}",
                self.op,
                self.x,
                self.kernel,
                self.stride,
                self.y
            );
        }
        Ok((pd, xd, yd))
    }
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        if self.max {
            "cudnn-max-pool2d"
        } else {
            "cudnn-avg-pool2d"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(not_on_cpu(self.op))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (dtype, dev) = (x.dtype(), x.device());
        let h = handle(dev)?;
        let (pd, xd, yd) = self.descs(dtype)?;
        run(
            &h,
            dev,
            dtype,
            [(x, xl, "input")],
            shape(self.y),
            |[xp], yp| {
                // SAFETY: descriptors of the buffers' sizes; f32 scalars.
                check(
                    unsafe {
                        sys::cudnnPoolingForward(
                            h.raw,
                            pd.0,
                            scalar(&ONE),
                            xd.0,
                            xp,
                            scalar(&ZERO),
                            yd.0,
                            yp,
                        )
                    },
                    "cudnnPoolingForward",
                )
            },
        )
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(arg.apply_op3_no_bwd(res, &grad, &PoolGrad(*self))?))
    }
}

/// `(x, y, dy) -> dx`: a max pool's gradient goes to each window's maximum (cuDNN's
/// deterministic choice among ties), an average pool's evenly over its window.
struct PoolGrad(Pool);

impl CustomOp3 for PoolGrad {
    fn name(&self) -> &'static str {
        "cudnn-pool2d-grad"
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
        Err(not_on_cpu(self.0.op))
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
        let p = &self.0;
        let (dtype, dev) = (x.dtype(), x.device());
        let h = handle(dev)?;
        let (pd, xd, yd) = p.descs(dtype)?;
        let srcs = [
            (x, xl, "input"),
            (y, yl, "output"),
            (dy, dyl, "output gradient"),
        ];
        run(&h, dev, dtype, srcs, shape(p.x), |[xp, yp, dyp], dxp| {
            // SAFETY: descriptors of the buffers' sizes; f32 scalars.
            check(
                unsafe {
                    sys::cudnnPoolingBackward(
                        h.raw,
                        pd.0,
                        scalar(&ONE),
                        yd.0,
                        yp,
                        yd.0,
                        dyp,
                        xd.0,
                        xp,
                        scalar(&ZERO),
                        xd.0,
                        dxp,
                    )
                },
                "cudnnPoolingBackward",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::cudnn::desc::{ActDesc, LrnDesc};

    /// With the real cuDNN library (no GPU needed for descriptors): AlexNet's 3x3/2 max pools
    /// and a whole-bin average pool have the crate's output sizes in cuDNN, in f32 and f16, a
    /// disagreement is an error, and the LRN and activation settings are accepted.
    #[test]
    fn alexnets_pools_have_the_crates_sizes_in_cudnn() {
        let pool = |x: [i32; 4], max: bool, k: i32, y: [i32; 4]| Pool {
            op: "test pool",
            max,
            kernel: [k, k],
            stride: [if max { 2 } else { k }; 2],
            x,
            y,
        };
        for dtype in [DType::F32, DType::F16] {
            for (side, out) in [(55, 27), (27, 13), (13, 6)] {
                pool([8, 96, side, side], true, 3, [8, 96, out, out])
                    .descs(dtype)
                    .unwrap();
            }
            pool([8, 256, 12, 12], false, 2, [8, 256, 6, 6])
                .descs(dtype)
                .unwrap();
        }
        let err = pool([8, 96, 55, 55], true, 3, [8, 96, 28, 28])
            .descs(DType::F32)
            .err()
            .expect("a wrong size")
            .to_string();
        assert!(err.contains("[8, 96, 27, 27]"), "{err}");
        LrnDesc::new(5, 1e-4, 0.75, 1.0).unwrap();
        LrnDesc::new(5, 1e-4, 0.75, 2.0).unwrap();
        ActDesc::new(true).unwrap();
        ActDesc::new(false).unwrap();
    }
}
