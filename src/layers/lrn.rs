use candle_core::{Result, Tensor};
use candle_nn::Module;

/// Local response normalization across channels, as in Caffe's `LRN` (`ACROSS_CHANNELS`),
/// PyTorch's `nn.LocalResponseNorm` and ONNX `LRN`:
///
/// `y[c] = x[c] / (k + alpha / size * sum(x[c']^2 for c' in window(c)))^beta`
///
/// The window holds `size` channels centred on `c` (`size / 2` before, `(size - 1) / 2` after),
/// clipped at the edges. `alpha` is divided by `size`: that is the convention the released
/// AlexNet weights were trained with, not the paper's undivided `alpha` with `k = 2`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_nn::Module;
/// use candle_zoo::layers::LocalResponseNorm;
///
/// let lrn = LocalResponseNorm::alexnet(); // size 5, alpha 1e-4, beta 0.75, k 1
/// let x = Tensor::ones((1, 8, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
/// let y = lrn.forward(&x)?;
/// assert_eq!(y.dims(), x.dims());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalResponseNorm {
    pub size: usize,
    pub alpha: f64,
    pub beta: f64,
    pub k: f64,
}

impl LocalResponseNorm {
    pub fn new(size: usize, alpha: f64, beta: f64, k: f64) -> Self {
        Self {
            size,
            alpha,
            beta,
            k,
        }
    }

    /// The settings of `bvlc_alexnet` and CaffeNet: size 5, alpha 1e-4, beta 0.75, k 1.
    pub fn alexnet() -> Self {
        Self::new(5, 1e-4, 0.75, 1.0)
    }
}

impl Module for LocalResponseNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() < 2 {
            candle_core::bail!(
                "LocalResponseNorm needs a channel dim (N, C, ...), got {:?}",
                x.dims()
            );
        }
        let channels = x.dim(1)?;
        let sq = x.sqr()?;
        // Zero-pad the channel dim so that every window is a plain slice of the padded tensor.
        let padded = sq.pad_with_zeros(1, self.size / 2, (self.size - 1) / 2)?;
        let mut sum = padded.narrow(1, 0, channels)?;
        for offset in 1..self.size {
            sum = (sum + padded.narrow(1, offset, channels)?)?;
        }
        let scale = sum
            .affine(self.alpha / self.size as f64, self.k)?
            .powf(self.beta)?;
        x.broadcast_div(&scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Direct evaluation of the formula, one element at a time.
    fn reference(x: &[f32], c: usize, hw: usize, lrn: &LocalResponseNorm) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for ch in 0..c {
            let lo = ch.saturating_sub(lrn.size / 2);
            let hi = (ch + (lrn.size - 1) / 2).min(c - 1);
            for p in 0..hw {
                let s: f64 = (lo..=hi).map(|j| (x[j * hw + p] as f64).powi(2)).sum();
                let scale = (lrn.k + lrn.alpha / lrn.size as f64 * s).powf(lrn.beta);
                out[ch * hw + p] = (x[ch * hw + p] as f64 / scale) as f32;
            }
        }
        out
    }

    #[test]
    fn matches_formula_including_edges_and_even_size() -> Result<()> {
        let (c, hw) = (7, 3);
        let data: Vec<f32> = (0..c * hw)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 9.0)
            .collect();
        let x = Tensor::from_vec(data.clone(), (1, c, 1, hw), &Device::Cpu)?;
        for lrn in [
            LocalResponseNorm::alexnet(),
            LocalResponseNorm::new(4, 0.3, 0.6, 2.0),
        ] {
            let got = lrn.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let want = reference(&data, c, hw, &lrn);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let lrn = LocalResponseNorm::new(3, 0.5, 0.75, 1.0);
        let data: Vec<f64> = (0..6)
            .map(|i| 0.3 + 0.4 * i as f64 - 0.1 * (i * i) as f64)
            .collect();
        let x = candle_core::Var::from_vec(data.clone(), (1, 6, 1, 1), &Device::Cpu)?;
        // A weighted sum so that each output contributes differently to the loss.
        let w = Tensor::arange(1f64, 7., &Device::Cpu)?.reshape((1, 6, 1, 1))?;
        let loss =
            |t: &Tensor| -> Result<f64> { (lrn.forward(t)? * &w)?.sum_all()?.to_scalar::<f64>() };
        let grads = (lrn.forward(x.as_tensor())? * &w)?.sum_all()?.backward()?;
        let g = grads
            .get(&x)
            .expect("gradient for x")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let eps = 1e-6;
        for i in 0..data.len() {
            let shifted = |d: f64| -> Result<f64> {
                let mut v = data.clone();
                v[i] += d;
                loss(&Tensor::from_vec(v, (1, 6, 1, 1), &Device::Cpu)?)
            };
            let numeric = (shifted(eps)? - shifted(-eps)?) / (2.0 * eps);
            assert!(
                (g[i] - numeric).abs() < 1e-6,
                "d/dx{i}: {} vs {numeric}",
                g[i]
            );
        }
        Ok(())
    }
}
