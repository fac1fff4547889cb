//! Weights: files on disk, the registry of published ones, the hub they download from, and the
//! converters from the formats they were published in.
//!
//! | module | what |
//! |---|---|
//! | [`Checkpoint`] (`checkpoint.rs`) | a local safetensors or PyTorch `.pth` file, checked before any tensor is read, and the [`AlexNet`](crate::AlexNet) and pipeline it holds |
//! | [`metadata`] | the keys a weights file's header holds: layout, preprocessing, classes, source |
//! | [`AlexNetWeights`] (`registry.rs`) | the published AlexNet weights, with accuracy, checksums, and where they come from |
//! | `hub` (feature `pretrained`) | downloads from the Hugging Face hub, cached and checksummed |
//! | [`convert`] | Caffe `.caffemodel`, ONNX and PyTorch AlexNet weights to safetensors |
//! | [`checksum`] | SHA-256 and SHA-1 of files |
//!
//! ```no_run
//! use candle_zoo::weights::{AlexNetWeights, Checkpoint};
//! let device = candle_core::Device::Cpu;
//! // Published weights, by name:
//! let (model, preprocess) = AlexNetWeights::TorchVisionV1.load(&device)?;
//! // Any local AlexNet checkpoint:
//! let ckpt = Checkpoint::open("alexnet-owt-7be5be79.pth")?;
//! let (model, preprocess) = (ckpt.load(&device)?, ckpt.preprocess()?);
//! # Ok::<(), candle_zoo::Error>(())
//! ```

mod checkpoint;
pub mod checksum;
pub mod convert;
#[cfg(feature = "pretrained")]
pub mod hub;
pub mod metadata;
mod pth;
mod registry;

pub use checkpoint::{Checkpoint, Format};
pub use registry::{install_dir, AlexNetWeights, HubCopy, Published, WeightsInfo};

pub use crate::io::safetensors::save_safetensors;

#[allow(deprecated)]
pub use registry::Pretrained;

/// Old names of the metadata keys, now in [`metadata`].
#[deprecated(since = "0.2.0", note = "moved to `weights::metadata::LAYOUT`")]
pub const META_LAYOUT: &str = metadata::LAYOUT;
/// Old names of the metadata keys, now in [`metadata`].
#[deprecated(since = "0.2.0", note = "moved to `weights::metadata::PREPROCESS`")]
pub const META_PREPROCESS: &str = metadata::PREPROCESS;
