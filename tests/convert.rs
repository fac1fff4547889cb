//! Converting the original weights: a two-tower AlexNet built in PyTorch and written as a Caffe
//! `.caffemodel` (both layer formats), an ONNX export and a `.pth`
//! (`scripts/make_convert_fixtures.py`) converts to safetensors whose logits equal PyTorch's; bad
//! files get errors that name the layer at fault.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::Module;
use candle_zoo::data::preprocess::{MeanImage, Preprocess};
use candle_zoo::models::alexnet::Layout;
use candle_zoo::weights::convert::{
    convert, read_mean_binaryproto, read_mean_image, ConvertOptions, SourceFormat,
};
use candle_zoo::weights::metadata::MEAN_IMAGE as MEAN_IMAGE_KEY;
use candle_zoo::weights::Checkpoint;
use candle_zoo::Error;
use common::{det_values, rel_err};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/convert")
        .join(name)
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The formula input the script fed PyTorch.
fn input(side: usize) -> Tensor {
    let r = reference();
    let batch = r["batch"].as_u64().unwrap() as usize;
    let bound = r["input_bound"].as_f64().unwrap();
    let data = det_values("input", batch * 3 * side * side, bound);
    Tensor::from_vec(data, (batch, 3, side, side), &Device::Cpu).unwrap()
}

