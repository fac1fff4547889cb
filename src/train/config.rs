//! How a run trains ([`TrainConfig`]) and which parameters learn how fast ([`ParamPolicy`]);
//! both are saved in the run's checkpoints.

use serde::{Deserialize, Serialize};

use super::optim::{LrSchedule, PlateauMode, SgdConfig};
use crate::error::{Error, Result};
use crate::models::alexnet::Tap;

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
    pub freeze_through: Option<Tap>,
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
    /// Threads decoding and augmenting images (0 is taken as 1).
    pub workers: usize,
    /// Random crops of the resized image (else its centre crop, as in evaluation). Checkpoints
    /// written before this setting existed trained with random crops.
    #[serde(default = "random_crops_by_default")]
    pub random_crop: bool,
    /// Random horizontal mirrors.
    pub flip: bool,
    /// Standard deviation of the PCA lighting noise (the paper's 0.1; 0 turns it off).
    pub lighting: f32,
    /// Evaluate on the paper's ten crops (corners, centre and their mirrors) instead of the
    /// centre crop.
    pub ten_crop: bool,
    /// Also checkpoint every this many batches within an epoch (0: at the end of epochs only).
    pub checkpoint_every: usize,
    /// The dtype the convs and fc layers compute in (the weights, their updates, pooling, LRN
    /// and the loss stay f32). Checkpoints written before this setting existed trained in f32.
    #[serde(default)]
    pub precision: Precision,
}

/// Training arithmetic: `f32` throughout, or mixed precision (`bf16`): the convs and fc layers
/// in bfloat16 on CUDA (cuDNN and cuBLAS accumulate in f32) from casts of the f32 master
/// weights, which get their gradients in f32 and are updated in f32
/// ([`TrainView::with_compute_dtype`](crate::models::alexnet::TrainView::with_compute_dtype)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The compute dtype, where it is not the weights'.
    pub fn compute_dtype(self) -> Option<candle_core::DType> {
        match self {
            Self::F32 => None,
            Self::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(Error::parse("precision", s, "f32 or bf16")),
        }
    }
}

impl Default for TrainConfig {
    /// The paper's recipe at a small batch: SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr
    /// x0.1 when validation top-1 stalls, random crops, flips and PCA lighting.
    fn default() -> Self {
        Self {
            epochs: 90,
            batch_size: 128,
            sgd: SgdConfig::default(),
            schedule: LrSchedule::Plateau {
                mode: PlateauMode::Max,
                factor: 0.1,
                patience: 5,
                threshold: 1e-4,
                min_lr: 0.0,
            },
            policy: ParamPolicy::default(),
            seed: 0,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            random_crop: true,
            flip: true,
            lighting: 0.1,
            ten_crop: false,
            checkpoint_every: 0,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    /// Refuses what cannot train, before any work is done: a batch size of 0, a frozen head,
    /// a negative or non-finite lighting or multiplier. (The optimizer checks its own settings.)
    pub(crate) fn validate(&self) -> Result<()> {
        crate::data::check_batch_size(self.batch_size)?;
        if self.policy.freeze_through == Some(Tap::Fc8) {
            return Err(Error::Invalid(
                "freezing through fc8 (the logits) leaves nothing to train".into(),
            ));
        }
        if !(self.lighting.is_finite() && self.lighting >= 0.0) {
            return Err(Error::Invalid(format!(
                "lighting std must be finite and >= 0, got {}",
                self.lighting
            )));
        }
        Ok(())
    }
}

fn random_crops_by_default() -> bool {
    true
}
