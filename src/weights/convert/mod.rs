//! Converts published AlexNet weights into safetensors with this crate's key names.
//!
//! | source | read from | layout |
//! |---|---|---|
//! | Caffe `.caffemodel` (`layer` or V1 `layers` format) | the layer list: weights, LRN and pooling order | AlexNet or CaffeNet, from where LRN sits |
//! | ONNX `.onnx` (model zoo `bvlcalexnet`, `torch.onnx.export`) | `Conv`, `Gemm`/`MatMul`, `LRN`, `MaxPool` nodes | as for Caffe |
//! | PyTorch `.pth` (zip) or `.safetensors` | weights in module order | torchvision, or two-tower ([`ConvertOptions::layout`]) |
//!
//! The result is checked by building the [`AlexNet`] it describes, so a file that converts is a
//! file that loads. [`Converted::save`] writes it atomically, with metadata (see
//! [`crate::weights::metadata`]) naming the layout, the input pipeline, and the source file and
//! its SHA-256 and SHA-1. The bytes written depend only on the source's bytes and the options, so
//! the same download always gives the same checksum.
//!
//! ```no_run
//! use candle_zoo::weights::convert::{convert, ConvertOptions};
//! use candle_zoo::models::alexnet::Layout;
//! let converted = convert("bvlc_alexnet.caffemodel", &ConvertOptions::default())?;
//! assert_eq!(converted.layout(), Layout::BvlcAlexNet);
//! converted.save("bvlc_alexnet.safetensors")?;
//! # Ok::<(), candle_zoo::Error>(())
//! ```

mod caffe;
mod onnx;
mod torch;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use caffe::{read_mean_binaryproto, read_mean_image};

use super::{checksum, metadata, Checkpoint};
use crate::data::preprocess::{MeanImage, Preprocess, Preset};
use crate::error::{Error, Result};
use crate::models::alexnet::{AlexNet, Config, Layout};

/// The kinds of file [`convert`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// A Caffe `.caffemodel`.
    Caffe,
    /// An ONNX model.
    Onnx,
    /// A PyTorch `.pth` (zip format) or a safetensors file.
    Torch,
}

impl SourceFormat {
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Caffe => "caffe",
            SourceFormat::Onnx => "onnx",
            SourceFormat::Torch => "torch",
        }
    }

    /// Tells the format from the extension, or for PyTorch and safetensors files from the
    /// first bytes. Protobuf files carry no magic number: name them `.caffemodel` or `.onnx`, or
    /// say which with [`ConvertOptions::format`].
    pub fn detect(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("caffemodel") => return Ok(SourceFormat::Caffe),
            Some("onnx") => return Ok(SourceFormat::Onnx),
            Some("pth" | "pt" | "bin" | "safetensors" | "ckpt") => return Ok(SourceFormat::Torch),
            _ => {}
        }
        match Checkpoint::open(path) {
            Ok(_) => Ok(SourceFormat::Torch),
            Err(Error::Io { path, source }) => Err(Error::Io { path, source }),
            Err(_) => Err(Error::checkpoint(
                path,
                "cannot tell the format from the name or the first bytes; name the file \
                 .caffemodel, .onnx or .pth, or say which format it is",
            )),
        }
    }
}

impl fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SourceFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "caffe" | "caffemodel" => Ok(SourceFormat::Caffe),
            "onnx" => Ok(SourceFormat::Onnx),
            "torch" | "pytorch" | "pth" | "safetensors" => Ok(SourceFormat::Torch),
            _ => Err(Error::parse("source format", s, "caffe, onnx or torch")),
        }
    }
}

