//! Checkpoints on disk and the registry of known pretrained AlexNet weights.
//!
//! [`Checkpoint`] opens a local safetensors file (memory-mapped) or a PyTorch `.pth` (zip
//! format), checks it before any tensor is read, and builds the [`AlexNet`] it holds.
//! [`Pretrained`] names the published weights; `weights/README.md` documents each in full.
//!
//! ```no_run
//! use candle_zoo::weights::Checkpoint;
//! let ckpt = Checkpoint::open("alexnet-owt-7be5be79.pth")?;
//! let model = ckpt.load(&candle_core::Device::Cpu)?;
//! let preprocess = ckpt.preprocess();
//! # Ok::<(), candle_zoo::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::alexnet::{AlexNet, Config, Layout};
use crate::error::{Error, Result};
use crate::hub::{Hub, HubFile};
use crate::preprocess::{Preprocess, Preset};

/// Metadata key naming the layout (`torchvision`, `alexnet`, `caffenet`) in files this crate
/// writes. Caffe's keys alone cannot tell AlexNet from CaffeNet.
pub const META_LAYOUT: &str = "layout";
/// Metadata key naming the preprocessing preset (`torchvision`, `caffe`).
pub const META_PREPROCESS: &str = "preprocess";

/// The on-disk format of a checkpoint, told by its first bytes rather than its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// PyTorch's zip format (`torch.save` since 1.6), as torchvision's `.pth` files.
    Pth,
}

