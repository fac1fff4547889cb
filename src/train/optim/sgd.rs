//! [`Sgd`]: `torch.optim.SGD` step for step, with parameter groups; see the [module
//! docs](super).

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var, WithDType};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A set of parameters sharing a learning-rate multiplier and a weight decay (PyTorch's
/// `param_groups`), e.g. weights with decay and biases without, or a new head trained faster.
///
/// ```
/// use candle_core::{DType, Device, Var};
/// use candle_zoo::train::optim::ParamGroup;
///
/// let w = Var::zeros((4, 3), DType::F32, &Device::Cpu)?;
/// let group = ParamGroup::new("weights", vec![("fc.weight".to_string(), w)])
///     .lr_mult(1.0)
///     .weight_decay(5e-4);
/// assert_eq!(group.weight_decay, 5e-4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// A name for messages and logs, e.g. `"weights"`, `"biases"`, `"head"`.
    pub name: String,
    /// The group's variables with their checkpoint keys (which name their momentum buffers).
    pub params: Vec<(String, Var)>,
    /// The group's learning rate is the optimizer's base learning rate times this.
    pub lr_mult: f64,
    /// Absolute L2 coefficient added to the gradient (PyTorch's `weight_decay`).
    pub weight_decay: f64,
}

impl ParamGroup {
    /// A group with learning-rate multiplier 1 and no weight decay.
    pub fn new(name: impl Into<String>, params: Vec<(String, Var)>) -> Self {
        Self {
            name: name.into(),
            params,
            lr_mult: 1.0,
            weight_decay: 0.0,
        }
    }

    /// Sets the learning-rate multiplier.
    pub fn lr_mult(mut self, m: f64) -> Self {
        self.lr_mult = m;
        self
    }

    /// Sets the weight decay (absolute L2 coefficient).
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
}

/// Hyperparameters shared by all groups, named as in `torch.optim.SGD`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    /// Base learning rate (each group multiplies it by its `lr_mult`).
    pub lr: f64,
    /// Momentum factor; 0 disables momentum (and its buffers).
    pub momentum: f64,
    /// Dampening of the gradient's contribution to the momentum buffer.
    pub dampening: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    /// lr 0.01, momentum 0.9, no dampening, no Nesterov (the AlexNet paper's momentum).
    fn default() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

impl SgdConfig {
    /// PyTorch's checks, plus finiteness.
    fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(invalid(format!(
                "sgd: invalid learning rate {} (must be finite and >= 0)",
                self.lr
            )));
        }
        if !(self.momentum.is_finite() && self.momentum >= 0.0) {
            return Err(invalid(format!(
                "sgd: invalid momentum {} (must be finite and >= 0)",
                self.momentum
            )));
        }
        if !self.dampening.is_finite() {
            return Err(invalid(format!(
                "sgd: invalid dampening {}",
                self.dampening
            )));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(invalid(format!(
                "sgd: Nesterov momentum requires a momentum > 0 and zero dampening \
                 (momentum {}, dampening {})",
                self.momentum, self.dampening
            )));
        }
        Ok(())
    }
}

/// A momentum buffer. CPU buffers live outside candle so that the fused op, which may mutate only
/// its destination (the parameter), can update them in the same pass.
#[derive(Debug)]
enum Buffer {
    Cpu(CpuBuf),
    Tensor(Tensor),
}

#[derive(Debug)]
enum CpuBuf {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl CpuBuf {
    fn zeros(dtype: DType, n: usize) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32(vec![0.0; n])),
            DType::F64 => Some(Self::F64(vec![0.0; n])),
            _ => None,
        }
    }

    fn from_tensor(t: &Tensor, dtype: DType) -> Result<Self> {
        let flat = t.flatten_all()?;
        match dtype {
            DType::F64 => Ok(Self::F64(flat.to_dtype(DType::F64)?.to_vec1()?)),
            _ => Ok(Self::F32(flat.to_dtype(DType::F32)?.to_vec1()?)),
        }
    }

    fn to_tensor(&self, shape: &candle_core::Shape) -> Result<Tensor> {
        let dev = candle_core::Device::Cpu;
        Ok(match self {
            Self::F32(v) => Tensor::from_slice(v, shape, &dev)?,
            Self::F64(v) => Tensor::from_slice(v, shape, &dev)?,
        })
    }
}

/// The coefficients of one group's update.
#[derive(Debug, Clone, Copy)]
pub(super) struct Coeffs {
    pub(super) lr: f64,
    pub(super) weight_decay: f64,
    pub(super) momentum: f64,
    pub(super) dampening: f64,
    pub(super) nesterov: bool,
}

