//! The flags of the `train` and `finetune` examples and the loop that reports their progress.

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::Device;

use super::Progress;
use crate::data::dataset::ImageFolder;
use crate::data::preprocess::Preprocess;
use crate::dist::{Engine, Placement};
use crate::error::{Error, Result};
use crate::models::alexnet::{Activation, Config, Layout, Pooling};
use crate::train::optim::{LrSchedule, SgdConfig};
use crate::train::{Event, ParamPolicy, Precision, TrainConfig, Trainer};

/// The architecture of a model trained from scratch (`train`, `ablate`): layout, widths, input
/// size, dropout and the variant (activation, pooling, LRN).
#[derive(Debug, Clone, clap::Args)]
pub struct ArchArgs {
    /// torchvision (one tower), bvlc-alexnet (two towers, LRN before pooling) or caffenet.
    #[arg(long, default_value = "torchvision")]
    pub layout: Layout,

    /// Output channels of conv1..conv5 (default: the layout's published widths).
    #[arg(long, value_delimiter = ',', value_name = "C1,C2,C3,C4,C5")]
    pub channels: Option<Vec<usize>>,

    /// Width of fc6 and fc7 (default: 4096).
    #[arg(long)]
    pub hidden: Option<usize>,

    /// Side of the square crops the model sees (default: 224, or 227 for the Caffe layouts;
    /// torchvision takes >= 63, the Caffe layouts 199..=230).
    #[arg(long)]
    pub input_size: Option<u32>,

    /// Dropout before (torchvision) or after (Caffe) fc6 and fc7.
    #[arg(long, default_value_t = 0.5)]
    pub dropout: f32,

    /// relu (published) or tanh.
    #[arg(long, default_value = "relu")]
    pub activation: Activation,

    /// overlapping (3x3, stride 2: published) or non-overlapping (2x2, stride 2).
    #[arg(long, default_value = "overlapping")]
    pub pooling: Pooling,

    /// LRN after conv1 and conv2: on or off (default: the layout's published choice, on in the
    /// Caffe layouts).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub lrn: Option<bool>,
}

impl ArchArgs {
    /// The model the flags describe, with `classes` outputs.
    pub fn config(&self, classes: usize) -> Result<Config> {
        let mut model = Config::for_layout(self.layout)
            .with_classes(classes)
            .with_dropout(self.dropout)
            .with_activation(self.activation)
            .with_pooling(self.pooling);
        if let Some(lrn) = self.lrn {
            model = model.with_lrn(lrn);
        }
        if let Some(c) = &self.channels {
            model.channels = c.as_slice().try_into().map_err(|_| {
                Error::Invalid(format!(
                    "--channels takes 5 widths (conv1..conv5), got {}",
                    c.len()
                ))
            })?;
        }
        if let Some(h) = self.hidden {
            model.hidden = h;
        }
        Ok(model)
    }

    /// The layout's pipeline, scaled to `--input-size`.
    pub fn preprocess(&self) -> Preprocess {
        let preprocess = Preprocess::for_layout(self.layout);
        match self.input_size {
            Some(side) => preprocess.scaled_to(side),
            None => preprocess,
        }
    }
}

/// `on`/`off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got `{s}`")),
    }
}

/// Flags shared by the `train` and `finetune` examples: data, output, the optimizer and its
/// schedule, augmentation and checkpointing.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// Dataset root holding `train/<class>/*` and, optionally, `val/<class>/*` (ImageFolder).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,

    /// Output folder: checkpoint.safetensors, best.safetensors, metrics.csv, metrics.png and
    /// confusion.csv.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Epochs to train (default: 90 for train, 10 for finetune).
    #[arg(long)]
    pub epochs: Option<usize>,

    /// Images per batch (default: 128 for train and finetune).
    #[arg(long, value_parser = super::parse_batch_size)]
    pub batch_size: Option<usize>,

    /// Base learning rate (default: 0.01 for train, 0.001 for finetune).
    #[arg(long)]
    pub lr: Option<f64>,

    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,

    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,

    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,

    /// Learning-rate schedule: `constant`, `step:EPOCHS:GAMMA` or
    /// `plateau:max|min:FACTOR:PATIENCE` (on validation top-1).
    #[arg(long, default_value = "plateau:max:0.1:5")]
    pub schedule: LrSchedule,

    /// Caffe's solver policy: biases at 2x the learning rate and without weight decay.
    #[arg(long)]
    pub caffe_biases: bool,

    /// Every random draw (shuffling, crops, flips, lighting, dropout) derives from it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Threads decoding and augmenting images (default: the cores).
    #[arg(long)]
    pub workers: Option<usize>,

    /// Train on the centre crop instead of random crops.
    #[arg(long)]
    pub no_random_crop: bool,

    /// Turn off random horizontal mirrors.
    #[arg(long)]
    pub no_flip: bool,

    /// Standard deviation of the PCA lighting noise (the paper's 0.1; 0 turns it off).
    #[arg(long, default_value_t = 0.1)]
    pub lighting: f32,

    /// Evaluate on ten crops (corners, centre and mirrors) instead of the centre crop.
    #[arg(long)]
    pub ten_crop: bool,

    /// Also checkpoint every N batches within an epoch (0: at the end of each epoch only).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub checkpoint_every: usize,

    /// Continue the run in --out from its checkpoint (settings come from the checkpoint;
    /// --epochs and --workers may change).
    #[arg(long)]
    pub resume: bool,

    /// Data-parallel engine: auto (one process unless mpirun, srun or torchrun started
    /// several: then NCCL on CUDA, else MPI), none, mpi or nccl. --batch-size is the global
    /// batch, split over the processes.
    #[arg(long, default_value = "auto")]
    pub engine: Engine,

    /// Training arithmetic: f32, or bf16 (mixed precision on CUDA: convs and fc layers in
    /// bfloat16, f32 master weights, updates and loss).
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
}

