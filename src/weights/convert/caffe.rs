//! Reads Caffe's `.caffemodel` (a binary `NetParameter`) and `.binaryproto` mean files.
//!
//! Only the messages and fields AlexNet needs are declared, with caffe.proto's field numbers;
//! protobuf skips the rest. Both layer formats are read: `layer` (field 100, `LayerParameter`,
//! string types, since 2015) and the deprecated `layers` (field 2, `V1LayerParameter`, enum
//! types), in which the BVLC model zoo files were written, and the V0 layers of 2013 files
//! nested inside it.

use std::path::Path;

use prost::Message;

use super::{Op, Param, SourceNet};
use crate::data::preprocess::MeanImage;
use crate::error::{Error, Result};

#[derive(Clone, PartialEq, Message)]
struct NetParameter {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "100")]
    layer: Vec<LayerParameter>,
    #[prost(message, repeated, tag = "2")]
    layers: Vec<V1LayerParameter>,
}

#[derive(Clone, PartialEq, Message)]
struct LayerParameter {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    r#type: Option<String>,
    #[prost(message, repeated, tag = "7")]
    blobs: Vec<BlobProto>,
    #[prost(message, optional, tag = "106")]
    convolution_param: Option<ConvolutionParameter>,
    #[prost(message, optional, tag = "117")]
    inner_product_param: Option<InnerProductParameter>,
    #[prost(message, optional, tag = "118")]
    lrn_param: Option<LrnParameter>,
    #[prost(message, optional, tag = "121")]
    pooling_param: Option<PoolingParameter>,
}

#[derive(Clone, PartialEq, Message)]
struct V1LayerParameter {
    #[prost(string, optional, tag = "4")]
    name: Option<String>,
    /// `V1LayerParameter.LayerType`.
    #[prost(int32, optional, tag = "5")]
    r#type: Option<i32>,
    #[prost(message, repeated, tag = "6")]
    blobs: Vec<BlobProto>,
    #[prost(message, optional, tag = "10")]
    convolution_param: Option<ConvolutionParameter>,
    #[prost(message, optional, tag = "17")]
    inner_product_param: Option<InnerProductParameter>,
    #[prost(message, optional, tag = "18")]
    lrn_param: Option<LrnParameter>,
    #[prost(message, optional, tag = "19")]
    pooling_param: Option<PoolingParameter>,
    /// The V0 layer, in files from 2013 that Caffe upgrades on load.
    #[prost(message, optional, tag = "1")]
    layer: Option<V0LayerParameter>,
}

/// Caffe's first layer format, kept inside `V1LayerParameter.layer`.
#[derive(Clone, PartialEq, Message)]
struct V0LayerParameter {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(string, optional, tag = "2")]
    r#type: Option<String>,
    #[prost(uint32, optional, tag = "7")]
    pad: Option<u32>,
    #[prost(uint32, optional, tag = "9")]
    group: Option<u32>,
    #[prost(uint32, optional, tag = "10")]
    stride: Option<u32>,
    #[prost(int32, optional, tag = "11")]
    pool: Option<i32>,
    #[prost(uint32, optional, tag = "8")]
    kernelsize: Option<u32>,
    #[prost(uint32, optional, tag = "13")]
    local_size: Option<u32>,
    #[prost(float, optional, tag = "14")]
    alpha: Option<f32>,
    #[prost(float, optional, tag = "15")]
    beta: Option<f32>,
    #[prost(float, optional, tag = "22")]
    k: Option<f32>,
    #[prost(message, repeated, tag = "50")]
    blobs: Vec<BlobProto>,
}