/// Stochastic gradient descent with momentum, dampening, Nesterov momentum and per-group weight
/// decay and learning-rate multipliers, exactly as `torch.optim.SGD`.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use candle_zoo::train::optim::{ParamGroup, Sgd, SgdConfig};
///
/// let w = Var::from_slice(&[1.0f32, -2.0], 2, &Device::Cpu)?;
/// let group = ParamGroup::new("weights", vec![("w".to_string(), w.clone())]).weight_decay(0.1);
/// let config = SgdConfig { lr: 0.5, momentum: 0.9, ..SgdConfig::default() };
/// let mut opt = Sgd::new(vec![group], config)?;
///
/// // loss = sum(w * g) has gradient g.
/// let g = Tensor::new(&[0.2f32, 0.4], &Device::Cpu)?;
/// opt.backward_step(&(w.as_tensor() * &g)?.sum_all()?)?;
/// // d_p = g + 0.1 w = [0.3, 0.2]; first step: buf = d_p; w -= 0.5 * buf.
/// let w1 = w.to_vec1::<f32>()?;
/// assert!((w1[0] - 0.85).abs() < 1e-6 && (w1[1] + 2.1).abs() < 1e-6);
/// assert_eq!(opt.steps(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Sgd {
    groups: Vec<ParamGroup>,
    config: SgdConfig,
    /// `buffers[g][p]`: momentum buffer of parameter `p` of group `g`, `None` before its first
    /// gradient (PyTorch's `momentum_buffer is None`).
    buffers: Vec<Vec<Option<Buffer>>>,
    steps: u64,
    /// Use the fused in-place CPU kernel where it applies (tests turn it off to compare).
    fused: bool,
}

impl Sgd {
    /// An optimizer over `groups`. Errors on a key or variable in more than one place, a
    /// negative or non-finite learning rate, momentum, `lr_mult` or weight decay, and Nesterov
    /// momentum without momentum or with dampening (PyTorch's rules).
    pub fn new(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let mut keys: HashMap<&str, &str> = HashMap::new();
        let mut ids: HashMap<candle_core::TensorId, &str> = HashMap::new();
        for g in &groups {
            if !(g.lr_mult.is_finite() && g.lr_mult >= 0.0) {
                return Err(invalid(format!(
                    "sgd: group `{}` has invalid lr_mult {} (must be finite and >= 0)",
                    g.name, g.lr_mult
                )));
            }
            if !(g.weight_decay.is_finite() && g.weight_decay >= 0.0) {
                return Err(invalid(format!(
                    "sgd: group `{}` has invalid weight decay {} (must be finite and >= 0)",
                    g.name, g.weight_decay
                )));
            }
            for (key, var) in &g.params {
                if let Some(other) = keys.insert(key, &g.name) {
                    return Err(invalid(format!(
                        "sgd: parameter key `{key}` appears more than once (groups `{other}` and `{}`)",
                        g.name
                    )));
                }
                if let Some(other) = ids.insert(var.as_tensor().id(), key) {
                    return Err(invalid(format!(
                        "sgd: parameters `{other}` and `{key}` are the same variable; \
                         a variable may be in only one group"
                    )));
                }
            }
        }
        let buffers = groups
            .iter()
            .map(|g| g.params.iter().map(|_| None).collect())
            .collect();
        Ok(Self {
            groups,
            config,
            buffers,
            steps: 0,
            fused: true,
        })
    }