fn expected(case: &str) -> Vec<f32> {
    reference()[case]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// Converts, saves, reloads through `Checkpoint`, and returns the reloaded model's logits.
fn convert_and_run(name: &str, options: &ConvertOptions, side: usize) -> (Vec<f32>, Checkpoint) {
    let converted = convert(fixture(name), options).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("converted.safetensors");
    converted.save(&out).unwrap();
    let ckpt = Checkpoint::open(&out).unwrap();
    let model = ckpt.load(&Device::Cpu).unwrap();
    assert_eq!(model.layout(), converted.layout());
    let logits = model.forward(&input(side)).unwrap();
    let direct = converted.model(&Device::Cpu).unwrap().forward(&input(side));
    assert_eq!(
        logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        direct
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    (logits.flatten_all().unwrap().to_vec1().unwrap(), ckpt)
}

fn assert_parity(got: &[f32], case: &str) {
    let err = rel_err(got, &expected(case));
    eprintln!("{case}: logits relative error {err:.2e}");
    assert!(err <= 1e-5, "{case}: relative error {err:.3e} > 1e-5");
}

#[test]
fn caffemodel_in_the_current_layer_format_matches_pytorch() {
    let (logits, ckpt) = convert_and_run("alexnet.caffemodel", &ConvertOptions::default(), 227);
    assert_parity(&logits, "alexnet_227");
    let meta = ckpt.metadata();
    assert_eq!(meta["layout"], "bvlc-alexnet");
    assert_eq!(meta["preprocess"], "caffe");
    assert_eq!(meta["source"], "alexnet.caffemodel");
    assert_eq!(meta["source_format"], "caffe");
    let (sha256, sha1) =
        candle_zoo::weights::checksum::digests(fixture("alexnet.caffemodel")).unwrap();
    assert_eq!(
        (&meta["source_sha256"], &meta["source_sha1"]),
        (&sha256, &sha1)
    );
    assert_eq!(ckpt.preprocess().unwrap(), Preprocess::caffe());
}

#[test]
fn caffemodel_in_the_v1_format_is_caffenet_and_matches_pytorch() {
    let (logits, ckpt) = convert_and_run("caffenet_v1.caffemodel", &ConvertOptions::default(), 227);
    assert_parity(&logits, "caffenet_227");
    // Pool before LRN in the file: CaffeNet, recorded so that loading needs no flag.
    assert_eq!(ckpt.metadata()["layout"], "caffenet");
}

#[test]
fn caffemodel_in_the_2013_v0_format_matches_pytorch() {
    let (logits, ckpt) = convert_and_run("alexnet_v0.caffemodel", &ConvertOptions::default(), 227);
    assert_parity(&logits, "alexnet_227");
    assert_eq!(ckpt.metadata()["layout"], "bvlc-alexnet");
}

#[test]
fn onnx_export_matches_pytorch_at_224() {
    let (logits, ckpt) = convert_and_run("alexnet.onnx", &ConvertOptions::default(), 224);
    assert_parity(&logits, "alexnet_224");
    assert_eq!(ckpt.metadata()["layout"], "bvlc-alexnet");
    // The ONNX model zoo feeds 224 px: the recorded pipeline crops 224.
    let p = ckpt.preprocess().unwrap();
    assert_eq!((p.crop, p.bgr), (224, true));
}

#[test]
fn pytorch_port_of_caffenet_needs_the_layout_and_matches_pytorch() {
    let options = ConvertOptions {
        layout: Some(Layout::CaffeNet),
        ..Default::default()
    };
    let (logits, ckpt) = convert_and_run("caffenet_port.pth", &options, 227);
    assert_parity(&logits, "caffenet_227");
    assert_eq!(ckpt.metadata()["layout"], "caffenet");
    assert_eq!(ckpt.metadata()["source_format"], "torch");
    // Weights alone cannot tell CaffeNet from AlexNet: the default is AlexNet.
    let guessed = convert(fixture("caffenet_port.pth"), &ConvertOptions::default()).unwrap();
    assert_eq!(guessed.layout(), Layout::BvlcAlexNet);
}

#[test]
fn torchvision_pth_converts_to_the_same_model() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tv_small.pth");
    let converted = convert(&path, &ConvertOptions::default()).unwrap();
    assert_eq!(converted.layout(), Layout::TorchVision);
    assert!(converted
        .tensors
        .iter()
        .any(|(k, _)| k == "features.10.weight"));
    let x = Tensor::ones((1, 3, 96, 96), candle_core::DType::F32, &Device::Cpu).unwrap();
    let direct = Checkpoint::open(&path).unwrap().load(&Device::Cpu).unwrap();
    let a: Vec<f32> = converted
        .model(&Device::Cpu)
        .unwrap()
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = direct
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(converted.metadata["preprocess"], "torchvision");
}

#[test]
fn the_same_source_always_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let options = ConvertOptions::default();
    convert(fixture("caffenet_v1.caffemodel"), &options)
        .unwrap()
        .save(&a)
        .unwrap();
    convert(fixture("caffenet_v1.caffemodel"), &options)
        .unwrap()
        .save(&b)
        .unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn mean_file_is_recorded_per_channel() {
    let mean = read_mean_binaryproto(fixture("mean.binaryproto")).unwrap();
    let want = expected("mean_bgr");
    for c in 0..3 {
        assert!((mean[c] - want[c]).abs() < 1e-4, "{mean:?} vs {want:?}");
    }
    let options = ConvertOptions {
        mean: Some(mean),
        ..Default::default()
    };
    let converted = convert(fixture("alexnet.caffemodel"), &options).unwrap();
    assert_eq!(converted.preprocess().unwrap().mean, mean);
    // A weights file is not a mean file.
    let err = read_mean_binaryproto(fixture("alexnet.caffemodel")).unwrap_err();
    assert!(err.to_string().contains("alexnet.caffemodel"), "{err}");
}

/// Caffe's mean image: stored with the weights, subtracted pixel by pixel at the crop's offset.
#[test]
fn mean_image_is_stored_and_subtracted_at_the_crop_offset() {
    let small = read_mean_image(fixture("mean.binaryproto")).unwrap();
    assert_eq!((small.height, small.width), (16, 16));
    // A 256x256 mean whose value encodes its position, as the pipeline's resize is 256x256.
    let (h, w) = (256, 256);
    let values: Vec<f32> = (0..3 * h * w).map(|i| (i % 1000) as f32 / 10.0).collect();
    let mean = MeanImage {
        height: h,
        width: w,
        values: values.clone(),
    };
    let options = ConvertOptions {
        mean_image: Some(mean.clone()),
        ..Default::default()
    };
    let converted = convert(fixture("alexnet.caffemodel"), &options).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("with_mean.safetensors");
    converted.save(&out).unwrap();
    let ckpt = Checkpoint::open(&out).unwrap();
    assert!(ckpt.keys().iter().any(|k| k == MEAN_IMAGE_KEY));
    let p = ckpt.preprocess().unwrap();
    assert_eq!(p.mean_image.as_deref(), Some(&mean));
    // The model still loads (the mean image is not a weight).
    ckpt.load(&Device::Cpu).unwrap();

    // A 256x256 image (no resize) of one colour: value = pixel - mean[c, 14 + y, 14 + x].
    let image = image::RgbImage::from_pixel(256, 256, image::Rgb([200, 100, 50]));
    let x = p
        .to_tensor(&p.resize_and_crop(&image).unwrap(), &Device::Cpu)
        .unwrap();
    assert_eq!(x.dims(), &[3, 227, 227]);
    let got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let bgr = [50.0f32, 100.0, 200.0];
    for (c, y, xx) in [(0, 0, 0), (1, 5, 7), (2, 226, 226)] {
        let want = bgr[c] - values[c * h * w + (14 + y) * w + 14 + xx];
        assert_eq!(
            got[c * 227 * 227 + y * 227 + xx],
            want,
            "c {c}, y {y}, x {xx}"
        );
    }
    // A mean image that does not match the resize is refused.
    let err = candle_zoo::data::preprocess::Preprocess::torchvision()
        .with_mean_image(small)
        .unwrap_err();
    assert!(err.to_string().contains("16x16"), "{err}");
}

fn convert_err(name: &str, options: &ConvertOptions) -> String {
    let err = convert(fixture(name), options).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(name), "the error should name the file: {msg}");
    msg
}

