//! Training and fine-tuning: the loop, its checkpoints and its metrics.
//!
//! A [`Trainer`] owns a model whose weights live in candle variables, an [`Sgd`](optim::Sgd) optimizer
//! with parameter groups, a learning-rate [`Scheduler`](optim::Scheduler) and the data. Each epoch it trains on
//! augmented batches decoded on worker threads, evaluates on the validation split, logs a row
//! to `metrics.csv`, redraws `metrics.png`, and writes `checkpoint.safetensors` atomically: the
//! model under its checkpoint key names (so the file loads like any other weights), the momentum
//! buffers, and the run's state (epoch, batch, dropout RNG, running sums, history) in the
//! header. A run stopped at any point resumes from its last checkpoint to the same weights as an
//! uninterrupted run: every random draw comes from the crate's seeded [`crate::rng::Rng`], as a
//! function of (seed, epoch, sample) for augmentation and a saved stream for dropout.
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | [`TrainConfig`], [`ParamPolicy`] |
//! | `trainer.rs` | the loop: [`Trainer`], [`Event`] |
//! | `params.rs` | fresh seeded weights, pretrained ones on top, [`param_groups`] |
//! | `checkpoint.rs` | the training checkpoint format (what `--resume` reads) |
//! | `eval.rs` | [`evaluate`]: loss, top-1, top-5, confusion matrix, ten crops |
//! | `report.rs` | [`EpochRecord`], `metrics.csv`, `metrics.png`, `confusion.csv` |
//! | [`optim`] | [`Sgd`](optim::Sgd) with momentum and parameter groups, learning-rate schedules |
//! | [`plot`] | the curves |
//! | [`ablation`] | the paper's claims: variants x seeds, `ablation.{csv,md,png}` |
//!
//! ```no_run
//! use candle_core::Device;
//! use candle_zoo::data::dataset::ImageFolder;
//! use candle_zoo::data::preprocess::Preprocess;
//! use candle_zoo::models::alexnet::Config;
//! use candle_zoo::train::{TrainConfig, Trainer};
//!
//! let (train, val) = ImageFolder::open_splits("data/flowers")?;
//! let model = Config::torchvision().with_classes(train.classes().len());
//! let settings = TrainConfig::default();
//! let mut trainer = Trainer::new(
//!     &model, Preprocess::torchvision(), train, Some(val), settings, "runs/flowers", &Device::Cpu,
//! )?;
//! trainer.run(&mut |_| std::ops::ControlFlow::Continue(()))?;
//! # Ok::<(), candle_zoo::Error>(())
//! ```

pub mod ablation;
mod checkpoint;
mod config;
mod eval;
pub mod optim;
mod params;
pub mod plot;
mod report;
mod trainer;

pub use config::{ParamPolicy, Precision, TrainConfig};
pub use eval::{evaluate, Evaluation};
pub use params::param_groups;
pub use report::{write_confusion, EpochRecord};
pub use trainer::{Event, Trainer};

/// The file a run resumes from, in its output folder.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The weights of the epoch with the best validation top-1 (training top-1 without a
/// validation split).
pub const BEST: &str = "best.safetensors";
/// One row per epoch: `epoch,lr,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5,seconds`.
pub const METRICS_CSV: &str = "metrics.csv";
/// Loss and accuracy curves.
pub const METRICS_PNG: &str = "metrics.png";
/// The last evaluation's confusion matrix: rows are true classes, columns predictions.
pub const CONFUSION_CSV: &str = "confusion.csv";

/// The input pipeline of a model trained at another input size than its layout's.
#[deprecated(
    since = "0.2.0",
    note = "use `Preprocess::for_layout(layout).scaled_to(side)`"
)]
pub fn pipeline_for_size(
    layout: crate::models::alexnet::Layout,
    side: u32,
) -> crate::data::preprocess::Preprocess {
    crate::data::preprocess::Preprocess::for_layout(layout).scaled_to(side)
}
