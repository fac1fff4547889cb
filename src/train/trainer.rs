//! The training loop: [`Trainer`] and the [`Event`]s it reports.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor, Var};

use super::checkpoint::{self, Run, RunState};
use super::eval::{evaluate, hits, Evaluation};
use super::optim::{Scheduler, Sgd};
use super::params::{build_model, param_groups, Start};
use super::report::{write_confusion, write_metrics, EpochRecord};
use super::{TrainConfig, BEST, CHECKPOINT, CONFUSION_CSV, METRICS_CSV, METRICS_PNG};
use crate::data::augment::Augment;
use crate::data::dataset::{epoch_order, ImageFolder, LabelledLoader};
use crate::data::preprocess::Preprocess;
use crate::dist::{Collective, GradSync, Placement, BUCKET_BYTES};
use crate::error::{Error, Result};
use crate::io::OutputLock;
use crate::models::alexnet::{AlexNet, Config};
use crate::weights::save_safetensors;

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

/// Trains an [`AlexNet`] on an [`ImageFolder`], from scratch or from pretrained weights.
///
/// In a data-parallel run (a [`Placement`] from [`crate::dist::connect`]) each process builds
/// its own trainer; `batch_size` is the global batch, split evenly over the ranks; rank 0 alone
/// evaluates and writes the output folder, and its figures are the whole batch's.
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
    /// Sums gradients and figures over the ranks (a no-op for one process).
    sync: GradSync,
    /// Every variable of the model, by checkpoint key.
    vars: Vec<(String, Var)>,
    /// Whether the ranks have checked their settings and taken rank 0's weights.
    joined: bool,
    /// The output folder's lock, held for the trainer's life (rank 0's alone).
    _lock: Option<OutputLock>,
}