#[test]
fn a_missing_blob_names_the_layer() {
    let msg = convert_err("missing_blob.caffemodel", &ConvertOptions::default());
    assert!(msg.contains("`fc7`") && msg.contains("bias"), "{msg}");
}

#[test]
fn a_wrong_layer_count_is_refused() {
    let msg = convert_err("no_conv5.caffemodel", &ConvertOptions::default());
    assert!(
        msg.contains("5 convolution") && msg.contains("has 4"),
        "{msg}"
    );
}

#[test]
fn an_lrn_that_is_not_alexnets_is_refused() {
    let msg = convert_err("bad_lrn.caffemodel", &ConvertOptions::default());
    assert!(msg.contains("norm1") && msg.contains("size 3"), "{msg}");
}

#[test]
fn a_layout_that_contradicts_the_file_is_refused() {
    let options = ConvertOptions {
        layout: Some(Layout::BvlcAlexNet),
        ..Default::default()
    };
    let msg = convert_err("caffenet_v1.caffemodel", &options);
    assert!(msg.contains("caffenet") && msg.contains("alexnet"), "{msg}");
}

#[test]
fn truncated_files_are_refused_with_the_format_named() {
    let dir = tempfile::tempdir().unwrap();
    for (name, what) in [
        ("alexnet.caffemodel", ".caffemodel"),
        ("alexnet.onnx", "ONNX"),
    ] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let cut = dir.path().join(name);
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let err = convert(&cut, &ConvertOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains(what), "{msg}");
    }
    // A .pth cut short.
    let bytes = std::fs::read(fixture("caffenet_port.pth")).unwrap();
    let cut = dir.path().join("port.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = convert(&cut, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("port.pth"), "{msg}");
}

#[test]
fn an_unrecognised_file_asks_for_the_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.dat");
    std::fs::write(&path, b"\x0a\x03abc").unwrap();
    let msg = convert(&path, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("weights.dat") && msg.contains("say which format it is"),
        "{msg}"
    );
    assert!(!msg.contains("--"), "a library error names no flag: {msg}");
    // Named explicitly, the caffe reader finds no layers in it.
    let options = ConvertOptions {
        format: Some(SourceFormat::Caffe),
        ..Default::default()
    };
    let msg = convert(&path, &options).unwrap_err().to_string();
    assert!(msg.contains("no layers"), "{msg}");
}

