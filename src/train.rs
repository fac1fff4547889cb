//! Training and fine-tuning: the loop, its checkpoints and its metrics.
//!
//! A [`Trainer`] owns a model whose weights live in a [`VarMap`], an [`Sgd`] optimizer with
//! parameter groups, a learning-rate [`Scheduler`] and the data. Each epoch it trains on
//! augmented batches decoded on worker threads, evaluates on the validation split, logs a row
//! to `metrics.csv`, redraws `metrics.png`, and writes `checkpoint.safetensors` atomically: the
//! model under its checkpoint key names (so the file loads like any other weights), the momentum
//! buffers, and the run's state (epoch, batch, dropout RNG, running sums, history) in the
//! header. A run stopped at any point resumes from its last checkpoint to the same weights as an
//! uninterrupted run: every random draw comes from the crate's seeded [`Rng`], as a function of
//! (seed, epoch, sample) for augmentation and a saved stream for dropout.
//!
//! ```no_run
//! use candle_core::Device;
//! use candle_zoo::alexnet::Config;
//! use candle_zoo::dataset::ImageFolder;
//! use candle_zoo::preprocess::Preprocess;
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

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::alexnet::{AlexNet, Config, Layer, Layout};
use crate::augment::Augment;
use crate::dataset::{epoch_order, ImageFolder, LabelledLoader};
use crate::error::{Error, Result};
use crate::optim::{LrSchedule, ParamGroup, Scheduler, Sgd, SgdConfig};
use crate::plot::{render_png, Chart, Series};
use crate::preprocess::Preprocess;
use crate::rng::Rng;
use crate::weights::{save_safetensors, Checkpoint};

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

const META_STATE: &str = "train.state";
const META_CONFIG: &str = "train.config";
const META_CLASSES: &str = "classes";
const META_DROPOUT: &str = "model.dropout";
/// Stream id of the dropout masks (sample ids are indices, far below it).
const DROPOUT_STREAM: u64 = u64::MAX - 1;
/// Stream id of the initial weights.
const INIT_STREAM: u64 = u64::MAX - 2;

/// Which parameters train, and how fast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamPolicy {
    /// L2 weight decay of the weights (PyTorch's `weight_decay`).
    pub weight_decay: f64,
    /// Caffe's solver: biases learn at twice the rate, without weight decay.
    pub caffe_biases: bool,
    /// Learning-rate multiplier of the last layer: a new head learns faster than a pretrained
    /// backbone (Caffe's fine-tuning example uses 10).
    pub head_lr_mult: f64,
    /// Layers up to and including this one are frozen: they are left out of the optimizer and
    /// the forward pass detaches their output, so no gradient is computed for them.
    pub freeze_through: Option<Layer>,
}

impl Default for ParamPolicy {
    /// The paper's: weight decay 5e-4 on everything, one learning rate, nothing frozen.
    fn default() -> Self {
        Self {
            weight_decay: 5e-4,
            caffe_biases: false,
            head_lr_mult: 1.0,
            freeze_through: None,
        }
    }
}

/// How a run trains; saved in its checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub sgd: SgdConfig,
    pub schedule: LrSchedule,
    pub policy: ParamPolicy,
    /// Every random draw of the run derives from it.
    pub seed: u64,
    /// Threads decoding and augmenting images.
    pub workers: usize,
    /// Random horizontal mirrors.
    pub flip: bool,
    /// Standard deviation of the PCA lighting noise (the paper's 0.1; 0 turns it off).
    pub lighting: f32,
    /// Evaluate on the paper's ten crops (corners, centre and their mirrors) instead of the
    /// centre crop.
    pub ten_crop: bool,
    /// Also checkpoint every this many batches within an epoch (0: at the end of epochs only).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    /// The paper's recipe at a small batch: SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr
    /// x0.1 when validation top-1 stalls, flips and PCA lighting.
    fn default() -> Self {
        Self {
            epochs: 90,
            batch_size: 128,
            sgd: SgdConfig::default(),
            schedule: LrSchedule::Plateau {
                mode: crate::optim::PlateauMode::Max,
                factor: 0.1,
                patience: 5,
                threshold: 1e-4,
                min_lr: 0.0,
            },
            policy: ParamPolicy::default(),
            seed: 0,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            flip: true,
            lighting: 0.1,
            ten_crop: false,
            checkpoint_every: 0,
        }
    }
}

