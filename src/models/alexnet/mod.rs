//! AlexNet in its two published layouts, behind one API.
//!
//! | layout | widths | towers | LRN | pooling | input | checkpoint keys |
//! |---|---|---|---|---|---|---|
//! | [`Layout::TorchVision`] | 64-192-384-256-256 | 1 | none | 3x3/2 floor, then adaptive avg 6x6 | >= 63 px, 224 canonical | `features.{0,3,6,8,10}`, `classifier.{1,4,6}` |
//! | [`Layout::BvlcAlexNet`] | 96-256-384-384-256 | 2 (`groups=2` on conv2/4/5) | after ReLU on conv1, conv2, before pooling | 3x3/2 ceil (Caffe) | 199..=230 px, 227 canonical | `conv1..conv5`, `fc6..fc8` |
//! | [`Layout::CaffeNet`] | as BVLC | 2 | after pooling | as BVLC | as BVLC | as BVLC |
//!
//! The files of this folder: [`Config`] and [`Layout`] in `config.rs`, the [`Tap`]s in
//! `tap.rs`, training mode for candle's `ModuleT` ([`TrainView`]) in `train_view.rs`, and here
//! the model itself. The published weights are in [`crate::weights::AlexNetWeights`].
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, VarBuilder, VarMap};
//! use candle_zoo::models::alexnet::{AlexNet, Config, Tap};
//!
//! // A fresh, trainable torchvision-layout AlexNet with a 10-class head.
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = AlexNet::new(&Config::torchvision().with_classes(10), vb)?;
//!
//! let x = Tensor::zeros((2, 3, 224, 224), DType::F32, &Device::Cpu)?;
//! assert_eq!(model.forward(&x)?.dims(), &[2, 10]);
//! assert_eq!(model.extract(&x, Tap::Pool5)?.dims(), &[2, 256, 6, 6]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod tap;
mod train_view;

pub use config::{Activation, Config, Layout, Pooling};
pub use tap::Tap;
pub use train_view::TrainView;

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};

use crate::error::{Error, Result};
use crate::layers::{conv2d, linear, max_pool2d, AdaptiveAvgPool2d, LocalResponseNorm};
use crate::rng::Rng;

/// The taps' old name.
#[deprecated(
    since = "0.2.0",
    note = "renamed `Tap`: it names where the network is tapped"
)]
pub type Layer = Tap;

/// AlexNet, in any [`Layout`], with named layers that can be reached, frozen and tapped.
///
/// The fields hold the learnable layers under their paper names whatever the checkpoint calls
/// them; [`AlexNet::layers`] gives each with its checkpoint key and [`Tap`].
///
/// As a [`Module`], AlexNet is in eval mode (no dropout). For training, call
/// [`AlexNet::forward_t`] by method syntax, or hand [`AlexNet::train_view`] to code written
/// against candle's `ModuleT`: candle implements `ModuleT` for every `Module` by ignoring
/// `train`, so `x.apply_t(&model, true)` would silently skip dropout.
#[derive(Debug, Clone)]
pub struct AlexNet {
    config: Config,
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub conv3: Conv2d,
    pub conv4: Conv2d,
    pub conv5: Conv2d,
    pub fc6: Linear,
    pub fc7: Linear,
    pub fc8: Linear,
    lrn: LocalResponseNorm,
    avgpool: AdaptiveAvgPool2d,
}

/// A borrowed learnable layer.
#[derive(Debug, Clone, Copy)]
pub enum LayerRef<'a> {
    Conv(&'a Conv2d),
    Linear(&'a Linear),
}

/// A learnable layer with its names, from [`AlexNet::layers`].
#[derive(Debug, Clone, Copy)]
pub struct NamedLayer<'a> {
    /// The tap at the layer's output; its name (`conv1`..`fc8`) is the paper's name of the layer.
    pub tap: Tap,
    /// The checkpoint key prefix in the model's layout (`features.0`, `conv1`, ...).
    pub key: &'static str,
    pub layer: LayerRef<'a>,
}

