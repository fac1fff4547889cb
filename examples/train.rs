//! Trains AlexNet from scratch on an image folder with the paper's recipe: SGD with momentum 0.9
//! and weight decay 5e-4, the learning rate divided by 10 when validation stalls, random crops,
//! mirrors and PCA lighting.
//!
//! ```text
//! cargo run --release --example train -- --data DATA --out runs/a
//! cargo run --release --example train -- --data DATA --out runs/a --layout bvlc-alexnet --caffe-biases
//! cargo run --release --example train -- --data DATA --out runs/small \
//!     --channels 16,32,48,32,32 --hidden 256 --input-size 64 --epochs 20
//! cargo run --release --example train -- --data DATA --out runs/tanh --activation tanh --lrn on
//! cargo run --release --example train -- --data DATA --out runs/a --resume   # after a kill
//! cargo build --release --features mpi --example train
//! mpirun -np 2 target/release/examples/train --data DATA --out runs/dp --batch-size 128
//! ```
//! `DATA` holds `train/<class>/*.jpg` and optionally `val/<class>/*.jpg`. The output folder gets
//! `checkpoint.safetensors` (model, optimizer, RNG and epoch, for `--resume`), `best.safetensors`
//! (weights that `classify --weights` loads), `metrics.csv`, `metrics.png` and `confusion.csv`.

use anyhow::{Context, Result};
use candle_zoo::cli::{run_training, ArchArgs, TrainArgs};
use candle_zoo::device::DeviceChoice;
use candle_zoo::train::{TrainConfig, Trainer};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Train AlexNet from scratch on an image folder")]
struct Args {
    #[command(flatten)]
    train: TrainArgs,

    #[command(flatten)]
    arch: ArchArgs,

    /// auto, cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> Result<()> {
    // Many same-sized steps: reuse freed memory rather than fault it back in each time.
    candle_zoo::memory::retain_freed_memory();
    let args = Args::parse();
    let placement = args.train.connect(&args.device.device()?)?;
    let comm = placement.comm.clone();
    let run = || -> Result<()> {
        let mut trainer = args.train.trainer(placement, |train, val, placement| {
            let model = args.arch.config(train.classes().len())?;
            // The paper's recipe: 90 epochs, lr 0.01 (TrainConfig's defaults).
            let settings = args.train.config(TrainConfig::default());
            Trainer::new(
                &model,
                args.arch.preprocess(),
                train,
                val,
                settings,
                &args.train.out,
                placement,
            )
        })?;
        run_training(&mut trainer, "training").context("training failed")?;
        if comm.rank() == 0 {
            eprintln!("done: {}", trainer.out_dir().display());
        }
        Ok(())
    };
    // An error on one process of a data-parallel run ends them all at once.
    candle_zoo::dist::abort_on_error(&*comm, run())
}
