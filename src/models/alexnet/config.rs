//! What decides an AlexNet's shape: its [`Layout`] and its widths ([`Config`]).

use std::fmt;
use std::str::FromStr;

use candle_nn::VarBuilder;

use super::map_load_error;
use crate::error::{Error, Result};
use crate::layers::pooled_size;

/// Which published AlexNet the model follows. See the [module docs](super) for a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// torchvision's single-tower model ("One weird trick", arXiv 1404.5997), no LRN,
    /// adaptive average pool to 6x6. Loads `alexnet-owt-7be5be79.pth`.
    TorchVision,
    /// The original two-tower model as Caffe's `bvlc_alexnet`: conv → ReLU → LRN → pool.
    BvlcAlexNet,
    /// Caffe's `bvlc_reference_caffenet`: as [`Layout::BvlcAlexNet`] but conv → ReLU → pool → LRN.
    CaffeNet,
}

#[allow(non_upper_case_globals)]
impl Layout {
    /// The BVLC two-tower model's old name.
    #[deprecated(since = "0.2.0", note = "renamed `Layout::BvlcAlexNet`")]
    pub const AlexNet: Layout = Layout::BvlcAlexNet;
}

impl Layout {
    /// All layouts, in documentation order.
    pub const ALL: [Layout; 3] = [Layout::TorchVision, Layout::BvlcAlexNet, Layout::CaffeNet];

    /// The name used on the command line and in checkpoint metadata. `alexnet`, this layout's
    /// name before 0.2, still parses as [`Layout::BvlcAlexNet`].
    pub fn name(self) -> &'static str {
        match self {
            Layout::TorchVision => "torchvision",
            Layout::BvlcAlexNet => "bvlc-alexnet",
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

/// `Display` as `name()`, and `FromStr` from a name or an alias, in any case, with `-` and `_`
/// ignored; an unknown name is [`Error::parse`] naming what was expected.
macro_rules! named_enum {
    ($ty:ident, $what:literal, $expected:literal, { $($alias:literal => $v:expr),* $(,)? }) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                let key = s.to_ascii_lowercase().replace(['-', '_'], "");
                $(if key == $alias {
                    return Ok($v);
                })*
                $ty::ALL
                    .into_iter()
                    .find(|v| v.name().replace('-', "") == key)
                    .ok_or_else(|| Error::parse($what, s, $expected))
            }
        }
    };
}

named_enum!(Layout, "layout", "torchvision, bvlc-alexnet or caffenet", {
    "tv" => Layout::TorchVision,
    "alexnet" => Layout::BvlcAlexNet,
    "bvlc" => Layout::BvlcAlexNet,
    "original" => Layout::BvlcAlexNet,
    "twotower" => Layout::BvlcAlexNet,
    "bvlcreferencecaffenet" => Layout::CaffeNet,
});

/// The nonlinearity after every conv and after fc6 and fc7.
///
/// The paper's Figure 1 compares the two: ReLU reached 25% training error six times faster than
/// tanh. Pretrained files are ReLU networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// `max(0, x)`, fused into the conv and linear ops.
    #[default]
    Relu,
    /// The saturating `tanh(x)` the paper compares ReLU with.
    Tanh,
}

impl Activation {
    pub const ALL: [Activation; 2] = [Activation::Relu, Activation::Tanh];

    /// The name on the command line and in checkpoint metadata.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
        }
    }
}

/// The max-pooling windows after conv1, conv2 and conv5.
///
/// The paper's overlapping pools (window 3, stride 2) lowered its top-1 and top-5 errors by 0.4%
/// and 0.3% against non-overlapping ones (window 2, stride 2), which "produce output of
/// equivalent dimensions".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pooling {
    /// 3x3 windows, stride 2, rounded as the layout's framework rounds (Caffe: ceil, torchvision:
    /// floor): the published models.
    #[default]
    Overlapping,
    /// 2x2 windows, stride 2, floor: the same output sizes as the overlapping pools at the
    /// published input sizes (55 -> 27 -> 13 -> 6).
    NonOverlapping,
}

impl Pooling {
    pub const ALL: [Pooling; 2] = [Pooling::Overlapping, Pooling::NonOverlapping];

    /// The name on the command line and in checkpoint metadata.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Overlapping => "overlapping",
            Pooling::NonOverlapping => "non-overlapping",
        }
    }

    /// Window, stride and ceil mode in `layout`.
    pub fn window(self, layout: Layout) -> (usize, usize, bool) {
        match self {
            Pooling::Overlapping => (3, 2, layout.is_caffe()),
            Pooling::NonOverlapping => (2, 2, false),
        }
    }
}

named_enum!(Activation, "activation", "relu or tanh", {});
named_enum!(Pooling, "pooling", "overlapping (3x3, stride 2) or non-overlapping (2x2, stride 2)", {
    "3x3s2" => Pooling::Overlapping,
    "2x2s2" => Pooling::NonOverlapping,
});