impl V0LayerParameter {
    /// The layer in the V1/current vocabulary (Caffe's `UpgradeV0LayerParameter`).
    fn upgrade(self) -> Layer {
        let kind = match self.r#type.as_deref().unwrap_or("") {
            "conv" => "Convolution",
            "innerproduct" => "InnerProduct",
            "lrn" => "LRN",
            "pool" => "Pooling",
            "relu" => "ReLU",
            "dropout" => "Dropout",
            "softmax" => "Softmax",
            "data" => "Data",
            other => other,
        }
        .to_string();
        Layer {
            name: self.name.unwrap_or_default(),
            conv: Some(ConvolutionParameter {
                pad: self.pad.into_iter().collect(),
                kernel_size: self.kernelsize.into_iter().collect(),
                group: self.group,
                stride: self.stride.into_iter().collect(),
                pad_h: None,
                stride_h: None,
            }),
            fc: None,
            lrn: Some(LrnParameter {
                local_size: self.local_size,
                alpha: self.alpha,
                beta: self.beta,
                norm_region: None,
                k: self.k,
            }),
            pool: Some(PoolingParameter {
                pool: self.pool,
                kernel_size: self.kernelsize,
                stride: self.stride,
                pad: self.pad,
            }),
            kind,
            blobs: self.blobs,
        }
    }
}

