//! The weights file format: safetensors whose string metadata says what the weights are. This
//! module owns every key a weights file's header can hold and how each value is written and
//! read; a training checkpoint (`crate::train`) is a weights file with keys of its own added.
//!
//! | key | values | written by | effect when read |
//! |---|---|---|---|
//! | [`LAYOUT`] | `torchvision`, `bvlc-alexnet` (or `alexnet`), `caffenet` | convert, train | picks CaffeNet's order for Caffe keys; refused when it contradicts the keys |
//! | [`PREPROCESS`] | `torchvision`, `caffe` | convert, train | the pipeline's preset |
//! | [`PREPROCESS_MEAN`] | `a,b,c`, the model's channel order, after scaling | convert, train | replaces the preset's mean |
//! | [`PREPROCESS_CROP`] | a side in pixels | convert, train | replaces the preset's crop |
//! | [`PREPROCESS_RESIZE`] | `shorter:N` or `exact:WxH` | convert, train | replaces the preset's resize |
//! | tensor [`MEAN_IMAGE`] | `(3, H, W)` f32, the model's channel order | convert, train | subtracted pixel by pixel instead of the mean |
//! | [`CLASSES`] | a JSON list of class names | train | names the model's outputs |
//! | [`DROPOUT`] | a probability | train | the dropout a resumed run trains with |
//! | [`ACTIVATION`], [`POOLING`], [`LRN`] | `relu`/`tanh`, `overlapping`/`non-overlapping`, `true`/`false` | train | the architecture variant ([`Config`]); absent, the layout's published one |
//! | [`SOURCE`], [`SOURCE_SHA256`], [`SOURCE_SHA1`], [`SOURCE_FORMAT`], [`CONVERTER`] | | convert | where converted weights came from |

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::data::preprocess::{MeanImage, Preprocess, Preset, Resize};
use crate::error::{Error, Result};
use crate::models::alexnet::{Config, Layout};

/// The layout: Caffe's keys alone cannot tell AlexNet from CaffeNet.
pub const LAYOUT: &str = "layout";
/// The preprocessing preset.
pub const PREPROCESS: &str = "preprocess";
/// The per-channel mean to subtract, `a,b,c` in the model's channel order.
pub const PREPROCESS_MEAN: &str = "preprocess.mean";
/// The side of the centre crop the model is fed.
pub const PREPROCESS_CROP: &str = "preprocess.crop";
/// How images are resized before the crop, `shorter:N` or `exact:WxH`.
pub const PREPROCESS_RESIZE: &str = "preprocess.resize";
/// Tensor key of a Caffe mean image stored with the weights: `(3, H, W)` f32, subtracted pixel
/// by pixel (see [`MeanImage`]).
pub const MEAN_IMAGE: &str = "preprocess.mean_image";
/// The class names of the outputs, a JSON list.
pub const CLASSES: &str = "classes";
/// The dropout probability the model was trained with.
pub const DROPOUT: &str = "model.dropout";
/// The nonlinearity of a variant ([`crate::models::alexnet::Activation`]).
pub const ACTIVATION: &str = "model.activation";
/// The pooling windows of a variant ([`crate::models::alexnet::Pooling`]).
pub const POOLING: &str = "model.pooling";
/// Whether a variant has LRN after conv1 and conv2.
pub const LRN: &str = "model.lrn";
/// The file converted weights came from (its name, not its path).
pub const SOURCE: &str = "source";
/// That file's SHA-256.
pub const SOURCE_SHA256: &str = "source_sha256";
/// That file's SHA-1 (the checksum Caffe's model zoo publishes).
pub const SOURCE_SHA1: &str = "source_sha1";
/// That file's format: `caffe`, `onnx` or `torch`.
pub const SOURCE_FORMAT: &str = "source_format";
/// The program that converted it.
pub const CONVERTER: &str = "converter";

/// The layout a file's metadata names, if any.
pub fn layout(meta: &BTreeMap<String, String>) -> Result<Option<Layout>> {
    meta.get(LAYOUT).map(|s| s.parse()).transpose()
}

