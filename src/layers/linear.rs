//! A fully connected layer with its bias and an optional ReLU fused: on the CPU a custom op
//! whose gemms are laid out for a narrow batch.
//!
//! Why: candle's `Linear` computes `x * W^T` with `x` the batch (1 to 64 rows) and `W` AlexNet's
//! fc6 (4096 x 9216, 151 MB): a wide, flat product that the `gemm` crate runs at half the speed
//! of the same product turned round, `(W * x^T)^T`, whose long side is split over the threads.
//! Its backward goes through the transpose, the matmul, the bias broadcast and the ReLU as four
//! graph nodes, and candle's backprop allocates, zero-fills and adds a gradient buffer for each
//! of them: for fc6's weight that is several passes over 151 MB per step.
//!
//! [`linear`] on the CPU in f32:
//! - forward: `y^T = W * x^T` split by rows of `W` over the threads, then one pass that
//!   transposes the small `[out, batch]` result and applies the bias and the ReLU;
//! - backward: the output gradient is masked by the ReLU (where the output is > 0, as
//!   PyTorch), then `dW = g^T * x` split by rows, `dx = g * W` split by columns (on AVX2 CPUs
//!   at batch 2 to 32 reading `W` in place, `narrow::wide_gemm`), and `db` = column sums of
//!   `g`; each only for a tracked tensor.
//!
//! Elsewhere (other devices and dtypes, inputs of rank other than 2) it is candle's ops.

use candle_core::{DType, Result, Shape, Tensor};

use super::cpu::{apply, checked_elems, matmul, matmul_few_rows, relu_grad, Split, WeightOp};

/// The op's name in error messages.
const OP: &str = "linear";

/// `relu(x * weight^T + bias)` (the ReLU when `relu` is true), with the semantics of
/// `candle_nn::Linear`: `x` is `(N, in)`, `weight` is `(out, in)` and `bias` is `(out)`.
///
/// On the CPU with f32 tensors and a 2-D input this is one custom op (design notes at the top of
/// `src/layers/linear.rs`); the gradient of a fused ReLU is PyTorch's (zero where the output is
/// zero), and a tensor that is not tracked gets no gradient. Anywhere else it is candle's ops,
/// with candle's gradients.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_zoo::layers::linear;
///
/// let dev = Device::Cpu;
/// let x = Tensor::new(&[[1f32, 2., 3.], [-1., -2., -3.]], &dev)?;
/// let w = Var::new(&[[1f32, 0., 1.], [0., 1., 0.]], &dev)?;
/// let b = Var::new(&[0.5f32, -1.], &dev)?;
/// let y = linear(&x, w.as_tensor(), Some(b.as_tensor()), true)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[4.5, 1.], [0., 0.]]);
///
/// let grads = y.sum_all()?.backward()?;
/// // Only the first row passed the ReLU: dW rows are x[0] where the output is positive.
/// assert_eq!(grads.get(w.as_tensor()).unwrap().to_vec2::<f32>()?, [[1., 2., 3.], [1., 2., 3.]]);
/// assert_eq!(grads.get(b.as_tensor()).unwrap().to_vec1::<f32>()?, [1., 1.]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let fast = x.rank() == 2
        && weight.rank() == 2
        && f32_cpu(x)
        && f32_cpu(weight)
        && bias.is_none_or(f32_cpu);
    if !fast {
        return linear_candle(x, weight, bias, relu);
    }
    let (n, inp) = x.dims2()?;
    let (out, w_in) = weight.dims2()?;
    checked_elems(OP, "input", &[n, inp])?;
    checked_elems(OP, "weight", &[out, w_in])?;
    checked_elems(OP, "output", &[n, out])?;
    if w_in != inp {
        candle_core::bail!(
            "{OP}: input of shape {:?} does not fit a weight of shape {:?} ({inp} features in, \
             the weight takes {w_in})",
            x.dims(),
            weight.dims()
        );
    }
    if let Some(b) = bias {
        if b.dims() != [out] {
            candle_core::bail!(
                "{OP}: bias of shape {:?}, expected [{out}] for a weight of shape {:?}",
                b.dims(),
                weight.dims()
            );
        }
    }
    if n == 0 || inp == 0 || out == 0 {
        return linear_candle(x, weight, bias, relu);
    }
    apply(LinearOp { n, inp, out, relu }, x, weight, bias)
}

