//! Trains AlexNet from scratch on an image folder with the paper's recipe: SGD with momentum 0.9
//! and weight decay 5e-4, the learning rate divided by 10 when validation stalls, random crops,
//! mirrors and PCA lighting.
//!
//! ```text
//! cargo run --release --example train -- --data DATA --out runs/a
//! cargo run --release --example train -- --data DATA --out runs/a --layout bvlc-alexnet --caffe-biases
//! cargo run --release --example train -- --data DATA --out runs/small \
//!     --channels 16,32,48,32,32 --hidden 256 --input-size 64 --epochs 20
//! cargo run --release --example train -- --data DATA --out runs/a --resume   # after a kill
//! ```
//! `DATA` holds `train/<class>/*.jpg` and optionally `val/<class>/*.jpg`. The output folder gets
//! `checkpoint.safetensors` (model, optimizer, RNG and epoch, for `--resume`), `best.safetensors`
//! (weights that `classify --weights` loads), `metrics.csv`, `metrics.png` and `confusion.csv`.

use anyhow::{Context, Result};
use candle_zoo::cli::{run_training, TrainArgs};
use candle_zoo::data::preprocess::Preprocess;
use candle_zoo::device::DeviceChoice;
use candle_zoo::models::alexnet::{Config, Layout};
use candle_zoo::train::{ParamPolicy, Trainer};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Train AlexNet from scratch on an image folder")]
struct Args {
    #[command(flatten)]
    train: TrainArgs,

    /// torchvision (one tower), bvlc-alexnet (two towers, LRN before pooling) or caffenet.
    #[arg(long, default_value = "torchvision")]
    layout: Layout,

    /// Output channels of conv1..conv5 (default: the layout's published widths).
    #[arg(long, value_delimiter = ',', value_name = "C1,C2,C3,C4,C5")]
    channels: Option<Vec<usize>>,

    /// Width of fc6 and fc7 (default: 4096).
    #[arg(long)]
    hidden: Option<usize>,

    /// Side of the square crops the model sees (default: 224, or 227 for the Caffe layouts;
    /// torchvision takes >= 63, the Caffe layouts 199..=230).
    #[arg(long)]
    input_size: Option<u32>,

    /// Dropout before (torchvision) or after (Caffe) fc6 and fc7.
    #[arg(long, default_value_t = 0.5)]
    dropout: f32,

    /// auto, cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> Result<()> {
    // Many same-sized steps: reuse freed memory rather than fault it back in each time.
    candle_zoo::memory::retain_freed_memory();
    let args = Args::parse();
    let device = args.device.device()?;
    let mut trainer = args.train.trainer(&device, |train, val| {
        let mut model = Config::for_layout(args.layout)
            .with_classes(train.classes().len())
            .with_dropout(args.dropout);
        if let Some(c) = &args.channels {
            model.channels = c.as_slice().try_into().map_err(|_| {
                candle_zoo::Error::Invalid(format!(
                    "--channels takes 5 widths (conv1..conv5), got {}",
                    c.len()
                ))
            })?;
        }
        if let Some(h) = args.hidden {
            model.hidden = h;
        }
        let preprocess = Preprocess::for_layout(args.layout);
        let preprocess = match args.input_size {
            Some(side) => preprocess.scaled_to(side),
            None => preprocess,
        };
        let settings = args.train.config(90, 0.01, ParamPolicy::default());
        Trainer::new(
            &model,
            preprocess,
            train,
            val,
            settings,
            &args.train.out,
            &device,
        )
    })?;
    run_training(&mut trainer, "training").context("training failed")?;
    eprintln!("done: {}", trainer.out_dir().display());
    Ok(())
}
