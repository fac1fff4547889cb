//! AlexNet in its two published layouts, behind one API.
//!
//! | layout | widths | towers | LRN | pooling | input | checkpoint keys |
//! |---|---|---|---|---|---|---|
//! | [`Layout::TorchVision`] | 64-192-384-256-256 | 1 | none | 3x3/2 floor, then adaptive avg 6x6 | >= 63 px, 224 canonical | `features.{0,3,6,8,10}`, `classifier.{1,4,6}` |
//! | [`Layout::AlexNet`] (BVLC) | 96-256-384-384-256 | 2 (`groups=2` on conv2/4/5) | after ReLU on conv1, conv2, before pooling | 3x3/2 ceil (Caffe) | 199..=230 px, 227 canonical | `conv1..conv5`, `fc6..fc8` |
//! | [`Layout::CaffeNet`] | as BVLC | 2 | after pooling | as BVLC | as BVLC | as BVLC |
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, VarBuilder, VarMap};
//! use candle_zoo::alexnet::{AlexNet, Config, Layer};
//!
//! // A fresh, trainable torchvision-layout AlexNet with a 10-class head.
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = AlexNet::new(&Config::torchvision().with_classes(10), vb)?;
//!
//! let x = Tensor::zeros((2, 3, 224, 224), DType::F32, &Device::Cpu)?;
//! assert_eq!(model.forward(&x)?.dims(), &[2, 10]);
//! assert_eq!(model.extract(&x, Layer::Pool5)?.dims(), &[2, 256, 6, 6]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};

use crate::error::{Error, Result};
use crate::layers::{
    conv2d, linear, max_pool2d, pooled_size, AdaptiveAvgPool2d, LocalResponseNorm,
};
use crate::rng::Rng;

/// Which published AlexNet the model follows. See the [module docs](self) for a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// torchvision's single-tower model ("One weird trick", arXiv 1404.5997), no LRN,
    /// adaptive average pool to 6x6. Loads `alexnet-owt-7be5be79.pth`.
    TorchVision,
    /// The original two-tower model as Caffe's `bvlc_alexnet`: conv → ReLU → LRN → pool.
    AlexNet,
    /// Caffe's `bvlc_reference_caffenet`: as [`Layout::AlexNet`] but conv → ReLU → pool → LRN.
    CaffeNet,
}

impl Layout {
    /// All layouts, in documentation order.
    pub const ALL: [Layout; 3] = [Layout::TorchVision, Layout::AlexNet, Layout::CaffeNet];

    /// The name used on the command line and in checkpoint metadata.
    pub fn name(self) -> &'static str {
        match self {
            Layout::TorchVision => "torchvision",
            Layout::AlexNet => "alexnet",
            Layout::CaffeNet => "caffenet",
        }
    }

    /// Whether the layout is one of Caffe's two-tower models.
    pub fn is_caffe(self) -> bool {
        !matches!(self, Layout::TorchVision)
    }

    /// The side of the square crop the layout's pretrained weights were trained on.
    pub fn input_size(self) -> usize {
        if self.is_caffe() {
            227
        } else {
            224
        }
    }

    /// Checkpoint key prefixes of conv1..conv5 and fc6..fc8, as upstream names them.
    pub fn key_prefixes(self) -> [&'static str; 8] {
        if self.is_caffe() {
            [
                "conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8",
            ]
        } else {
            [
                "features.0",
                "features.3",
                "features.6",
                "features.8",
                "features.10",
                "classifier.1",
                "classifier.4",
                "classifier.6",
            ]
        }
    }

    /// Channel widths of conv1..conv5 and the width of fc6/fc7 of the published model.
    fn widths(self) -> ([usize; 5], usize) {
        if self.is_caffe() {
            ([96, 256, 384, 384, 256], 4096)
        } else {
            ([64, 192, 384, 256, 256], 4096)
        }
    }

    /// `groups` of conv1..conv5: the two towers are `groups=2` on conv2, conv4 and conv5.
    pub fn groups(self) -> [usize; 5] {
        if self.is_caffe() {
            [1, 2, 1, 2, 2]
        } else {
            [1; 5]
        }
    }

    /// Kernel, stride and padding of conv1..conv5.
    pub(crate) fn conv_geometry(self) -> [(usize, usize, usize); 5] {
        let conv1_pad = if self.is_caffe() { 0 } else { 2 };
        [
            (11, 4, conv1_pad),
            (5, 1, 2),
            (3, 1, 1),
            (3, 1, 1),
            (3, 1, 1),
        ]
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "torchvision" | "tv" => Ok(Layout::TorchVision),
            "alexnet" | "bvlc" | "bvlcalexnet" | "original" | "twotower" => Ok(Layout::AlexNet),
            "caffenet" | "bvlcreferencecaffenet" => Ok(Layout::CaffeNet),
            _ => Err(Error::Invalid(format!(
                "unknown layout `{s}`; expected torchvision, alexnet or caffenet"
            ))),
        }
    }
}