/// The same layer as candle's ops: `candle_nn::Linear`'s forward, then `relu`.
fn linear_candle(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    use candle_nn::Module;
    let y = candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// `n` rows of `inp` features to `out` features.
#[derive(Debug, Clone, Copy)]
struct LinearOp {
    n: usize,
    inp: usize,
    out: usize,
    relu: bool,
}

/// `dst[cols x rows] = src[rows x cols]^T`, in blocks that stay in cache.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

impl LinearOp {
    fn threads() -> usize {
        super::cpu::threads()
    }
}

impl WeightOp for LinearOp {
    const OP: &'static str = OP;
    const NAMES: [&'static str; 2] = ["linear-relu", "linear-bias-relu"];

    fn lens(&self) -> [usize; 4] {
        let (n, inp, out) = (self.n, self.inp, self.out);
        [n * inp, out * inp, out, n * out]
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.n, self.out))
    }

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let (n, inp, out) = (self.n, self.inp, self.out);
        // y^T[out x n] = W[out x inp] * x^T[inp x n]
        let mut yt = vec![0f32; out * n];
        let threads = (Self::threads(), Split::Rows);
        matmul(
            (&mut yt, n),
            false,
            (out, n, inp),
            (w, inp, 1),
            (x, 1, inp),
            threads,
        );
        let mut y = vec![0f32; n * out];
        transpose(&yt, out, n, &mut y);
        for row in y.chunks_exact_mut(out) {
            for (i, v) in row.iter_mut().enumerate() {
                let z = *v + b.map_or(0.0, |b| b[i]);
                *v = if self.relu { z.max(0.0) } else { z };
            }
        }
        y
    }

    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        [want_dx, want_dw, want_db]: [bool; 3],
    ) -> [Option<Vec<f32>>; 3] {
        let (n, inp, out) = (self.n, self.inp, self.out);
        let threads = (Self::threads(), Split::Rows);
        let g = relu_grad(self.relu, grad, res);
        let g: &[f32] = &g;
        // dW[out x inp] = g^T[out x n] * x[n x inp]
        let dw = want_dw.then(|| {
            let mut dw = vec![0f32; out * inp];
            matmul(
                (&mut dw, inp),
                false,
                (out, inp, n),
                (g, 1, out),
                (x, inp, 1),
                threads,
            );
            dw
        });
        // dx[n x inp] = g[n x out] * W[out x inp], split by columns
        let dx = want_dx.then(|| {
            let mut dx = vec![0f32; n * inp];
            matmul_few_rows(
                (&mut dx, inp),
                false,
                (n, inp, out),
                (g, out, 1),
                (w, inp, 1),
                (Self::threads(), Split::Cols),
            );
            dx
        });
        // Summed in f64: the order of a long f32 sum would show in the last bits.
        let db = want_db.then(|| {
            let mut db = vec![0f64; out];
            for row in g.chunks_exact(out) {
                db.iter_mut().zip(row).for_each(|(d, &v)| *d += v as f64);
            }
            db.into_iter().map(|v| v as f32).collect()
        });
        [dx, dw, db]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 2003.0) - 0.5)
            .collect()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        Ok(a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / scale)
    }

    /// Forward and every gradient equal candle's `Linear` + `relu` under autograd, with and
    /// without bias and ReLU, for batches narrower and wider than the threads' split (batch 17 and
    /// 5 with 200 and 300 inputs take `wide_gemm` for the input gradient, 400 outputs in blocks).
    #[test]
    fn matches_candle_linear_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, inp, out) in &[
            (1, 7, 5),
            (3, 33, 130),
            (17, 200, 70),
            (5, 300, 400),
            (64, 96, 300),
        ] {
            for (bias, relu) in [(true, true), (true, false), (false, true)] {
                let x = Var::from_vec(data(n * inp, 1), (n, inp), &dev)?;
                let w = Var::from_vec(data(out * inp, 2), (out, inp), &dev)?;
                let b = Var::from_vec(data(out, 3), out, &dev)?;
                let b_opt = bias.then_some(b.as_tensor());
                // Weights for the loss, so that every output's gradient differs.
                let lw = Tensor::from_vec(data(n * out, 4), (n, out), &dev)?;
                let ours = linear(x.as_tensor(), w.as_tensor(), b_opt, relu)?;
                let theirs = linear_candle(x.as_tensor(), w.as_tensor(), b_opt, relu)?;
                let case = format!("n {n} in {inp} out {out} bias {bias} relu {relu}");
                assert!(max_rel(&ours, &theirs)? < 1e-5, "forward, {case}");
                let g1 = (ours * &lw)?.sum_all()?.backward()?;
                let g2 = (theirs * &lw)?.sum_all()?.backward()?;
                let mut params = vec![("x", x.as_tensor()), ("w", w.as_tensor())];
                if bias {
                    params.push(("b", b.as_tensor()));
                }
                for (name, t) in params {
                    let (a, e) = (g1.get(t).unwrap(), g2.get(t).unwrap());
                    assert!(max_rel(a, e)? < 1e-5, "d{name}, {case}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn untracked_input_gets_no_gradient_and_other_ranks_fall_back() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(data(4 * 6, 1), (4, 6), &dev)?;
        let w = Var::from_vec(data(3 * 6, 2), (3, 6), &dev)?;
        let grads = linear(&x, w.as_tensor(), None, true)?
            .sum_all()?
            .backward()?;
        assert!(grads.get(&x).is_none() && grads.get(w.as_tensor()).is_some());
        // A batch of sequences, as candle's Linear takes it.
        let x3 = x.reshape((2, 2, 6))?;
        let y3 = linear(&x3, w.as_tensor(), None, false)?;
        let y2 = linear(&x, w.as_tensor(), None, false)?;
        assert!(max_rel(&y3.reshape((4, 3))?, &y2)? < 1e-6);
        Ok(())
    }

    #[test]
    fn bad_shapes_name_the_operands() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 5), DType::F32, &dev)?;
        let w = Tensor::zeros((3, 4), DType::F32, &dev)?;
        let err = linear(&x, &w, None, false).unwrap_err().to_string();
        assert!(err.contains("[2, 5]") && err.contains("[3, 4]"), "{err}");
        let w = Tensor::zeros((3, 5), DType::F32, &dev)?;
        let b = Tensor::zeros(4, DType::F32, &dev)?;
        let err = linear(&x, &w, Some(&b), false).unwrap_err().to_string();
        assert!(err.contains("bias of shape [4]"), "{err}");
        Ok(())
    }
}
