//! Pretrained vision models on [candle](https://github.com/huggingface/candle), starting with
//! AlexNet in both of its published layouts.
//!
//! The folders show the architecture:
//!
//! | module | what |
//! |---|---|
//! | [`models`] | the models, one folder each: [`models::alexnet`] ([`AlexNet`], its `Config`, `Layout` and `Tap`s) |
//! | [`layers`] | the layers candle lacks (LRN, adaptive average pool, a trainable overlapping max-pool) and the CPU conv and linear ops, with their kernels |
//! | [`weights`] | checkpoints, the registry of published weights ([`weights::AlexNetWeights`]), the hub, and the Caffe/ONNX/PyTorch converters |
//! | [`data`] | image inputs, preprocessing, augmentation, labelled datasets and feature files |
//! | [`dist`] | data-parallel training: the [`dist::Collective`] engines (MPI, NCCL) and the bucketed gradient all-reduce |
//! | [`train`] | the training loop, its checkpoints, evaluation, reports, the optimizer and its schedules, plots |
//! | `cli` | (feature `cli`) the flags the examples share |
//! | [`device`], [`io`], [`memory`], [`rng`] | device choice, atomic writes, keeping freed memory, the seeded RNG |
//!
//! ```no_run
//! use candle_core::Device;
//! use candle_nn::Module;
//! use candle_zoo::data::imagenet;
//! use candle_zoo::weights::AlexNetWeights;
//!
//! let device = Device::Cpu;
//! let (model, preprocess) = AlexNetWeights::default().load(&device)?;
//! let image = preprocess.load_batch(&["assets/chelsea.png"], &device)?;
//! for (class, p) in &model.top_k(&image, 5)?[0] {
//!     println!("{p:.3} {}", imagenet::classes()[*class]);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! | feature | effect |
//! |---|---|
//! | `pretrained` | `weights::hub`: downloads from the Hugging Face hub (pulls in an HTTP client, `ureq` with rustls) |
//! | `cli` | `cli`: the examples' shared flags and progress display (pulls in clap and indicatif) |
//! | `mpi` | `dist::mpi`: data-parallel training over MPI (rsmpi; needs an MPI library and libclang to build) |
//! | `nccl` | `dist::nccl`: data-parallel training over NCCL on CUDA GPUs (implies `cuda`) |
//! | `cuda`, `cudnn`, `metal`, `mkl`, `accelerate` | candle's backends |

#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
mod error;
pub mod io;
pub mod layers;
pub mod memory;
pub mod models;
pub mod rng;
pub mod train;
pub mod weights;

pub use error::{Error, HubError, Result};
pub use models::alexnet;
pub use models::AlexNet;

// Names from before 0.2, kept for one release.

/// The AlexNet config's old place.
#[deprecated(since = "0.2.0", note = "use `candle_zoo::models::alexnet::Config`")]
pub type Config = models::alexnet::Config;
/// The taps' old name and place.
#[deprecated(since = "0.2.0", note = "use `candle_zoo::models::alexnet::Tap`")]
pub type Layer = models::alexnet::Tap;
/// The layouts' old place.
#[deprecated(since = "0.2.0", note = "use `candle_zoo::models::alexnet::Layout`")]
pub type Layout = models::alexnet::Layout;

/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::data::augment`")]
pub mod augment {
    pub use crate::data::augment::*;
}
/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::weights::convert`")]
pub mod convert {
    pub use crate::weights::convert::*;
}
/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::data::dataset`")]
pub mod dataset {
    pub use crate::data::dataset::*;
}
/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::data::features`")]
pub mod features {
    pub use crate::data::features::*;
}
/// Old module path.
#[cfg(feature = "pretrained")]
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::weights::hub`")]
pub mod hub {
    pub use crate::weights::hub::*;
}
/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::data::imagenet`")]
pub mod imagenet {
    pub use crate::data::imagenet::*;
}
/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::train::optim`")]
pub mod optim {
    pub use crate::train::optim::*;
}
/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::train::plot`")]
pub mod plot {
    pub use crate::train::plot::*;
}
/// Old module path.
#[deprecated(since = "0.2.0", note = "moved to `candle_zoo::data::preprocess`")]
pub mod preprocess {
    pub use crate::data::preprocess::*;
}