/// Everything that decides an AlexNet's shape.
///
/// The presets build the published models with 1000 classes; `with_*` adapt them, for a
/// fine-tuning head or a small model in tests.
///
/// ```
/// use candle_zoo::alexnet::{Config, Layout};
/// let cfg = Config::alexnet().with_classes(20).with_dropout(0.0);
/// assert_eq!(cfg.layout, Layout::AlexNet);
/// assert_eq!(cfg.channels, [96, 256, 384, 384, 256]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub layout: Layout,
    /// Width of the last layer.
    pub num_classes: usize,
    /// Output channels of conv1..conv5.
    pub channels: [usize; 5],
    /// Width of fc6 and fc7.
    pub hidden: usize,
    /// Dropout probability before (torchvision) or after (Caffe) fc6 and fc7, in training only.
    pub dropout: f32,
}

impl Config {
    /// The published model of `layout`, 1000 classes, dropout 0.5.
    pub fn for_layout(layout: Layout) -> Self {
        let (channels, hidden) = layout.widths();
        Self {
            layout,
            num_classes: 1000,
            channels,
            hidden,
            dropout: 0.5,
        }
    }

    /// torchvision's `alexnet()`.
    pub fn torchvision() -> Self {
        Self::for_layout(Layout::TorchVision)
    }

    /// Caffe's `bvlc_alexnet`, the original two-tower model.
    pub fn alexnet() -> Self {
        Self::for_layout(Layout::AlexNet)
    }

    /// Caffe's `bvlc_reference_caffenet`.
    pub fn caffenet() -> Self {
        Self::for_layout(Layout::CaffeNet)
    }

    pub fn with_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    pub fn with_dropout(mut self, p: f32) -> Self {
        self.dropout = p;
        self
    }

    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Other widths than the published ones, for example a small model for tests.
    pub fn with_widths(mut self, channels: [usize; 5], hidden: usize) -> Self {
        self.channels = channels;
        self.hidden = hidden;
        self
    }