/// Everything that decides an AlexNet's shape.
///
/// The presets build the published models with 1000 classes; `with_*` adapt them: a
/// fine-tuning head, a small model in tests, or a variant of the architecture that one of the
/// paper's claims compares ([`Activation`], [`Pooling`], [`Config::lrn`], [`Config::dropout`]).
///
/// ```
/// use candle_zoo::models::alexnet::{Config, Layout};
/// let cfg = Config::bvlc_alexnet().with_classes(20).with_dropout(0.0);
/// assert_eq!(cfg.layout, Layout::BvlcAlexNet);
/// assert_eq!(cfg.channels, [96, 256, 384, 384, 256]);
///
/// // The variants the paper's claims compare: tanh, non-overlapping pools, LRN added to
/// // torchvision's layout.
/// use candle_zoo::models::alexnet::{Activation, Pooling};
/// let tanh = Config::torchvision().with_activation(Activation::Tanh);
/// let pools = Config::bvlc_alexnet().with_pooling(Pooling::NonOverlapping);
/// let lrn = Config::torchvision().with_lrn(true);
/// assert!(!tanh.is_published_variant() && !pools.is_published_variant() && lrn.lrn);
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
    /// The nonlinearity (published: ReLU).
    pub activation: Activation,
    /// The max-pooling windows (published: overlapping).
    pub pooling: Pooling,
    /// Local response normalisation after conv1 and conv2: before their pooling, as the paper and
    /// `bvlc_alexnet` place it, or after it in [`Layout::CaffeNet`] (published: on in the Caffe
    /// layouts, off in torchvision's).
    pub lrn: bool,
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
            activation: Activation::Relu,
            pooling: Pooling::Overlapping,
            lrn: layout.is_caffe(),
        }
    }

    /// torchvision's `alexnet()`.
    pub fn torchvision() -> Self {
        Self::for_layout(Layout::TorchVision)
    }

    /// Caffe's `bvlc_alexnet`, the original two-tower model.
    pub fn bvlc_alexnet() -> Self {
        Self::for_layout(Layout::BvlcAlexNet)
    }

    /// Caffe's `bvlc_alexnet` under its old name.
    #[deprecated(since = "0.2.0", note = "renamed `Config::bvlc_alexnet`")]
    pub fn alexnet() -> Self {
        Self::bvlc_alexnet()
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

    /// The same widths and variant in another layout. LRN follows the layouts' published
    /// choice unless it was changed from it.
    pub fn with_layout(mut self, layout: Layout) -> Self {
        if self.lrn == self.layout.is_caffe() {
            self.lrn = layout.is_caffe();
        }
        self.layout = layout;
        self
    }

    /// Another nonlinearity after the convs and fc6/fc7 (see [`Activation`]).
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Other pooling windows (see [`Pooling`]).
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// LRN on or off, in any layout (see [`Config::lrn`]).
    pub fn with_lrn(mut self, lrn: bool) -> Self {
        self.lrn = lrn;
        self
    }

    /// Whether this is the published architecture of its layout (any widths and dropout): ReLU,
    /// overlapping pools, and LRN exactly where the layout has it.
    pub fn is_published_variant(&self) -> bool {
        self.activation == Activation::Relu
            && self.pooling == Pooling::Overlapping
            && self.lrn == self.layout.is_caffe()
    }

    /// Other widths than the published ones, for example a small model for tests.
    pub fn with_widths(mut self, channels: [usize; 5], hidden: usize) -> Self {
        self.channels = channels;
        self.hidden = hidden;
        self
    }

    /// Works out the config of a checkpoint from its key names and shapes.
    ///
    /// torchvision keys give [`Layout::TorchVision`], Caffe keys [`Layout::BvlcAlexNet`] (Caffe's
    /// keys do not tell CaffeNet apart: use [`Config::with_layout`], or load through
    /// [`crate::weights::Checkpoint`], which reads the layout from the file's metadata). Widths
    /// and the class count come from the weight shapes.
    pub fn from_checkpoint(vb: &VarBuilder) -> Result<Self> {
        let layout = if vb.contains_tensor("features.0.weight") {
            Layout::TorchVision
        } else if vb.contains_tensor("conv1.weight") {
            Layout::BvlcAlexNet
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
        let cfg = Self::for_layout(layout)
            .with_widths(channels, hidden)
            .with_classes(num_classes);
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> Result<()> {
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

    pub(crate) fn conv_inputs(&self) -> [usize; 5] {
        let c = self.channels;
        [3, c[0], c[1], c[2], c[3]]
    }

    /// Side of conv5's pooled output for an input side, or `None` where the input is too small.
    pub(crate) fn pool5_side(&self, input: usize) -> Option<usize> {
        let (window, stride, ceil) = self.pooling.window(self.layout);
        let geometry = self.layout.conv_geometry();
        let conv = |n: usize, (k, s, p): (usize, usize, usize)| {
            (n + 2 * p).checked_sub(k).map(|v| v / s + 1)
        };
        let pool = |n: usize| pooled_size(n, window, stride, ceil);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool5_sizes_match_the_published_arithmetic() {
        let tv = Config::torchvision();
        assert_eq!(tv.pool5_side(224), Some(6));
        assert_eq!(tv.pool5_side(63), Some(1));
        assert_eq!(tv.pool5_side(62), None);
        let caffe = Config::bvlc_alexnet();
        assert_eq!(caffe.pool5_side(227), Some(6));
        // Ceil-mode pooling keeps 224 (the ONNX zoo's input) at 6x6.
        assert_eq!(caffe.pool5_side(224), Some(6));
        assert_eq!(caffe.pool5_side(199), Some(6));
        assert_eq!(caffe.pool5_side(198), Some(5));
        assert_eq!(caffe.pool5_side(230), Some(6));
        assert_eq!(caffe.pool5_side(231), Some(7));
    }

    #[test]
    fn layout_names_parse_back_and_the_old_name_still_parses() -> Result<()> {
        for l in Layout::ALL {
            assert_eq!(l.name().parse::<Layout>()?, l);
        }
        assert_eq!("alexnet".parse::<Layout>()?, Layout::BvlcAlexNet);
        let err = "resnet".parse::<Layout>().unwrap_err();
        assert!(err.to_string().contains("unknown layout `resnet`"), "{err}");
        Ok(())
    }
}