/// One epoch's figures. Accuracies are fractions in `[0, 1]`; validation figures are `None`
/// without a validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub train_top5: f64,
    pub val_loss: Option<f64>,
    pub val_top1: Option<f64>,
    pub val_top5: Option<f64>,
    /// Wall-clock seconds of the epoch, evaluation included.
    pub seconds: f64,
}

/// Loss and accuracy over a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub images: usize,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    /// `confusion[true][predicted]` image counts.
    pub confusion: Vec<Vec<u64>>,
    /// Images that could not be read, with why.
    pub failed: Vec<(PathBuf, String)>,
}

impl Evaluation {
    /// The confusion matrix as an aligned text table, one row per true class.
    ///
    /// ```
    /// use candle_zoo::train::Evaluation;
    /// let eval = Evaluation {
    ///     images: 3, loss: 0.5, top1: 2.0 / 3.0, top5: 1.0,
    ///     confusion: vec![vec![1, 1], vec![0, 1]], failed: vec![],
    /// };
    /// let table = eval.confusion_table(&["cat".into(), "dog".into()]);
    /// assert_eq!(table.lines().nth(1), Some("[0] cat   1   1"));
    /// ```
    pub fn confusion_table(&self, classes: &[String]) -> String {
        let labels: Vec<String> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| format!("[{i}] {c}"))
            .collect();
        let label_w = labels.iter().map(|l| l.len()).max().unwrap_or(0);
        let max = self.confusion.iter().flatten().max().copied().unwrap_or(0);
        let cell_w = max.to_string().len().max(classes.len().to_string().len()) + 3;
        let mut out = " ".repeat(label_w);
        for j in 0..classes.len() {
            out.push_str(&format!("{:>cell_w$}", format!("[{j}]")));
        }
        out.push('\n');
        for (label, row) in labels.iter().zip(&self.confusion) {
            out.push_str(&format!("{label:<label_w$}"));
            for n in row {
                out.push_str(&format!("{n:>cell_w$}"));
            }
            out.push('\n');
        }
        out
    }
}

/// What a running [`Trainer`] reports to its observer, which can stop the run by returning
/// `ControlFlow::Break`.
#[derive(Debug)]
pub enum Event<'a> {
    /// An epoch (1-based) starts or resumes at `done` of `batches` batches.
    EpochStart {
        epoch: usize,
        batches: usize,
        done: usize,
        lr: f64,
    },
    /// A training batch of `images` images is done.
    Batch {
        epoch: usize,
        batch: usize,
        images: usize,
        loss: f64,
    },
    /// An image was skipped because it could not be read.
    Skipped {
        path: &'a Path,
        error: &'a Error,
    },
    /// Evaluation of `images` images starts; [`Event::EvalBatch`] reports its progress.
    EvalStart {
        images: usize,
    },
    EvalBatch {
        images: usize,
    },
    /// An epoch ended; its row was logged.
    Epoch(&'a EpochRecord),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// Running sums of a training epoch (saved in mid-epoch checkpoints so that a resumed epoch
/// reports the same figures).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Tally {
    images: u64,
    loss_sum: f64,
    top1: u64,
    top5: u64,
    seconds: f64,
}

/// Where a run stands; the `train.state` entry of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunState {
    /// 0-based epoch in progress (or next).
    epoch: usize,
    /// Batches of `epoch` already trained.
    batch: usize,
    /// The dropout stream at that point.
    dropout_rng: Rng,
    tally: Tally,
    history: Vec<EpochRecord>,
    best_top1: Option<f64>,
}

impl RunState {
    fn start(seed: u64) -> Self {
        Self {
            epoch: 0,
            batch: 0,
            dropout_rng: Rng::stream(seed, &[0, DROPOUT_STREAM]),
            tally: Tally::default(),
            history: Vec::new(),
            best_top1: None,
        }
    }
}

