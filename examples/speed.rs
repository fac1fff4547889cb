//! One speed workload of issue #5, timed, as one JSON line on stdout: what
//! `benches/compare.py` runs (once per workload, each in its own process) to compare with
//! PyTorch. The workloads are the criterion benches' (`benches/workloads.rs`).
//!
//! ```text
//! cargo run --release --example speed -- --layout torchvision --mode infer --batch 16
//! cargo run --release --example speed -- --layout alexnet --mode train --batch 32 --iters 5
//! cargo run --release --example speed -- --mode sgemm --n 2048
//! cargo run --release --features cuda --example speed -- --device cuda --mode train --batch 128
//! ```
//!
//! The line holds the seconds per iteration (median, mean, min), images/s at the median (or
//! GFLOP/s for `sgemm`), the resident memory once the workload is set up (`setup_rss_mb`: model,
//! input and, for training, nothing run yet) and the peak (`peak_rss_mb`, `VmHWM` of
//! `/proc/self/status`, Linux only), and candle's thread count. On a GPU every iteration ends with
//! a device synchronisation, so the times are the GPU's work, not its queueing.

#[path = "../benches/workloads.rs"]
mod workloads;

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use candle_zoo::device::DeviceChoice;
use candle_zoo::models::alexnet::Layout;
use candle_zoo::train::Precision;
use clap::{Parser, ValueEnum};
use workloads::{Inference, Sgemm, TrainStep};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Eval-mode logits of a batch.
    Infer,
    /// One training step (forward, backward, SGD with momentum and weight decay).
    Train,
    /// One n x n by n x n f32 matmul.
    Sgemm,
}

#[derive(Parser)]
#[command(about = "Time one AlexNet speed workload and print one JSON line")]
struct Args {
    /// torchvision (224 px input) or alexnet (the two-tower model, 227 px).
    #[arg(long, default_value = "torchvision")]
    layout: String,

    #[arg(long, value_enum, default_value_t = Mode::Infer)]
    mode: Mode,

    /// Images per batch (infer, train).
    #[arg(long, default_value_t = 16)]
    batch: usize,

    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,

    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,

    /// Matrix side for sgemm.
    #[arg(long, default_value_t = workloads::SGEMM_N)]
    n: usize,

    /// cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,

    /// Training arithmetic (train): f32, or bf16 (mixed precision, CUDA).
    #[arg(long, default_value = "f32")]
    precision: Precision,
}

/// A `kB` field of `/proc/self/status` in MB (1e6 bytes), if the file exists.
fn status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0 / 1e6)
}

fn time(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect()
}

fn main() -> Result<()> {
    // Many same-sized steps: reuse freed memory rather than fault it back in each time.
    candle_zoo::memory::retain_freed_memory();
    let args = Args::parse();
    if args.iters == 0 || args.batch == 0 {
        bail!("--iters and --batch must be at least 1");
    }
    let layout: Layout = args.layout.parse()?;
    let device = args.device.device()?;
    let (times, setup_rss, per_iter, unit) = match args.mode {
        Mode::Infer => {
            let w = Inference::new(layout, args.batch, &device)?;
            let setup = status_mb("VmRSS:");
            let times = time(&device, args.warmup, args.iters, || {
                w.run()?;
                Ok(())
            })?;
            (times, setup, w.batch() as f64, "images_per_s")
        }
        Mode::Train => {
            let mut w = TrainStep::new(layout, args.batch, &device)?;
            w.compute = args.precision.compute_dtype();
            let setup = status_mb("VmRSS:");
            let times = time(&device, args.warmup, args.iters, || Ok(w.step()?))?;
            (times, setup, w.batch() as f64, "images_per_s")
        }
        Mode::Sgemm => {
            let w = Sgemm::new(args.n, &device)?;
            let setup = status_mb("VmRSS:");
            let times = time(&device, args.warmup, args.iters, || {
                w.run()?;
                Ok(())
            })?;
            (times, setup, w.flops() / 1e9, "gflops")
        }
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let mean = times.iter().sum::<f64>() / n as f64;
    let mode = match args.mode {
        Mode::Infer => "infer",
        Mode::Train => "train",
        Mode::Sgemm => "sgemm",
    };
    let batch = if args.mode == Mode::Sgemm {
        serde_json::Value::Null
    } else {
        args.batch.into()
    };
    let line = serde_json::json!({
        "side": "candle",
        "layout": if args.mode == Mode::Sgemm { "-" } else { layout.name() },
        "mode": mode,
        "batch": batch,
        "n": if args.mode == Mode::Sgemm { args.n.into() } else { serde_json::Value::Null },
        "iters": n,
        "warmup": args.warmup,
        "median_s": median,
        "mean_s": mean,
        "min_s": sorted[0],
        unit: per_iter / median,
        "setup_rss_mb": setup_rss,
        "peak_rss_mb": status_mb("VmHWM:"),
        "threads": candle_core::utils::get_num_threads(),
        "device": candle_zoo::device::describe(&device),
        "precision": args.precision.to_string(),
    });
    println!("{line}");
    Ok(())
}
