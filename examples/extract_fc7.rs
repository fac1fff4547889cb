//! AlexNet features (fc7 by default) for many images, as one `[N, D]` matrix plus a manifest.
//!
//! ```text
//! cargo run --release --example extract-fc7 -- --out fc7.safetensors photos/
//! cargo run --release --example extract-fc7 -- --out fc7.npy @list.txt extra.jpg
//! cargo run --release --example extract-fc7 -- --weights alexnet.pth --layer pool5 --out p5.safetensors photos/
//! cargo run --release --example extract-fc7 -- --out fc7.safetensors photos/ --resume   # after a kill
//! cargo run --release --example extract-fc7 -- --shard 0/2 --out fc7-0.safetensors photos/  # one of 2
//! ```
//! Rows follow the input order (a folder's images sorted by path); `OUT` with the extension
//! `csv` lists each image's row, or why it failed. Images that fail are skipped, reported, and
//! make the exit code 1.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_zoo::cli::{ModelArgs, Progress};
use candle_zoo::data::features::{
    extract_to, work_dir, FeatureFormat, FeatureWriter, RunInfo, Shard,
};
use candle_zoo::data::{collect_images, BatchLoader};
use candle_zoo::device;
use candle_zoo::models::alexnet::Tap;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Extract AlexNet features for many images")]
struct Args {
    /// Image files, folders (searched recursively for .jpg/.jpeg/.png) and @lists (one path per
    /// line, relative to the list's folder).
    #[arg(value_name = "INPUT", required = true)]
    inputs: Vec<String>,

    /// The features file to write: .safetensors or .npy.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,

    #[command(flatten)]
    model: ModelArgs,

    /// The tap: conv1..conv5, pool5, fc6, fc7, fc8 (or logits); conv and pool taps are flattened.
    #[arg(long, default_value = "fc7")]
    layer: Tap,

    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_parser = candle_zoo::cli::parse_batch_size)]
    batch_size: usize,

    /// Output format (default: from --out's extension, else safetensors).
    #[arg(long)]
    format: Option<FeatureFormat>,

    /// Threads decoding and resizing images while the model runs (default: the cores).
    #[arg(long)]
    workers: Option<usize>,

    /// Continue an interrupted run (its work is in OUT.partial/) without redoing finished images.
    #[arg(long)]
    resume: bool,

    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,

    /// Extract only shard K of N (K from 0) of the inputs, into --out; `merge-features` joins
    /// the N shards' outputs into the file one run would have written.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
}

fn main() -> Result<()> {
    // Many same-sized steps: reuse freed memory rather than fault it back in each time.
    candle_zoo::memory::retain_freed_memory();
    let args = Args::parse();
    let format =
        args.format
            .unwrap_or_else(|| match args.out.extension().and_then(|e| e.to_str()) {
                Some(e) if e.eq_ignore_ascii_case("npy") => FeatureFormat::Npy,
                _ => FeatureFormat::Safetensors,
            });
    let resuming = args.resume && work_dir(&args.out).exists();
    if args.out.exists() && !args.force && !resuming {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    let all = collect_images(&args.inputs)?;
    if all.is_empty() {
        bail!("no images found in {}", args.inputs.join(" "));
    }
    let paths = match args.shard {
        Some(shard) => all[shard.range(all.len(), args.batch_size)].to_vec(),
        None => all.clone(),
    };

    let device = args.model.device()?;
    let loaded = args
        .model
        .load(&device)
        .with_context(|| args.model.context())?;
    let source = args.model.source();
    let metadata = RunInfo {
        model: &source,
        layout: loaded.model.layout(),
        tap: args.layer,
        preprocess: &loaded.preprocess,
        producer: concat!("candle-zoo ", env!("CARGO_PKG_VERSION"), " extract-fc7"),
        batch_size: args.batch_size,
        inputs: &all,
        shard: args.shard,
    }
    .metadata();
    let mut writer = match FeatureWriter::create(&args.out, format, &paths, metadata, args.resume) {
        Err(e @ candle_zoo::Error::Interrupted { .. }) => {
            return Err(anyhow::Error::new(e).context("pass --resume to continue it"))
        }
        writer => writer?,
    };
    let total = paths.len();
    let skip = writer.done();
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let part = args.shard.map_or(String::new(), |k| {
        format!(" (shard {k} of {} images)", all.len())
    });
    eprintln!(
        "{} images{part}, {} tap of {} ({} layout) on {}, batch {}, {} decoding threads{}",
        total,
        args.layer,
        args.model.source(),
        loaded.model.layout(),
        device::describe(&device),
        args.batch_size,
        workers,
        if skip > 0 {
            format!(", resuming after {skip} done")
        } else {
            String::new()
        }
    );

    let mut progress = Progress::new("extract", "img", total as u64, skip as u64);
    let loader = BatchLoader::new(
        paths,
        loaded.preprocess.clone(),
        args.batch_size,
        workers,
        skip,
    )?;
    extract_to(
        &loaded.model,
        args.layer,
        loader,
        &mut writer,
        &device,
        |report| {
            for (_, reason) in &report.failed {
                progress.println(format!("skipped: {reason}"));
            }
            progress.inc(report.images as u64);
            ControlFlow::Continue(())
        },
    )?;
    let rate = progress.rate();
    progress.finish();
    let summary = writer.finish()?;
    eprintln!(
        "wrote {} rows of {} values to {} ({:.1} img/s), manifest {}",
        summary.rows,
        summary.dim,
        summary.features.display(),
        rate,
        summary.manifest.display()
    );
    if !summary.failed.is_empty() {
        eprintln!("{} of {total} images failed:", summary.failed.len());
        for (_, reason) in &summary.failed {
            eprintln!("  {reason}");
        }
        std::process::exit(1);
    }
    Ok(())
}
