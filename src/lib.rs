//! Pretrained vision models on [candle](https://github.com/huggingface/candle), starting with
//! AlexNet in both of its published layouts.
//!
//! - [`alexnet`]: the model ([`AlexNet`]), its [`Config`] and [`Layout`]s, and the [`Layer`]
//!   taps for intermediate features;
//! - [`layers`]: LRN, adaptive average pooling and a trainable overlapping max-pool, which
//!   candle lacks;
//! - [`weights`]: local checkpoints (safetensors, PyTorch `.pth`) and the registry of known
//!   pretrained files; [`hub`]: downloads from the Hugging Face hub;
//! - [`convert`]: Caffe `.caffemodel`, ONNX and PyTorch AlexNet weights to safetensors;
//! - [`data`]: finding images and decoding them on worker threads; [`features`]: feature
//!   matrices for many images, resumable and written atomically;
//! - [`preprocess`]: image loading and the torchvision and Caffe input pipelines;
//! - training: [`dataset`] (labelled image folders, a loader on worker threads), [`augment`]
//!   (the paper's crops, mirrors and PCA lighting), [`rng`] (the seeded RNG every random draw
//!   comes from), [`optim`] (SGD with momentum, weight decay, parameter groups and schedules),
//!   [`train`] (the loop, resumable checkpoints, metrics) and [`plot`] (training curves);
//! - [`cli`] (feature `cli`, on by default): the flags the examples share;
//! - [`imagenet`]: the 1000 ImageNet class names; [`device`]: device selection; [`io`]: atomic
//!   file writes; [`memory`]: keeping freed memory for the next step.
//!
//! ```no_run
//! use candle_core::Device;
//! use candle_nn::Module;
//! use candle_zoo::{imagenet, weights::Pretrained};
//!
//! let device = Device::Cpu;
//! let (model, preprocess) = Pretrained::default().load(&device)?;
//! let image = preprocess.load_batch(&["assets/chelsea.png"], &device)?;
//! let probs = candle_nn::ops::softmax(&model.forward(&image)?, 1)?;
//! for (class, p) in imagenet::top_k(&probs.get(0)?, 5)? {
//!     println!("{p:.3} {}", imagenet::classes()[class]);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod alexnet;
pub mod augment;
#[cfg(feature = "cli")]
pub mod cli;
pub mod convert;
pub mod data;
pub mod dataset;
pub mod device;
mod error;
pub mod features;
pub mod hub;
pub mod imagenet;
pub mod io;
pub mod layers;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod preprocess;
pub mod rng;
pub mod train;
pub mod weights;

pub use alexnet::{AlexNet, Config, Layer, Layout};
pub use error::{Error, HubError, Result};
