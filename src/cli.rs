//! Command-line flags shared by the examples (feature `cli`): which weights, which device,
//! which preprocessing. The examples stay thin; programs of your own can flatten these too.
//!
//! ```
//! use clap::Parser;
//! use candle_zoo::cli::ModelArgs;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(flatten)]
//!     model: ModelArgs,
//! }
//! let args = Args::parse_from(["prog", "--weights", "alexnet.safetensors", "--device", "cpu"]);
//! assert_eq!(args.model.source(), "alexnet.safetensors");
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::Device;

use crate::alexnet::{AlexNet, Layout};
use crate::dataset::ImageFolder;
use crate::device::DeviceChoice;
use crate::error::Result;
use crate::hub::{Hub, HubFile};
use crate::optim::{LrSchedule, SgdConfig};
use crate::preprocess::{Preprocess, Preset};
use crate::train::{Event, ParamPolicy, TrainConfig, Trainer};
use crate::weights::{Checkpoint, Pretrained};

/// Where the weights come from, the device, and preprocessing overrides.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Pretrained model from the registry: torchvision, bvlc-alexnet, bvlc-caffenet.
    #[arg(long, default_value = "torchvision", conflicts_with_all = ["weights", "model_id"])]
    pub model: Pretrained,

    /// A local checkpoint instead: .safetensors or PyTorch .pth (zip format).
    #[arg(long, value_name = "PATH", conflicts_with = "model_id")]
    pub weights: Option<PathBuf>,

    /// A hub repo instead (with --hub-file), e.g. theunnecessarythings/vision_models.
    #[arg(long, value_name = "OWNER/NAME", requires = "hub_file")]
    pub model_id: Option<String>,

    /// The file in --model-id's repo.
    #[arg(long, value_name = "FILE", requires = "model_id")]
    pub hub_file: Option<String>,

    /// Branch, tag or commit of --model-id (default: main).
    #[arg(long, value_name = "REV", requires = "model_id")]
    pub revision: Option<String>,

    /// Expected SHA-256 of the --model-id file; checked after download.
    #[arg(long, value_name = "HEX", requires = "model_id")]
    pub sha256: Option<String>,

    /// Override the layout the checkpoint implies (caffenet for CaffeNet weights without metadata).
    #[arg(long)]
    pub layout: Option<Layout>,

    /// Override the preprocessing preset: torchvision or caffe.
    #[arg(long)]
    pub preprocess: Option<Preset>,

    /// auto, cpu, cuda, cuda:N, metal or metal:N. auto picks CUDA, then Metal, then the CPU.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

/// A model ready to run, with the preprocessing its weights expect.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: AlexNet,
    pub preprocess: Preprocess,
    pub preset: Preset,
    /// The checkpoint file on disk.
    pub path: PathBuf,
}

impl ModelArgs {
    /// What the flags ask for, in words: a registry name, a path or `repo/file@revision`.
    pub fn source(&self) -> String {
        match (&self.weights, &self.model_id, &self.hub_file) {
            (Some(path), _, _) => path.display().to_string(),
            (None, Some(repo), Some(file)) => {
                format!(
                    "{repo}/{file}@{}",
                    self.revision.as_deref().unwrap_or("main")
                )
            }
            _ => self.model.name().to_string(),
        }
    }

    pub fn device(&self) -> Result<Device> {
        self.device.device()
    }

    /// Resolves the weights (downloading through the hub cache if needed) and loads the model.
    pub fn load(&self, device: &Device) -> Result<LoadedModel> {
        let (path, layout, preset) = match (&self.weights, &self.model_id, &self.hub_file) {
            (Some(path), _, _) => (path.clone(), self.layout, None),
            (None, Some(repo), Some(file)) => {
                let mut f = HubFile::new(repo, file);
                if let Some(rev) = &self.revision {
                    f = f.with_revision(rev);
                }
                if let Some(sha) = &self.sha256 {
                    f = f.with_sha256(sha);
                }
                (Hub::from_env().get(&f)?, self.layout, None)
            }
            (None, _, _) => {
                let info = self.model.info();
                let path = self.model.fetch(&Hub::from_env())?;
                (
                    path,
                    Some(self.layout.unwrap_or(info.layout)),
                    Some(info.preset),
                )
            }
        };
        let ckpt = Checkpoint::open(&path)?;
        let model = ckpt.load_as(layout, device)?;
        // --preprocess, else the registry's, else the file's metadata, else the layout's preset.
        let (preset, preprocess) = match (self.preprocess, preset) {
            (Some(p), _) | (None, Some(p)) => (p, p.pipeline()),
            (None, None) => (
                ckpt.preset_for(model.layout())?,
                ckpt.preprocess_for(model.layout())?,
            ),
        };
        Ok(LoadedModel {
            model,
            preprocess,
            preset,
            path,
        })
    }
}

