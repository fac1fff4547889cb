//! [`WeightOp`]: a layer computed by CPU kernels, run as a candle custom op.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{cpu_f32, tensor_f32};

/// A layer `y = f(x, weight, bias?)` computed by CPU kernels on contiguous f32 data: the conv and
/// linear ops. [`apply`] runs it as a candle custom op (a `CustomOp2` without a bias, a
/// `CustomOp3` with one); this trait holds what differs between them, the op the checks, the
/// storage access and the gradient tensors that do not.
pub(crate) trait WeightOp: Clone + Send + Sync + 'static {
    /// The op's name in error messages.
    const OP: &'static str;
    /// The custom ops' names without and with a bias.
    const NAMES: [&'static str; 2];

    /// Elements of the input, the weight, the bias and the output.
    fn lens(&self) -> [usize; 4];

    fn out_shape(&self) -> Shape;

    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32>;

    /// `[dx, dW, db]` from the input, the weight, the output and its gradient, each only where
    /// `want` asks for it.
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        res: &[f32],
        grad: &[f32],
        want: [bool; 3],
    ) -> [Option<Vec<f32>>; 3];
}

/// `op` on `x`, `weight` and `bias` as one custom op. The kernels read plain row-major data;
/// `contiguous` is free where it already is.
pub(crate) fn apply<T: WeightOp>(
    op: T,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, Fused(op)),
        None => x.apply_op2(&weight, Fused(op)),
    }
}

/// A [`WeightOp`] as candle's custom op.
struct Fused<T>(T);

impl<T: WeightOp> Fused<T> {
    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let [x_len, w_len, b_len, _] = self.0.lens();
        let xs = cpu_f32(x.0, x.1, x_len, T::OP, "input")?;
        let ws = cpu_f32(w.0, w.1, w_len, T::OP, "weight")?;
        let bs = b
            .map(|(s, l)| cpu_f32(s, l, b_len, T::OP, "bias"))
            .transpose()?;
        Ok((
            CpuStorage::F32(self.0.forward(xs, ws, bs)),
            self.0.out_shape(),
        ))
    }

    /// Gradients of `x`, `w` and `b` (the last only when there is a bias), each only when its
    /// tensor is tracked: an image, or a frozen layer, costs nothing.
    fn bwd(
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
        let grad = grad.contiguous()?;
        let [x_len, w_len, _, out_len] = self.0.lens();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let xv = tensor_f32(&xs, xl, x_len, T::OP, "input")?;
        let wv = tensor_f32(&ws, wl, w_len, T::OP, "weight")?;
        let rv = tensor_f32(&rs, rl, out_len, T::OP, "output")?;
        let gv = tensor_f32(&gs, gl, out_len, T::OP, "output gradient")?;
        let [dx, dw, db] = self.0.backward(xv, wv, rv, gv, want);
        let tensor = |d: Option<Vec<f32>>, like: &Tensor| {
            d.map(|d| Tensor::from_vec(d, like.shape(), x.device()))
                .transpose()
        };
        let db = match b {
            Some(b) => tensor(db, b)?,
            None => None,
        };
        Ok((tensor(dx, x)?, tensor(dw, w)?, db))
    }
}

impl<T: WeightOp> CustomOp2 for Fused<T> {
    fn name(&self) -> &'static str {
        T::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Fused::bwd(self, x, w, None, res, grad)?;
        Ok((dx, dw))
    }
}

impl<T: WeightOp> CustomOp3 for Fused<T> {
    fn name(&self) -> &'static str {
        T::NAMES[1]
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
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Fused::bwd(self, x, w, Some(b), res, grad)
    }
}
