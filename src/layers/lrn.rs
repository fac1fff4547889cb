use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::Module;
use rayon::prelude::*;

use super::cpu::{checked_elems, cpu_f32};

/// Local response normalization across channels, as in Caffe's `LRN` (`ACROSS_CHANNELS`),
/// PyTorch's `nn.LocalResponseNorm` and ONNX `LRN`:
///
/// `y[c] = x[c] / (k + alpha / size * sum(x[c']^2 for c' in window(c)))^beta`
///
/// The window holds `size` channels centred on `c` (`size / 2` before, `(size - 1) / 2` after),
/// clipped at the edges.
///
/// On the CPU, for f32, it is one fused custom op (forward and an analytic backward, parallel
/// over channel planes); elsewhere a composition of candle ops, which is differentiable too. `alpha` is divided by `size`: that is the convention the released
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
        if self.size == 0 {
            candle_core::bail!("LocalResponseNorm: size must be at least 1");
        }
        checked_elems("LocalResponseNorm", "input", x.dims())?;
        #[cfg(feature = "cudnn")]
        if super::cudnn::handles(x, super::cudnn::NORM_DTYPES)
            && super::cudnn::lrn_supports(x, self.size, self.beta, self.k)
            && x.elem_count() > 0
        {
            return super::cudnn::lrn(x, self.size, self.alpha, self.beta, self.k);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            x.contiguous()?.apply_op1(LrnOp(*self))
        } else {
            self.forward_generic(x)
        }
    }
}

impl LocalResponseNorm {
    /// The device-independent composition of candle ops (and the reference of the CPU op).
    fn forward_generic(&self, x: &Tensor) -> Result<Tensor> {
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

    /// Channels before and after `c` in its window.
    fn reach(&self) -> (usize, usize) {
        (self.size / 2, (self.size - 1) / 2)
    }

    /// `s = k + alpha / size * sum of x^2 over c's window`, for one plane of `hw` values.
    fn window_sum(&self, x: &[f32], c: usize, channels: usize, hw: usize, s: &mut [f32]) {
        let (before, after) = self.reach();
        let (lo, hi) = (c.saturating_sub(before), (c + after).min(channels - 1));
        s.fill(0.0);
        for cc in lo..=hi {
            for (s, &v) in s.iter_mut().zip(&x[cc * hw..(cc + 1) * hw]) {
                *s += v * v;
            }
        }
        let (a, k) = ((self.alpha / self.size as f64) as f32, self.k as f32);
        for s in s.iter_mut() {
            *s = k + a * *s;
        }
    }

    /// `s^-beta`, with the AlexNet exponent 0.75 as two square roots (several times faster
    /// than `powf`, and as accurate).
    fn inv_pow(&self, s: f32) -> f32 {
        if self.beta == 0.75 {
            let r = s.sqrt();
            1.0 / (r * r.sqrt())
        } else {
            s.powf(-self.beta as f32)
        }
    }
}

/// `(N, C, H*W)` of an LRN operand: dims 0 and 1 and the product of the rest.
fn planes(layout: &Layout) -> (usize, usize, usize) {
    let dims = layout.shape().dims();
    (dims[0], dims[1], dims[2..].iter().product())
}

/// The CPU LRN op (f32).
struct LrnOp(LocalResponseNorm);

impl CustomOp1 for LrnOp {
    fn name(&self) -> &'static str {
        "lrn"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = planes(layout);
        let x = cpu_f32(storage, layout, n * c * hw, "lrn", "input")?;
        let lrn = &self.0;
        let mut out = vec![0f32; n * c * hw];
        out.par_chunks_mut(hw.max(1)).enumerate().for_each_init(
            || vec![0f32; hw],
            |s, (plane, out)| {
                let (b, ch) = (plane / c, plane % c);
                let xb = &x[b * c * hw..(b + 1) * c * hw];
                lrn.window_sum(xb, ch, c, hw, s);
                for ((o, &v), &s) in out.iter_mut().zip(&xb[ch * hw..(ch + 1) * hw]).zip(&*s) {
                    *o = v * lrn.inv_pow(s);
                }
            },
        );
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = arg.contiguous()?.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &LrnBackward(self.0),
        )?;
        Ok(Some(grad))
    }
}