#[derive(Clone, PartialEq, Message)]
pub(crate) struct BlobProto {
    #[prost(message, optional, tag = "7")]
    shape: Option<BlobShape>,
    #[prost(float, repeated, tag = "5")]
    data: Vec<f32>,
    #[prost(double, repeated, tag = "8")]
    double_data: Vec<f64>,
    // The 4-D shape of files written before `shape` existed (2015).
    #[prost(int64, optional, tag = "1")]
    num: Option<i64>,
    #[prost(int64, optional, tag = "2")]
    channels: Option<i64>,
    #[prost(int64, optional, tag = "3")]
    height: Option<i64>,
    #[prost(int64, optional, tag = "4")]
    width: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct BlobShape {
    #[prost(int64, repeated, tag = "1")]
    dim: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct ConvolutionParameter {
    #[prost(uint32, repeated, tag = "3")]
    pad: Vec<u32>,
    #[prost(uint32, repeated, tag = "4")]
    kernel_size: Vec<u32>,
    #[prost(uint32, optional, tag = "5")]
    group: Option<u32>,
    #[prost(uint32, repeated, tag = "6")]
    stride: Vec<u32>,
    #[prost(uint32, optional, tag = "9")]
    pad_h: Option<u32>,
    #[prost(uint32, optional, tag = "13")]
    stride_h: Option<u32>,
}

#[derive(Clone, PartialEq, Message)]
struct InnerProductParameter {
    #[prost(bool, optional, tag = "6")]
    transpose: Option<bool>,
}

#[derive(Clone, PartialEq, Message)]
struct LrnParameter {
    #[prost(uint32, optional, tag = "1")]
    local_size: Option<u32>,
    #[prost(float, optional, tag = "2")]
    alpha: Option<f32>,
    #[prost(float, optional, tag = "3")]
    beta: Option<f32>,
    /// 0 = ACROSS_CHANNELS, 1 = WITHIN_CHANNEL.
    #[prost(int32, optional, tag = "4")]
    norm_region: Option<i32>,
    #[prost(float, optional, tag = "5")]
    k: Option<f32>,
}

#[derive(Clone, PartialEq, Message)]
struct PoolingParameter {
    /// 0 = MAX, 1 = AVE, 2 = STOCHASTIC.
    #[prost(int32, optional, tag = "1")]
    pool: Option<i32>,
    #[prost(uint32, optional, tag = "2")]
    kernel_size: Option<u32>,
    #[prost(uint32, optional, tag = "3")]
    stride: Option<u32>,
    #[prost(uint32, optional, tag = "4")]
    pad: Option<u32>,
}

/// One layer of either format, with its type as a `LayerParameter` type string.
struct Layer {
    name: String,
    kind: String,
    blobs: Vec<BlobProto>,
    conv: Option<ConvolutionParameter>,
    fc: Option<InnerProductParameter>,
    lrn: Option<LrnParameter>,
    pool: Option<PoolingParameter>,
}

/// The type strings of the `V1LayerParameter.LayerType` values that matter here.
fn v1_kind(t: i32) -> String {
    match t {
        4 => "Convolution".into(),
        14 => "InnerProduct".into(),
        15 => "LRN".into(),
        17 => "Pooling".into(),
        18 => "ReLU".into(),
        6 => "Dropout".into(),
        5 => "Data".into(),
        20 => "Softmax".into(),
        21 => "SoftmaxWithLoss".into(),
        1 => "Accuracy".into(),
        other => format!("V1 layer type {other}"),
    }
}

/// Parses a `.caffemodel` into the converter's list of operations.
pub(crate) fn read_caffemodel(path: &Path, bytes: &[u8]) -> Result<SourceNet> {
    let net = NetParameter::decode(bytes).map_err(|e| {
        Error::checkpoint(
            path,
            format!("not a readable .caffemodel (binary NetParameter protobuf): {e}"),
        )
    })?;
    let layers: Vec<Layer> = if !net.layer.is_empty() {
        net.layer
            .into_iter()
            .map(|l| Layer {
                name: l.name.unwrap_or_default(),
                kind: l.r#type.unwrap_or_default(),
                blobs: l.blobs,
                conv: l.convolution_param,
                fc: l.inner_product_param,
                lrn: l.lrn_param,
                pool: l.pooling_param,
            })
            .collect()
    } else {
        net.layers
            .into_iter()
            .map(|l| match l.layer {
                Some(v0) if l.r#type.unwrap_or(0) == 0 => v0.upgrade(),
                _ => Layer {
                    name: l.name.unwrap_or_default(),
                    kind: v1_kind(l.r#type.unwrap_or(0)),
                    blobs: l.blobs,
                    conv: l.convolution_param,
                    fc: l.inner_product_param,
                    lrn: l.lrn_param,
                    pool: l.pooling_param,
                },
            })
            .collect()
    };
    if layers.is_empty() {
        return Err(Error::checkpoint(
            path,
            "the .caffemodel holds no layers (neither `layer` nor the V1 `layers` field); \
             is it a .prototxt or a solver state?",
        ));
    }
    let mut ops = Vec::new();
    for layer in layers {
        let name = layer.name;
        let blob = |i: usize, what: &str| -> Result<Param> {
            let b = layer.blobs.get(i).ok_or_else(|| {
                Error::checkpoint(
                    path,
                    format!(
                        "layer `{name}` ({}) has {} blob(s); its {what} (blob {i}) is missing",
                        layer.kind,
                        layer.blobs.len()
                    ),
                )
            })?;
            blob_param(b).map_err(|reason| {
                Error::checkpoint(path, format!("layer `{name}`, blob {i} ({what}): {reason}"))
            })
        };
        let op = match layer.kind.as_str() {
            "Convolution" => {
                let p = layer.conv.clone().unwrap_or_default();
                Op::Conv {
                    weight: blob(0, "weight")?,
                    bias: blob(1, "bias")?,
                    groups: p.group.map(|g| g as usize),
                    stride: p
                        .stride_h
                        .or_else(|| p.stride.first().copied())
                        .or(Some(1))
                        .map(|s| s as usize),
                    pad: p
                        .pad_h
                        .or_else(|| p.pad.first().copied())
                        .or(Some(0))
                        .map(|s| s as usize),
                    name,
                }
            }
            "InnerProduct" => {
                let transposed = layer.fc.as_ref().and_then(|p| p.transpose).unwrap_or(false);
                Op::Fc {
                    weight: blob(0, "weight")?,
                    bias: blob(1, "bias")?,
                    transposed,
                    name,
                }
            }
            "LRN" => {
                let p = layer.lrn.clone().unwrap_or_default();
                if p.norm_region.unwrap_or(0) != 0 {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "layer `{name}`: LRN over WITHIN_CHANNEL regions; AlexNet normalises \
                             ACROSS_CHANNELS"
                        ),
                    ));
                }
                Op::Lrn {
                    size: p.local_size.unwrap_or(5) as usize,
                    alpha: p.alpha.unwrap_or(1.0),
                    beta: p.beta.unwrap_or(0.75),
                    k: p.k.unwrap_or(1.0),
                    name,
                }
            }
            "Pooling" => {
                let p = layer.pool.clone().unwrap_or_default();
                Op::MaxPool {
                    max: p.pool.unwrap_or(0) == 0,
                    kernel: p.kernel_size.map(|k| k as usize),
                    stride: Some(p.stride.unwrap_or(1) as usize),
                    pad: p.pad.unwrap_or(0) as usize,
                    name,
                }
            }
            _ => continue,
        };
        ops.push(op);
    }
    Ok(SourceNet {
        name: net.name.unwrap_or_default(),
        ops,
    })
}