    /// Works out the config of a checkpoint from its key names and shapes.
    ///
    /// torchvision keys give [`Layout::TorchVision`], Caffe keys [`Layout::AlexNet`] (Caffe's keys
    /// do not tell CaffeNet apart: use [`Config::with_layout`], or load through
    /// [`crate::weights::Checkpoint`], which reads the layout from the file's metadata). Widths and
    /// the class count come from the weight shapes.
    pub fn from_checkpoint(vb: &VarBuilder) -> Result<Self> {
        let layout = if vb.contains_tensor("features.0.weight") {
            Layout::TorchVision
        } else if vb.contains_tensor("conv1.weight") {
            Layout::AlexNet
        } else {
            return Err(Error::UnknownLayout {
                found: "neither of them".into(),
            });
        };
        let keys = layout.key_prefixes();
        let shape = |i: usize| -> Result<Vec<usize>> {
            let key = format!("{}.weight", keys[i]);
            let t = vb
                .get_unchecked(&key)
                .map_err(|e| map_load_error(e, &key))?;
            Ok(t.dims().to_vec())
        };
        let mut channels = [0; 5];
        for (i, c) in channels.iter_mut().enumerate() {
            *c = shape(i)?[0];
        }
        let hidden = shape(5)?[0];
        let num_classes = shape(7)?[0];
        let cfg = Self {
            layout,
            num_classes,
            channels,
            hidden,
            dropout: 0.5,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.num_classes == 0 || self.hidden == 0 || self.channels.contains(&0) {
            return Err(Error::Config(format!(
                "widths must be positive: channels {:?}, hidden {}, classes {}",
                self.channels, self.hidden, self.num_classes
            )));
        }
        let groups = self.layout.groups();
        let inputs = self.conv_inputs();
        for i in 0..5 {
            if !inputs[i].is_multiple_of(groups[i]) || !self.channels[i].is_multiple_of(groups[i]) {
                return Err(Error::Config(format!(
                    "conv{} has groups={} but {} input and {} output channels; the two-tower \
                     layouts need even widths",
                    i + 1,
                    groups[i],
                    inputs[i],
                    self.channels[i]
                )));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    fn conv_inputs(&self) -> [usize; 5] {
        let c = self.channels;
        [3, c[0], c[1], c[2], c[3]]
    }

    /// Side of conv5's pooled output for an input side, or `None` where the input is too small.
    fn pool5_side(&self, input: usize) -> Option<usize> {
        let ceil = self.layout.is_caffe();
        let geometry = self.layout.conv_geometry();
        let conv = |n: usize, (k, s, p): (usize, usize, usize)| {
            (n + 2 * p).checked_sub(k).map(|v| v / s + 1)
        };
        let pool = |n: usize| pooled_size(n, 3, 2, ceil);
        let n = pool(conv(input, geometry[0])?)?;
        let n = pool(conv(n, geometry[1])?)?;
        let n = conv(conv(conv(n, geometry[2])?, geometry[3])?, geometry[4])?;
        pool(n)
    }

    /// Checks that an `(N, 3, H, W)` input fits the layout before any work is done.
    pub(crate) fn check_input(&self, dims: &[usize]) -> Result<()> {
        let err = |reason: String| Error::Input {
            shape: dims.to_vec(),
            reason,
        };
        if dims.len() != 4 || dims[1] != 3 {
            return Err(err("expected (batch, 3, height, width)".into()));
        }
        for &side in &dims[2..] {
            match (self.layout.is_caffe(), self.pool5_side(side)) {
                (false, Some(_)) => {}
                (false, None) => {
                    return Err(err(format!(
                        "side {side} is too small: the torchvision layout needs at least 63 px"
                    )))
                }
                (true, Some(6)) => {}
                (true, got) => {
                    return Err(err(format!(
                        "side {side} gives a pool5 of {} but fc6 needs 6x6; the {} layout takes \
                         199..=230 px (227 canonical)",
                        got.map_or("nothing".to_string(), |n| format!("{n}x{n}")),
                        self.layout
                    )))
                }
            }
        }
        Ok(())
    }
}

/// A point in the network where [`AlexNet::extract`] can stop and return its output.
///
/// | tap | output | shape (published widths) |
/// |---|---|---|
/// | `Conv1`..`Conv5` | the conv after its ReLU, before LRN and pooling (Caffe's in-place `convN` blob) | `(N, C, H, W)` |
/// | `Pool5` | after the last max-pool (and torchvision's adaptive avg-pool) | `(N, 256, 6, 6)` |
/// | `Fc6`, `Fc7` | after their ReLU (torchvision's `classifier.2`/`.5`, Caffe's `fc6`/`fc7` blobs) | `(N, 4096)` |
/// | `Logits` | the last layer, before softmax | `(N, classes)` |
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Conv1,
    Conv2,
    Conv3,
    Conv4,
    Conv5,
    Pool5,
    Fc6,
    Fc7,
    Logits,
}

impl Layer {
    /// Every tap, in network order.
    pub const ALL: [Layer; 9] = [
        Layer::Conv1,
        Layer::Conv2,
        Layer::Conv3,
        Layer::Conv4,
        Layer::Conv5,
        Layer::Pool5,
        Layer::Fc6,
        Layer::Fc7,
        Layer::Logits,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Layer::Conv1 => "conv1",
            Layer::Conv2 => "conv2",
            Layer::Conv3 => "conv3",
            Layer::Conv4 => "conv4",
            Layer::Conv5 => "conv5",
            Layer::Pool5 => "pool5",
            Layer::Fc6 => "fc6",
            Layer::Fc7 => "fc7",
            Layer::Logits => "logits",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        Layer::ALL
            .into_iter()
            .find(|l| l.name() == lower || (lower == "fc8" && *l == Layer::Logits))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown layer `{s}`; expected one of conv1..conv5, pool5, fc6, fc7, logits"
                ))
            })
    }
}

/// AlexNet, in any [`Layout`], with named layers that can be reached, frozen and tapped.
///
/// The fields hold the learnable layers under their paper names whatever the checkpoint calls
/// them; [`Layout::key_prefixes`] maps them to checkpoint keys.
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

impl AlexNet {
    /// Loads a pretrained checkpoint, working out its layout, widths and classes from its keys.
    ///
    /// ```no_run
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarBuilder;
    /// use candle_zoo::alexnet::AlexNet;
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
    /// is backed by a [`candle_nn::VarMap`] (fresh weights for training).
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