    /// One optimisation step with the gradients in `grads`. A parameter without a gradient is
    /// left alone, its momentum buffer included (PyTorch: `p.grad is None`). All gradients are
    /// checked (shape) before any parameter changes.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for g in &self.groups {
            for (key, var) in &g.params {
                if let Some(grad) = grads.get(var.as_tensor()) {
                    if grad.dims() != var.dims() {
                        return Err(invalid(format!(
                            "sgd: the gradient of `{key}` has shape {:?} but the parameter has {:?}",
                            grad.dims(),
                            var.dims()
                        )));
                    }
                }
            }
        }
        for (group, bufs) in self.groups.iter().zip(self.buffers.iter_mut()) {
            let c = Coeffs {
                lr: self.config.lr * group.lr_mult,
                weight_decay: group.weight_decay,
                momentum: self.config.momentum,
                dampening: self.config.dampening,
                nesterov: self.config.nesterov,
            };
            for ((key, var), slot) in group.params.iter().zip(bufs.iter_mut()) {
                if let Some(grad) = grads.get(var.as_tensor()) {
                    update_param(key, var, grad, slot, &c, self.fused)?;
                }
            }
        }
        self.steps += 1;
        Ok(())
    }

    /// Back-propagates `loss` and takes a [`step`](Self::step).
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the base learning rate (e.g. from a [`Scheduler`](super::Scheduler)); it should be finite and >= 0.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The hyperparameters (with the current base learning rate).
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Number of steps taken (restored by [`load_state`](Self::load_state)).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// What a checkpoint needs to resume this optimizer: its [`SgdState`] and the momentum
    /// buffers by parameter key (a parameter that never had a gradient, or momentum 0, has
    /// none). Groups' `lr_mult` and weight decay are not included: they come from the code
    /// building the groups.
    pub fn state(&self) -> Result<(SgdState, Vec<(String, Tensor)>)> {
        let mut momentum = Vec::new();
        let mut buffers = Vec::new();
        for (group, bufs) in self.groups.iter().zip(&self.buffers) {
            for ((key, var), slot) in group.params.iter().zip(bufs) {
                let t = match slot {
                    None => continue,
                    Some(Buffer::Tensor(t)) => t.clone(),
                    Some(Buffer::Cpu(b)) => b.to_tensor(var.shape())?,
                };
                momentum.push(key.clone());
                buffers.push((key.clone(), t));
            }
        }
        let state = SgdState {
            config: self.config,
            steps: self.steps,
            momentum,
        };
        Ok((state, buffers))
    }

    /// Restores what [`state`](Self::state) saved: the config (as PyTorch's `load_state_dict`
    /// restores its hyperparameters), the step count and the momentum buffers (moved to each
    /// parameter's device and dtype). `buffers` holds a tensor for every key `state.momentum`
    /// lists, and may hold others. Errors name the parameter at fault; nothing changes on error.
    pub fn load_state(
        &mut self,
        state: &SgdState,
        buffers: &HashMap<String, Tensor>,
    ) -> Result<()> {
        state.config.validate()?;
        let mut index: HashMap<&str, (usize, usize)> = HashMap::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (pi, (key, _)) in g.params.iter().enumerate() {
                index.insert(key, (gi, pi));
            }
        }
        let mut restored: Vec<Vec<Option<Buffer>>> = self
            .groups
            .iter()
            .map(|g| g.params.iter().map(|_| None).collect())
            .collect();
        for key in &state.momentum {
            let &(gi, pi) = index.get(key.as_str()).ok_or_else(|| {
                invalid(format!(
                    "optimizer state: it has a momentum buffer for `{key}`, which is not a \
                     parameter of this optimizer"
                ))
            })?;
            let t = buffers.get(key).ok_or_else(|| {
                invalid(format!(
                    "optimizer state: the momentum buffer of parameter `{key}` is missing"
                ))
            })?;
            let var = &self.groups[gi].params[pi].1;
            if t.dims() != var.dims() {
                return Err(invalid(format!(
                    "optimizer state: the momentum buffer of `{key}` has shape {:?} but the \
                     parameter has {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            restored[gi][pi] = Some(Buffer::Tensor(t));
        }
        self.config = state.config;
        self.steps = state.steps;
        self.buffers = restored;
        Ok(())
    }
}

/// Where an [`Sgd`] stands, for a checkpoint: serialised as one JSON value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SgdState {
    /// The hyperparameters, with the base learning rate at that point.
    pub config: SgdConfig,
    /// Steps taken.
    pub steps: u64,
    /// The keys of the parameters that have a momentum buffer.
    pub momentum: Vec<String>,
}

/// candle's optimizer interface: one group over `vars` (named `param.0`, `param.1`, ... in
/// [`Sgd::state`]) without weight decay; build [`ParamGroup`]s with [`Sgd::new`] for weight decay
/// and per-group learning rates.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// use candle_zoo::train::optim::{Sgd, SgdConfig};
///
/// let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
/// let mut opt = <Sgd as Optimizer>::new(vec![w.clone()], SgdConfig { lr: 0.5, ..Default::default() })?;
/// let loss = (w.as_tensor() * Tensor::new(&[0.2f32, 0.4], &Device::Cpu)?)?.sum_all()?;
/// Optimizer::backward_step(&mut opt, &loss)?;
/// assert_eq!(w.to_vec1::<f32>()?, [0.9, -2.2]);
/// assert_eq!(opt.learning_rate(), 0.5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl candle_nn::Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> candle_core::Result<Self> {
        let params = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("param.{i}"), v))
            .collect();
        Ok(Sgd::new(vec![ParamGroup::new("params", params)], config)?)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        Ok(Sgd::step(self, grads)?)
    }

    fn learning_rate(&self) -> f64 {
        self.lr()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.set_lr(lr)
    }
}

