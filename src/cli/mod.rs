//! Command-line flags shared by the examples (feature `cli`, off by default; the examples turn
//! it on for themselves): which weights, which device, which preprocessing, the training flags,
//! and progress display. Programs of your own can flatten these too.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`ModelArgs`]: `--model`, `--weights`, `--model-id`, `--layout`, `--preprocess`, `--device` |
//! | `train.rs` | [`TrainArgs`], the flags of `train` and `finetune`; [`ArchArgs`], the architecture of `train` and `ablate`; [`run_training`] |
//! | `progress.rs` | [`Progress`]: a bar on a terminal, a line every few seconds in a log |
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

mod progress;
mod train;

pub use progress::Progress;
pub use train::{run_training, ArchArgs, TrainArgs};

use std::path::PathBuf;

use candle_core::Device;

use crate::data::preprocess::{Preprocess, Preset};
use crate::device::DeviceChoice;
use crate::error::Result;
use crate::models::alexnet::{AlexNet, Layout};
use crate::weights::hub::{Hub, HubFile};
use crate::weights::{AlexNetWeights, Checkpoint};

/// Where the weights come from, the device, and preprocessing overrides.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Pretrained weights from the registry: torchvision (from the hub), bvlc-alexnet,
    /// bvlc-caffenet (installed with `convert --install`).
    #[arg(long, default_value = "torchvision", conflicts_with_all = ["weights", "model_id"])]
    pub model: AlexNetWeights,

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

/// Parses a `--batch-size`, refusing what the library refuses (0), before any work starts.
pub fn parse_batch_size(s: &str) -> std::result::Result<usize, String> {
    let n = s.parse::<usize>().map_err(|e| e.to_string())?;
    crate::data::check_batch_size(n).map_err(|e| e.to_string())?;
    Ok(n)
}

/// A model ready to run, with the preprocessing its weights expect.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: AlexNet,
    pub preprocess: Preprocess,
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

    /// What a failed [`ModelArgs::load`] was doing, with the flag that loads a local file
    /// instead where the weights came from elsewhere: for an error's context.
    pub fn context(&self) -> String {
        let local = match self.weights {
            Some(_) => "",
            None => " (for weights on this machine: --weights PATH)",
        };
        format!("loading model `{}`{local}", self.source())
    }

    pub fn device(&self) -> Result<Device> {
        self.device.device()
    }

    /// Resolves the weights (downloading through the hub cache if needed) and loads the model
    /// with the pipeline its checkpoint records, or `--preprocess`'s.
    pub fn load(&self, device: &Device) -> Result<LoadedModel> {
        let ckpt = match (&self.weights, &self.model_id, &self.hub_file) {
            (Some(path), _, _) => Checkpoint::open(path)?,
            (None, Some(repo), Some(file)) => {
                let mut f = HubFile::new(repo, file);
                if let Some(rev) = &self.revision {
                    f = f.with_revision(rev);
                }
                if let Some(sha) = &self.sha256 {
                    f = f.with_sha256(sha);
                }
                Checkpoint::open(Hub::from_env().get(&f)?)?
            }
            (None, _, _) => Checkpoint::open(self.model.fetch(&Hub::from_env())?)?
                .with_layout(self.model.info().layout)?,
        };
        let ckpt = match self.layout {
            Some(layout) => ckpt.with_layout(layout)?,
            None => ckpt,
        };
        let preprocess = match self.preprocess {
            Some(preset) => preset.pipeline(),
            None => ckpt.preprocess()?,
        };
        Ok(LoadedModel {
            model: ckpt.load(device)?,
            preprocess,
            path: ckpt.path().to_path_buf(),
        })
    }
}