/// The class names a file's metadata lists, if any.
pub fn classes(meta: &BTreeMap<String, String>) -> Result<Option<Vec<String>>> {
    meta.get(CLASSES)
        .map(|s| {
            serde_json::from_str(s)
                .map_err(|e| Error::Invalid(format!("metadata `{CLASSES}`: {e}")))
        })
        .transpose()
}

/// The dropout probability a file's metadata records, if any.
pub fn dropout(meta: &BTreeMap<String, String>) -> Result<Option<f32>> {
    meta.get(DROPOUT)
        .map(|s| {
            s.parse()
                .map_err(|e| Error::Invalid(format!("metadata `{DROPOUT}` = `{s}`: {e}")))
        })
        .transpose()
}

/// The entries that record `config`'s architecture variant: its activation, pooling and LRN.
pub fn variant_entries(config: &Config) -> Vec<(String, String)> {
    vec![
        (ACTIVATION.into(), config.activation.name().into()),
        (POOLING.into(), config.pooling.name().into()),
        (LRN.into(), config.lrn.to_string()),
    ]
}

/// `config` with the architecture variant a file's metadata records; a key that is absent keeps
/// `config`'s (the published) choice.
pub fn variant(meta: &BTreeMap<String, String>, config: Config) -> Result<Config> {
    let bad =
        |key: &str, s: &str, e: String| Error::Invalid(format!("metadata `{key}` = `{s}`: {e}"));
    let mut config = config;
    if let Some(s) = meta.get(ACTIVATION) {
        config.activation = s
            .parse()
            .map_err(|e: Error| bad(ACTIVATION, s, e.to_string()))?;
    }
    if let Some(s) = meta.get(POOLING) {
        config.pooling = s
            .parse()
            .map_err(|e: Error| bad(POOLING, s, e.to_string()))?;
    }
    if let Some(s) = meta.get(LRN) {
        config.lrn = s
            .parse()
            .map_err(|e: std::str::ParseBoolError| bad(LRN, s, e.to_string()))?;
    }
    Ok(config)
}

/// The entries that record a pipeline: its preset (from its channel order), mean, crop and
/// resize. A mean image travels as the tensor [`MEAN_IMAGE`] ([`mean_image_tensor`]).
///
/// ```
/// use candle_zoo::data::preprocess::{Preprocess, Resize};
/// use candle_zoo::models::alexnet::Layout;
/// use candle_zoo::weights::metadata;
///
/// let mut p = Preprocess::torchvision();
/// (p.resize, p.crop) = (Resize::ShorterSide(73), 64);
/// let back = metadata::preprocess(&metadata::preprocess_entries(&p), Layout::TorchVision, None)?;
/// assert_eq!(back, p);
/// # Ok::<(), candle_zoo::Error>(())
/// ```
pub fn preprocess_entries(p: &Preprocess) -> BTreeMap<String, String> {
    let [a, b, c] = p.mean;
    let resize = match p.resize {
        Resize::ShorterSide(n) => format!("shorter:{n}"),
        Resize::Exact(w, h) => format!("exact:{w}x{h}"),
    };
    BTreeMap::from([
        (PREPROCESS.to_string(), p.preset().name().to_string()),
        (PREPROCESS_MEAN.to_string(), format!("{a},{b},{c}")),
        (PREPROCESS_CROP.to_string(), p.crop.to_string()),
        (PREPROCESS_RESIZE.to_string(), resize),
    ])
}