/// `(x, y, dy) -> dx` of [`LrnOp`]. With `s[c]` the window sum of channel `c` and `a` = alpha /
/// size: `dx[j] = dy[j] s[j]^-beta - 2 a beta x[j] sum(dy[c] y[c] / s[c])` over the channels `c`
/// whose window holds `j` (Caffe's LRN backward).
struct LrnBackward(LocalResponseNorm);

impl CustomOp3 for LrnBackward {
    fn name(&self) -> &'static str {
        "lrn-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!(
                "lrn backward: shapes {:?}, {:?}, {:?} differ",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (n, c, hw) = planes(l1);
        let len = n * c * hw;
        let x = cpu_f32(s1, l1, len, "lrn backward", "input")?;
        let y = cpu_f32(s2, l2, len, "lrn backward", "output")?;
        let g = cpu_f32(s3, l3, len, "lrn backward", "output gradient")?;
        let lrn = &self.0;
        // Pass 1, per plane: t = dy * y / s, and dx's direct term dy * s^-beta.
        let mut t = vec![0f32; len];
        let mut dx = vec![0f32; len];
        t.par_chunks_mut(hw.max(1))
            .zip(dx.par_chunks_mut(hw.max(1)))
            .enumerate()
            .for_each_init(
                || vec![0f32; hw],
                |s, (plane, (t, dx))| {
                    let (b, ch) = (plane / c, plane % c);
                    lrn.window_sum(&x[b * c * hw..(b + 1) * c * hw], ch, c, hw, s);
                    let r = plane * hw..(plane + 1) * hw;
                    for i in 0..hw {
                        let (gi, si) = (g[r.start + i], s[i]);
                        t[i] = gi * y[r.start + i] / si;
                        dx[i] = gi * lrn.inv_pow(si);
                    }
                },
            );
        // Pass 2, per plane j: subtract 2 a beta x[j] * (sum of t over the channels whose
        // window holds j: j - after ..= j + before).
        let (before, after) = lrn.reach();
        let coef = (2.0 * lrn.alpha / lrn.size as f64 * lrn.beta) as f32;
        dx.par_chunks_mut(hw.max(1)).enumerate().for_each_init(
            || vec![0f32; hw],
            |acc, (plane, dx)| {
                let (b, j) = (plane / c, plane % c);
                let (lo, hi) = (j.saturating_sub(after), (j + before).min(c - 1));
                acc.fill(0.0);
                for cc in lo..=hi {
                    let tp = &t[(b * c + cc) * hw..(b * c + cc + 1) * hw];
                    for (a, &v) in acc.iter_mut().zip(tp) {
                        *a += v;
                    }
                }
                let xp = &x[plane * hw..(plane + 1) * hw];
                for ((d, &a), &xv) in dx.iter_mut().zip(&*acc).zip(xp) {
                    *d -= coef * xv * a;
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
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
    fn cpu_op_matches_the_composition_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 7, 3, 4);
        let len = n * c * h * w;
        let data: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
            .collect();
        let wts: Vec<f32> = (0..len)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5)
            .collect();
        let wts = Tensor::from_vec(wts, (n, c, h, w), &dev)?;
        for lrn in [
            LocalResponseNorm::alexnet(),
            LocalResponseNorm::new(4, 0.3, 0.6, 2.0),
            LocalResponseNorm::new(1, 0.5, 0.75, 1.0),
        ] {
            let x = candle_core::Var::from_vec(data.clone(), (n, c, h, w), &dev)?;
            let fast = lrn.forward(x.as_tensor())?;
            let slow = lrn.forward_generic(x.as_tensor())?;
            let gf = (&fast * &wts)?.sum_all()?.backward()?;
            let gs = (&slow * &wts)?.sum_all()?.backward()?;
            let pairs = [
                (fast, slow),
                (gf.get(&x).unwrap().clone(), gs.get(&x).unwrap().clone()),
            ];
            for (a, b) in pairs {
                let (a, b) = (
                    a.flatten_all()?.to_vec1::<f32>()?,
                    b.flatten_all()?.to_vec1::<f32>()?,
                );
                for (a, b) in a.iter().zip(&b) {
                    assert!(
                        (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                        "{lrn:?}: {a} vs {b}"
                    );
                }
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