/// Progress of a long job: on a terminal, a bar with the rate and ETA; in logs (stderr is not a
/// terminal), a plain line every few seconds and at the end.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    /// Done when this run started (a resumed run's earlier work does not count in the rate).
    first: u64,
    start: std::time::Instant,
    last_line: std::time::Instant,
}

impl Progress {
    /// How often a plain progress line is written to a log.
    pub const LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(label: &str, unit: &'static str, total: u64, done: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{prefix}} {{wide_bar}} {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}"
                ))
                .expect("a valid template"),
            );
            bar.set_prefix(label.to_string());
            bar.set_position(done);
            bar.reset_eta();
            bar
        });
        let now = std::time::Instant::now();
        Self {
            bar,
            label: label.to_string(),
            unit,
            total,
            done,
            first: done,
            start: now,
            last_line: now,
        }
    }

    /// Items per second in this run so far.
    pub fn rate(&self) -> f64 {
        (self.done - self.first) as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.last_line.elapsed() >= Self::LOG_EVERY => {
                self.last_line = std::time::Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    /// Prints a message without breaking the bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(msg.as_ref()),
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    fn line(&self) -> String {
        let rate = self.rate();
        let left = self.total.saturating_sub(self.done) as f64;
        let eta = if rate > 0.0 {
            format!("{:.0}s", left / rate)
        } else {
            "?".into()
        };
        format!(
            "{}: {}/{} {} ({:.1}%), {:.1} {}/s, ETA {eta}",
            self.label,
            self.done,
            self.total,
            self.unit,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            rate,
            self.unit
        )
    }

    /// Clears the bar, or writes the last plain line.
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None => eprintln!("{}", self.line()),
        }
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

    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,

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
}

impl TrainArgs {
    /// The training settings the flags describe, with the example's defaults for what was not
    /// given.
    pub fn config(
        &self,
        default_epochs: usize,
        default_lr: f64,
        policy: ParamPolicy,
    ) -> TrainConfig {
        let defaults = TrainConfig::default();
        TrainConfig {
            epochs: self.epochs.unwrap_or(default_epochs),
            batch_size: self.batch_size,
            sgd: SgdConfig {
                lr: self.lr.unwrap_or(default_lr),
                momentum: self.momentum,
                nesterov: self.nesterov,
                ..SgdConfig::default()
            },
            schedule: self.schedule.clone(),
            policy: ParamPolicy {
                weight_decay: self.weight_decay,
                caffe_biases: self.caffe_biases,
                ..policy
            },
            seed: self.seed,
            workers: self.workers.unwrap_or(defaults.workers),
            flip: !self.no_flip,
            lighting: self.lighting,
            ten_crop: self.ten_crop,
            checkpoint_every: self.checkpoint_every,
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

    /// `Trainer::resume` on --out, or `start` for a new run; refuses to start over an existing
    /// run without --resume.
    pub fn trainer(
        &self,
        device: &Device,
        start: impl FnOnce(ImageFolder, Option<ImageFolder>) -> Result<Trainer>,
    ) -> Result<Trainer> {
        let (train, val) = self.open_data()?;
        if self.resume {
            Trainer::resume(&self.out, train, val, self.epochs, self.workers, device)
        } else {
            start(train, val)
        }
    }
}

/// Runs a trainer to the end with a progress bar per epoch and a summary line per epoch,
/// after a line saying what runs where (`what`: "training", "fine-tuning").
pub fn run_training(trainer: &mut Trainer, what: &str) -> Result<()> {
    eprintln!(
        "{what} a {} AlexNet ({} classes) on {}; outputs in {}",
        trainer.model().layout(),
        trainer.model().num_classes(),
        crate::device::describe(trainer.device()),
        trainer.out_dir().display()
    );
    let mut bar: Option<Progress> = None;
    let mut eval_bar: Option<Progress> = None;
    let mut skipped = 0usize;
    trainer.run(&mut |event| {
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
