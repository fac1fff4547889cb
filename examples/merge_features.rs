//! Joins the outputs of `extract-fc7 --shard K/N` into the file one run over all the inputs would
//! have written, byte for byte, with its manifest.
//!
//! ```text
//! cargo run --release --example merge-features -- --out fc7.safetensors fc7-0.safetensors fc7-1.safetensors
//! ```
//! It checks the shards first (each finished, the same job, 0/N .. N-1/N each once) and merges
//! nothing if one fails, naming it.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Merge the shard outputs of extract-fc7 --shard K/N")]
struct Args {
    /// The shards' feature files, in any order.
    #[arg(value_name = "SHARD", required = true)]
    shards: Vec<PathBuf>,

    /// The merged features file.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,

    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    let summary = candle_zoo::data::features::merge(&args.shards, &args.out)?;
    eprintln!(
        "merged {} shards: {} rows of {} values to {}, manifest {} ({} images failed)",
        args.shards.len(),
        summary.rows,
        summary.dim,
        summary.features.display(),
        summary.manifest.display(),
        summary.failed.len()
    );
    Ok(())
}
