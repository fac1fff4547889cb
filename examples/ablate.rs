//! Re-runs the AlexNet paper's claims on an image folder: ReLU against tanh (Figure 1),
//! overlapping pooling, response normalization, dropout, crops and flips, PCA lighting. Each
//! variant is the baseline with one thing changed, trained with the same recipe from the same
//! seeds (3 by default); the effects are measured seed by seed against the baseline.
//!
//! ```text
//! python3 scripts/fashion_mnist_folder.py /tmp/fmnist --train-per-class 400 --val-per-class 100
//! cargo run --release --example ablate -- --data /tmp/fmnist --out runs/ablation   # ~20 min, 2 cores
//! cargo run --release --example ablate -- --data /tmp/fmnist --out runs/ablation --resume
//! cargo run --release --example ablate -- --data DATA --out runs/q --quick         # mechanics only
//! cargo run --release --example ablate -- --data DATA --out runs/lrn --variants lrn,tanh --seeds 5
//! ```
//! Writes `ablation.csv`, `ablation.md` and `ablation.png` into `--out`, and each run's usual
//! outputs into `--out/runs/<variant>/seed-<seed>/`. A killed study continues with `--resume`.
//! The default model is small (widths 16-32-48-32-32, fc 256, 64 px crops, torchvision layout);
//! `--channels`, `--hidden`, `--input-size` and `--layout` change it, as in `train`.

use std::ops::ControlFlow;

use anyhow::{Context, Result};
use candle_zoo::cli::{ArchArgs, TrainArgs};
use candle_zoo::device::DeviceChoice;
use candle_zoo::models::alexnet::Layout;
use candle_zoo::train::ablation::{Study, ABLATION_MD, VARIANTS};
use candle_zoo::train::optim::SgdConfig;
use candle_zoo::train::{Event, TrainConfig};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Re-run the AlexNet paper's claims: variants x seeds, one recipe")]
struct Args {
    #[command(flatten)]
    train: TrainArgs,

    #[command(flatten)]
    arch: ArchArgs,

    /// Seeds per variant: --seed, --seed + 1, ...
    #[arg(long, default_value_t = 3)]
    seeds: u64,

    /// Only these variants (the baseline always runs), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    variants: Option<Vec<String>>,

    /// Figure 1's target training error.
    #[arg(long, default_value_t = 0.25)]
    target_error: f64,

    /// A tiny study that checks the mechanics, not the claims: 2 seeds, 2 epochs.
    #[arg(long)]
    quick: bool,

    /// auto, cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> Result<()> {
    candle_zoo::memory::retain_freed_memory();
    let mut args = Args::parse();
    // A small AlexNet at 64 px unless told otherwise (the Caffe layouts need 199..=230 px).
    let arch = &mut args.arch;
    if arch.layout == Layout::TorchVision {
        arch.input_size.get_or_insert(64);
    }
    arch.channels.get_or_insert(vec![16, 32, 48, 32, 32]);
    arch.hidden.get_or_insert(256);
    let (seeds, epochs) = if args.quick {
        (2, args.train.epochs.unwrap_or(2))
    } else {
        (args.seeds, args.train.epochs.unwrap_or(12))
    };
    let device = args.device.device()?;
    let data = args.train.open_data()?;
    let model = args.arch.config(data.0.classes().len())?;
    // Without batch norm, the small model diverges at the paper's 0.01 (measured on
    // Fashion-MNIST); 0.003 learns steadily.
    let recipe = args.train.config(TrainConfig {
        epochs,
        batch_size: 32,
        sgd: SgdConfig {
            lr: 0.003,
            ..SgdConfig::default()
        },
        ..TrainConfig::default()
    });
    let base = args.train.seed;
    let mut study = Study::paper(
        &model,
        &recipe,
        args.arch.preprocess(),
        (base..base + seeds).collect(),
    )?;
    study.target_error = args.target_error;
    if let Some(names) = &args.variants {
        study = study.only(names)?;
    }
    let out = &args.train.out;
    eprintln!(
        "{} variants x {seeds} seeds, {epochs} epochs each, {} AlexNet on {}; outputs in {} \
         (known variants: {})",
        study.variants.len(),
        model.layout,
        candle_zoo::device::describe(&device),
        out.display(),
        VARIANTS.join(", ")
    );
    let results = study
        .run(
            &data,
            out,
            args.train.resume,
            &device,
            &mut |v, seed, event| {
                if let Event::Epoch(r) = event {
                    let val = r.val_top1.map_or(String::new(), |t| {
                        format!(", val error {:.1}%", 100.0 * (1.0 - t))
                    });
                    eprintln!(
                        "{} seed {seed} epoch {}: train error {:.1}%{val} ({:.0} s)",
                        v.name,
                        r.epoch,
                        100.0 * (1.0 - r.train_top1),
                        r.seconds
                    );
                }
                ControlFlow::Continue(())
            },
        )
        .context("the study failed")?;
    let rows = study.report(&results, out)?;
    for r in &rows {
        eprintln!(
            "{} [{}]: paper {}, measured {} -> {}",
            r.claim,
            r.variant,
            r.paper,
            r.measured(),
            r.verdict()
        );
    }
    eprintln!("done: {}", out.join(ABLATION_MD).display());
    Ok(())
}
