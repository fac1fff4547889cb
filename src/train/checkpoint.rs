//! The training checkpoint format: a weights file (the model under its checkpoint keys, with the
//! metadata of [`crate::weights::metadata`], so that it loads like any other weights: layout,
//! input pipeline, classes, dropout) plus what a run needs to go on bit for bit.
//!
//! | entry | what |
//! |---|---|
//! | tensors `optim.momentum.<key>` | the SGD momentum buffer of parameter `<key>` |
//! | `train.config` | the run's [`TrainConfig`], JSON |
//! | `train.state` | where the run stands (epoch, batch, running sums, history), JSON; dropout masks are a function of (seed, epoch, sample), so no stream is saved |
//! | `train.scheduler` | the learning-rate [`Scheduler`] with its state, JSON |
//! | `train.optimizer` | the [`SgdState`] (config, steps, which parameters have momentum), JSON |
//!
//! Checkpoints of candle-zoo 0.1 kept the optimizer's state under `optim.type`, `optim.lr`,
//! `optim.momentum`, `optim.dampening`, `optim.nesterov`, `optim.steps` and
//! `optim.momentum_keys`; they still resume.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::{Scheduler, Sgd, SgdConfig, SgdState};
use super::report::EpochRecord;
use super::TrainConfig;
use crate::data::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::models::alexnet::{AlexNet, Config};
use crate::weights::{metadata, save_safetensors, Checkpoint};

const CONFIG: &str = "train.config";
const STATE: &str = "train.state";
const SCHEDULER: &str = "train.scheduler";
const OPTIMIZER: &str = "train.optimizer";
/// Prefix of the momentum buffers' tensor names.
const MOMENTUM: &str = "optim.momentum.";

/// Running sums of a training epoch (saved in mid-epoch checkpoints so that a resumed epoch
/// reports the same figures).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Tally {
    pub images: u64,
    pub loss_sum: f64,
    pub top1: u64,
    pub top5: u64,
    pub seconds: f64,
}

/// Where a run stands; the `train.state` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct RunState {
    /// 0-based epoch in progress (or next).
    pub epoch: usize,
    /// Batches of `epoch` already trained.
    pub batch: usize,
    pub tally: Tally,
    pub history: Vec<EpochRecord>,
    pub best_top1: Option<f64>,
}

impl RunState {
    pub fn start() -> Self {
        Self {
            epoch: 0,
            batch: 0,
            tally: Tally::default(),
            history: Vec::new(),
            best_top1: None,
        }
    }

    /// Moves on to the next epoch.
    pub fn next_epoch(&mut self) {
        self.epoch += 1;
        self.batch = 0;
        self.tally = Tally::default();
    }
}

/// The named tensors and the metadata of a safetensors file.
pub(super) type Contents = (Vec<(String, Tensor)>, BTreeMap<String, String>);

/// The model's weights and the metadata that lets them load on their own: layout, pipeline
/// (its mean image as a tensor), classes and dropout. What `best.safetensors` holds.
pub(super) fn weights(
    model: &AlexNet,
    preprocess: &Preprocess,
    classes: &[String],
) -> Result<Contents> {
    let mut tensors = model.named_tensors();
    tensors.extend(
        metadata::mean_image_tensor(preprocess)?.map(|t| (metadata::MEAN_IMAGE.to_string(), t)),
    );
    let mut meta = metadata::preprocess_entries(preprocess);
    meta.extend([
        (
            metadata::LAYOUT.to_string(),
            model.layout().name().to_string(),
        ),
        (metadata::CLASSES.to_string(), to_json(&classes)?),
        (
            metadata::DROPOUT.to_string(),
            model.config().dropout.to_string(),
        ),
    ]);
    meta.extend(metadata::variant_entries(model.config()));
    Ok((tensors, meta))
}

/// A run as written to its checkpoint.
pub(super) struct Run<'a> {
    pub model: &'a AlexNet,
    pub preprocess: &'a Preprocess,
    pub classes: &'a [String],
    pub config: &'a TrainConfig,
    pub state: &'a RunState,
    pub scheduler: &'a Scheduler,
    pub sgd: &'a Sgd,
}

/// Writes the checkpoint of `run` to `path`, atomically.
pub(super) fn write(path: &Path, run: &Run) -> Result<()> {
    let (mut tensors, mut meta) = weights(run.model, run.preprocess, run.classes)?;
    let (sgd, buffers) = run.sgd.state()?;
    tensors.extend(
        buffers
            .into_iter()
            .map(|(k, t)| (format!("{MOMENTUM}{k}"), t)),
    );
    meta.extend([
        (CONFIG.to_string(), to_json(run.config)?),
        (STATE.to_string(), to_json(run.state)?),
        (SCHEDULER.to_string(), to_json(run.scheduler)?),
        (OPTIMIZER.to_string(), to_json(&sgd)?),
    ]);
    save_safetensors(path, &tensors, &meta)
}

