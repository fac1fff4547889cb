use candle_core::{Result, Tensor};
use candle_nn::Module;

/// Output length of a pooling window sweep, with PyTorch's and Caffe's rules.
///
/// Floor mode (PyTorch's default) drops a last partial window; ceil mode (Caffe, and PyTorch's
/// `ceil_mode=True`) keeps it as long as it starts inside the input. Returns `None` when the
/// input is shorter than the kernel.
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

/// Max pooling of an `(N, C, H, W)` tensor with a square window, in floor or ceil mode.
///
/// Ceil mode pads the bottom and right edges by replicating the last row and column, which leaves
/// every window's maximum unchanged, then runs candle's floor-mode pool.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, ceil_mode: bool) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let size = |n: usize| {
        pooled_size(n, kernel, stride, ceil_mode).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "max pool {kernel}x{kernel}: input {h}x{w} is smaller than the window"
            ))
        })
    };
    let (oh, ow) = (size(h)?, size(w)?);
    let pad_h = ((oh - 1) * stride + kernel).saturating_sub(h);
    let pad_w = ((ow - 1) * stride + kernel).saturating_sub(w);
    let x = if pad_h > 0 || pad_w > 0 {
        x.pad_with_same(2, 0, pad_h)?.pad_with_same(3, 0, pad_w)?
    } else {
        x.clone()
    };
    x.max_pool2d_with_stride(kernel, stride)
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
    pub out_h: usize,
    pub out_w: usize,
}

impl AdaptiveAvgPool2d {
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
        if (h, w) == (self.out_h, self.out_w) {
            return Ok(x.clone());
        }
        if h == 0 || w == 0 {
            candle_core::bail!("adaptive avg pool: empty input {:?}", x.dims());
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
}