/// Everything a run is made of, before the optimizer is built over the model.
struct Parts {
    model: AlexNet,
    vars: std::collections::HashMap<String, candle_core::Var>,
    preprocess: Preprocess,
    train: ImageFolder,
    val: Option<ImageFolder>,
    config: TrainConfig,
    out: PathBuf,
    lock: Option<OutputLock>,
    state: RunState,
    scheduler: Scheduler,
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
        placement: impl Into<Placement>,
    ) -> Result<Self> {
        Self::with_weights(model, &[], preprocess, train, val, config, out, placement)
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
        placement: impl Into<Placement>,
    ) -> Result<Self> {
        let placement = placement.into();
        let device = &placement.device;
        config.validate()?;
        for data in std::iter::once(&train).chain(&val) {
            if data.classes().len() != model.num_classes {
                return Err(Error::Invalid(format!(
                    "{} has {} classes but the model has {} outputs",
                    data.root().display(),
                    data.classes().len(),
                    model.num_classes
                )));
            }
        }
        let out = out.as_ref().to_path_buf();
        let lock = match placement.comm.rank() {
            0 => {
                std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
                let lock = lock_output(&out)?;
                if out.join(CHECKPOINT).exists() {
                    return Err(Error::Invalid(format!(
                        "{} already holds a run ({CHECKPOINT}): resume it, or choose another \
                         output folder",
                        out.display()
                    )));
                }
                Some(lock)
            }
            _ => None,
        };
        let start = Start::Fresh {
            seed: config.seed,
            pretrained: weights,
        };
        let (model, vars) = build_model(model, start, device)?;
        Self::assemble(
            Parts {
                model,
                vars,
                preprocess,
                train,
                val,
                state: RunState::start(),
                scheduler: Scheduler::new(config.schedule.clone(), config.sgd.lr),
                config,
                out,
                lock,
            },
            None,
            placement,
        )
    }

    /// Continues the run in `out` from its checkpoint, with the settings it was started with.
    /// `epochs` (to extend a run) and `workers` may differ; the data must have the same classes.
    /// A data-parallel run may resume with another number of processes that divides its batch;
    /// every rank reads the checkpoint, so `out` must be on storage they share.
    pub fn resume(
        out: impl AsRef<Path>,
        train: ImageFolder,
        val: Option<ImageFolder>,
        epochs: Option<usize>,
        workers: Option<usize>,
        placement: impl Into<Placement>,
    ) -> Result<Self> {
        let placement = placement.into();
        let device = &placement.device;
        let out = out.as_ref().to_path_buf();
        let path = out.join(CHECKPOINT);
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "nothing to resume: {} does not exist",
                path.display()
            )));
        }
        let lock = match placement.comm.rank() {
            0 => Some(lock_output(&out)?),
            _ => None,
        };
        let saved = checkpoint::read(&path, device)?;
        for (split, data) in [("training", Some(&train)), ("validation", val.as_ref())] {
            if let Some(data) = data {
                if data.classes() != saved.classes.as_slice() {
                    return Err(Error::Invalid(format!(
                        "the {split} data in {} has classes {:?}, but the run in {} was trained \
                         on {:?}",
                        data.root().display(),
                        data.classes(),
                        out.display(),
                        saved.classes
                    )));
                }
            }
        }
        let mut config = saved.config;
        config.epochs = epochs.unwrap_or(config.epochs);
        config.workers = workers.unwrap_or(config.workers);
        let start = Start::Restored {
            tensors: &saved.weights,
            from: &path,
        };
        let (model, vars) = build_model(&saved.model, start, device)?;
        let parts = Parts {
            model,
            vars,
            preprocess: saved.preprocess,
            train,
            val,
            config,
            out,
            lock,
            state: saved.state,
            scheduler: saved.scheduler,
        };
        Self::assemble(parts, Some((&saved.sgd, &saved.momentum)), placement).map_err(|e| match e {
            Error::Invalid(reason) => Error::checkpoint(&path, reason),
            e => e,
        })
    }

    /// The trainer of `parts`, with the optimizer over its model's variables under the run's
    /// policy, restored from `sgd` when resuming.
    fn assemble(
        parts: Parts,
        sgd: Option<(
            &super::optim::SgdState,
            &std::collections::HashMap<String, Tensor>,
        )>,
        placement: Placement,
    ) -> Result<Self> {
        if parts.config.precision != super::Precision::F32 && !placement.device.is_cuda() {
            return Err(Error::Invalid(format!(
                "--precision {} trains on CUDA devices only (candle's CPU convolution has no \
                 bf16 kernels): pass --device cuda, or --precision f32",
                parts.config.precision
            )));
        }
        let groups = param_groups(&parts.model, &parts.vars, &parts.config.policy)?;
        let world = placement.comm.world_size();
        if !parts.config.batch_size.is_multiple_of(world) {
            return Err(Error::Invalid(format!(
                "batch size {} does not split evenly over {world} processes: choose a multiple \
                 of {world}",
                parts.config.batch_size
            )));
        }
        let trainable = groups.iter().flat_map(|g| g.params.clone()).collect();
        let sync = GradSync::new(placement.comm, trainable, BUCKET_BYTES)?;
        let mut optimizer = Sgd::new(groups, parts.config.sgd)?;
        if let Some((state, buffers)) = sgd {
            optimizer.load_state(state, buffers)?;
        }
        let mut vars: Vec<_> = parts.vars.into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let device = &placement.device;
        Ok(Self {
            model: parts.model,
            sgd: optimizer,
            scheduler: parts.scheduler,
            config: parts.config,
            preprocess: parts.preprocess,
            train_set: Arc::new(parts.train),
            val_set: parts.val.map(Arc::new),
            device: device.clone(),
            out: parts.out,
            state: parts.state,
            last_eval: None,
            sync,
            vars,
            joined: false,
            _lock: parts.lock,
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

    /// The processes this trainer trains with (one, unless it was placed in a data-parallel
    /// run).
    pub fn collective(&self) -> &dyn Collective {
        self.sync.comm()
    }

    /// Checks that every rank runs the same job at the same point, then gives all of them rank
    /// 0's weights. Once, before the first step.
    fn join(&mut self) -> Result<()> {
        if self.joined || self.sync.world_size() == 1 {
            self.joined = true;
            return Ok(());
        }
        // `workers` may differ between ranks (machines differ); nothing else may.
        let config = TrainConfig {
            workers: 0,
            ..self.config.clone()
        };
        let settings = format!("{config:?} {:?} {:?}", self.model.config(), self.preprocess);
        let digest = <sha2::Sha256 as sha2::Digest>::digest(settings.as_bytes());
        let word =
            |i: usize| u32::from_le_bytes(digest[i * 4..i * 4 + 4].try_into().unwrap()) as f64;
        self.sync.check_same(
            "the settings, the data or where the run stands",
            &[
                word(0),
                word(1),
                self.train_set.len() as f64,
                self.val_set.as_ref().map_or(0, |v| v.len()) as f64,
                self.state.epoch as f64,
                self.state.batch as f64,
            ],
        )?;
        self.sync.broadcast_from_rank0(&self.vars)?;
        self.joined = true;
        Ok(())
    }

    /// Trains until `config.epochs` epochs are done or `observer` breaks.
    pub fn run(&mut self, observer: &mut dyn FnMut(Event) -> ControlFlow<()>) -> Result<()> {
        self.join()?;
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
        // Every rank shuffles alike and takes its slice of each (global) batch.
        let (rank, world) = (self.sync.rank(), self.sync.world_size());
        let order = epoch_order(self.train_set.len(), cfg.seed, epoch as u64, true);
        let local = cfg.batch_size / world;
        let batches = order.len().div_ceil(cfg.batch_size);
        let mine: Vec<usize> = order
            .chunks(cfg.batch_size)
            .flat_map(|batch| batch.iter().skip(rank * local).take(local).copied())
            .collect();
        let mut augment = Augment::train(self.preprocess.clone());
        if !cfg.random_crop {
            augment.crop = crate::data::augment::Crop::Center;
        }
        augment.flip = cfg.flip;
        augment.lighting = cfg.lighting;
        let loader = LabelledLoader::new(
            self.train_set.clone(),
            mine,
            augment,
            local,
            false,
            cfg.workers,
            cfg.seed,
            epoch as u64,
        )?;
        let mut loader = loader.skip_batches(self.state.batch);
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
        let every = cfg.checkpoint_every;
        while self.state.batch < batches {
            // A rank whose share of the last batch is empty has no batch, and still sums.
            let batch = loader.next().transpose()?;
            for (path, error) in batch.iter().flat_map(|b| &b.failed) {
                let _ = observer(Event::Skipped { path, error });
            }
            self.state.batch += 1;
            if let Some((images, loss)) = self.step(batch.as_ref(), epoch)? {
                let flow = observer(Event::Batch {
                    epoch: epoch + 1,
                    batch: self.state.batch,
                    images,
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
        // The epoch's figures: rank 0 evaluates, the others receive its figures.
        let eval = match &self.val_set {
            Some(val) if rank == 0 => {
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
            _ => None,
        };
        let mut val = match &eval {
            Some(e) => [1.0, e.loss, e.top1, e.top5],
            None => [0.0; 4],
        };
        if world > 1 {
            self.sync.all_reduce_f64(&mut val)?;
        }
        let val = (val[0] > 0.0).then_some(val);
        let t = &self.state.tally;
        let n = t.images.max(1) as f64;
        let record = EpochRecord {
            epoch: epoch + 1,
            lr,
            train_loss: t.loss_sum / n,
            train_top1: t.top1 as f64 / n,
            train_top5: t.top5 as f64 / n,
            val_loss: val.map(|v| v[1]),
            val_top1: val.map(|v| v[2]),
            val_top5: val.map(|v| v[3]),
            seconds: seconds_before + started.elapsed().as_secs_f64(),
        };
        let monitored = record.val_top1.unwrap_or(record.train_top1);
        let next_lr = self.scheduler.epoch_end(Some(monitored))?;
        self.sgd.set_lr(next_lr);
        let best = self.state.best_top1.is_none_or(|b| monitored > b);
        self.state.history.push(record.clone());
        self.state.next_epoch();
        if best {
            self.state.best_top1 = Some(monitored);
        }
        if best && rank == 0 {
            let (tensors, meta) =
                checkpoint::weights(&self.model, &self.preprocess, self.train_set.classes())?;
            save_safetensors(self.out.join(BEST), &tensors, &meta)?;
        }
        self.last_eval = eval;
        if rank == 0 {
            write_metrics(&self.out, &self.state.history)?;
        }
        let _ = observer(Event::Epoch(&record));
        self.save_checkpoint(observer)?;
        Ok(ControlFlow::Continue(()))
    }

    /// One SGD step on `batch` (this rank's share of the global batch; `None` or empty when it
    /// has none): the gradients and figures summed over the ranks. Returns the global batch's
    /// images and mean loss, or `None` when no rank had an image.
    fn step(
        &mut self,
        batch: Option<&crate::data::dataset::LabelledBatch>,
        epoch: usize,
    ) -> Result<Option<(usize, f64)>> {
        let cfg = &self.config;
        let mut figures = [0.0f64; 4];
        let mut grads = None;
        if let Some(batch) = batch.filter(|b| !b.is_empty()) {
            let (x, y) = batch.tensors(&self.device)?;
            let logits = self
                .model
                .train_view()
                .with_sample_masks(cfg.seed, epoch as u64, &batch.indices)
                .freeze_through(cfg.policy.freeze_through)
                .with_compute_dtype(cfg.precision.compute_dtype())
                .forward_t(&x, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            grads = Some(loss.backward()?);
            let (top1, top5) = hits(&logits, &batch.labels)?;
            let n = batch.len() as f64;
            figures = [
                n,
                loss.to_scalar::<f32>()? as f64 * n,
                top1 as f64,
                top5 as f64,
            ];
        }
        let local = figures[0];
        if self.sync.world_size() > 1 {
            self.sync.all_reduce_f64(&mut figures)?;
        }
        let [images, loss_sum, top1, top5] = figures;
        if images == 0.0 {
            return Ok(None);
        }
        let grads = match grads {
            Some(g) if self.sync.world_size() == 1 => g,
            g => self.sync.all_reduce_grads(g.as_ref(), local / images)?,
        };
        self.sgd.step(&grads)?;
        let t = &mut self.state.tally;
        t.images += images as u64;
        t.loss_sum += loss_sum;
        t.top1 += top1 as u64;
        t.top5 += top5 as u64;
        Ok(Some((images as usize, loss_sum / images)))
    }

    fn save_checkpoint(&self, observer: &mut dyn FnMut(Event) -> ControlFlow<()>) -> Result<()> {
        if self.sync.rank() != 0 {
            return Ok(());
        }
        let path = self.out.join(CHECKPOINT);
        let run = Run {
            model: &self.model,
            preprocess: &self.preprocess,
            classes: self.train_set.classes(),
            config: &self.config,
            state: &self.state,
            scheduler: &self.scheduler,
            sgd: &self.sgd,
        };
        checkpoint::write(&path, &run)?;
        let _ = observer(Event::Checkpoint(&path));
        Ok(())
    }
}

/// The lock of a run's output folder (`.candle-zoo.lock` in it): one run per folder, a second
/// fails at once. Holding it, the temporary files of a killed run's writes are removed.
fn lock_output(out: &Path) -> Result<OutputLock> {
    let lock = OutputLock::acquire(out.join(".candle-zoo.lock"))?.remove_on_release();
    crate::io::remove_stale_temps(
        out,
        &[CHECKPOINT, BEST, METRICS_CSV, METRICS_PNG, CONFUSION_CSV],
    )?;
    Ok(lock)
}