/// Updates one parameter, fused and in place where possible.
fn update_param(
    key: &str,
    var: &Var,
    grad: &Tensor,
    slot: &mut Option<Buffer>,
    c: &Coeffs,
    fused: bool,
) -> Result<()> {
    let dtype = var.dtype();
    let grad = if grad.dtype() == dtype {
        grad.clone()
    } else {
        grad.to_dtype(dtype)?
    };
    let use_momentum = c.momentum != 0.0;
    let fusable = fused
        && var.device().is_cpu()
        && grad.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && var.is_contiguous();
    #[cfg(feature = "cuda")]
    if fused && var.device().is_cuda() && dtype == DType::F32 && var.is_contiguous() {
        let buf = match slot.take() {
            Some(Buffer::Tensor(t)) => Some(t.contiguous()?),
            Some(Buffer::Cpu(b)) => Some(b.to_tensor(var.shape())?.to_device(var.device())?),
            None => None,
        };
        let first = buf.is_none();
        let kept = buf.clone();
        return match super::cuda::update(var.as_tensor(), &grad.contiguous()?, buf, c) {
            Ok(buf) => {
                *slot = buf.map(Buffer::Tensor);
                Ok(())
            }
            Err(e) => {
                // A failed first step leaves no (meaningless) buffer behind.
                *slot = if first {
                    None
                } else {
                    kept.map(Buffer::Tensor)
                };
                Err(invalid(format!(
                    "sgd: in-place update of `{key}` failed: {e}"
                )))
            }
        };
    }
    if fusable {
        let grad = grad.contiguous()?;
        let mut buf = if use_momentum {
            match slot.take() {
                Some(Buffer::Cpu(b)) => Some(b),
                Some(Buffer::Tensor(t)) => Some(CpuBuf::from_tensor(&t, dtype)?),
                None => None,
            }
        } else {
            None
        };
        let first = use_momentum && buf.is_none();
        if first {
            buf = CpuBuf::zeros(dtype, var.elem_count());
        }
        let res = {
            let op = FusedSgd {
                c: *c,
                first,
                buf: RefCell::new(buf.as_mut()),
            };
            var.as_tensor().inplace_op2(&grad, &op)
        };
        // A failed first step leaves no (meaningless) buffer behind.
        *slot = if res.is_err() && first {
            None
        } else {
            buf.map(Buffer::Cpu)
        };
        res.map_err(|e| invalid(format!("sgd: in-place update of `{key}` failed: {e}")))
    } else {
        let p = var.as_tensor().detach();
        let mut d_p = grad;
        if c.weight_decay != 0.0 {
            d_p = (d_p + p.affine(c.weight_decay, 0.0)?)?;
        }
        if use_momentum {
            let prev = match slot.take() {
                Some(Buffer::Tensor(t)) => Some(t),
                Some(Buffer::Cpu(b)) => Some(b.to_tensor(var.shape())?.to_device(var.device())?),
                None => None,
            };
            let buf = match prev {
                None => d_p.copy()?,
                Some(b) => (b.affine(c.momentum, 0.0)? + d_p.affine(1.0 - c.dampening, 0.0)?)?,
            };
            d_p = if c.nesterov {
                (d_p + buf.affine(c.momentum, 0.0)?)?
            } else {
                buf.clone()
            };
            *slot = Some(Buffer::Tensor(buf));
        }
        var.set(&(p - d_p.affine(c.lr, 0.0)?)?)?;
        Ok(())
    }
}

/// The fused CPU update: parameter (the op's destination) and momentum buffer (held by the op)
/// updated in one pass.
struct FusedSgd<'a> {
    c: Coeffs,
    first: bool,
    buf: RefCell<Option<&'a mut CpuBuf>>,
}

impl InplaceOp2 for FusedSgd<'_> {
    fn name(&self) -> &'static str {
        "fused-sgd"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused-sgd: parameter and gradient must be contiguous")
        };
        let mut buf = self.buf.borrow_mut();
        match (s1, s2, buf.as_deref_mut()) {
            (CpuStorage::F32(p), CpuStorage::F32(g), None) => {
                sgd_kernel(&mut p[p0..p1], &g[g0..g1], None, self.first, &self.c)
            }
            (CpuStorage::F32(p), CpuStorage::F32(g), Some(CpuBuf::F32(b))) => {
                sgd_kernel(&mut p[p0..p1], &g[g0..g1], Some(b), self.first, &self.c)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g), None) => {
                sgd_kernel(&mut p[p0..p1], &g[g0..g1], None, self.first, &self.c)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g), Some(CpuBuf::F64(b))) => {
                sgd_kernel(&mut p[p0..p1], &g[g0..g1], Some(b), self.first, &self.c)
            }
            _ => candle_core::bail!(
                "fused-sgd: parameter, gradient and momentum buffer must all be f32 or all f64"
            ),
        }
    }
}