impl NamedLayer<'_> {
    pub fn weight(&self) -> &Tensor {
        match self.layer {
            LayerRef::Conv(c) => c.weight(),
            LayerRef::Linear(l) => l.weight(),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self.layer {
            LayerRef::Conv(c) => c.bias(),
            LayerRef::Linear(l) => l.bias(),
        }
    }

    /// The weight and bias under their checkpoint keys (`<key>.weight`, `<key>.bias`).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{}.weight", self.key), self.weight().clone())];
        if let Some(b) = self.bias() {
            out.push((format!("{}.bias", self.key), b.clone()));
        }
        out
    }

    /// Whether this is the classifier head (fc8), the layer a fine-tuning run replaces.
    pub fn is_head(&self) -> bool {
        self.tap == Tap::Fc8
    }
}

impl AlexNet {
    /// Loads a pretrained checkpoint, working out its layout, widths and classes from its keys.
    ///
    /// ```no_run
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarBuilder;
    /// use candle_zoo::AlexNet;
    ///
    /// let vb = unsafe {
    ///     VarBuilder::from_mmaped_safetensors(&["alexnet.safetensors"], DType::F32, &Device::Cpu)?
    /// };
    /// let model = AlexNet::load(vb)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load(vb: VarBuilder) -> Result<Self> {
        let config = Config::from_checkpoint(&vb)?;
        Self::new(&config, vb)
    }

    /// Builds the model `config` describes, reading weights from `vb`, or creating them when `vb`
    /// is backed by a [`candle_nn::VarMap`] (fresh weights for training, with PyTorch's default
    /// initialisation).
    pub fn new(config: &Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let layout = config.layout;
        let keys = layout.key_prefixes();
        let inputs = config.conv_inputs();
        let groups = layout.groups();
        let geometry = layout.conv_geometry();
        let conv = |i: usize| -> Result<Conv2d> {
            let (k, stride, padding) = geometry[i];
            let (cin, cout, g) = (inputs[i], config.channels[i], groups[i]);
            let (w, b) = params(&vb, keys[i], &[cout, cin / g, k, k], cin / g * k * k)?;
            let cfg = Conv2dConfig {
                padding,
                stride,
                groups: g,
                ..Default::default()
            };
            Ok(Conv2d::new(w, Some(b), cfg))
        };
        let pooled = config.channels[4] * 36;
        let dims = [
            (pooled, config.hidden),
            (config.hidden, config.hidden),
            (config.hidden, config.num_classes),
        ];
        let linear = |i: usize| -> Result<Linear> {
            let (fan_in, out) = dims[i - 5];
            let (w, b) = params(&vb, keys[i], &[out, fan_in], fan_in)?;
            Ok(Linear::new(w, Some(b)))
        };
        Ok(Self {
            config: config.clone(),
            conv1: conv(0)?,
            conv2: conv(1)?,
            conv3: conv(2)?,
            conv4: conv(3)?,
            conv5: conv(4)?,
            fc6: linear(5)?,
            fc7: linear(6)?,
            fc8: linear(7)?,
            lrn: LocalResponseNorm::alexnet(),
            avgpool: AdaptiveAvgPool2d::new(6, 6),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn layout(&self) -> Layout {
        self.config.layout
    }

    pub fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    /// The learnable layers conv1..fc8 in network order, each with its [`Tap`] and checkpoint
    /// key.
    pub fn layers(&self) -> [NamedLayer<'_>; 8] {
        let keys = self.config.layout.key_prefixes();
        let layers = [
            LayerRef::Conv(&self.conv1),
            LayerRef::Conv(&self.conv2),
            LayerRef::Conv(&self.conv3),
            LayerRef::Conv(&self.conv4),
            LayerRef::Conv(&self.conv5),
            LayerRef::Linear(&self.fc6),
            LayerRef::Linear(&self.fc7),
            LayerRef::Linear(&self.fc8),
        ];
        std::array::from_fn(|i| NamedLayer {
            tap: Tap::LEARNABLE[i],
            key: keys[i],
            layer: layers[i],
        })
    }

    /// Every weight and bias under the checkpoint key names of the model's layout, ready for
    /// [`crate::weights::save_safetensors`].
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.layers().iter().flat_map(NamedLayer::tensors).collect()
    }

    /// The output of one tap, in eval mode, computing nothing past it.
    ///
    /// `x` is a `(N, 3, H, W)` batch already preprocessed for the layout
    /// (see [`crate::data::preprocess`]). Which side of the ReLU each tap is on is documented on
    /// [`Tap`].
    pub fn extract(&self, x: &Tensor, tap: Tap) -> Result<Tensor> {
        self.run(x, tap, Mode::Eval, |_, _| {})
    }

    /// The outputs of several taps from one forward pass that stops at the deepest of them.
    /// Results come in the order of `taps`.
    pub fn extract_many(&self, x: &Tensor, taps: &[Tap]) -> Result<Vec<Tensor>> {
        let Some(&last) = taps.iter().max() else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Option<Tensor>> = vec![None; taps.len()];
        self.run(x, last, Mode::Eval, |at, t| {
            for (slot, want) in out.iter_mut().zip(taps) {
                if *want == at {
                    *slot = Some(t.clone());
                }
            }
        })?;
        Ok(out.into_iter().flatten().collect())
    }

    /// The `k` most probable classes of each image of a preprocessed batch, as
    /// `(class, probability)` pairs, most probable first.
    pub fn top_k(&self, x: &Tensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let probs = candle_nn::ops::softmax(&self.forward(x)?, 1)?;
        (0..probs.dim(0)?)
            .map(|i| super::top_k(&probs.get(i)?, k))
            .collect()
    }

    /// Logits, with dropout (from candle's unseeded RNG) when `train` is true.
    ///
    /// This is an inherent method, which method syntax (`model.forward_t(&x, true)`) picks over
    /// candle's blanket `ModuleT` impl; code generic over `ModuleT` needs
    /// [`AlexNet::train_view`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mode = if train {
            Mode::Train {
                masks: None,
                frozen: None,
                compute: None,
            }
        } else {
            Mode::Eval
        };
        self.run(x, Tap::Fc8, mode, |_, _| {})
    }

    /// The model in training mode as a candle `ModuleT` (see [`TrainView`]), with seeded
    /// dropout and frozen layers on request.
    pub fn train_view(&self) -> TrainView<'_> {
        TrainView::new(self)
    }

    /// Training-mode logits with dropout masks drawn from `rng` and the layers up to and
    /// including `frozen_through` frozen.
    #[deprecated(
        since = "0.2.0",
        note = "use `model.train_view().with_rng(rng).freeze_through(tap).forward_t(x, true)`"
    )]
    pub fn forward_train(
        &self,
        x: &Tensor,
        rng: &mut Rng,
        frozen_through: Option<Tap>,
    ) -> Result<Tensor> {
        let mode = Mode::Train {
            masks: Some(Masks::Stream(rng)),
            frozen: frozen_through,
            compute: None,
        };
        self.run(x, Tap::Fc8, mode, |_, _| {})
    }

    /// The forward pass up to `stop`, handing every tap it passes to `tap`.
    fn run(
        &self,
        x: &Tensor,
        stop: Tap,
        mode: Mode<'_>,
        mut tap: impl FnMut(Tap, &Tensor),
    ) -> Result<Tensor> {
        self.config.check_input(x.dims())?;
        let layout = self.config.layout;
        let (train, mut masks, frozen, compute) = match mode {
            Mode::Eval => (false, None, None, None),
            Mode::Train {
                masks,
                frozen,
                compute,
            } => (true, masks, frozen, compute),
        };
        let master = self.conv1.weight().dtype();
        let compute = compute.filter(|&d| d != master);
        // Mixed precision: the weighted layers' operands in `compute`, the rest in `master`.
        let cast = |t: &Tensor, to: DType| match compute {
            Some(_) if t.dtype() != to => t.to_dtype(to),
            _ => Ok(t.clone()),
        };
        let low = |t: &Tensor| cast(t, compute.unwrap_or(master));
        let low_opt = |t: Option<&Tensor>| t.map(low).transpose();
        let high = |t: &Tensor| cast(t, master);
        // Taps the output of `at` and, at the frozen boundary, cuts the graph so that no
        // gradient is computed for the layers before it.
        let mut done = |at: Tap, t: &mut Tensor| {
            if frozen == Some(at) {
                *t = t.detach();
            }
            tap(at, t);
            at == stop
        };
        let (window, stride, ceil) = self.config.pooling.window(layout);
        let pool = |t: &Tensor| max_pool2d(&high(t)?, window, stride, ceil);
        // LRN (where the config has it) and pooling after conv1 and conv2: CaffeNet pools first.
        let norm_pool = |t: &Tensor| -> candle_core::Result<Tensor> {
            match (self.config.lrn, layout) {
                (false, _) => pool(t),
                (true, Layout::CaffeNet) => self.lrn.forward(&pool(t)?),
                (true, _) => pool(&self.lrn.forward(&high(t)?)?),
            }
        };
        let p = self.config.dropout;
        let mut dropout_layer = 0u64;
        let mut drop = |t: Tensor| -> candle_core::Result<Tensor> {
            dropout_layer += 1;
            let mask = match masks.as_mut() {
                _ if !train || p == 0.0 => return Ok(t),
                None => return candle_nn::ops::dropout(&t, p),
                Some(Masks::Stream(rng)) => rng.dropout_mask(t.elem_count(), p),
                Some(Masks::PerSample {
                    seed,
                    epoch,
                    samples,
                }) => {
                    let (rows, width) = t.dims2()?;
                    if rows != samples.len() {
                        candle_core::bail!(
                            "dropout masks for {} samples, but the batch has {rows}",
                            samples.len()
                        );
                    }
                    samples
                        .iter()
                        .flat_map(|&s| {
                            let ids = [*epoch, s as u64, DROPOUT_ID, dropout_layer];
                            Rng::stream(*seed, &ids).dropout_mask(width, p)
                        })
                        .collect()
                }
            };
            let mask = Tensor::from_vec(mask, t.shape(), t.device())?.to_dtype(t.dtype())?;
            t * mask
        };
        // conv + bias + ReLU as one op (a gemm forward and backward on the CPU); tanh follows
        // the op instead. The conv and fc taps are after the activation.
        let relu = self.config.activation == Activation::Relu;
        let activate = |t: Tensor| if relu { Ok(t) } else { t.tanh() };
        let conv_relu = |conv: &Conv2d, t: &Tensor| {
            let (w, b) = (low(conv.weight())?, low_opt(conv.bias())?);
            activate(conv2d(&low(t)?, &w, b.as_ref(), conv.config(), relu)?)
        };
        let fc_with = |l: &Linear, t: &Tensor, relu: bool| {
            let (w, b) = (low(l.weight())?, low_opt(l.bias())?);
            linear(&low(t)?, &w, b.as_ref(), relu)
        };
        let fc_act = |l: &Linear, t: &Tensor| activate(fc_with(l, t, relu)?);
        let fc = |l: &Linear, t: &Tensor| fc_with(l, t, false);

        let mut h = conv_relu(&self.conv1, x)?;
        if done(Tap::Conv1, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv2, &norm_pool(&h)?)?;
        if done(Tap::Conv2, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv3, &norm_pool(&h)?)?;
        if done(Tap::Conv3, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv4, &h)?;
        if done(Tap::Conv4, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv5, &h)?;
        if done(Tap::Conv5, &mut h) {
            return Ok(h);
        }
        let mut h = pool(&h)?;
        if layout == Layout::TorchVision {
            h = self.avgpool.forward(&h)?;
        }
        if done(Tap::Pool5, &mut h) {
            return Ok(h);
        }
        // torchvision drops out the inputs of fc6 and fc7, Caffe the outputs of relu6 and relu7.
        let caffe = layout.is_caffe();
        let mut h = h.flatten_from(1)?;
        if !caffe {
            h = drop(h)?;
        }
        let mut h = fc_act(&self.fc6, &h)?;
        if done(Tap::Fc6, &mut h) {
            return Ok(h);
        }
        let mut h = fc_act(&self.fc7, &drop(h)?)?;
        if done(Tap::Fc7, &mut h) {
            return Ok(h);
        }
        let h = if caffe { drop(h)? } else { h };
        let mut logits = high(&fc(&self.fc8, &h)?)?;
        done(Tap::Fc8, &mut logits);
        Ok(logits)
    }
}

