//! The training loop: [`Trainer`] and the [`Event`]s it reports.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, ModuleT, Tensor};

use super::checkpoint::{self, Run, RunState};
use super::eval::{evaluate, hits, Evaluation};
use super::optim::{Scheduler, Sgd};
use super::params::{build_model, param_groups, Start};
use super::report::{write_confusion, write_metrics, EpochRecord};
use super::{TrainConfig, BEST, CHECKPOINT, CONFUSION_CSV, METRICS_CSV, METRICS_PNG};
use crate::data::augment::Augment;
use crate::data::dataset::{epoch_order, ImageFolder, LabelledLoader};
use crate::data::preprocess::Preprocess;
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
    /// The output folder's lock, held for the trainer's life.
    _lock: OutputLock,
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
    lock: OutputLock,
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
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let lock = lock_output(&out)?;
        if out.join(CHECKPOINT).exists() {
            return Err(Error::Invalid(format!(
                "{} already holds a run ({CHECKPOINT}): resume it, or choose another output folder",
                out.display()
            )));
        }
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
                state: RunState::start(config.seed),
                scheduler: Scheduler::new(config.schedule.clone(), config.sgd.lr),
                config,
                out,
                lock,
            },
            None,
            device,
        )
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
        let lock = lock_output(&out)?;
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
        Self::assemble(parts, Some((&saved.sgd, &saved.momentum)), device).map_err(|e| match e {
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
        device: &Device,
    ) -> Result<Self> {
        let groups = param_groups(&parts.model, &parts.vars, &parts.config.policy)?;
        let mut optimizer = Sgd::new(groups, parts.config.sgd)?;
        if let Some((state, buffers)) = sgd {
            optimizer.load_state(state, buffers)?;
        }
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
        if !cfg.random_crop {
            augment.crop = crate::data::augment::Crop::Center;
        }
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
                    .train_view()
                    .with_rng(&mut self.state.dropout_rng)
                    .freeze_through(freeze)
                    .forward_t(&x, true)?;
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
        self.state.next_epoch(self.config.seed);
        if best {
            self.state.best_top1 = Some(monitored);
            let (tensors, meta) =
                checkpoint::weights(&self.model, &self.preprocess, self.train_set.classes())?;
            save_safetensors(self.out.join(BEST), &tensors, &meta)?;
        }
        self.last_eval = eval;
        write_metrics(&self.out, &self.state.history)?;
        let _ = observer(Event::Epoch(&record));
        self.save_checkpoint(observer)?;
        Ok(ControlFlow::Continue(()))
    }

    fn save_checkpoint(&self, observer: &mut dyn FnMut(Event) -> ControlFlow<()>) -> Result<()> {
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