/// What [`convert`] is told beyond the file itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvertOptions {
    /// The source format; by default told from the file.
    pub format: Option<SourceFormat>,
    /// The layout. Caffe and ONNX files say it themselves (a different value is an error);
    /// two-tower PyTorch weights need it to tell CaffeNet from BVLC AlexNet (default BVLC
    /// AlexNet).
    pub layout: Option<Layout>,
    /// The preprocessing preset to record; by default the layout's.
    pub preprocess: Option<Preset>,
    /// A per-channel mean to record, in the model's channel order (BGR for Caffe), for example
    /// from [`read_mean_binaryproto`].
    pub mean: Option<[f32; 3]>,
    /// The crop side to record; by default the preset's, except 224 for ONNX two-tower models,
    /// which the ONNX model zoo feeds 224-pixel inputs.
    pub crop: Option<u32>,
    /// A mean image to store with the weights (tensor [`metadata::MEAN_IMAGE`]), subtracted pixel by
    /// pixel as Caffe's data layer does, for example from [`read_mean_image`].
    pub mean_image: Option<MeanImage>,
}

/// Weights converted to this crate's key names, checked to build an [`AlexNet`].
#[derive(Debug, Clone)]
pub struct Converted {
    pub config: Config,
    /// `(key, tensor)` pairs on the CPU, in the layout's key names.
    pub tensors: Vec<(String, Tensor)>,
    /// What [`Converted::save`] records: layout, preprocessing, source, checksum, converter.
    pub metadata: BTreeMap<String, String>,
}

impl Converted {
    pub fn layout(&self) -> Layout {
        self.config.layout
    }

    /// The model, in f32 on `device`.
    pub fn model(&self, device: &Device) -> Result<AlexNet> {
        let map: HashMap<String, Tensor> = self.tensors.iter().cloned().collect();
        AlexNet::new(
            &self.config,
            VarBuilder::from_tensors(map, DType::F32, device),
        )
    }

    /// The input pipeline the metadata (and a stored mean image) records.
    pub fn preprocess(&self) -> Result<Preprocess> {
        let mean_image = self
            .tensors
            .iter()
            .find(|(k, _)| k == metadata::MEAN_IMAGE)
            .map(|(_, t)| t);
        metadata::preprocess(&self.metadata, self.layout(), mean_image)
    }

    /// Writes the weights and metadata as safetensors, atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::weights::save_safetensors(path, &self.tensors, &self.metadata)
    }
}

/// Reads AlexNet weights from a Caffe, ONNX or PyTorch file; see the [module docs](self).
pub fn convert(path: impl AsRef<Path>, options: &ConvertOptions) -> Result<Converted> {
    let path = path.as_ref();
    let format = match options.format {
        Some(f) => f,
        None => SourceFormat::detect(path)?,
    };
    let (net, layout_hint) = match format {
        SourceFormat::Caffe => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            (caffe::read_caffemodel(path, &bytes)?, None)
        }
        SourceFormat::Onnx => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            (onnx::read_onnx(path, &bytes)?, None)
        }
        SourceFormat::Torch => torch::read_torch(path)?,
    };
    let (layout, params) = assemble(path, &net, options.layout.or(layout_hint))?;

    let keys = layout.key_prefixes();
    let mut tensors = Vec::with_capacity(17);
    for (key, (w, b)) in keys.iter().zip(params) {
        tensors.push((
            format!("{key}.weight"),
            Tensor::from_vec(w.data, w.shape, &Device::Cpu)?,
        ));
        tensors.push((
            format!("{key}.bias"),
            Tensor::from_vec(b.data, b.shape, &Device::Cpu)?,
        ));
    }
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
    let wrap = |e: Error| match e {
        Error::Checkpoint { .. } | Error::Io { .. } => e,
        e => Error::checkpoint(
            path,
            format!("the converted weights do not form an AlexNet: {e}"),
        ),
    };
    let config = Config::from_checkpoint(&vb)
        .map_err(wrap)?
        .with_layout(layout);
    AlexNet::new(&config, vb).map_err(wrap)?;

    // The pipeline to record: the preset, with the options' mean, crop and mean image.
    let mut pipeline = match options.preprocess {
        Some(preset) => preset.pipeline(),
        None => Preprocess::for_layout(layout),
    };
    if let Some(mean) = options.mean {
        pipeline.mean = mean;
    }
    let crop = options.crop.or_else(|| {
        (format == SourceFormat::Onnx && layout.is_caffe() && options.preprocess.is_none())
            .then_some(224)
    });
    if let Some(crop) = crop {
        let side = crop as usize;
        config.check_input(&[1, 3, side, side]).map_err(|e| {
            Error::Invalid(format!("crop {crop} does not fit the converted model: {e}"))
        })?;
        pipeline.crop = crop;
    }
    if let Some(m) = &options.mean_image {
        pipeline = pipeline.with_mean_image(m.clone())?;
    }
    tensors.extend(
        metadata::mean_image_tensor(&pipeline)?.map(|t| (metadata::MEAN_IMAGE.to_string(), t)),
    );

    let (sha256, sha1) = checksum::digests(path)?;
    let source = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut meta = metadata::preprocess_entries(&pipeline);
    meta.extend([
        (metadata::LAYOUT.to_string(), layout.name().to_string()),
        (metadata::SOURCE.to_string(), source),
        (metadata::SOURCE_SHA256.to_string(), sha256),
        (metadata::SOURCE_SHA1.to_string(), sha1),
        (
            metadata::SOURCE_FORMAT.to_string(),
            format.name().to_string(),
        ),
        (
            metadata::CONVERTER.to_string(),
            concat!("candle-zoo ", env!("CARGO_PKG_VERSION")).to_string(),
        ),
    ]);
    Ok(Converted {
        config,
        tensors,
        metadata: meta,
    })
}

