//! Converts the original AlexNet weights (Caffe `.caffemodel`, ONNX, PyTorch `.pth`) into a
//! safetensors file that `--weights` and `AlexNet::load` read.
//!
//! ```text
//! cargo run --release --example convert -- bvlc_alexnet.caffemodel --out bvlc_alexnet.safetensors
//! cargo run --release --example convert -- bvlc_reference_caffenet.caffemodel \
//!     --mean ilsvrc_2012_mean.binaryproto --out bvlc_caffenet.safetensors
//! cargo run --release --example convert -- bvlcalexnet-12.onnx --out bvlcalexnet.safetensors
//! cargo run --release --example convert -- my_caffenet_port.pth --layout caffenet --out x.safetensors
//! cargo run --release --example convert -- bvlc_alexnet.caffemodel --install   # for --model bvlc-alexnet
//! ```
//! See `weights/README.md` for the original downloads and the checksums to expect. `--install`
//! checks the input against the registry's published checksums and writes the result where
//! `AlexNetWeights::load` (and `classify --model NAME`) find it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::Module;
use candle_zoo::data::preprocess::{Preset, Resize};
use candle_zoo::device::{self, DeviceChoice};
use candle_zoo::models::alexnet::Layout;
use candle_zoo::weights::checksum::sha256_file;
use candle_zoo::weights::convert::{
    convert, read_mean_binaryproto, read_mean_image, ConvertOptions, SourceFormat,
};
use candle_zoo::weights::{metadata, AlexNetWeights};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Convert Caffe, ONNX or PyTorch AlexNet weights to safetensors")]
struct Args {
    /// The weights to convert: .caffemodel, .onnx, .pth or .safetensors.
    #[arg(value_name = "INPUT")]
    input: PathBuf,

    /// Where to write the safetensors file.
    #[arg(long, value_name = "PATH", required_unless_present = "install")]
    out: Option<PathBuf>,

    /// Install a published original for the registry (`--model bvlc-alexnet`, ...) instead of
    /// writing --out: it must have the registry's checksum.
    #[arg(long, conflicts_with = "out")]
    install: bool,

    /// The input's format, where its name does not tell: caffe, onnx or torch.
    #[arg(long, value_name = "FORMAT")]
    from: Option<SourceFormat>,

    /// The layout: bvlc-alexnet or caffenet for two-tower PyTorch weights (Caffe and ONNX files
    /// say it themselves; a different value is an error).
    #[arg(long)]
    layout: Option<Layout>,

    /// The preprocessing preset to record (default: the layout's).
    #[arg(long)]
    preprocess: Option<Preset>,

    /// A Caffe mean file (e.g. ilsvrc_2012_mean.binaryproto): its per-channel means are recorded.
    #[arg(long, value_name = "FILE")]
    mean: Option<PathBuf>,

    /// A Caffe mean file to store whole: subtracted pixel by pixel at the crop's offset, as
    /// Caffe's data layer does (needs the Caffe preset's 256x256 resize).
    #[arg(long, value_name = "FILE", conflicts_with = "mean")]
    mean_image: Option<PathBuf>,

    /// The crop side to record (default: the preset's; 224 for ONNX two-tower models).
    #[arg(long)]
    crop: Option<u32>,

    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,

    /// Device for the check run of the converted model: auto, cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(out) = args.out.as_ref().filter(|out| out.exists() && !args.force) {
        bail!("{} exists; pass --force to replace it", out.display());
    }
    let mean = args.mean.as_ref().map(read_mean_binaryproto).transpose()?;
    let mean_image = args.mean_image.as_ref().map(read_mean_image).transpose()?;
    let format = match args.from {
        Some(format) => format,
        None => SourceFormat::detect(&args.input)
            .context("name its format with --from caffe|onnx|torch")?,
    };
    let options = ConvertOptions {
        format: Some(format),
        layout: args.layout,
        preprocess: args.preprocess,
        mean,
        crop: args.crop,
        mean_image,
    };
    let converted = convert(&args.input, &options)
        .with_context(|| format!("converting {}", args.input.display()))?;
    let cfg = &converted.config;
    let meta = &converted.metadata;
    println!(
        "read   {} ({}, sha256 {})",
        args.input.display(),
        meta[metadata::SOURCE_FORMAT],
        meta[metadata::SOURCE_SHA256]
    );
    println!(
        "layout {}: conv {}, fc {}, {} classes",
        cfg.layout,
        cfg.channels.map(|c| c.to_string()).join("-"),
        cfg.hidden,
        cfg.num_classes
    );
    let p = converted.preprocess()?;
    let resize = match p.resize {
        Resize::ShorterSide(s) => format!("shorter side {s}"),
        Resize::Exact(w, h) => format!("{w}x{h} warp"),
    };
    let mean = match &p.mean_image {
        Some(m) => format!("{}x{} mean image", m.width, m.height),
        None => format!("mean {:?}", p.mean),
    };
    println!(
        "input  {} preset: {resize}, crop {}, {}, {mean}, std {:?}",
        meta[metadata::PREPROCESS],
        p.crop,
        if p.bgr { "BGR" } else { "RGB" },
        p.std
    );

    // Prove the file is a working model before writing it: one forward pass on the device.
    let device = args.device.device()?;
    let model = converted.model(&device)?;
    let side = p.crop as usize;
    let x = Tensor::zeros((1, 3, side, side), DType::F32, &device)?;
    let logits = model.forward(&x)?;
    if logits
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .any(|v| !v.is_finite())
    {
        bail!("the converted model gives non-finite logits on a zero image");
    }
    println!("check  forward pass on {}: ok", device::describe(&device));

    let out = match &args.out {
        Some(out) => {
            converted
                .save(out)
                .with_context(|| format!("writing {}", out.display()))?;
            out.clone()
        }
        None => {
            let Some(weights) = AlexNetWeights::of_converted(&converted) else {
                bail!(
                    "{} is none of the registry's originals (sha1 {}); write it with --out \
                     instead",
                    args.input.display(),
                    meta[metadata::SOURCE_SHA1]
                );
            };
            weights.install(&converted)?
        }
    };
    println!("wrote  {} (sha256 {})", out.display(), sha256_file(&out)?);
    Ok(())
}