/// A checked, not yet loaded, weights file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    keys: Vec<String>,
    metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens and validates a checkpoint: the format, the header, and (for safetensors) that the
    /// file holds every byte its header promises.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let mut magic = [0u8; 8];
        let got = read_up_to(&mut file, &mut magic).map_err(|e| Error::io(&path, e))?;
        if got >= 4 && magic[..4] == *b"PK\x03\x04" {
            let pth = candle_core::pickle::PthTensors::new(&path, None).map_err(|e| {
                Error::checkpoint(&path, format!("not a readable PyTorch zip checkpoint: {e}"))
            })?;
            let mut keys: Vec<String> = pth.tensor_infos().keys().cloned().collect();
            keys.sort();
            return Ok(Self {
                path,
                format: Format::Pth,
                keys,
                metadata: BTreeMap::new(),
            });
        }
        if got >= 2 && magic[0] == 0x80 && magic[1] <= 5 {
            return Err(Error::checkpoint(
                &path,
                "legacy (pre-1.6, non-zip) PyTorch serialization, which candle cannot read; \
                 re-save it with `torch.save(torch.load(path), new_path)` in PyTorch >= 1.6",
            ));
        }
        if got < 8 {
            return Err(Error::checkpoint(
                &path,
                format!("{len} bytes is too short for a checkpoint"),
            ));
        }
        let header_len = u64::from_le_bytes(magic);
        if header_len == 0 || header_len > 100 << 20 || 8 + header_len > len {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "neither safetensors nor a PyTorch zip checkpoint (a safetensors header of \
                     {header_len} bytes cannot fit in a {len}-byte file)"
                ),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(&path, e))?;
        let (keys, metadata, data_len) = parse_safetensors_header(&header).map_err(|reason| {
            Error::checkpoint(&path, format!("corrupt safetensors header: {reason}"))
        })?;
        let available = len - 8 - header_len;
        if data_len > available {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "truncated safetensors file: the header describes {data_len} bytes of tensor \
                     data but only {available} follow it"
                ),
            ));
        }
        Ok(Self {
            path,
            format: Format::Safetensors,
            keys,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Tensor names, sorted.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The safetensors `__metadata__` (empty for `.pth`).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// A [`VarBuilder`] over the file's tensors (memory-mapped for safetensors).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let err = |e: candle_core::Error| Error::checkpoint(&self.path, e);
        match self.format {
            // SAFETY: the file is mapped read-only; as with every mmap, it must not be truncated
            // while the model is alive.
            Format::Safetensors => unsafe {
                VarBuilder::from_mmaped_safetensors(&[&self.path], dtype, device).map_err(err)
            },
            Format::Pth => {
                let pth = candle_core::pickle::PthTensors::new(&self.path, None).map_err(err)?;
                Ok(VarBuilder::from_backend(
                    Box::new(pth),
                    dtype,
                    device.clone(),
                ))
            }
        }
    }

    /// The layout named in the metadata, if any.
    pub fn layout_hint(&self) -> Result<Option<Layout>> {
        self.metadata
            .get(META_LAYOUT)
            .map(|s| s.parse())
            .transpose()
    }

    /// The model config: from keys and shapes, with the layout from metadata where present.
    pub fn config(&self, vb: &VarBuilder) -> Result<Config> {
        let config = Config::from_checkpoint(vb).map_err(|e| match e {
            Error::UnknownLayout { .. } => Error::UnknownLayout {
                found: format!("{} in {}", preview(&self.keys), self.path.display()),
            },
            e => self.with_path(e),
        })?;
        match self.layout_hint()? {
            Some(layout) if layout.is_caffe() != config.layout.is_caffe() => {
                Err(Error::checkpoint(
                    &self.path,
                    format!(
                        "metadata says layout `{layout}` but the keys are those of `{}`",
                        config.layout
                    ),
                ))
            }
            Some(layout) => Ok(config.with_layout(layout)),
            None => Ok(config),
        }
    }

    /// Loads the model in f32 on `device`.
    pub fn load(&self, device: &Device) -> Result<AlexNet> {
        self.load_as(None, device)
    }

    /// Loads the model in f32 on `device`, with `layout` overriding the one the file implies
    /// (for CaffeNet weights saved without metadata).
    pub fn load_as(&self, layout: Option<Layout>, device: &Device) -> Result<AlexNet> {
        let vb = self.var_builder(DType::F32, device)?;
        let mut config = self.config(&vb)?;
        if let Some(layout) = layout {
            if layout.is_caffe() != config.layout.is_caffe() {
                return Err(Error::checkpoint(
                    &self.path,
                    format!(
                        "layout `{layout}` was asked for, but the keys are those of `{}`",
                        config.layout
                    ),
                ));
            }
            config.layout = layout;
        }
        AlexNet::new(&config, vb).map_err(|e| self.with_path(e))
    }

    /// The preprocessing the weights expect: from metadata, else the preset of the layout the
    /// file implies.
    pub fn preset(&self) -> Result<Preset> {
        self.preset_for(self.layout_hint()?.unwrap_or(self.implied_layout()))
    }

    /// The layout the keys alone imply (Caffe keys cannot tell CaffeNet from AlexNet).
    fn implied_layout(&self) -> Layout {
        if self.keys.iter().any(|k| k == "conv1.weight") {
            Layout::AlexNet
        } else {
            Layout::TorchVision
        }
    }

    /// The preprocessing for the weights loaded as `layout`: from metadata, else the layout's
    /// preset.
    pub fn preset_for(&self, layout: Layout) -> Result<Preset> {
        match self.metadata.get(META_PREPROCESS) {
            Some(p) => p.parse(),
            None => Ok(Preset::for_layout(layout)),
        }
    }

    /// [`Checkpoint::preset`] as a pipeline with the metadata's mean and crop overrides (see
    /// [`Preprocess::with_metadata`]) and a stored mean image, falling back to torchvision's on
    /// bad metadata.
    pub fn preprocess(&self) -> Preprocess {
        let layout = self
            .layout_hint()
            .ok()
            .flatten()
            .unwrap_or(self.implied_layout());
        self.preprocess_for(layout)
            .unwrap_or_else(|_| Preset::TorchVision.pipeline())
    }

    /// The pipeline for the weights loaded as `layout`: [`Checkpoint::preset_for`] with the
    /// metadata's mean and crop overrides and a stored mean image (tensor
    /// [`crate::convert::MEAN_IMAGE_KEY`]).
    pub fn preprocess_for(&self, layout: Layout) -> Result<Preprocess> {
        let p = self
            .preset_for(layout)?
            .pipeline()
            .with_metadata(&self.metadata)?;
        if !self
            .keys
            .iter()
            .any(|k| k == crate::convert::MEAN_IMAGE_KEY)
        {
            return Ok(p);
        }
        let t = self
            .var_builder(DType::F32, &Device::Cpu)?
            .get_unchecked(crate::convert::MEAN_IMAGE_KEY)
            .map_err(|e| Error::checkpoint(&self.path, e))?;
        p.with_mean_image(crate::convert::mean_image_of(&t)?)
            .map_err(|e| Error::checkpoint(&self.path, e))
    }

    fn with_path(&self, e: Error) -> Error {
        match e {
            Error::MissingKey { key, .. } => Error::MissingKey {
                key,
                hint: format!("{}; it has {}", self.path.display(), preview(&self.keys)),
            },
            Error::ShapeMismatch {
                key,
                expected,
                actual,
            } => Error::checkpoint(
                &self.path,
                Error::ShapeMismatch {
                    key,
                    expected,
                    actual,
                },
            ),
            e => e,
        }
    }
}

