//! Image data: finding inputs, decoding and preprocessing them, the paper's augmentation,
//! labelled datasets, and feature files.
//!
//! | module | what |
//! |---|---|
//! | [`collect_images`] (`inputs.rs`) | files, folders searched recursively, and `@lists` of paths |
//! | [`preprocess`] | image loading and the torchvision and Caffe input pipelines |
//! | `jpeg` (private) | the DCT-scaled decoder of baseline JPEGs that [`preprocess`] uses for large photos |
//! | [`BatchLoader`] (`loader.rs`) | decoding batches on worker threads while the model runs, in input order |
//! | [`augment`] | the paper's random crops, mirrors and PCA lighting; ten-crop testing |
//! | [`dataset`] | labelled image folders (torchvision's `ImageFolder`) and their training loader |
//! | [`features`] | feature matrices for many images, resumable and written atomically |
//! | [`imagenet`] | the 1000 ImageNet class names |
//!
//! ```no_run
//! use candle_zoo::data::{collect_images, preprocess::Preprocess, BatchLoader};
//!
//! let paths = collect_images(&["photos/", "@more.txt", "one.jpg"])?;
//! for batch in BatchLoader::new(paths, Preprocess::torchvision(), 32, 2, 0)? {
//!     let batch = batch?;
//!     let (tensor, ok) = batch.tensor(&candle_core::Device::Cpu)?;
//!     // `ok` lists the input indices of the tensor's rows; `batch.failed()` the others.
//! }
//! # Ok::<(), candle_zoo::Error>(())
//! ```

pub mod augment;
pub mod dataset;
pub mod features;
pub mod imagenet;
mod inputs;
mod jpeg;
mod loader;
pub mod preprocess;

pub use inputs::{collect_images, IMAGE_EXTENSIONS};
pub use loader::{Batch, BatchLoader, Loaded};

pub(crate) use inputs::walk_images;
pub(crate) use loader::{check_batch_size, guard_decode, OrderedPool};