impl TrainArgs {
    /// The training settings the flags describe, `defaults` (the example's epochs, batch size,
    /// learning rate and parameter policy) for what was not given.
    pub fn config(&self, defaults: TrainConfig) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs.unwrap_or(defaults.epochs),
            batch_size: self.batch_size.unwrap_or(defaults.batch_size),
            sgd: SgdConfig {
                lr: self.lr.unwrap_or(defaults.sgd.lr),
                momentum: self.momentum,
                nesterov: self.nesterov,
                ..defaults.sgd
            },
            schedule: self.schedule.clone(),
            policy: ParamPolicy {
                weight_decay: self.weight_decay,
                caffe_biases: self.caffe_biases,
                ..defaults.policy
            },
            seed: self.seed,
            workers: self.workers.unwrap_or(defaults.workers),
            random_crop: !self.no_random_crop,
            flip: !self.no_flip,
            lighting: self.lighting,
            ten_crop: self.ten_crop,
            checkpoint_every: self.checkpoint_every,
            precision: self.precision,
        }
    }

    /// `DATA/train` and, when it exists, `DATA/val` with the training split's classes.
    pub fn open_data(&self) -> Result<(ImageFolder, Option<ImageFolder>)> {
        let train = ImageFolder::open(self.data.join("train"))?;
        let val_dir = self.data.join("val");
        let val = if val_dir.is_dir() {
            Some(ImageFolder::open_with_classes(&val_dir, train.classes())?)
        } else {
            None
        };
        Ok((train, val))
    }

    /// This process's place in the run --engine asks for, on `device` (a CUDA device becomes
    /// the process's own GPU in a multi-process launch): see [`crate::dist::connect`].
    pub fn connect(&self, device: &Device) -> Result<Placement> {
        crate::dist::connect(self.engine, device)
    }

    /// `Trainer::resume` on --out, or `start` for a new run; refuses to start over an existing
    /// run without --resume.
    pub fn trainer(
        &self,
        placement: Placement,
        start: impl FnOnce(ImageFolder, Option<ImageFolder>, Placement) -> Result<Trainer>,
    ) -> Result<Trainer> {
        let (train, val) = self.open_data()?;
        if self.resume {
            Trainer::resume(&self.out, train, val, self.epochs, self.workers, placement)
        } else {
            start(train, val, placement)
        }
    }
}

/// Runs a trainer to the end with a progress bar per epoch and a summary line per epoch,
/// after a line saying what runs where (`what`: "training", "fine-tuning").
/// In a data-parallel run, rank 0 alone reports progress and epochs; every rank reports the
/// images it skipped.
pub fn run_training(trainer: &mut Trainer, what: &str) -> Result<()> {
    let (rank, world) = (
        trainer.collective().rank(),
        trainer.collective().world_size(),
    );
    let quiet = rank != 0;
    let processes = match world {
        1 => String::new(),
        n => format!(
            " x {n} processes ({}, global batch {})",
            trainer.collective().engine(),
            trainer.config().batch_size
        ),
    };
    if !quiet {
        eprintln!(
            "{what} a {} AlexNet ({} classes) on {}{processes}; outputs in {}",
            trainer.model().layout(),
            trainer.model().num_classes(),
            crate::device::describe(trainer.device()),
            trainer.out_dir().display()
        );
    }
    let mut bar: Option<Progress> = None;
    let mut eval_bar: Option<Progress> = None;
    let mut skipped = 0usize;
    trainer.run(&mut |event| {
        if quiet {
            if let Event::Skipped { path, error } = event {
                skipped += 1;
                eprintln!("rank {rank}: skipped {}: {error}", path.display());
            }
            return ControlFlow::Continue(());
        }
        match event {
            Event::EpochStart {
                epoch,
                batches,
                done,
                lr,
            } => {
                bar = Some(Progress::new(
                    &format!("epoch {epoch} (lr {lr:.3e})"),
                    "batches",
                    batches as u64,
                    done as u64,
                ));
            }
            Event::Batch { .. } => {
                if let Some(b) = &mut bar {
                    b.inc(1);
                }
            }
            Event::Skipped { path, error } => {
                skipped += 1;
                let msg = format!("skipped {}: {error}", path.display());
                match &bar {
                    Some(b) => b.println(msg),
                    None => eprintln!("{msg}"),
                }
            }
            Event::EvalStart { images } => {
                if let Some(b) = bar.take() {
                    b.finish();
                }
                eval_bar = Some(Progress::new("evaluating", "images", images as u64, 0));
            }
            Event::EvalBatch { images } => {
                if let Some(b) = &mut eval_bar {
                    b.inc(images as u64);
                }
            }
            Event::Epoch(r) => {
                if let Some(b) = bar.take().or(eval_bar.take()) {
                    b.finish();
                }
                let val = match (r.val_loss, r.val_top1, r.val_top5) {
                    (Some(l), Some(t1), Some(t5)) => format!(
                        "; val loss {l:.4}, top-1 {:.2}%, top-5 {:.2}%",
                        100.0 * t1,
                        100.0 * t5
                    ),
                    _ => String::new(),
                };
                eprintln!(
                    "epoch {}: train loss {:.4}, top-1 {:.2}%{val} ({:.0} s)",
                    r.epoch,
                    r.train_loss,
                    100.0 * r.train_top1,
                    r.seconds
                );
            }
            Event::Checkpoint(_) => {}
        }
        ControlFlow::Continue(())
    })?;
    if skipped > 0 {
        eprintln!("{skipped} unreadable images were skipped (listed above)");
    }
    Ok(())
}