    /// The learnable layers in network order, under their paper names (`conv1`..`fc8`).
    pub fn layers(&self) -> [(&'static str, LayerRef<'_>); 8] {
        [
            ("conv1", LayerRef::Conv(&self.conv1)),
            ("conv2", LayerRef::Conv(&self.conv2)),
            ("conv3", LayerRef::Conv(&self.conv3)),
            ("conv4", LayerRef::Conv(&self.conv4)),
            ("conv5", LayerRef::Conv(&self.conv5)),
            ("fc6", LayerRef::Linear(&self.fc6)),
            ("fc7", LayerRef::Linear(&self.fc7)),
            ("fc8", LayerRef::Linear(&self.fc8)),
        ]
    }

    /// Every weight and bias under the checkpoint key names of the model's layout, ready for
    /// [`crate::weights::save_safetensors`].
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let keys = self.config.layout.key_prefixes();
        let mut out = Vec::with_capacity(16);
        for ((_, layer), key) in self.layers().into_iter().zip(keys) {
            let (w, b) = match layer {
                LayerRef::Conv(c) => (c.weight(), c.bias()),
                LayerRef::Linear(l) => (l.weight(), l.bias()),
            };
            out.push((format!("{key}.weight"), w.clone()));
            if let Some(b) = b {
                out.push((format!("{key}.bias"), b.clone()));
            }
        }
        out
    }

    /// The output of one layer, in eval mode, computing nothing past it.
    ///
    /// `x` is a `(N, 3, H, W)` batch already preprocessed for the layout
    /// (see [`crate::preprocess`]). Which side of the ReLU each tap is on is documented on
    /// [`Layer`].
    pub fn extract(&self, x: &Tensor, layer: Layer) -> Result<Tensor> {
        self.run(x, layer, Mode::Eval, |_, _| {})
    }

    /// The `k` most probable classes of each image of a preprocessed batch, as
    /// `(class, probability)` pairs, most probable first.
    pub fn top_k(&self, x: &Tensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
        let probs = candle_nn::ops::softmax(&self.forward(x)?, 1)?;
        (0..probs.dim(0)?)
            .map(|i| crate::imagenet::top_k(&probs.get(i)?, k))
            .collect()
    }

    /// The outputs of several layers from one forward pass that stops at the deepest of them.
    /// Results come in the order of `layers`.
    pub fn extract_many(&self, x: &Tensor, layers: &[Layer]) -> Result<Vec<Tensor>> {
        let Some(&last) = layers.iter().max() else {
            return Ok(Vec::new());
        };
        let mut taps: Vec<Option<Tensor>> = vec![None; layers.len()];
        self.run(x, last, Mode::Eval, |layer, t| {
            for (slot, want) in taps.iter_mut().zip(layers) {
                if *want == layer {
                    *slot = Some(t.clone());
                }
            }
        })?;
        Ok(taps.into_iter().flatten().collect())
    }

    /// The forward pass up to `stop`, handing every tap it passes to `tap`.
    fn run(
        &self,
        x: &Tensor,
        stop: Layer,
        mode: Mode<'_>,
        mut tap: impl FnMut(Layer, &Tensor),
    ) -> Result<Tensor> {
        self.config.check_input(x.dims())?;
        let layout = self.config.layout;
        let (train, mut rng, frozen) = match mode {
            Mode::Eval => (false, None, None),
            Mode::Candle => (true, None, None),
            Mode::Seeded { rng, frozen } => (true, Some(rng), frozen),
        };
        // Taps the output of `layer` and, at the frozen boundary, cuts the graph so that no
        // gradient is computed for the layers before it.
        let mut done = |layer: Layer, t: &mut Tensor| {
            if frozen == Some(layer) {
                *t = t.detach();
            }
            tap(layer, t);
            layer == stop
        };
        let pool = |t: &Tensor| max_pool2d(t, 3, 2, layout.is_caffe());
        // LRN and pooling after conv1 and conv2, in the layout's order.
        let norm_pool = |t: &Tensor| -> candle_core::Result<Tensor> {
            match layout {
                Layout::TorchVision => pool(t),
                Layout::AlexNet => pool(&self.lrn.forward(t)?),
                Layout::CaffeNet => self.lrn.forward(&pool(t)?),
            }
        };
        let p = self.config.dropout;
        let mut drop = |t: Tensor| -> candle_core::Result<Tensor> {
            match rng.as_deref_mut() {
                _ if !train || p == 0.0 => Ok(t),
                None => candle_nn::ops::dropout(&t, p),
                Some(rng) => {
                    let mask = rng.dropout_mask(t.elem_count(), p);
                    let mask =
                        Tensor::from_vec(mask, t.shape(), t.device())?.to_dtype(t.dtype())?;
                    t * mask
                }
            }
        };

        // conv + bias + ReLU as one op (a gemm forward and backward on the CPU); the conv taps
        // are after the ReLU.
        let conv_relu =
            |conv: &Conv2d, t: &Tensor| conv2d(t, conv.weight(), conv.bias(), conv.config(), true);
        let mut h = conv_relu(&self.conv1, x)?;
        if done(Layer::Conv1, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv2, &norm_pool(&h)?)?;
        if done(Layer::Conv2, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv3, &norm_pool(&h)?)?;
        if done(Layer::Conv3, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv4, &h)?;
        if done(Layer::Conv4, &mut h) {
            return Ok(h);
        }
        let mut h = conv_relu(&self.conv5, &h)?;
        if done(Layer::Conv5, &mut h) {
            return Ok(h);
        }
        let mut h = pool(&h)?;
        if layout == Layout::TorchVision {
            h = self.avgpool.forward(&h)?;
        }
        if done(Layer::Pool5, &mut h) {
            return Ok(h);
        }
        // torchvision drops out the inputs of fc6 and fc7, Caffe the outputs of relu6 and relu7.
        let caffe = layout.is_caffe();
        let mut h = h.flatten_from(1)?;
        if !caffe {
            h = drop(h)?;
        }
        let fc = |l: &Linear, t: &Tensor, relu| linear(t, l.weight(), l.bias(), relu);
        let mut h = fc(&self.fc6, &h, true)?;
        if done(Layer::Fc6, &mut h) {
            return Ok(h);
        }
        let mut h = fc(&self.fc7, &drop(h)?, true)?;
        if done(Layer::Fc7, &mut h) {
            return Ok(h);
        }
        let h = if caffe { drop(h)? } else { h };
        let mut logits = fc(&self.fc8, &h, false)?;
        done(Layer::Logits, &mut logits);
        Ok(logits)
    }
}

