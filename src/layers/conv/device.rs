//! The convolution off the CPU: candle's kernels forward, and a backward that hands candle
//! contiguous operands only.
//!
//! candle's own conv backward passes `grad.transpose(0, 1)` as the kernel of the weight
//! gradient's convolution, a non-contiguous tensor whenever the batch is larger than 1. candle
//! 0.11.1's Metal conv copies such a kernel and then multiplies with the original anyway
//! (`../shared/reference/gpu-facts.md`), so training on Metal computed wrong conv weight
//! gradients, silently. Here the forward runs detached (candle's kernels, no graph), and a
//! custom op joins its result to the graph with a backward of its own: candle's formulas with
//! every operand made contiguous first, on every non-CPU device, so the fix does not depend on
//! which backend has the bug.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `conv2d(x, weight)` (no bias) with `groups` as candle's `Tensor::conv2d`: each group is
/// convolved on its own and the outputs concatenated along the channels.
pub(crate) fn conv2d_contiguous_grad(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    if groups > 1 {
        let (cin, cout) = (x.dim(1)? / groups, weight.dim(0)? / groups);
        let parts = (0..groups)
            .map(|g| {
                let x = x.narrow(1, g * cin, cin)?.contiguous()?;
                let w = weight.narrow(0, g * cout, cout)?.contiguous()?;
                conv2d_contiguous_grad(&x, &w, padding, stride, dilation, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 1);
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let y = x
        .detach()
        .conv2d(&weight.detach(), padding, stride, dilation, 1)?
        .contiguous()?;
    x.apply_op3(
        &weight,
        &y,
        ContiguousGradConv {
            padding,
            stride,
            dilation,
        },
    )
}

/// Forward: the third operand, the convolution already computed. Backward: the gradients of
/// the first two, from contiguous operands.
struct ContiguousGradConv {
    padding: usize,
    stride: usize,
    dilation: usize,
}

/// A copy of a contiguous storage that starts at its beginning (what a fresh conv output is).
fn copy<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("conv2d-contiguous-grad: the precomputed output must be contiguous")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp3 for ContiguousGradConv {
    fn name(&self) -> &'static str {
        "conv2d-contiguous-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy(y, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy(y, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
        y: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        copy(y, l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (padding, stride, dilation) = (self.padding, self.stride, self.dilation);
        let (x, weight, grad) = (x.contiguous()?, weight.contiguous()?, grad.contiguous()?);
        // An image (untracked) needs no gradient.
        let dx = if x.track_op() {
            // conv_transpose2d's output side is (g - 1) * stride + dilation * (k - 1) + 1 - 2 *
            // padding; the rows the forward's stride skipped come back as output padding.
            let (g, k) = (grad.dim(2)?, weight.dim(2)?);
            let side = (g - 1) * stride + dilation * (k - 1) + 1 - 2 * padding;
            let out_padding = x.dim(2)? - side;
            Some(grad.conv_transpose2d(&weight, padding, out_padding, stride, dilation)?)
        } else {
            None
        };
        // dW[o, c] = sum over the batch of x[:, c] correlated with grad[:, o], dilated by the
        // stride: the batch becomes the channels on both sides, each copied contiguous.
        let xt = x.transpose(0, 1)?.contiguous()?;
        let gt = grad.transpose(0, 1)?.contiguous()?;
        let dw = xt.conv2d(&gt, padding, dilation, stride, 1)?;
        let (_, _, kh, kw) = weight.dims4()?;
        let dw = dw
            .narrow(2, 0, kh)?
            .narrow(3, 0, kw)?
            .transpose(0, 1)?
            .contiguous()?;
        Ok((dx, Some(dw), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// The backward every non-CPU device runs, computed here on the CPU at batch 3 for conv1's
    /// strided 11x11 and a grouped 5x5 (the two-tower conv2), equals candle's own conv gradients
    /// on the CPU (where candle's conv handles non-contiguous kernels correctly) and this crate's
    /// CPU op, whose gradients are PyTorch's (`tests/gradients.rs`).
    #[test]
    fn contiguous_backward_gives_the_reference_gradients_at_batch_3() -> Result<()> {
        let dev = Device::Cpu;
        for (cin, cout, k, stride, padding, groups, side) in
            [(3, 8, 11, 4, 2, 1, 39), (8, 12, 5, 1, 2, 2, 9)]
        {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, cin, side, side), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (cout, cin / groups, k, k), &dev)?)?;
            // The loss weighs each output by a fixed pseudo-random value.
            let grads = |y: Tensor| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
                let n = y.elem_count();
                let r = Tensor::arange(0f32, n as f32, &dev)?
                    .affine(0.37, 0.0)?
                    .sin()?
                    .reshape(y.shape())?;
                let g = (y.clone() * r)?.sum_all()?.backward()?;
                let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                Ok((
                    flat(&y)?,
                    flat(g.get(x.as_tensor()).unwrap())?,
                    flat(g.get(w.as_tensor()).unwrap())?,
                ))
            };
            let ours = grads(conv2d_contiguous_grad(
                x.as_tensor(),
                w.as_tensor(),
                padding,
                stride,
                1,
                groups,
            )?)?;
            let candle = grads(
                x.as_tensor()
                    .conv2d(w.as_tensor(), padding, stride, 1, groups)?,
            )?;
            let cfg = candle_nn::Conv2dConfig {
                padding,
                stride,
                groups,
                ..Default::default()
            };
            let fast = grads(super::super::conv2d(
                x.as_tensor(),
                w.as_tensor(),
                None,
                &cfg,
                false,
            )?)?;
            let close = |a: &[f32], b: &[f32], what: &str| {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    err <= 1e-5 * scale,
                    "k{k} g{groups} {what}: {err} of {scale}"
                );
            };
            for (name, reference) in [("candle", &candle), ("cpu op", &fast)] {
                close(&ours.0, &reference.0, &format!("output vs {name}"));
                close(&ours.1, &reference.1, &format!("dx vs {name}"));
                close(&ours.2, &reference.2, &format!("dw vs {name}"));
            }
        }
        Ok(())
    }
}