impl Module for AlexNet {
    /// Logits in eval mode: no dropout.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.run(x, Tap::Fc8, Mode::Eval, |_, _| {})?)
    }
}

/// How `AlexNet::run` treats dropout and frozen layers.
enum Mode<'a> {
    Eval,
    /// Training: dropout from `masks` (candle's unseeded generator without them), and an
    /// optional frozen prefix.
    Train {
        masks: Option<Masks<'a>>,
        frozen: Option<Tap>,
        /// Mixed precision: convs and fc layers compute in this dtype from casts of the
        /// weights (whose gradients come back in theirs); pooling, LRN and the logits stay in
        /// the weights' dtype.
        compute: Option<DType>,
    },
}

/// The stream id of per-sample dropout masks, beside the epoch, the sample and the layer.
const DROPOUT_ID: u64 = u64::MAX - 1;

/// Where seeded dropout masks come from.
pub(super) enum Masks<'a> {
    /// One stream for the whole batch, in order.
    Stream(&'a mut Rng),
    /// Each sample's rows from `Rng::stream(seed, [epoch, sample, DROPOUT_ID, layer])`: the
    /// same mask whatever batch, position or process the sample is in.
    PerSample {
        seed: u64,
        epoch: u64,
        samples: &'a [usize],
    },
}