/// A borrowed learnable layer, from [`AlexNet::layers`].
#[derive(Debug, Clone, Copy)]
pub enum LayerRef<'a> {
    Conv(&'a Conv2d),
    Linear(&'a Linear),
}

impl Module for AlexNet {
    /// Logits in eval mode: no dropout.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.run(x, Layer::Logits, Mode::Eval, |_, _| {})?)
    }
}

impl AlexNet {
    /// Logits, with dropout when `train` is true.
    ///
    /// candle implements `ModuleT` for every `Module` (ignoring `train`), so this cannot be a
    /// `ModuleT` impl of its own: method syntax (`model.forward_t(&x, true)`) picks this inherent
    /// method, while generic code bound on `ModuleT` sees eval-mode logits.
    ///
    /// Dropout masks come from candle's RNG, which cannot be seeded on the CPU; training that
    /// must be reproducible uses [`AlexNet::forward_train`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mode = if train { Mode::Candle } else { Mode::Eval };
        self.run(x, Layer::Logits, mode, |_, _| {})
    }

    /// Training-mode logits with dropout masks drawn from `rng`, and the layers up to and
    /// including `frozen_through` frozen: their output is detached from the graph, so a
    /// backward pass computes no gradient for them (or for anything before them).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use candle_zoo::{rng::Rng, AlexNet, Config, Layer};
    ///
    /// let varmap = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    /// let cfg = Config::torchvision().with_widths([8, 8, 8, 8, 8], 16).with_classes(3);
    /// let model = AlexNet::new(&cfg, vb)?;
    /// let x = Tensor::zeros((2, 3, 64, 64), DType::F32, &Device::Cpu)?;
    /// let mut rng = Rng::new(7);
    /// let logits = model.forward_train(&x, &mut rng, Some(Layer::Fc7))?;
    /// let grads = logits.sum_all()?.backward()?;
    /// assert!(grads.get(model.fc8.weight()).is_some());
    /// assert!(grads.get(model.fc7.weight()).is_none()); // frozen: never computed
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_train(
        &self,
        x: &Tensor,
        rng: &mut Rng,
        frozen_through: Option<Layer>,
    ) -> Result<Tensor> {
        let mode = Mode::Seeded {
            rng,
            frozen: frozen_through,
        };
        self.run(x, Layer::Logits, mode, |_, _| {})
    }
}