/// One pass of PyTorch's `_single_tensor_sgd` over a parameter; same operation order (and so the
/// same rounding) as the tensor-op path and PyTorch's CPU kernels (up to their use of FMA).
fn sgd_kernel<T: WithDType>(
    p: &mut [T],
    g: &[T],
    buf: Option<&mut Vec<T>>,
    first: bool,
    c: &Coeffs,
) -> candle_core::Result<()> {
    if p.len() != g.len() || buf.as_ref().is_some_and(|b| b.len() != p.len()) {
        candle_core::bail!(
            "fused-sgd: parameter has {} elements, gradient {}, buffer {:?}",
            p.len(),
            g.len(),
            buf.map(|b| b.len())
        )
    }
    let neg_lr = T::from_f64(-c.lr);
    let wd = T::from_f64(c.weight_decay);
    let has_wd = c.weight_decay != 0.0;
    let m = T::from_f64(c.momentum);
    let keep = T::from_f64(1.0 - c.dampening);
    match buf {
        None => {
            for (p, &g) in p.iter_mut().zip(g) {
                let d = if has_wd { g + wd * *p } else { g };
                *p += neg_lr * d;
            }
        }
        Some(buf) => {
            for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                let d = if has_wd { g + wd * *p } else { g };
                let nb = if first { d } else { m * *b + keep * d };
                *b = nb;
                let d = if c.nesterov { d + m * nb } else { nb };
                *p += neg_lr * d;
            }
        }
    }
    Ok(())
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32], shape: &[usize]) -> Var {
        Var::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
        }
    }

    // ---- Against torch.optim.SGD --------------------------------------------------------
    //
    // Expected parameters computed once with torch 2.15.0 (CPU) on this machine:
    //
    // import torch
    // def run(momentum, dampening, nesterov):
    //     w1 = torch.tensor([[0.5, -1.25, 2.0], [0.75, -0.3, 1.1]], requires_grad=True)
    //     w2 = torch.tensor([1.5, -0.5, 0.25, -2.0], requires_grad=True)
    //     b1 = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    //     opt = torch.optim.SGD([
    //         {"params": [w1, w2], "lr": 0.1 * 1.0, "weight_decay": 0.01},
    //         {"params": [b1], "lr": 0.1 * 2.0, "weight_decay": 0.0},
    //     ], lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov)
    //     grads = [  # as GRADS below; step 1: b1.grad is None
    //         {"w1": [[0.1, -0.2, 0.3], [-0.4, 0.5, -0.6]], "w2": [0.01, 0.02, -0.03, 0.04], "b1": None},
    //         {"w1": [[-0.3, 0.25, 0.1], [0.2, -0.15, 0.05]], "w2": [-0.02, 0.5, 0.1, -0.1], "b1": [0.7, -0.8, 0.9]},
    //         {"w1": [[0.05, 0.05, -0.2], [0.3, 0.1, -0.1]], "w2": [0.3, -0.3, 0.2, 0.0], "b1": [-0.1, 0.2, 0.4]},
    //     ]
    //     for g in grads:
    //         for p, k in ((w1, "w1"), (w2, "w2"), (b1, "b1")):
    //             p.grad = None if g[k] is None else torch.tensor(g[k])
    //         opt.step()
    //     for k, p in (("w1", w1), ("w2", w2), ("b1", b1)):
    //         print(k, ", ".join(str(x) for x in p.detach().flatten().numpy()))  # f32 reprs
    // for cfg in [(0.0, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)]:
    //     print(cfg); run(*cfg)

    type StepGrads = [Option<&'static [f32]>; 3];
    const GRADS: [StepGrads; 3] = [
        [
            Some(&[0.1, -0.2, 0.3, -0.4, 0.5, -0.6]),
            Some(&[0.01, 0.02, -0.03, 0.04]),
            None,
        ],
        [
            Some(&[-0.3, 0.25, 0.1, 0.2, -0.15, 0.05]),
            Some(&[-0.02, 0.5, 0.1, -0.1]),
            Some(&[0.7, -0.8, 0.9]),
        ],
        [
            Some(&[0.05, 0.05, -0.2, 0.3, 0.1, -0.1]),
            Some(&[0.3, -0.3, 0.2, 0.0]),
            Some(&[-0.1, 0.2, 0.4]),
        ],
    ];

    struct TorchCase {
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        w1: [f32; 6],
        w2: [f32; 4],
        b1: [f32; 3],
    }

    const TORCH: [TorchCase; 3] = [
        TorchCase {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            w1: [
                0.51349145,
                -1.2562687,
                1.974076,
                0.7376923,
                -0.34401593,
                1.1615883,
            ],
            w2: [1.4665045, -0.5204475, 0.22225477, -1.9880081],
            b1: [-0.019999998, -0.08, 0.04000001],
        },
        TorchCase {
            momentum: 0.9,
            dampening: 0.1,
            nesterov: false,
            w1: [
                0.517052,
                -1.2364534,
                1.9090792,
                0.7930926,
                -0.41709647,
                1.2570016,
            ],
            w2: [1.465738, -0.5612148, 0.22169891, -1.9831029],
            b1: [-0.148, 0.067999996, -0.113999985],
        },
        TorchCase {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            w1: [
                0.53338706,
                -1.2485417,
                1.8920047,
                0.76999426,
                -0.44742906,
                1.3023521,
            ],
            w2: [1.4329314, -0.58115935, 0.19321346, -1.9705807],
            b1: [-0.24139999, 0.15759999, -0.33979997],
        },
    ];

    fn torch_vars() -> [Var; 3] {
        [
            var(&[0.5, -1.25, 2.0, 0.75, -0.3, 1.1], &[2, 3]),
            var(&[1.5, -0.5, 0.25, -2.0], &[4]),
            var(&[0.1, -0.2, 0.3], &[3]),
        ]
    }

    fn torch_sgd(vars: &[Var; 3], case: &TorchCase) -> Sgd {
        let weights = ParamGroup::new(
            "weights",
            vec![
                ("w1".into(), vars[0].clone()),
                ("w2".into(), vars[1].clone()),
            ],
        )
        .weight_decay(0.01);
        let biases = ParamGroup::new("biases", vec![("b1".into(), vars[2].clone())]).lr_mult(2.0);
        let config = SgdConfig {
            lr: 0.1,
            momentum: case.momentum,
            dampening: case.dampening,
            nesterov: case.nesterov,
        };
        Sgd::new(vec![weights, biases], config).unwrap()
    }

    fn torch_grads(vars: &[Var; 3], step: usize) -> GradStore {
        let mut store = GradStore::default();
        for (v, g) in vars.iter().zip(GRADS[step]) {
            if let Some(g) = g {
                let g = Tensor::from_slice(g, v.shape(), &Device::Cpu).unwrap();
                store.insert(v.as_tensor(), g);
            }
        }
        store
    }

    fn check_torch(vars: &[Var; 3], case: &TorchCase, what: &str) {
        assert_close(&flat(&vars[0]), &case.w1, 1e-6, &format!("{what} w1"));
        assert_close(&flat(&vars[1]), &case.w2, 1e-6, &format!("{what} w2"));
        assert_close(&flat(&vars[2]), &case.b1, 1e-6, &format!("{what} b1"));
    }

    #[test]
    fn matches_torch_sgd() {
        for case in &TORCH {
            for fused in [true, false] {
                let vars = torch_vars();
                let mut opt = torch_sgd(&vars, case);
                opt.fused = fused;
                for step in 0..3 {
                    opt.step(&torch_grads(&vars, step)).unwrap();
                }
                assert_eq!(opt.steps(), 3);
                let what = format!(
                    "momentum {} dampening {} nesterov {} fused {fused}",
                    case.momentum, case.dampening, case.nesterov
                );
                check_torch(&vars, case, &what);
            }
        }
    }

    #[test]
    fn state_round_trip_after_step_2() {
        for case in &TORCH {
            // Save from one path and resume on the other as well: the state is path-independent.
            for (fused_before, fused_after) in [(true, true), (false, false), (true, false)] {
                let vars = torch_vars();
                let mut opt = torch_sgd(&vars, case);
                opt.fused = fused_before;
                opt.step(&torch_grads(&vars, 0)).unwrap();
                opt.step(&torch_grads(&vars, 1)).unwrap();
                let (state, buffers) = opt.state().unwrap();
                let buffers: HashMap<String, Tensor> = buffers.into_iter().collect();
                assert_eq!(buffers.len(), if case.momentum == 0.0 { 0 } else { 3 });
                // Through JSON, as a checkpoint stores it.
                let json = serde_json::to_string(&state).unwrap();
                let state: SgdState = serde_json::from_str(&json).unwrap();

                // A fresh optimizer over fresh variables holding the step-2 values, built with
                // another config: load_state must restore lr, momentum, dampening, nesterov.
                let resumed: [Var; 3] = std::array::from_fn(|i| {
                    Var::from_tensor(&vars[i].as_tensor().copy().unwrap()).unwrap()
                });
                let fresh = TorchCase {
                    momentum: 0.5,
                    dampening: 0.0,
                    nesterov: false,
                    ..TORCH[0]
                };
                let mut opt2 = torch_sgd(&resumed, &fresh);
                opt2.set_lr(3.0);
                opt2.fused = fused_after;
                opt2.load_state(&state, &buffers).unwrap();
                assert_eq!(opt2.config(), opt.config());
                assert_eq!(opt2.steps(), 2);

                opt.step(&torch_grads(&vars, 2)).unwrap();
                opt2.step(&torch_grads(&resumed, 2)).unwrap();
                assert_eq!(opt2.steps(), 3);
                for (a, b) in vars.iter().zip(&resumed) {
                    assert_close(&flat(b), &flat(a), 1e-7, "resumed vs uninterrupted");
                }
                check_torch(&resumed, case, "resumed");
            }
        }
    }

    /// A deterministic pseudo-random vector in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn fused_matches_generic() {
        let configs = [
            (0.0, 0.0, false, 0.0),
            (0.0, 0.0, false, 5e-4),
            (0.9, 0.0, false, 0.0),
            (0.9, 0.0, false, 5e-4),
            (0.9, 0.3, false, 1e-2),
            (0.9, 0.0, true, 0.0),
            (0.5, 0.0, true, 1e-3),
        ];
        for dtype in [DType::F32, DType::F64] {
            for (k, &(momentum, dampening, nesterov, wd)) in configs.iter().enumerate() {
                let shapes: [&[usize]; 2] = [&[7, 13], &[31]];
                let make = || -> Vec<Var> {
                    shapes
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let n = s.iter().product();
                            let t = Tensor::from_vec(noise(n, i as u64), *s, &Device::Cpu)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap();
                            Var::from_tensor(&t).unwrap()
                        })
                        .collect()
                };
                let (a, b) = (make(), make());
                let build = |vars: &[Var], fused: bool| {
                    let g1 =
                        ParamGroup::new("w", vec![("w".into(), vars[0].clone())]).weight_decay(wd);
                    let g2 = ParamGroup::new("b", vec![("b".into(), vars[1].clone())])
                        .lr_mult(2.0)
                        .weight_decay(wd / 2.0);
                    let config = SgdConfig {
                        lr: 0.05,
                        momentum,
                        dampening,
                        nesterov,
                    };
                    let mut opt = Sgd::new(vec![g1, g2], config).unwrap();
                    opt.fused = fused;
                    opt
                };
                let (mut fused, mut generic) = (build(&a, true), build(&b, false));
                for step in 0..5u64 {
                    let mut ga = GradStore::default();
                    let mut gb = GradStore::default();
                    for (i, (va, vb)) in a.iter().zip(&b).enumerate() {
                        // The bias has no gradient at step 1 (its buffer must stay untouched).
                        if i == 1 && step == 1 {
                            continue;
                        }
                        let g = Tensor::from_vec(
                            noise(va.elem_count(), 100 + 10 * step + i as u64),
                            va.shape(),
                            &Device::Cpu,
                        )
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                        ga.insert(va.as_tensor(), g.clone());
                        gb.insert(vb.as_tensor(), g);
                    }
                    fused.step(&ga).unwrap();
                    generic.step(&gb).unwrap();
                }
                for (va, vb) in a.iter().zip(&b) {
                    let d = (va.as_tensor() - vb.as_tensor())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    assert!(
                        d <= 1e-7,
                        "{dtype:?} config {k}: max |fused - generic| = {d}"
                    );
                }
                let (sa, sb) = (fused.state().unwrap().1, generic.state().unwrap().1);
                assert_eq!(sa.len(), sb.len());
                for ((ka, ta), (kb, tb)) in sa.iter().zip(&sb) {
                    assert_eq!(ka, kb);
                    assert_eq!(ta.dtype(), dtype);
                    let d: f64 = (ta - tb)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .max(0)
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    assert!(d <= 1e-7, "{dtype:?} config {k} buffer {ka}: {d}");
                }
            }
        }
    }

    #[test]
    fn update_is_in_place_and_visible_through_clones() {
        let w = var(&[1.0, 2.0, 3.0], &[3]);
        let id = w.as_tensor().id();
        // A module holds a clone of the variable's tensor; it must see the new values.
        let held = w.as_tensor().clone();
        let mut opt = Sgd::new(
            vec![ParamGroup::new("w", vec![("w".into(), w.clone())])],
            SgdConfig {
                lr: 0.5,
                ..SgdConfig::default()
            },
        )
        .unwrap();
        let g = Tensor::new(&[1.0f32, -1.0, 0.0], &Device::Cpu).unwrap();
        opt.backward_step(&(w.as_tensor() * &g).unwrap().sum_all().unwrap())
            .unwrap();
        assert_eq!(w.as_tensor().id(), id);
        assert_eq!(held.to_vec1::<f32>().unwrap(), [0.5, 2.5, 3.0]);
    }

    #[test]
    fn param_without_gradient_is_untouched() {
        let vars = torch_vars();
        let mut opt = torch_sgd(&vars, &TORCH[1]);
        opt.step(&torch_grads(&vars, 0)).unwrap();
        opt.step(&torch_grads(&vars, 1)).unwrap();
        let before: HashMap<String, Vec<f32>> = opt
            .state()
            .unwrap()
            .1
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        let b1 = flat(&vars[2]);
        let mut grads = torch_grads(&vars, 2);
        grads.remove(vars[2].as_tensor());
        opt.step(&grads).unwrap();
        assert_eq!(flat(&vars[2]), b1);
        let after: HashMap<String, Vec<f32>> = opt
            .state()
            .unwrap()
            .1
            .into_iter()
            .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        assert_eq!(after["b1"], before["b1"]);
        assert_ne!(after["w1"], before["w1"]);
    }

    #[test]
    fn gradient_of_wrong_shape_is_rejected_before_any_update() {
        let vars = torch_vars();
        let mut opt = torch_sgd(&vars, &TORCH[1]);
        let mut grads = torch_grads(&vars, 1);
        grads.insert(
            vars[2].as_tensor(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = opt.step(&grads).unwrap_err().to_string();
        assert!(err.contains("`b1`") && err.contains("[4]"), "{err}");
        assert_eq!(flat(&vars[0]), [0.5, -1.25, 2.0, 0.75, -0.3, 1.1]);
        assert_eq!(opt.steps(), 0);
    }

    #[test]
    fn new_rejects_invalid_settings() {
        let (a, b) = (var(&[1.0], &[1]), var(&[2.0], &[1]));
        let err = |groups: Vec<ParamGroup>, config: SgdConfig| {
            Sgd::new(groups, config).unwrap_err().to_string()
        };
        let one =
            |name: &str, key: &str, v: &Var| ParamGroup::new(name, vec![(key.into(), v.clone())]);
        let ok = SgdConfig::default();

        let e = err(vec![one("g1", "k", &a), one("g2", "k", &b)], ok);
        assert!(
            e.contains("`k`") && e.contains("g1") && e.contains("g2"),
            "{e}"
        );
        let e = err(vec![one("g1", "k1", &a), one("g2", "k2", &a)], ok);
        assert!(e.contains("`k1`") && e.contains("`k2`"), "{e}");
        let e = err(vec![one("g", "k", &a)], SgdConfig { lr: -0.1, ..ok });
        assert!(e.contains("learning rate"), "{e}");
        let e = err(
            vec![one("g", "k", &a)],
            SgdConfig {
                momentum: -0.5,
                ..ok
            },
        );
        assert!(e.contains("momentum"), "{e}");
        let e = err(vec![one("g", "k", &a).weight_decay(-1e-4)], ok);
        assert!(e.contains("weight decay") && e.contains("`g`"), "{e}");
        let e = err(vec![one("g", "k", &a).lr_mult(f64::NAN)], ok);
        assert!(e.contains("lr_mult"), "{e}");
        let no_momentum = SgdConfig {
            momentum: 0.0,
            nesterov: true,
            ..ok
        };
        assert!(err(vec![one("g", "k", &a)], no_momentum).contains("Nesterov"));
        let damped = SgdConfig {
            dampening: 0.1,
            nesterov: true,
            ..ok
        };
        assert!(err(vec![one("g", "k", &a)], damped).contains("Nesterov"));
    }

    #[test]
    fn load_state_errors_name_the_key() {
        let vars = torch_vars();
        let mut opt = torch_sgd(&vars, &TORCH[1]);
        opt.step(&torch_grads(&vars, 1)).unwrap();
        let (state, buffers) = opt.state().unwrap();
        let buffers: HashMap<String, Tensor> = buffers.into_iter().collect();
        assert_eq!(state.momentum, ["w1", "w2", "b1"]);
        assert_eq!(state.config.lr, 0.1);

        let mut missing = buffers.clone();
        missing.remove("w2");
        let e = opt.load_state(&state, &missing).unwrap_err().to_string();
        assert!(e.contains("`w2`") && e.contains("missing"), "{e}");

        let mut wrong = buffers.clone();
        wrong.insert(
            "w1".into(),
            Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = opt.load_state(&state, &wrong).unwrap_err().to_string();
        assert!(e.contains("`w1`") && e.contains("[3, 2]"), "{e}");

        let mut stray = state.clone();
        stray.momentum.push("fc9".into());
        let e = opt.load_state(&stray, &buffers).unwrap_err().to_string();
        assert!(e.contains("fc9"), "{e}");

        let mut bad = state.clone();
        bad.config.momentum = -1.0;
        let e = opt.load_state(&bad, &buffers).unwrap_err().to_string();
        assert!(e.contains("momentum -1"), "{e}");

        // Nothing changed on error; the intact state still loads (other entries are ignored).
        assert_eq!(opt.steps(), 1);
        let mut with_model = buffers.clone();
        with_model.insert(
            "features.0.weight".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        );
        opt.load_state(&state, &with_model).unwrap();
    }
}
