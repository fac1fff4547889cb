//! Fine-tunes pretrained AlexNet weights on an image folder: a new head for its classes, and
//! either a frozen backbone (`--freeze-through LAYER`: no gradients are computed up to it) or
//! every layer training, the new head at `--head-lr-mult` times the base rate.
//!
//! ```text
//! cargo run --release --example finetune -- --data DATA --out runs/ft --freeze-through fc7
//! cargo run --release --example finetune -- --weights alexnet.safetensors --data DATA --out runs/ft
//! ```
//! Outputs are those of `train`, and the final confusion matrix is printed and written to
//! `confusion.csv`.

use anyhow::{Context, Result};
use candle_zoo::cli::{run_training, ModelArgs, TrainArgs};
use candle_zoo::models::alexnet::Tap;
use candle_zoo::train::optim::SgdConfig;
use candle_zoo::train::{ParamPolicy, TrainConfig, Trainer, CONFUSION_CSV};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Fine-tune pretrained AlexNet on an image folder")]
struct Args {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    train: TrainArgs,

    /// Freeze the layers up to and including this one (conv1..conv5, pool5, fc6, fc7).
    /// Without it every layer trains.
    #[arg(long, value_name = "LAYER")]
    freeze_through: Option<Tap>,

    /// Learning-rate multiplier of the new head (Caffe's fine-tuning example uses 10).
    #[arg(long, default_value_t = 10.0)]
    head_lr_mult: f64,

    /// Dropout before (torchvision) or after (Caffe) fc6 and fc7.
    #[arg(long, default_value_t = 0.5)]
    dropout: f32,
}

fn main() -> Result<()> {
    // Many same-sized steps: reuse freed memory rather than fault it back in each time.
    candle_zoo::memory::retain_freed_memory();
    let args = Args::parse();
    let placement = args.train.connect(&args.model.device()?)?;
    let comm = placement.comm.clone();
    // An error on one process of a data-parallel run ends them all at once.
    candle_zoo::dist::abort_on_error(&*comm, finetune(&args, placement))
}

fn finetune(args: &Args, placement: candle_zoo::dist::Placement) -> Result<()> {
    let rank0 = placement.comm.rank() == 0;
    let mut trainer = args.train.trainer(placement, |train, val, placement| {
        let loaded = args.model.load(&placement.device)?;
        if rank0 {
            eprintln!("pretrained weights: {}", loaded.path.display());
        }
        let model = loaded
            .model
            .config()
            .clone()
            .with_classes(train.classes().len())
            .with_dropout(args.dropout);
        // Everything but the head, which the new classes replace.
        let weights: Vec<_> = loaded
            .model
            .layers()
            .iter()
            .filter(|layer| !layer.is_head())
            .flat_map(|layer| layer.tensors())
            .collect();
        let policy = ParamPolicy {
            head_lr_mult: args.head_lr_mult,
            freeze_through: args.freeze_through,
            ..ParamPolicy::default()
        };
        let settings = args.train.config(TrainConfig {
            epochs: 10,
            sgd: SgdConfig {
                lr: 0.001,
                ..SgdConfig::default()
            },
            policy,
            ..TrainConfig::default()
        });
        Trainer::with_weights(
            &model,
            &weights,
            loaded.preprocess,
            train,
            val,
            settings,
            &args.train.out,
            placement,
        )
    })?;
    run_training(&mut trainer, "fine-tuning").context("fine-tuning failed")?;
    // Rank 0 alone evaluates.
    if let Some(eval) = trainer.last_evaluation() {
        println!("confusion matrix (rows: true class, columns: predicted):");
        print!("{}", eval.confusion_table(&trainer.classes()));
        println!(
            "top-1 {:.2}%, top-5 {:.2}% on {} images; written to {}",
            100.0 * eval.top1,
            100.0 * eval.top5,
            eval.images,
            trainer.out_dir().join(CONFUSION_CSV).display()
        );
    }
    Ok(())
}
