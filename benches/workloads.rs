//! The speed workloads of issue #5, shared by the criterion benches (`benches/inference.rs`,
//! `benches/train_step.rs`) and `examples/speed.rs` (which `benches/compare.py` runs against
//! PyTorch). Each includes this file as a module:
//!
//! ```text
//! #[path = "../benches/workloads.rs"]
//! mod workloads;
//! ```
//!
//! Weights are fresh (a `VarMap` and `AlexNet::new`, PyTorch's default initialisation; speed
//! does not depend on their values) and inputs random, seeded.
//!
//! - [`Inference`]: eval-mode logits of a batch. The model is rebuilt on detached copies of the
//!   fresh variables, as a loaded checkpoint is (plain tensors): candle records the graph of ops
//!   on variables, which inference does not need and which would keep every activation alive.
//! - [`TrainStep`]: one step as `candle_zoo::train` does it: `train_view` (seeded dropout),
//!   cross-entropy, backward and the crate's `Sgd` (momentum 0.9, weight decay 5e-4 on every
//!   parameter, `ParamPolicy::default()`).
//! - [`Sgemm`]: one `n x n` by `n x n` f32 matmul through candle (the `gemm` crate on the CPU),
//!   the yardstick the model's FLOP rate is compared with.

// Each includer uses a different part of this module.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, ModuleT, VarBuilder, VarMap};
use candle_zoo::models::alexnet::{AlexNet, Config, Layout};
use candle_zoo::rng::Rng;
use candle_zoo::train::optim::{Sgd, SgdConfig};
use candle_zoo::train::{param_groups, ParamPolicy};
use candle_zoo::Result;

/// The two layouts of the issue with their canonical input side (224 and 227).
pub const LAYOUTS: [Layout; 2] = [Layout::TorchVision, Layout::BvlcAlexNet];

/// Inference batch sizes of the issue.
pub const INFER_BATCHES: [usize; 3] = [1, 16, 64];

/// Training batch size of the issue.
pub const TRAIN_BATCH: usize = 32;

/// Side of the `Sgemm` matrices.
pub const SGEMM_N: usize = 2048;

/// Seed of the input tensors (candle's CPU `randn` cannot be seeded: inputs come from `Rng`).
const SEED: u64 = 5;

/// The published model of `layout`: 1000 classes, dropout 0.5.
pub fn config(layout: Layout) -> Config {
    Config::for_layout(layout)
}

/// A fresh model of `layout` on its variables.
fn fresh(layout: Layout, device: &Device) -> Result<(AlexNet, VarMap)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = AlexNet::new(&config(layout), vb)?;
    Ok((model, varmap))
}

/// `n` values of a standard normal distribution.
fn normal(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// A random `(batch, 3, side, side)` input at the layout's canonical side.
pub fn input(layout: Layout, batch: usize, device: &Device) -> Result<Tensor> {
    let side = layout.input_size();
    let mut rng = Rng::new(SEED);
    let x = normal(&mut rng, batch * 3 * side * side);
    Ok(Tensor::from_vec(x, (batch, 3, side, side), device)?)
}

/// Eval-mode forward passes of one batch.
pub struct Inference {
    pub model: AlexNet,
    pub x: Tensor,
}

impl Inference {
    pub fn new(layout: Layout, batch: usize, device: &Device) -> Result<Self> {
        let (_, varmap) = fresh(layout, device)?;
        let weights = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        let model = AlexNet::new(&config(layout), vb)?;
        let x = input(layout, batch, device)?;
        Ok(Self { model, x })
    }

    pub fn batch(&self) -> usize {
        self.x.dims()[0]
    }

    /// The logits of the batch.
    pub fn run(&self) -> Result<Tensor> {
        Ok(self.model.forward(&self.x)?)
    }
}

/// Training steps on one batch, repeated.
pub struct TrainStep {
    pub model: AlexNet,
    pub x: Tensor,
    pub y: Tensor,
    sgd: Sgd,
    rng: Rng,
    /// Mixed precision's compute dtype (`--precision bf16`), if any.
    pub compute: Option<DType>,
    _varmap: VarMap,
}

impl TrainStep {
    pub fn new(layout: Layout, batch: usize, device: &Device) -> Result<Self> {
        let (model, varmap) = fresh(layout, device)?;
        let vars = varmap.data().lock().expect("varmap lock").clone();
        let groups = param_groups(&model, &vars, &ParamPolicy::default())?;
        let sgd = Sgd::new(
            groups,
            SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                ..SgdConfig::default()
            },
        )?;
        let x = input(layout, batch, device)?;
        let mut rng = Rng::new(SEED + 1);
        let classes = model.num_classes();
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
        let y = Tensor::from_vec(labels, batch, device)?;
        Ok(Self {
            model,
            x,
            y,
            sgd,
            rng,
            compute: None,
            _varmap: varmap,
        })
    }

    pub fn batch(&self) -> usize {
        self.x.dims()[0]
    }

    /// Forward with dropout, cross-entropy, backward, SGD update.
    pub fn step(&mut self) -> Result<()> {
        let view = self
            .model
            .train_view()
            .with_rng(&mut self.rng)
            .with_compute_dtype(self.compute);
        let logits = view.forward_t(&self.x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &self.y)?;
        self.sgd.backward_step(&loss)
    }
}

/// An `n x n` by `n x n` f32 matrix product.
pub struct Sgemm {
    a: Tensor,
    b: Tensor,
}

impl Sgemm {
    pub fn new(n: usize, device: &Device) -> Result<Self> {
        let mut rng = Rng::new(SEED + 2);
        let a = Tensor::from_vec(normal(&mut rng, n * n), (n, n), device)?;
        let b = Tensor::from_vec(normal(&mut rng, n * n), (n, n), device)?;
        Ok(Self { a, b })
    }

    /// Floating-point operations of one product (`2 n^3`).
    pub fn flops(&self) -> f64 {
        let n = self.a.dims()[0] as f64;
        2.0 * n * n * n
    }

    pub fn run(&self) -> Result<Tensor> {
        Ok(self.a.matmul(&self.b)?)
    }
}