/// The shape of a blob: `shape` where present, else the legacy 4-D fields.
fn blob_param(b: &BlobProto) -> std::result::Result<Param, String> {
    let shape: Vec<usize> = match &b.shape {
        Some(s) => s
            .dim
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
            .collect::<std::result::Result<_, _>>()?,
        None => [b.num, b.channels, b.height, b.width]
            .iter()
            .map(|d| {
                usize::try_from(d.unwrap_or(0)).map_err(|_| format!("negative dimension {d:?}"))
            })
            .collect::<std::result::Result<_, _>>()?,
    };
    let data: Vec<f32> = if !b.data.is_empty() {
        b.data.clone()
    } else {
        b.double_data.iter().map(|&v| v as f32).collect()
    };
    let numel = super::checked_numel(&shape)?;
    if numel != data.len() {
        return Err(format!(
            "shape {shape:?} holds {numel} values but the blob has {}",
            data.len()
        ));
    }
    Ok(Param { shape, data })
}

/// Reads a Caffe mean file (`BlobProto`, e.g. `ilsvrc_2012_mean.binaryproto`, shape
/// `1x3x256x256` in BGR) as a [`MeanImage`], in the file's (BGR) channel order.
pub fn read_mean_image(path: impl AsRef<Path>) -> Result<MeanImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let blob = BlobProto::decode(bytes.as_slice()).map_err(|e| {
        Error::checkpoint(path, format!("not a readable .binaryproto mean file: {e}"))
    })?;
    let p = blob_param(&blob).map_err(|reason| Error::checkpoint(path, reason))?;
    let dims: Vec<usize> = p.shape.iter().copied().filter(|&d| d != 1).collect();
    if dims.len() != 3 || dims[0] != 3 {
        return Err(Error::checkpoint(
            path,
            format!(
                "a mean image must have shape (1, 3, H, W); this one has {:?}",
                p.shape
            ),
        ));
    }
    Ok(MeanImage {
        height: dims[1],
        width: dims[2],
        values: p.data,
    })
}

/// The per-channel means of a Caffe mean file, in its (BGR) order: what Caffe's own Python
/// classifier subtracts.
pub fn read_mean_binaryproto(path: impl AsRef<Path>) -> Result<[f32; 3]> {
    Ok(read_mean_image(path)?.channel_means())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 x 7 x 0x6DB6DB6DB6DB6DB7 values wrap around to the 3 the blob holds (7 times that
    /// width is 1 modulo 2^64): a crafted mean file of a few dozen bytes must be an error, not a
    /// mean image whose planes lie about their size.
    #[test]
    fn a_blob_whose_shape_overflows_is_refused() {
        let blob = BlobProto {
            shape: Some(BlobShape {
                dim: vec![1, 3, 7, 0x6DB6_DB6D_B6DB_6DB7],
            }),
            data: vec![1.0, 2.0, 3.0],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crafted.binaryproto");
        std::fs::write(&path, blob.encode_to_vec()).unwrap();
        let err = read_mean_image(&path).unwrap_err().to_string();
        assert!(
            err.contains("crafted.binaryproto") && err.contains("more values than fit"),
            "{err}"
        );
        assert!(std::fs::metadata(&path).unwrap().len() < 64);
    }
}