/// A checkpoint read back: everything a run needs to go on.
pub(super) struct Saved {
    pub model: Config,
    pub preprocess: Preprocess,
    pub classes: Vec<String>,
    pub config: TrainConfig,
    pub state: RunState,
    pub scheduler: Scheduler,
    pub sgd: SgdState,
    /// The model's weights by checkpoint key.
    pub weights: HashMap<String, Tensor>,
    /// The momentum buffers by parameter key.
    pub momentum: HashMap<String, Tensor>,
}

/// Reads the checkpoint at `path` onto `device`. Errors name the file and the entry at fault.
pub(super) fn read(path: &Path, device: &Device) -> Result<Saved> {
    let ckpt = Checkpoint::open(path)?;
    let meta = ckpt.metadata();
    let bad = |key: &str, e: String| Error::checkpoint(path, format!("`{key}`: {e}"));
    let json = |key: &str| -> Result<&String> {
        meta.get(key)
            .ok_or_else(|| Error::checkpoint(path, format!("no `{key}` in its metadata")))
    };
    fn parse<T: for<'de> Deserialize<'de>>(
        key: &str,
        text: &str,
    ) -> std::result::Result<T, String> {
        serde_json::from_str(text).map_err(|e| format!("{key}: {e}"))
    }
    let config: TrainConfig = parse(CONFIG, json(CONFIG)?).map_err(|e| bad(CONFIG, e))?;
    let state: RunState = parse(STATE, json(STATE)?).map_err(|e| bad(STATE, e))?;
    let scheduler: Scheduler = parse(SCHEDULER, json(SCHEDULER)?).map_err(|e| bad(SCHEDULER, e))?;
    let sgd = match meta.get(OPTIMIZER) {
        Some(text) => parse(OPTIMIZER, text).map_err(|e| bad(OPTIMIZER, e))?,
        None => legacy_sgd_state(meta).map_err(|e| Error::checkpoint(path, e))?,
    };
    let classes = metadata::classes(meta)
        .map_err(|e| Error::checkpoint(path, e))?
        .ok_or_else(|| {
            Error::checkpoint(path, format!("no `{}` in its metadata", metadata::CLASSES))
        })?;
    let model = ckpt.config()?;
    let preprocess = ckpt.preprocess()?;
    let tensors =
        candle_core::safetensors::load(path, device).map_err(|e| Error::checkpoint(path, e))?;
    let (mut weights, mut momentum) = (HashMap::new(), HashMap::new());
    for (name, t) in tensors {
        match name.strip_prefix(MOMENTUM) {
            Some(key) => momentum.insert(key.to_string(), t),
            None => weights.insert(name, t),
        };
    }
    Ok(Saved {
        model,
        preprocess,
        classes,
        config,
        state,
        scheduler,
        sgd,
        weights,
        momentum,
    })
}

/// The optimizer's state as candle-zoo 0.1 wrote it, one metadata key per value.
fn legacy_sgd_state(meta: &BTreeMap<String, String>) -> std::result::Result<SgdState, String> {
    let get = |k: &str| {
        meta.get(k)
            .map(String::as_str)
            .ok_or_else(|| format!("no `{OPTIMIZER}` (nor 0.1's `{k}`) in its metadata"))
    };
    fn value<T: std::str::FromStr>(k: &str, v: &str) -> std::result::Result<T, String> {
        v.parse().map_err(|_| format!("`{k}` = `{v}` is not valid"))
    }
    if get("optim.type")? != "sgd" {
        return Err("`optim.type` is not `sgd`".into());
    }
    Ok(SgdState {
        config: SgdConfig {
            lr: value("optim.lr", get("optim.lr")?)?,
            momentum: value("optim.momentum", get("optim.momentum")?)?,
            dampening: value("optim.dampening", get("optim.dampening")?)?,
            nesterov: value("optim.nesterov", get("optim.nesterov")?)?,
        },
        steps: value("optim.steps", get("optim.steps")?)?,
        momentum: serde_json::from_str(get("optim.momentum_keys")?)
            .map_err(|e| format!("`optim.momentum_keys`: {e}"))?,
    })
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::Invalid(format!("serialising the training state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_0_1_optimizer_state_still_reads() {
        let meta = BTreeMap::from(
            [
                ("optim.type", "sgd"),
                ("optim.lr", "0.01"),
                ("optim.momentum", "0.9"),
                ("optim.dampening", "0"),
                ("optim.nesterov", "false"),
                ("optim.steps", "12"),
                ("optim.momentum_keys", r#"["fc8.weight"]"#),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let state = legacy_sgd_state(&meta).unwrap();
        assert_eq!((state.steps, state.config.lr), (12, 0.01));
        assert_eq!(state.momentum, ["fc8.weight"]);
        let mut broken = meta.clone();
        broken.insert("optim.steps".into(), "two".into());
        assert!(legacy_sgd_state(&broken)
            .unwrap_err()
            .contains("`optim.steps` = `two`"));
    }
}