/// The number of values of a source tensor's shape, or an error: a crafted file can declare
/// dimensions whose product wraps around to its data's length.
pub(crate) fn checked_numel(shape: &[usize]) -> std::result::Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has more values than fit in memory"))
}

/// A weight or bias as read from the source, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Param {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The operations of a source network that decide how its weights map onto AlexNet, in order
/// (ReLU, dropout, flatten and the like are left out).
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Conv {
        name: String,
        weight: Param,
        bias: Param,
        groups: Option<usize>,
        stride: Option<usize>,
        pad: Option<usize>,
    },
    Fc {
        name: String,
        weight: Param,
        bias: Param,
        /// The weight is stored `(in, out)` rather than `(out, in)`.
        transposed: bool,
    },
    Lrn {
        name: String,
        size: usize,
        alpha: f32,
        beta: f32,
        k: f32,
    },
    MaxPool {
        name: String,
        /// False for average or stochastic pooling.
        max: bool,
        kernel: Option<usize>,
        stride: Option<usize>,
        pad: usize,
    },
}

impl Op {
    fn name(&self) -> &str {
        match self {
            Op::Conv { name, .. }
            | Op::Fc { name, .. }
            | Op::Lrn { name, .. }
            | Op::MaxPool { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SourceNet {
    #[allow(dead_code)]
    pub name: String,
    pub ops: Vec<Op>,
}

/// Maps a source network onto AlexNet: checks it has AlexNet's layers with AlexNet's settings,
/// tells the layout, and returns conv1..fc8's `(weight, bias)` in this crate's shapes.
fn assemble(
    path: &Path,
    net: &SourceNet,
    hint: Option<Layout>,
) -> Result<(Layout, Vec<(Param, Param)>)> {
    let err = |reason: String| Error::checkpoint(path, reason);
    let names = |pick: fn(&Op) -> bool| -> Vec<&str> {
        net.ops.iter().filter(|op| pick(op)).map(Op::name).collect()
    };
    let convs = names(|op| matches!(op, Op::Conv { .. }));
    let fcs = names(|op| matches!(op, Op::Fc { .. }));
    if convs.len() != 5 || fcs.len() != 3 {
        return Err(err(format!(
            "AlexNet has 5 convolution and 3 fully connected layers; this file has {} \
             convolution ({}) and {} fully connected ({})",
            convs.len(),
            convs.join(", "),
            fcs.len(),
            fcs.join(", ")
        )));
    }

    // The layout the layer order says: LRN before the first pool is AlexNet, after it CaffeNet.
    let lrns: Vec<usize> = positions(&net.ops, |op| matches!(op, Op::Lrn { .. }));
    let conv_at = positions(&net.ops, |op| matches!(op, Op::Conv { .. }));
    let told = if lrns.is_empty() {
        None
    } else {
        if lrns.len() != 2 {
            return Err(err(format!(
                "AlexNet has 2 LRN layers (after conv1 and conv2); this file has {}",
                lrns.len()
            )));
        }
        for &i in &lrns {
            if let Op::Lrn {
                name,
                size,
                alpha,
                beta,
                k,
            } = &net.ops[i]
            {
                let close = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs().max(1.0);
                if *size != 5 || !close(*alpha, 1e-4) || !close(*beta, 0.75) || !close(*k, 1.0) {
                    return Err(err(format!(
                        "LRN layer `{name}` has size {size}, alpha {alpha}, beta {beta}, k {k}; \
                         AlexNet's is size 5, alpha 1e-4, beta 0.75, k 1"
                    )));
                }
            }
        }
        let first_pool = net.ops[conv_at[0]..conv_at[1]]
            .iter()
            .position(|op| matches!(op, Op::MaxPool { .. }));
        let first_lrn = net.ops[conv_at[0]..conv_at[1]]
            .iter()
            .position(|op| matches!(op, Op::Lrn { .. }));
        match (first_lrn, first_pool) {
            (Some(l), Some(p)) if p < l => Some(Layout::CaffeNet),
            (Some(_), _) => Some(Layout::BvlcAlexNet),
            (None, _) => {
                return Err(err(
                    "no LRN between conv1 and conv2, where AlexNet has one".into()
                ))
            }
        }
    };
    for op in &net.ops {
        if let Op::MaxPool {
            name,
            max,
            kernel,
            stride,
            pad,
        } = op
        {
            if !max || kernel.is_some_and(|k| k != 3) || stride.is_some_and(|s| s != 2) || *pad != 0
            {
                return Err(err(format!(
                    "pooling layer `{name}` is not AlexNet's 3x3, stride 2, unpadded max-pool"
                )));
            }
        }
    }

    let mut params: Vec<(Param, Param, &str)> = Vec::with_capacity(8);
    let mut geometry: Vec<(Option<usize>, Option<usize>, Option<usize>)> = Vec::with_capacity(5);
    for op in &net.ops {
        match op {
            Op::Conv {
                name,
                weight,
                bias,
                groups,
                stride,
                pad,
            } => {
                if weight.shape.len() != 4 {
                    return Err(err(format!(
                        "convolution `{name}` has a weight of shape {:?}; expected 4 dimensions",
                        weight.shape
                    )));
                }
                params.push((weight.clone(), squeeze_bias(name, bias).map_err(err)?, name));
                geometry.push((*groups, *stride, *pad));
            }
            Op::Fc {
                name,
                weight,
                bias,
                transposed,
            } => {
                let w = matrix(name, weight, *transposed).map_err(err)?;
                params.push((w, squeeze_bias(name, bias).map_err(err)?, name));
            }
            _ => {}
        }
    }

    // The layout the shapes say: conv2 reads half of conv1's channels in two towers.
    let (c1_out, c2_in) = (params[0].0.shape[0], params[1].0.shape[1]);
    let layout = if c2_in == c1_out {
        if told.is_some() || hint.is_some_and(Layout::is_caffe) {
            return Err(err(format!(
                "conv2 (`{}`) reads all {c1_out} channels of conv1, as the single-tower torchvision \
                 layout does, but the file {}",
                params[1].2,
                if told.is_some() {
                    "has LRN layers, which torchvision's AlexNet lacks".to_string()
                } else {
                    format!("was said to be `{}`", hint.expect("checked"))
                }
            )));
        }
        Layout::TorchVision
    } else if c2_in * 2 == c1_out {
        match (told, hint) {
            (Some(told), Some(hint)) if told != hint => {
                return Err(err(format!(
                    "the file's layer order is that of `{told}`, but `{hint}` was asked for"
                )))
            }
            (Some(told), _) => told,
            (None, Some(Layout::TorchVision)) => {
                return Err(err(
                    "conv2 reads half of conv1's channels (two towers), so the weights cannot be \
                     loaded as `torchvision`"
                        .into(),
                ))
            }
            (None, Some(hint)) => hint,
            (None, None) => Layout::BvlcAlexNet,
        }
    } else {
        return Err(err(format!(
            "conv2 (`{}`) reads {c2_in} channels but conv1 gives {c1_out}: neither one tower nor two",
            params[1].2
        )));
    };
    let expected = layout.conv_geometry();
    for (i, (groups, stride, pad)) in geometry.iter().enumerate() {
        let (_, want_stride, want_pad) = expected[i];
        let want_groups = layout.groups()[i];
        let bad = |what: &str, got: usize, want: usize| {
            err(format!(
                "convolution `{}` has {what} {got}; conv{} of the `{layout}` layout has {want}",
                params[i].2,
                i + 1
            ))
        };
        if let Some(g) = groups.filter(|&g| g != want_groups) {
            return Err(bad("groups", g, want_groups));
        }
        if let Some(s) = stride.filter(|&s| s != want_stride) {
            return Err(bad("stride", s, want_stride));
        }
        if let Some(p) = pad.filter(|&p| p != want_pad) {
            return Err(bad("padding", p, want_pad));
        }
    }
    Ok((layout, params.into_iter().map(|(w, b, _)| (w, b)).collect()))
}

fn positions(ops: &[Op], pick: impl Fn(&Op) -> bool) -> Vec<usize> {
    ops.iter()
        .enumerate()
        .filter(|(_, op)| pick(op))
        .map(|(i, _)| i)
        .collect()
}

/// A bias as a vector, whatever leading unit dimensions the source gave it (Caffe's legacy
/// blobs are `1x1x1xN`).
fn squeeze_bias(name: &str, bias: &Param) -> std::result::Result<Param, String> {
    if bias.shape.iter().filter(|&&d| d != 1).count() > 1 {
        return Err(format!(
            "layer `{name}` has a bias of shape {:?}; expected a vector",
            bias.shape
        ));
    }
    Ok(Param {
        shape: vec![bias.data.len()],
        data: bias.data.clone(),
    })
}

/// A fully connected weight as `(out, in)`, from `(out, in)`, `(in, out)` when `transposed`, or
/// Caffe's legacy `1x1xOUTxIN`.
fn matrix(name: &str, weight: &Param, transposed: bool) -> std::result::Result<Param, String> {
    let mut shape: Vec<usize> = weight.shape.clone();
    while shape.len() > 2 && shape[0] == 1 {
        shape.remove(0);
    }
    if shape.len() != 2 {
        return Err(format!(
            "fully connected layer `{name}` has a weight of shape {:?}; expected a matrix",
            weight.shape
        ));
    }
    if !transposed {
        return Ok(Param {
            shape,
            data: weight.data.clone(),
        });
    }
    let (rows, cols) = (shape[0], shape[1]);
    let mut data = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            data[c * rows + r] = weight.data[r * cols + c];
        }
    }
    Ok(Param {
        shape: vec![cols, rows],
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_matrix_becomes_out_by_in() {
        let w = Param {
            shape: vec![2, 3],
            data: vec![1., 2., 3., 4., 5., 6.],
        };
        let m = matrix("fc", &w, true).unwrap();
        assert_eq!(m.shape, vec![3, 2]);
        assert_eq!(m.data, vec![1., 4., 2., 5., 3., 6.]);
        let legacy = Param {
            shape: vec![1, 1, 2, 3],
            data: w.data.clone(),
        };
        assert_eq!(matrix("fc", &legacy, false).unwrap().shape, vec![2, 3]);
    }

    #[test]
    fn formats_parse_and_detect_by_extension() {
        assert_eq!("ONNX".parse::<SourceFormat>().unwrap(), SourceFormat::Onnx);
        assert!("tf".parse::<SourceFormat>().is_err());
        assert_eq!(
            SourceFormat::detect(Path::new("x/bvlc_alexnet.caffemodel")).unwrap(),
            SourceFormat::Caffe
        );
    }
}