/// Writes named tensors and string metadata as a safetensors file, atomically.
///
/// ```
/// use std::collections::BTreeMap;
/// use candle_core::{Device, Tensor};
/// use candle_zoo::weights::{save_safetensors, Checkpoint};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("t.safetensors");
/// let t = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let meta = BTreeMap::from([("layout".to_string(), "caffenet".to_string())]);
/// save_safetensors(&path, &[("x".to_string(), t)], &meta)?;
/// assert_eq!(Checkpoint::open(&path)?.metadata()["layout"], "caffenet");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let cpu = tensors
        .iter()
        .map(|(k, t)| Ok((k.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    let bytes = safetensors::serialize(cpu, meta).map_err(|e| Error::checkpoint(path, e))?;
    let bytes = sorted_header(bytes).map_err(|e| Error::checkpoint(path, e))?;
    crate::io::write_atomic(path, &bytes)
}

/// Rewrites a safetensors header with its keys in sorted order. `safetensors` writes the
/// metadata from a `HashMap`, in a different order on every run; sorted, the same tensors and
/// metadata always give the same bytes, and so the same checksum.
fn sorted_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    let sorted = |v: serde_json::Value| -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let map: BTreeMap<String, serde_json::Value> = map.into_iter().collect();
                serde_json::to_value(map).expect("a map of JSON values")
            }
            v => v,
        }
    };
    let header: BTreeMap<String, serde_json::Value> =
        header.into_iter().map(|(k, v)| (k, sorted(v))).collect();
    let mut out = safetensors_prefix(&header);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// A safetensors file's first bytes for a header: its length, then its JSON padded with spaces
/// so that the data section starts 8-byte aligned, as safetensors writes it.
pub(crate) fn safetensors_prefix(header: &BTreeMap<String, serde_json::Value>) -> Vec<u8> {
    let mut json = serde_json::to_string(header).expect("JSON values serialise");
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// What a safetensors header tells: sorted keys, string metadata, and the byte length of the
/// data section.
type HeaderInfo = (Vec<String>, BTreeMap<String, String>, u64);

fn parse_safetensors_header(header: &[u8]) -> std::result::Result<HeaderInfo, String> {
    let json: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let obj = json.as_object().ok_or("the header is not a JSON object")?;
    let mut keys = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut data_len = 0u64;
    for (name, entry) in obj {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    if let Some(v) = v.as_str() {
                        metadata.insert(k.clone(), v.to_string());
                    }
                }
            }
            continue;
        }
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| format!("tensor `{name}` has no data_offsets"))?;
        data_len = data_len.max(end);
        keys.push(name.clone());
    }
    keys.sort();
    Ok((keys, metadata, data_len))
}

/// The first few of a list of keys, for error messages.
fn preview(keys: &[String]) -> String {
    const SHOWN: usize = 6;
    if keys.is_empty() {
        return "no tensors".into();
    }
    let head: Vec<&str> = keys.iter().take(SHOWN).map(|s| s.as_str()).collect();
    let more = keys.len().saturating_sub(SHOWN);
    if more > 0 {
        format!("[{}, ... {more} more]", head.join(", "))
    } else {
        format!("[{}]", head.join(", "))
    }
}

/// What is known about one published set of AlexNet weights. See `weights/README.md`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PretrainedInfo {
    pub name: &'static str,
    pub layout: Layout,
    /// The hub repo and file of a safetensors copy in this crate's key names, if one exists.
    pub hub_repo: Option<&'static str>,
    pub hub_file: Option<&'static str>,
    /// The hub revision to fetch: a commit hash where one is known, else a branch.
    pub hub_revision: &'static str,
    /// SHA-256 of the hub file, where known.
    pub hub_sha256: Option<&'static str>,
    /// The original release and its checksum as published (sha256 prefix or sha1).
    pub original: &'static str,
    pub original_checksum: &'static str,
    pub license: &'static str,
    /// ImageNet-1k validation accuracy (centre crop) reported by the publisher, in percent.
    pub top1: f32,
    pub top5: f32,
    pub preset: Preset,
}