/// Trains an [`AlexNet`] on an [`ImageFolder`], from scratch or from pretrained weights.
pub struct Trainer {
    model: AlexNet,
    sgd: Sgd,
    scheduler: Scheduler,
    config: TrainConfig,
    preprocess: Preprocess,
    train_set: Arc<ImageFolder>,
    val_set: Option<Arc<ImageFolder>>,
    device: Device,
    out: PathBuf,
    state: RunState,
    last_eval: Option<Evaluation>,
}

impl Trainer {
    /// A new run of a freshly initialised `model` (He-uniform weights and zero biases drawn
    /// from `config.seed`), writing into `out` (created if needed). `model.num_classes` must
    /// match the data's classes.
    pub fn new(
        model: &Config,
        preprocess: Preprocess,
        train: ImageFolder,
        val: Option<ImageFolder>,
        config: TrainConfig,
        out: impl AsRef<Path>,
        device: &Device,
    ) -> Result<Self> {
        Self::with_weights(model, &[], preprocess, train, val, config, out, device)
    }

    /// A new run whose weights start from `weights` (checkpoint key names, as
    /// [`AlexNet::named_tensors`] gives them); layers without an entry, such as a new head,
    /// keep their fresh initialisation. A weight of the wrong shape is an error naming it.
    #[allow(clippy::too_many_arguments)]
    pub fn with_weights(
        model: &Config,
        weights: &[(String, Tensor)],
        preprocess: Preprocess,
        train: ImageFolder,
        val: Option<ImageFolder>,
        config: TrainConfig,
        out: impl AsRef<Path>,
        device: &Device,
    ) -> Result<Self> {
        check_classes(model, &train)?;
        if let Some(val) = &val {
            check_classes(model, val)?;
        }
        let out = out.as_ref().to_path_buf();
        if out.join(CHECKPOINT).exists() {
            return Err(Error::Invalid(format!(
                "{} already holds a run ({CHECKPOINT}): resume it, or choose another output folder",
                out.display()
            )));
        }
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let varmap = VarMap::new();
        let net = AlexNet::new(model, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let vars = named_vars(&varmap);
        let head = format!("{}.", model.layout.key_prefixes()[7]);
        init_weights(&vars, &head, config.seed)?;
        for (key, t) in weights {
            let var = vars.get(key).ok_or_else(|| {
                Error::Invalid(format!(
                    "pretrained weight `{key}` has no place in a {} model",
                    model.layout
                ))
            })?;
            if var.dims() != t.dims() {
                return Err(Error::ShapeMismatch {
                    key: key.clone(),
                    expected: var.dims().to_vec(),
                    actual: t.dims().to_vec(),
                });
            }
            var.set(&t.to_device(device)?.to_dtype(DType::F32)?)?;
        }
        let groups = param_groups(&net, &vars, &config.policy)?;
        let sgd = Sgd::new(groups, config.sgd)?;
        let scheduler = Scheduler::new(config.schedule.clone(), config.sgd.lr);
        Ok(Self {
            model: net,
            sgd,
            scheduler,
            state: RunState::start(config.seed),
            config,
            preprocess,
            train_set: Arc::new(train),
            val_set: val.map(Arc::new),
            device: device.clone(),
            out,
            last_eval: None,
        })
    }

    /// Continues the run in `out` from its checkpoint, with the settings it was started with.
    /// `epochs` (to extend a run) and `workers` may differ; the data must have the same classes.
    pub fn resume(
        out: impl AsRef<Path>,
        train: ImageFolder,
        val: Option<ImageFolder>,
        epochs: Option<usize>,
        workers: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let out = out.as_ref().to_path_buf();
        let path = out.join(CHECKPOINT);
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "nothing to resume: {} does not exist",
                path.display()
            )));
        }
        let ckpt = Checkpoint::open(&path)?;
        let meta = ckpt.metadata();
        let json = |key: &str| -> Result<&String> {
            meta.get(key)
                .ok_or_else(|| Error::checkpoint(&path, format!("no `{key}` in its metadata")))
        };
        let bad =
            |key: &str, e: serde_json::Error| Error::checkpoint(&path, format!("`{key}`: {e}"));
        let mut config: TrainConfig =
            serde_json::from_str(json(META_CONFIG)?).map_err(|e| bad(META_CONFIG, e))?;
        let state: RunState =
            serde_json::from_str(json(META_STATE)?).map_err(|e| bad(META_STATE, e))?;
        let classes: Vec<String> =
            serde_json::from_str(json(META_CLASSES)?).map_err(|e| bad(META_CLASSES, e))?;
        let scheduler: Scheduler = serde_json::from_str(json("train.scheduler")?)
            .map_err(|e| bad("train.scheduler", e))?;
        for (split, data) in [("training", Some(&train)), ("validation", val.as_ref())] {
            if let Some(data) = data {
                if data.classes() != classes.as_slice() {
                    return Err(Error::Invalid(format!(
                        "the {split} data in {} has classes {:?}, but the run in {} was trained \
                         on {:?}",
                        data.root().display(),
                        data.classes(),
                        out.display(),
                        classes
                    )));
                }
            }
        }
        if let Some(e) = epochs {
            config.epochs = e;
        }
        if let Some(w) = workers {
            config.workers = w;
        }
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu)?;
        let mut model_config = ckpt.config(&vb)?;
        if let Some(p) = meta.get(META_DROPOUT) {
            model_config.dropout = p
                .parse()
                .map_err(|e| Error::checkpoint(&path, format!("`{META_DROPOUT}`: {e}")))?;
        }
        let preprocess = ckpt.preprocess_for(model_config.layout)?;
        let tensors = candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::checkpoint(&path, e))?;
        let varmap = VarMap::new();
        let net = AlexNet::new(
            &model_config,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        let vars = named_vars(&varmap);
        for (key, var) in &vars {
            let t = tensors
                .get(key)
                .ok_or_else(|| Error::checkpoint(&path, format!("missing tensor `{key}`")))?;
            var.set(t)?;
        }
        let groups = param_groups(&net, &vars, &config.policy)?;
        let mut sgd = Sgd::new(groups, config.sgd)?;
        sgd.load_state(&tensors, meta)?;
        Ok(Self {
            model: net,
            sgd,
            scheduler,
            config,
            preprocess,
            train_set: Arc::new(train),
            val_set: val.map(Arc::new),
            device: device.clone(),
            out,
            state,
            last_eval: None,
        })
    }

    /// The model being trained (its weights are the run's variables).
    pub fn model(&self) -> &AlexNet {
        &self.model
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The epochs finished so far.
    pub fn history(&self) -> &[EpochRecord] {
        &self.state.history
    }

    /// The last evaluation (with its confusion matrix), if any ran in this process.
    pub fn last_evaluation(&self) -> Option<&Evaluation> {
        self.last_eval.as_ref()
    }

    /// The class names, in label order.
    pub fn classes(&self) -> Vec<String> {
        self.train_set.classes().to_vec()
    }

    /// The device the run computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The output folder.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// Trains until `config.epochs` epochs are done or `observer` breaks.
    pub fn run(&mut self, observer: &mut dyn FnMut(Event) -> ControlFlow<()>) -> Result<()> {
        while self.state.epoch < self.config.epochs {
            if self.train_epoch(observer)?.is_break() {
                return Ok(());
            }
        }
        if let Some(eval) = &self.last_eval {
            write_confusion(
                &self.out.join(CONFUSION_CSV),
                eval,
                self.train_set.classes(),
            )?;
        }
        Ok(())
    }

    fn train_epoch(
        &mut self,
        observer: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>> {
        let epoch = self.state.epoch;
        let started = Instant::now();
        let seconds_before = self.state.tally.seconds;
        let cfg = &self.config;
        let order = epoch_order(self.train_set.len(), cfg.seed, epoch as u64, true);
        let mut augment = Augment::train(self.preprocess.clone());
        augment.flip = cfg.flip;
        augment.lighting = cfg.lighting;
        let loader = LabelledLoader::new(
            self.train_set.clone(),
            order,
            augment,
            cfg.batch_size,
            false,
            cfg.workers,
            cfg.seed,
            epoch as u64,
        )?;
        let batches = loader.len();
        let loader = loader.skip_batches(self.state.batch);
        let lr = self.sgd.lr();
        if observer(Event::EpochStart {
            epoch: epoch + 1,
            batches,
            done: self.state.batch,
            lr,
        })
        .is_break()
        {
            return Ok(ControlFlow::Break(()));
        }
        let freeze = cfg.policy.freeze_through;
        let every = cfg.checkpoint_every;
        for batch in loader {
            let batch = batch?;
            for (path, error) in &batch.failed {
                let _ = observer(Event::Skipped { path, error });
            }
            self.state.batch += 1;
            if !batch.is_empty() {
                let (x, y) = batch.tensors(&self.device)?;
                let logits = self
                    .model
                    .forward_train(&x, &mut self.state.dropout_rng, freeze)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
                self.sgd.backward_step(&loss)?;
                let loss = loss.to_scalar::<f32>()? as f64;
                let (top1, top5) = hits(&logits, &batch.labels)?;
                let t = &mut self.state.tally;
                t.images += batch.len() as u64;
                t.loss_sum += loss * batch.len() as f64;
                t.top1 += top1;
                t.top5 += top5;
                let flow = observer(Event::Batch {
                    epoch: epoch + 1,
                    batch: self.state.batch,
                    images: batch.len(),
                    loss,
                });
                if flow.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            if every > 0 && self.state.batch.is_multiple_of(every) && self.state.batch < batches {
                self.state.tally.seconds = seconds_before + started.elapsed().as_secs_f64();
                self.save_checkpoint(observer)?;
            }
        }
        // The epoch's figures.
        let eval = match &self.val_set {
            Some(val) => {
                let augment = Augment::eval(self.preprocess.clone());
                Some(evaluate(
                    &self.model,
                    val.clone(),
                    &augment,
                    self.config.batch_size,
                    self.config.workers,
                    self.config.ten_crop,
                    &self.device,
                    observer,
                )?)
            }
            None => None,
        };
        let t = &self.state.tally;
        let n = t.images.max(1) as f64;
        let record = EpochRecord {
            epoch: epoch + 1,
            lr,
            train_loss: t.loss_sum / n,
            train_top1: t.top1 as f64 / n,
            train_top5: t.top5 as f64 / n,
            val_loss: eval.as_ref().map(|e| e.loss),
            val_top1: eval.as_ref().map(|e| e.top1),
            val_top5: eval.as_ref().map(|e| e.top5),
            seconds: seconds_before + started.elapsed().as_secs_f64(),
        };
        let monitored = record.val_top1.unwrap_or(record.train_top1);
        let next_lr = self.scheduler.epoch_end(Some(monitored))?;
        self.sgd.set_lr(next_lr);
        let best = self.state.best_top1.is_none_or(|b| monitored > b);
        self.state.history.push(record.clone());
        self.state.epoch += 1;
        self.state.batch = 0;
        self.state.tally = Tally::default();
        self.state.dropout_rng =
            Rng::stream(self.config.seed, &[self.state.epoch as u64, DROPOUT_STREAM]);
        if best {
            self.state.best_top1 = Some(monitored);
            let path = self.out.join(BEST);
            save_safetensors(&path, &self.model.named_tensors(), &self.model_metadata()?)?;
        }
        self.last_eval = eval;
        write_metrics(&self.out, &self.state.history)?;
        let _ = observer(Event::Epoch(&record));
        self.save_checkpoint(observer)?;
        Ok(ControlFlow::Continue(()))
    }

    /// Metadata that lets the weights load on their own: layout, preprocessing, classes.
    fn model_metadata(&self) -> Result<BTreeMap<String, String>> {
        let mut meta = self.preprocess.metadata();
        meta.insert(
            crate::weights::META_LAYOUT.to_string(),
            self.model.layout().name().to_string(),
        );
        meta.insert(
            META_CLASSES.to_string(),
            serde_json::to_string(self.train_set.classes()).map_err(json_err)?,
        );
        meta.insert(
            META_DROPOUT.to_string(),
            self.model.config().dropout.to_string(),
        );
        Ok(meta)
    }

    fn save_checkpoint(&self, observer: &mut dyn FnMut(Event) -> ControlFlow<()>) -> Result<()> {
        let mut meta = self.model_metadata()?;
        meta.insert(
            META_CONFIG.into(),
            serde_json::to_string(&self.config).map_err(json_err)?,
        );
        meta.insert(
            META_STATE.into(),
            serde_json::to_string(&self.state).map_err(json_err)?,
        );
        meta.insert(
            "train.scheduler".into(),
            serde_json::to_string(&self.scheduler).map_err(json_err)?,
        );
        meta.extend(self.sgd.state_metadata());
        let mut tensors = self.model.named_tensors();
        tensors.extend(self.sgd.state_tensors());
        if let Some(mean) = &self.preprocess.mean_image {
            tensors.push((
                crate::convert::MEAN_IMAGE_KEY.to_string(),
                Tensor::from_slice(&mean.values, (3, mean.height, mean.width), &Device::Cpu)?,
            ));
        }
        let path = self.out.join(CHECKPOINT);
        save_safetensors(&path, &tensors, &meta)?;
        let _ = observer(Event::Checkpoint(&path));
        Ok(())
    }
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Invalid(format!("serialising the training state: {e}"))
}

fn check_classes(model: &Config, data: &ImageFolder) -> Result<()> {
    if data.classes().len() != model.num_classes {
        return Err(Error::Invalid(format!(
            "{} has {} classes but the model has {} outputs",
            data.root().display(),
            data.classes().len(),
            model.num_classes
        )));
    }
    Ok(())
}

/// Fresh weights from the run's seed (candle's own initialisers draw from its unseeded RNG):
/// He-uniform weights, `U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`, which keep the scale of ReLU
/// activations through the layers (PyTorch's default shrinks them layer by layer, and a small
/// AlexNet then barely starts), a head at a tenth of that, and zero biases.
fn init_weights(vars: &HashMap<String, Var>, head: &str, seed: u64) -> Result<()> {
    let mut keys: Vec<&String> = vars.keys().collect();
    keys.sort();
    for (i, key) in keys.into_iter().enumerate() {
        let var = &vars[key];
        let dims = var.dims().to_vec();
        let n = var.elem_count();
        let values = if key.ends_with(".weight") {
            let fan_in: usize = dims[1..].iter().product();
            // The head starts 10x smaller: near-uniform first predictions, a loss near
            // ln(classes), instead of large random logits that the first steps overshoot.
            let scale = if key.starts_with(head) { 0.1 } else { 1.0 };
            let bound = scale * (6.0 / fan_in.max(1) as f64).sqrt() as f32;
            let mut rng = Rng::stream(seed, &[INIT_STREAM, i as u64]);
            (0..n)
                .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                .collect()
        } else {
            vec![0f32; n]
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// The run's variables by checkpoint key.
fn named_vars(varmap: &VarMap) -> HashMap<String, Var> {
    varmap
        .data()
        .lock()
        .expect("VarMap lock poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The optimizer's parameter groups under `policy`: frozen layers left out; biases at 2x lr
/// without decay under Caffe's policy; the head (`fc8`) at `head_lr_mult`.
pub fn param_groups(
    model: &AlexNet,
    vars: &HashMap<String, Var>,
    policy: &ParamPolicy,
) -> Result<Vec<ParamGroup>> {
    if policy.freeze_through == Some(Layer::Logits) {
        return Err(Error::Invalid(
            "freezing through the logits leaves nothing to train".into(),
        ));
    }
    // The tap at the end of each learnable layer, to compare with `freeze_through`.
    const ENDS: [Layer; 8] = [
        Layer::Conv1,
        Layer::Conv2,
        Layer::Conv3,
        Layer::Conv4,
        Layer::Conv5,
        Layer::Fc6,
        Layer::Fc7,
        Layer::Logits,
    ];
    let keys = model.layout().key_prefixes();
    let (bias_lr, bias_wd) = if policy.caffe_biases {
        (2.0, 0.0)
    } else {
        (1.0, policy.weight_decay)
    };
    let mut groups: Vec<ParamGroup> = Vec::new();
    let mut add = |name: &str, key: String, lr: f64, wd: f64| -> Result<()> {
        let var = vars
            .get(&key)
            .ok_or_else(|| Error::Invalid(format!("no variable `{key}` in the model")))?
            .clone();
        match groups.iter_mut().find(|g| g.name == name) {
            Some(g) => g.params.push((key, var)),
            None => groups.push(
                ParamGroup::new(name, vec![(key, var)])
                    .lr_mult(lr)
                    .weight_decay(wd),
            ),
        }
        Ok(())
    };
    for (i, (prefix, end)) in keys.iter().zip(ENDS).enumerate() {
        if policy.freeze_through.is_some_and(|f| end <= f) {
            continue;
        }
        let head = if i == 7 { policy.head_lr_mult } else { 1.0 };
        let tag = if i == 7 { "head " } else { "" };
        add(
            &format!("{tag}weights"),
            format!("{prefix}.weight"),
            head,
            policy.weight_decay,
        )?;
        add(
            &format!("{tag}biases"),
            format!("{prefix}.bias"),
            head * bias_lr,
            bias_wd,
        )?;
    }
    Ok(groups)
}

/// Top-1 and top-5 hits of a batch of logits.
fn hits(logits: &Tensor, labels: &[u32]) -> Result<(u64, u64)> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut top1, mut top5) = (0, 0);
    for (row, &label) in rows.iter().zip(labels) {
        let rank = rank_of(row, label as usize);
        top1 += (rank == 0) as u64;
        top5 += (rank < 5) as u64;
    }
    Ok((top1, top5))
}

/// How many classes score strictly higher than `label` (ties count in the label's favour).
fn rank_of(row: &[f32], label: usize) -> usize {
    let s = row[label];
    row.iter().filter(|&&v| v > s).count()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Loss, top-1, top-5 and the confusion matrix of `model` on `data`, in eval mode (no
/// dropout), on the centre crop of `augment`'s pipeline or, with `ten_crop`, the softmax
/// averaged over the paper's ten crops.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &AlexNet,
    data: Arc<ImageFolder>,
    augment: &Augment,
    batch_size: usize,
    workers: usize,
    ten_crop: bool,
    device: &Device,
    observer: &mut dyn FnMut(Event) -> ControlFlow<()>,
) -> Result<Evaluation> {
    let classes = model.num_classes();
    let mut eval = Evaluation {
        images: 0,
        loss: 0.0,
        top1: 0.0,
        top5: 0.0,
        confusion: vec![vec![0; classes]; classes],
        failed: Vec::new(),
    };
    let (mut loss_sum, mut top1, mut top5) = (0.0, 0u64, 0u64);
    let _ = observer(Event::EvalStart { images: data.len() });
    let mut score = |probs: Vec<Vec<f32>>, labels: &[u32], eval: &mut Evaluation| {
        for (row, &label) in probs.iter().zip(labels) {
            let label = label as usize;
            let rank = rank_of(row, label);
            top1 += (rank == 0) as u64;
            top5 += (rank < 5) as u64;
            loss_sum -= (row[label].max(1e-30) as f64).ln();
            eval.confusion[label][argmax(row)] += 1;
            eval.images += 1;
        }
    };
    if ten_crop {
        for (path, label) in data.samples() {
            let crops = match augment
                .preprocess
                .open(path)
                .and_then(|img| augment.ten_crop(&img))
            {
                Ok(c) => c,
                Err(e) => {
                    let _ = observer(Event::Skipped { path, error: &e });
                    eval.failed.push((path.clone(), e.to_string()));
                    continue;
                }
            };
            let side = augment.preprocess.crop as usize;
            let x = Tensor::from_vec(crops.concat(), (crops.len(), 3, side, side), device)?;
            let probs =
                candle_nn::ops::softmax(&model.forward_t(&x, false)?, 1)?.mean_keepdim(0)?;
            score(probs.to_vec2::<f32>()?, &[*label as u32], &mut eval);
            let _ = observer(Event::EvalBatch { images: 1 });
        }
    } else {
        let order: Vec<usize> = (0..data.len()).collect();
        let loader = LabelledLoader::new(
            data.clone(),
            order,
            augment.clone(),
            batch_size,
            false,
            workers,
            0,
            0,
        )?;
        for batch in loader {
            let batch = batch?;
            for (path, error) in &batch.failed {
                let _ = observer(Event::Skipped { path, error });
                eval.failed.push((path.clone(), error.to_string()));
            }
            if batch.is_empty() {
                continue;
            }
            let (x, _) = batch.tensors(device)?;
            let probs = candle_nn::ops::softmax(&model.forward_t(&x, false)?, 1)?;
            score(probs.to_vec2::<f32>()?, &batch.labels, &mut eval);
            let _ = observer(Event::EvalBatch {
                images: batch.len(),
            });
        }
    }
    let n = eval.images.max(1) as f64;
    eval.loss = loss_sum / n;
    eval.top1 = top1 as f64 / n;
    eval.top5 = top5 as f64 / n;
    Ok(eval)
}

/// Rewrites `metrics.csv` and `metrics.png` from the history.
fn write_metrics(out: &Path, history: &[EpochRecord]) -> Result<()> {
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    let mut csv = String::from(
        "epoch,lr,train_loss,train_top1,train_top5,val_loss,val_top1,val_top5,seconds\n",
    );
    for r in history {
        csv.push_str(&format!(
            "{},{},{:.6},{:.6},{:.6},{},{},{},{:.1}\n",
            r.epoch,
            r.lr,
            r.train_loss,
            r.train_top1,
            r.train_top5,
            opt(r.val_loss),
            opt(r.val_top1),
            opt(r.val_top5),
            r.seconds
        ));
    }
    crate::io::write_atomic(out.join(METRICS_CSV), csv.as_bytes())?;
    let series = |name: &str, f: &dyn Fn(&EpochRecord) -> Option<f64>| Series {
        name: name.to_string(),
        points: history
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect(),
    };
    let pct = |v: f64| 100.0 * v;
    let charts = [
        Chart {
            title: "Loss".into(),
            x_label: "epoch".into(),
            y_label: "cross-entropy".into(),
            series: vec![
                series("train", &|r| Some(r.train_loss)),
                series("val", &|r| r.val_loss),
            ],
        },
        Chart {
            title: "Accuracy".into(),
            x_label: "epoch".into(),
            y_label: "%".into(),
            series: vec![
                series("train top-1", &|r| Some(pct(r.train_top1))),
                series("val top-1", &|r| r.val_top1.map(pct)),
                series("val top-5", &|r| r.val_top5.map(pct)),
            ],
        },
    ];
    render_png(&charts, out.join(METRICS_PNG))
}

/// Writes a confusion matrix as CSV: a header of predicted classes, one row per true class.
pub fn write_confusion(path: &Path, eval: &Evaluation, classes: &[String]) -> Result<()> {
    let mut csv = String::from("true\\predicted");
    for c in classes {
        csv.push(',');
        csv.push_str(&csv_field(c));
    }
    csv.push('\n');
    for (c, row) in classes.iter().zip(&eval.confusion) {
        csv.push_str(&csv_field(c));
        for n in row {
            csv.push_str(&format!(",{n}"));
        }
        csv.push('\n');
    }
    crate::io::write_atomic(path, csv.as_bytes())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The input pipeline of a model trained at another input size than its layout's: the crop
/// is `side`, and images are resized in the layout's proportion (torchvision 256/224 of the
/// shorter side, Caffe a 256/227 square warp).
pub fn pipeline_for_size(layout: Layout, side: u32) -> Preprocess {
    use crate::preprocess::Resize;
    let mut p = Preprocess::for_layout(layout);
    let base = p.crop as f64;
    let resize = (side as f64 * 256.0 / base).round() as u32;
    p.resize = match p.resize {
        Resize::ShorterSide(_) => Resize::ShorterSide(resize),
        Resize::Exact(..) => Resize::Exact(resize, resize),
    };
    p.crop = side;
    p
}