/// The pipeline a file records: its [`PREPROCESS`] preset (else `layout`'s), with the mean,
/// crop and resize its metadata overrides, and `mean_image` (the file's [`MEAN_IMAGE`] tensor)
/// subtracted pixel by pixel. Any value that does not parse is an error naming its key: a
/// pipeline is never guessed.
///
/// ```
/// use std::collections::BTreeMap;
/// use candle_zoo::models::alexnet::Layout;
/// use candle_zoo::weights::metadata;
/// let meta = BTreeMap::from([
///     ("preprocess.mean".to_string(), "104,117,123".to_string()),
///     ("preprocess.crop".to_string(), "224".to_string()),
/// ]);
/// let p = metadata::preprocess(&meta, Layout::CaffeNet, None)?;
/// assert_eq!((p.mean, p.crop, p.bgr), ([104.0, 117.0, 123.0], 224, true));
/// # Ok::<(), candle_zoo::Error>(())
/// ```
pub fn preprocess(
    meta: &BTreeMap<String, String>,
    layout: Layout,
    mean_image: Option<&Tensor>,
) -> Result<Preprocess> {
    let bad = |key: &str, value: &str, expected: &str| {
        Error::Invalid(format!("metadata `{key}` = `{value}`: expected {expected}"))
    };
    let mut p = match meta.get(PREPROCESS) {
        Some(name) => name.parse::<Preset>()?.pipeline(),
        None => Preprocess::for_layout(layout),
    };
    if let Some(mean) = meta.get(PREPROCESS_MEAN) {
        let values: Vec<f32> = mean
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(PREPROCESS_MEAN, mean, "three numbers `a,b,c`"))?;
        p.mean = values
            .try_into()
            .map_err(|_| bad(PREPROCESS_MEAN, mean, "three numbers `a,b,c`"))?;
    }
    if let Some(crop) = meta.get(PREPROCESS_CROP) {
        p.crop = crop
            .trim()
            .parse()
            .ok()
            .filter(|&c| (63..=4096).contains(&c))
            .ok_or_else(|| bad(PREPROCESS_CROP, crop, "a crop side in 63..=4096"))?;
    }
    if let Some(resize) = meta.get(PREPROCESS_RESIZE) {
        p.resize = parse_resize(resize)
            .ok_or_else(|| bad(PREPROCESS_RESIZE, resize, "`shorter:N` or `exact:WxH`"))?;
    }
    match mean_image {
        Some(t) => p.with_mean_image(mean_image_of(t)?),
        None => Ok(p),
    }
}

fn parse_resize(s: &str) -> Option<Resize> {
    let side = |v: &str| {
        v.trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| (1..=16384).contains(&n))
    };
    match s.trim().split_once(':')? {
        ("shorter", n) => Some(Resize::ShorterSide(side(n)?)),
        ("exact", wh) => {
            let (w, h) = wh.split_once('x')?;
            Some(Resize::Exact(side(w)?, side(h)?))
        }
        _ => None,
    }
}

/// A pipeline's mean image as the tensor stored under [`MEAN_IMAGE`], if it has one.
pub fn mean_image_tensor(p: &Preprocess) -> Result<Option<Tensor>> {
    p.mean_image
        .as_deref()
        .map(|m| -> Result<Tensor> {
            Ok(Tensor::from_slice(
                &m.values,
                (3, m.height, m.width),
                &Device::Cpu,
            )?)
        })
        .transpose()
}

/// A stored `(3, H, W)` mean image tensor as a [`MeanImage`].
fn mean_image_of(t: &Tensor) -> Result<MeanImage> {
    let bad = || {
        Error::Invalid(format!(
            "tensor `{MEAN_IMAGE}` has shape {:?}; expected (3, H, W)",
            t.dims()
        ))
    };
    let (c, height, width) = t.dims3().map_err(|_| bad())?;
    if c != 3 {
        return Err(bad());
    }
    Ok(MeanImage {
        height,
        width,
        values: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        for (key, value) in [
            (PREPROCESS, "sepia"),
            (PREPROCESS_MEAN, "1,2"),
            (PREPROCESS_CROP, "12"),
            (PREPROCESS_RESIZE, "shorter:-3"),
        ] {
            let meta = BTreeMap::from([(key.to_string(), value.to_string())]);
            let err = preprocess(&meta, Layout::TorchVision, None).unwrap_err();
            assert!(err.to_string().contains(value), "{key}: {err}");
        }
    }

    #[test]
    fn a_caffe_file_without_a_preset_gets_the_caffe_pipeline() -> Result<()> {
        let p = preprocess(&BTreeMap::new(), Layout::CaffeNet, None)?;
        assert_eq!(p, Preprocess::caffe());
        Ok(())
    }
}