/// The published AlexNet weights, by name.
///
/// | name | layout | top-1 / top-5 | source |
/// |---|---|---|---|
/// | `torchvision` (default) | torchvision | 56.522 / 79.066 | `alexnet-owt-7be5be79.pth`, torchvision `IMAGENET1K_V1` |
/// | `bvlc-alexnet` | alexnet (two-tower) | 57.1 / 80.2 | Caffe `bvlc_alexnet.caffemodel` |
/// | `bvlc-caffenet` | caffenet | 57.4 / 80.4 | Caffe `bvlc_reference_caffenet.caffemodel` |
///
/// ```
/// use candle_zoo::weights::Pretrained;
/// let p: Pretrained = "torchvision".parse()?;
/// assert_eq!(p, Pretrained::default());
/// assert_eq!(p.info().top1, 56.522);
/// # Ok::<(), candle_zoo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pretrained {
    /// torchvision `AlexNet_Weights.IMAGENET1K_V1`.
    #[default]
    TorchVisionV1,
    /// Caffe's BVLC AlexNet, two towers.
    BvlcAlexNet,
    /// Caffe's BVLC reference CaffeNet.
    BvlcCaffeNet,
}

impl Pretrained {
    pub const ALL: [Pretrained; 3] = [
        Pretrained::TorchVisionV1,
        Pretrained::BvlcAlexNet,
        Pretrained::BvlcCaffeNet,
    ];

    pub fn info(self) -> PretrainedInfo {
        match self {
            Pretrained::TorchVisionV1 => PretrainedInfo {
                name: "torchvision",
                layout: Layout::TorchVision,
                hub_repo: Some("theunnecessarythings/vision_models"),
                hub_file: Some("alexnet.safetensors"),
                hub_revision: "main",
                hub_sha256: None,
                original: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                original_checksum: "sha256 7be5be79...",
                license: "BSD-3-Clause (torchvision); ImageNet terms of access apply",
                top1: 56.522,
                top5: 79.066,
                preset: Preset::TorchVision,
            },
            Pretrained::BvlcAlexNet => PretrainedInfo {
                name: "bvlc-alexnet",
                layout: Layout::AlexNet,
                hub_repo: None,
                hub_file: None,
                hub_revision: "main",
                hub_sha256: None,
                original: "http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel",
                original_checksum: "sha1 9116a64c0fbe4459d18f4bb6b56d647b63920377",
                license: "unrestricted use (BVLC model zoo)",
                top1: 57.1,
                top5: 80.2,
                preset: Preset::Caffe,
            },
            Pretrained::BvlcCaffeNet => PretrainedInfo {
                name: "bvlc-caffenet",
                layout: Layout::CaffeNet,
                hub_repo: None,
                hub_file: None,
                hub_revision: "main",
                hub_sha256: None,
                original: "http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel",
                original_checksum: "sha1 4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46",
                license: "unrestricted use (BVLC model zoo)",
                top1: 57.4,
                top5: 80.4,
                preset: Preset::Caffe,
            },
        }
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The hub file holding these weights as safetensors, if one is known.
    pub fn hub_file(self) -> Option<HubFile> {
        let info = self.info();
        let mut file =
            HubFile::new(info.hub_repo?, info.hub_file?).with_revision(info.hub_revision);
        file.sha256 = info.hub_sha256.map(str::to_string);
        Some(file)
    }

    /// Fetches the weights from the hub (or its cache) and returns the local path.
    pub fn fetch(self, hub: &Hub) -> Result<PathBuf> {
        let file = self.hub_file().ok_or_else(|| {
            Error::Invalid(format!(
                "`{}` has no safetensors copy on the hub; convert the original ({}) with \
                 `cargo run --release --example convert` and pass it with --weights (see \
                 weights/README.md)",
                self.name(),
                self.info().original
            ))
        })?;
        hub.get(&file)
    }

    /// Fetches (with settings from the environment) and loads the model in f32, with its
    /// preprocessing.
    pub fn load(self, device: &Device) -> Result<(AlexNet, Preprocess)> {
        let path = self.fetch(&Hub::from_env())?;
        let model = Checkpoint::open(path)?.load_as(Some(self.info().layout), device)?;
        Ok((model, self.info().preset.pipeline()))
    }
}

impl fmt::Display for Pretrained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Pretrained {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase().replace('_', "-");
        Pretrained::ALL
            .into_iter()
            .find(|p| p.name() == lower)
            .ok_or_else(|| Error::UnknownModel {
                name: s.to_string(),
                known: Pretrained::ALL.map(|p| p.name()).join(", "),
            })
    }
}