/// The `convert` example: converts, refuses to overwrite without --force, and fails cleanly.
#[test]
fn convert_example_end_to_end() {
    let bin = common::example_bin("convert");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("caffenet.safetensors");
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(&bin)
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    };
    let src = fixture("caffenet_v1.caffemodel");
    let args = [
        src.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--device".as_ref(),
        "cpu".as_ref(),
    ];
    let first = run(&args);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(stdout.contains("layout caffenet"), "{stdout}");
    let sha = candle_zoo::weights::checksum::sha256_file(&out).unwrap();
    assert!(
        stdout.contains(&sha),
        "the output's sha256 is printed: {stdout}"
    );
    let model = Checkpoint::open(&out).unwrap().load(&Device::Cpu).unwrap();
    assert_eq!(model.layout(), Layout::CaffeNet);

    // An existing output is kept unless --force.
    let again = run(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        candle_zoo::weights::checksum::sha256_file(&out).unwrap(),
        sha
    );

    // A bad input leaves nothing behind and names the file.
    let bad = fixture("missing_blob.caffemodel");
    let out2 = dir.path().join("bad.safetensors");
    let failed = run(&[bad.as_os_str(), "--out".as_ref(), out2.as_os_str()]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("missing_blob.caffemodel") && stderr.contains("fc7"),
        "{stderr}"
    );
    assert!(!out2.exists());

    // The example names the flag that says the format.
    let unknown = dir.path().join("weights.dat");
    std::fs::write(&unknown, b"\x0a\x03abc").unwrap();
    let out3 = dir.path().join("unknown.safetensors");
    let failed = run(&[unknown.as_os_str(), "--out".as_ref(), out3.as_os_str()]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success() && stderr.contains("--from"),
        "{stderr}"
    );
}

/// `convert --install` installs only the registry's originals: the fixture, a real Caffe file but
/// not BVLC's, is refused by its checksum and nothing is written.
#[test]
fn convert_install_refuses_what_is_not_a_published_original() {
    let bin = common::example_bin("convert");
    let store = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&bin)
        .args(["--install", "--device", "cpu"])
        .arg(fixture("alexnet.caffemodel"))
        .env("CANDLE_ZOO_WEIGHTS", store.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("none of the registry's originals") && stderr.contains("--out"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);
}

/// The registry's Caffe entries load from their installed conversion, and only from the
/// conversion of the published file: here the fixture stands in for `bvlc_reference_caffenet`
/// once its recorded source checksum is the published one.
#[test]
fn installed_originals_load_through_the_registry() {
    use candle_zoo::weights::{metadata, AlexNetWeights, Published};
    let store = tempfile::tempdir().unwrap();
    // Only this test reads the variable in this process.
    std::env::set_var("CANDLE_ZOO_WEIGHTS", store.path());
    let entry = AlexNetWeights::BvlcCaffeNet;
    let Published::Sha1(published) = entry.info().original_checksum else {
        panic!("the Caffe entries publish SHA-1s")
    };

    // Nothing installed: the error says where it looked and what to download.
    let err = entry.load(&Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::NotInstalled { .. }), "{msg}");
    assert!(
        msg.contains(&store.path().display().to_string())
            && msg.contains("bvlc_reference_caffenet.caffemodel")
            && msg.contains(published),
        "{msg}"
    );

    // The fixture is not the published file: refused, nothing written.
    let mut converted = convert(fixture("caffenet_v1.caffemodel"), &Default::default()).unwrap();
    let err = entry.install(&converted).unwrap_err();
    assert!(matches!(err, Error::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(published), "{err}");
    assert!(!entry.installed_path().exists());
    assert_eq!(AlexNetWeights::of_converted(&converted), None);

    // As if it were: installed, found, loaded as CaffeNet with Caffe's pipeline.
    converted
        .metadata
        .insert(metadata::SOURCE_SHA1.into(), published.into());
    assert_eq!(AlexNetWeights::of_converted(&converted), Some(entry));
    // The registry's layout is checked too.
    assert!(AlexNetWeights::BvlcAlexNet.install(&converted).is_err());
    let path = entry.install(&converted).unwrap();
    assert_eq!(path, store.path().join("bvlc-caffenet.safetensors"));
    let (model, preprocess) = entry.load(&Device::Cpu).unwrap();
    assert_eq!(model.layout(), Layout::CaffeNet);
    assert_eq!(preprocess, Preprocess::caffe());
    let x = input(227);
    assert_eq!(
        model.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
        converted
            .model(&Device::Cpu)
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );

    // A file put there by hand from another source is refused by name.
    let other = convert(fixture("caffenet_v1.caffemodel"), &Default::default()).unwrap();
    other.save(&path).unwrap();
    let msg = entry.load(&Device::Cpu).unwrap_err().to_string();
    assert!(
        msg.contains("bvlc-caffenet.safetensors") && msg.contains("converted from another file"),
        "{msg}"
    );
}
