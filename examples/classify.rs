//! Top-5 ImageNet classes of images, with a pretrained AlexNet.
//!
//! ```text
//! cargo run --release --example classify                      # the bundled cat photo
//! cargo run --release --example classify -- a.jpg b.png --json
//! cargo run --release --example classify -- --weights alexnet-owt-7be5be79.pth cat.jpg
//! cargo run --release --example classify -- --model-id OWNER/NAME --hub-file alexnet.safetensors
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_zoo::{cli::ModelArgs, data::imagenet, device};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Classify images with a pretrained AlexNet")]
struct Args {
    /// Images to classify (any format the image crate reads; default: the bundled cat photo).
    #[arg(value_name = "IMAGE")]
    images: Vec<PathBuf>,

    #[command(flatten)]
    model: ModelArgs,

    /// How many classes to print per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.images.is_empty() {
        args.images.push(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/chelsea.png"
        )));
    }
    let device = args.model.device()?;
    let loaded = args
        .model
        .load(&device)
        .with_context(|| args.model.context())?;
    let classes = imagenet::classes();
    if loaded.model.num_classes() != classes.len() {
        eprintln!(
            "note: the model has {} classes, not ImageNet's {}; printing class indices",
            loaded.model.num_classes(),
            classes.len()
        );
    }
    if !args.json {
        eprintln!(
            "model {} ({} layout, {} preprocessing) on {}",
            args.model.source(),
            loaded.model.layout(),
            loaded.preprocess.preset(),
            device::describe(&device)
        );
    }

    let mut results = Vec::new();
    let mut failed = 0;
    for path in &args.images {
        let top = loaded
            .preprocess
            .load(path, &device)
            .and_then(|x| loaded.model.top_k(&x.unsqueeze(0)?, args.top_k))
            .map(|mut rows| rows.remove(0));
        let name = path.display().to_string();
        let label = |i: usize| match classes.get(i) {
            Some(l) if loaded.model.num_classes() == classes.len() => l.to_string(),
            _ => format!("class {i}"),
        };
        match top {
            Ok(top) if args.json => results.push(serde_json::json!({
                "image": name,
                "top": top.iter().map(|&(i, p)| serde_json::json!({
                    "class": i, "label": label(i), "probability": p,
                })).collect::<Vec<_>>(),
            })),
            Ok(top) => {
                println!("{name}");
                for (i, p) in top {
                    println!("  {:6.2}%  {}", p * 100.0, label(i));
                }
            }
            Err(e) => {
                failed += 1;
                if args.json {
                    results.push(serde_json::json!({ "image": name, "error": e.to_string() }));
                } else {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    if failed > 0 {
        bail!(
            "{failed} of {} images could not be classified",
            args.images.len()
        );
    }
    Ok(())
}