/// Reads (or, from a `VarMap`, creates) the weight and bias under `prefix`, with PyTorch's
/// default initialisation for fresh weights.
fn params(
    vb: &VarBuilder,
    prefix: &str,
    shape: &[usize],
    fan_in: usize,
) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let uniform = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let get = |name: &str, shape: &[usize], init: Init| {
        let key = format!("{prefix}.{name}");
        vb.get_with_hints(shape, &key, init)
            .map_err(|e| map_load_error(e, &key))
    };
    // kaiming_uniform(a = sqrt(5)) as in torch.nn.Conv2d / Linear: bound = 1 / sqrt(fan_in).
    let w = get("weight", shape, uniform)?;
    let b = get("bias", &shape[..1], uniform)?;
    Ok((w, b))
}

/// Turns candle's loading errors into ones that name the checkpoint key.
pub(crate) fn map_load_error(e: candle_core::Error, key: &str) -> Error {
    let mut inner = &e;
    while let candle_core::Error::WithBacktrace { inner: i, .. }
    | candle_core::Error::Context { inner: i, .. }
    | candle_core::Error::WithPath { inner: i, .. } = inner
    {
        inner = i;
    }
    match inner {
        candle_core::Error::CannotFindTensor { .. } => Error::MissingKey {
            key: key.to_string(),
            hint: String::new(),
        },
        candle_core::Error::UnexpectedShape { expected, got, .. } => Error::ShapeMismatch {
            key: key.to_string(),
            expected: expected.dims().to_vec(),
            actual: got.dims().to_vec(),
        },
        _ => Error::Candle(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, ModuleT};
    use candle_nn::VarMap;

    fn small(layout: Layout) -> Config {
        Config::for_layout(layout)
            .with_widths([8, 12, 16, 12, 8], 32)
            .with_classes(5)
    }

    fn fresh(cfg: &Config) -> Result<AlexNet> {
        let vm = VarMap::new();
        AlexNet::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
    }

    /// Mixed precision's plumbing on the CPU, with f64 as the compute dtype: the weights stay
    /// f32 and get f32 gradients equal to the f32 step's within f32 rounding, and the logits
    /// (so the loss) are f32. (candle's CPU convolution has no bf16 kernels; bf16's numerics
    /// are checked on CUDA in `tests/devices.rs`.)
    #[test]
    fn low_precision_compute_gives_f32_gradients_close_to_f32() -> Result<()> {
        let dev = Device::Cpu;
        for layout in Layout::ALL {
            let vm = VarMap::new();
            // No dropout: without seeded masks, each forward would draw its own.
            let model = AlexNet::new(
                &small(layout).with_dropout(0.0),
                VarBuilder::from_varmap(&vm, DType::F32, &dev),
            )?;
            let side = layout.input_size();
            let x = Tensor::randn(0f32, 1., (2, 3, side, side), &dev)?;
            let labels = Tensor::new(&[1u32, 3], &dev)?;
            let mut runs = Vec::new();
            for compute in [None, Some(DType::F64)] {
                let view = model.train_view().with_compute_dtype(compute);
                let logits = view.forward_t(&x, true)?;
                assert_eq!(logits.dtype(), DType::F32);
                let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                let grads = loss.backward()?;
                let mut flat = Vec::new();
                for (key, var) in model.named_tensors() {
                    let g = grads
                        .get(&var)
                        .unwrap_or_else(|| panic!("no gradient of {key}"));
                    assert_eq!(g.dtype(), DType::F32, "{key}");
                    flat.push(g.flatten_all()?.to_vec1::<f32>()?);
                }
                runs.push((loss.to_scalar::<f32>()?, flat));
            }
            let loss_err = ((runs[1].0 - runs[0].0) / runs[0].0).abs();
            assert!(loss_err < 1e-5, "{layout:?}: loss off by {loss_err}");
            for (i, (want, got)) in runs[0].1.iter().zip(&runs[1].1).enumerate() {
                let (mut d, mut n) = (0f64, 0f64);
                for (a, b) in got.iter().zip(want) {
                    d += ((a - b) as f64).powi(2);
                    n += (*b as f64).powi(2);
                }
                let err = (d / n.max(f64::MIN_POSITIVE)).sqrt();
                assert!(err < 1e-4, "{layout:?}: gradient {i} off by {err:.2e}");
            }
        }
        Ok(())
    }

    #[test]
    fn every_tap_has_the_documented_shape() -> Result<()> {
        let dev = Device::Cpu;
        for layout in Layout::ALL {
            let model = fresh(&small(layout))?;
            let side = layout.input_size();
            let x = Tensor::randn(0f32, 1., (2, 3, side, side), &dev)?;
            let taps = model.extract_many(&x, &Tap::ALL)?;
            let shapes: Vec<Vec<usize>> = taps.iter().map(|t| t.dims().to_vec()).collect();
            assert_eq!(
                shapes,
                vec![
                    vec![2, 8, 55, 55],
                    vec![2, 12, 27, 27],
                    vec![2, 16, 13, 13],
                    vec![2, 12, 13, 13],
                    vec![2, 8, 13, 13],
                    vec![2, 8, 6, 6],
                    vec![2, 32],
                    vec![2, 32],
                    vec![2, 5],
                ],
                "{layout}"
            );
            // A single tap equals the same tap of a longer run, and the logits equal forward().
            let fc6 = model.extract(&x, Tap::Fc6)?;
            assert_eq!(fc6.to_vec2::<f32>()?, taps[6].to_vec2::<f32>()?);
            assert_eq!(
                model.forward(&x)?.to_vec2::<f32>()?,
                taps[8].to_vec2::<f32>()?
            );
            // Eval mode, by either route, is forward().
            assert_eq!(
                model.forward_t(&x, false)?.to_vec2::<f32>()?,
                taps[8].to_vec2::<f32>()?
            );
            assert_eq!(
                model.train_view().forward_t(&x, false)?.to_vec2::<f32>()?,
                taps[8].to_vec2::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn dropout_applies_only_in_training() -> Result<()> {
        let dev = Device::Cpu;
        let model = fresh(&small(Layout::TorchVision).with_dropout(0.5))?;
        let x = Tensor::randn(0f32, 1., (4, 3, 96, 96), &dev)?;
        let eval = model.forward_t(&x, false)?.to_vec2::<f32>()?;
        assert_eq!(eval, model.forward_t(&x, false)?.to_vec2::<f32>()?);
        let train = model.forward_t(&x, true)?.to_vec2::<f32>()?;
        assert_ne!(eval, train);
        Ok(())
    }

    /// The trap the view exists for: candle's blanket `ModuleT` for a `Module` ignores `train`.
    #[test]
    fn generic_module_t_code_trains_through_the_view_only() -> Result<()> {
        fn train_logits<M: ModuleT>(m: &M, x: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
            x.apply_t(m, true)?.to_vec2::<f32>()
        }
        let model = fresh(&small(Layout::BvlcAlexNet).with_dropout(0.5))?;
        let x = Tensor::randn(0f32, 1., (4, 3, 227, 227), &Device::Cpu)?;
        let eval = model.forward(&x)?.to_vec2::<f32>()?;
        assert_eq!(
            train_logits(&model, &x)?,
            eval,
            "candle's blanket impl: eval"
        );
        assert_ne!(train_logits(&model.train_view(), &x)?, eval);
        // Seeded: the same seed gives the same masks, hence the same logits.
        let seeded = |seed| -> candle_core::Result<Vec<Vec<f32>>> {
            let mut rng = Rng::new(seed);
            train_logits(&model.train_view().with_rng(&mut rng), &x)
        };
        assert_eq!(seeded(3)?, seeded(3)?);
        assert_ne!(seeded(3)?, seeded(4)?);
        Ok(())
    }

    #[test]
    fn layers_name_their_keys_taps_and_head() -> Result<()> {
        let model = fresh(&small(Layout::CaffeNet))?;
        let layers = model.layers();
        let names: Vec<(&str, &str)> = layers.iter().map(|l| (l.tap.name(), l.key)).collect();
        assert_eq!(names[1], ("conv2", "conv2"));
        assert_eq!(names[7], ("fc8", "fc8"));
        assert!(layers[7].is_head() && !layers[6].is_head());
        assert_eq!(layers[0].weight().dims(), &[8, 3, 11, 11]);
        let tv = fresh(&small(Layout::TorchVision))?;
        assert_eq!(tv.layers()[7].key, "classifier.6");
        assert_eq!(tv.named_tensors()[14].0, "classifier.6.weight");
        Ok(())
    }

    #[test]
    fn bad_inputs_are_named() -> Result<()> {
        let dev = Device::Cpu;
        let tv = fresh(&small(Layout::TorchVision))?;
        let err = tv
            .forward(&Tensor::zeros((1, 3, 40, 64), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("side 40 is too small"), "{err}");
        let err = tv
            .extract(
                &Tensor::zeros((1, 1, 64, 64), DType::F32, &dev)?,
                Tap::Conv1,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("(batch, 3, height, width)"),
            "{err}"
        );
        let caffe = fresh(&small(Layout::BvlcAlexNet))?;
        let err = caffe
            .extract(
                &Tensor::zeros((1, 3, 256, 227), DType::F32, &dev)?,
                Tap::Conv1,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("side 256 gives a pool5 of 7x7"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn odd_widths_are_refused_for_two_towers() {
        let cfg = small(Layout::BvlcAlexNet).with_widths([8, 12, 16, 13, 8], 32);
        let err = fresh(&cfg).unwrap_err();
        assert!(err.to_string().contains("conv4 has groups=2"), "{err}");
    }
}