/// How `AlexNet::run` treats dropout and frozen layers.
enum Mode<'a> {
    Eval,
    /// Training with candle's (unseeded) dropout.
    Candle,
    /// Training with dropout from the crate's RNG and an optional frozen prefix.
    Seeded {
        rng: &'a mut Rng,
        frozen: Option<Layer>,
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
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn small(layout: Layout) -> Config {
        Config::for_layout(layout)
            .with_widths([8, 12, 16, 12, 8], 32)
            .with_classes(5)
    }

    #[test]
    fn pool5_sizes_match_the_published_arithmetic() {
        let tv = Config::torchvision();
        assert_eq!(tv.pool5_side(224), Some(6));
        assert_eq!(tv.pool5_side(63), Some(1));
        assert_eq!(tv.pool5_side(62), None);
        let caffe = Config::alexnet();
        assert_eq!(caffe.pool5_side(227), Some(6));
        // Ceil-mode pooling keeps 224 (the ONNX zoo's input) at 6x6.
        assert_eq!(caffe.pool5_side(224), Some(6));
        assert_eq!(caffe.pool5_side(199), Some(6));
        assert_eq!(caffe.pool5_side(198), Some(5));
        assert_eq!(caffe.pool5_side(230), Some(6));
        assert_eq!(caffe.pool5_side(231), Some(7));
    }

    #[test]
    fn every_tap_has_the_documented_shape() -> Result<()> {
        let dev = Device::Cpu;
        for layout in Layout::ALL {
            let vm = VarMap::new();
            let model = AlexNet::new(
                &small(layout),
                VarBuilder::from_varmap(&vm, DType::F32, &dev),
            )?;
            let side = layout.input_size();
            let x = Tensor::randn(0f32, 1., (2, 3, side, side), &dev)?;
            let taps = model.extract_many(&x, &Layer::ALL)?;
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
            let fc6 = model.extract(&x, Layer::Fc6)?;
            assert_eq!(fc6.to_vec2::<f32>()?, taps[6].to_vec2::<f32>()?);
            assert_eq!(
                model.forward(&x)?.to_vec2::<f32>()?,
                taps[8].to_vec2::<f32>()?
            );
            // Eval-mode ModuleT is forward().
            assert_eq!(
                model.forward_t(&x, false)?.to_vec2::<f32>()?,
                taps[8].to_vec2::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn dropout_applies_only_in_training() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = small(Layout::TorchVision).with_dropout(0.5);
        let model = AlexNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let x = Tensor::randn(0f32, 1., (4, 3, 96, 96), &dev)?;
        let eval = model.forward_t(&x, false)?.to_vec2::<f32>()?;
        assert_eq!(eval, model.forward_t(&x, false)?.to_vec2::<f32>()?);
        let train = model.forward_t(&x, true)?.to_vec2::<f32>()?;
        assert_ne!(eval, train);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_named() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let tv = AlexNet::new(
            &small(Layout::TorchVision),
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        )?;
        let err = tv
            .forward(&Tensor::zeros((1, 3, 40, 64), DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("side 40 is too small"), "{err}");
        let err = tv
            .extract(
                &Tensor::zeros((1, 1, 64, 64), DType::F32, &dev)?,
                Layer::Conv1,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("(batch, 3, height, width)"),
            "{err}"
        );
        let vm = VarMap::new();
        let caffe = AlexNet::new(
            &small(Layout::AlexNet),
            VarBuilder::from_varmap(&vm, DType::F32, &dev),
        )?;
        let err = caffe
            .extract(
                &Tensor::zeros((1, 3, 256, 227), DType::F32, &dev)?,
                Layer::Conv1,
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
        let vm = VarMap::new();
        let cfg = small(Layout::AlexNet).with_widths([8, 12, 16, 13, 8], 32);
        let err =
            AlexNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap_err();
        assert!(err.to_string().contains("conv4 has groups=2"), "{err}");
    }

    #[test]
    fn names_parse_back() -> Result<()> {
        for l in Layer::ALL {
            assert_eq!(l.name().parse::<Layer>()?, l);
        }
        for l in Layout::ALL {
            assert_eq!(l.name().parse::<Layout>()?, l);
        }
        assert_eq!("fc8".parse::<Layer>()?, Layer::Logits);
        assert!("fc9".parse::<Layer>().is_err());
        Ok(())
    }
}
