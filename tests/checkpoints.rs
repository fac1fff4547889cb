//! Loading checkpoints from disk, and the errors bad files get: each names the file, key or shape
//! at fault, and none panics.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;
use candle_zoo::models::alexnet::{AlexNet, Layout};
use candle_zoo::weights::metadata::{LAYOUT as META_LAYOUT, PREPROCESS as META_PREPROCESS};
use candle_zoo::weights::{save_safetensors, Checkpoint, Format};
use candle_zoo::Error;
use common::{det_var_builder, small};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn x() -> Tensor {
    Tensor::ones((2, 3, 227, 227), DType::F32, &Device::Cpu).unwrap()
}

fn logits(m: &AlexNet) -> Vec<Vec<f32>> {
    m.forward(&x()).unwrap().to_vec2().unwrap()
}

fn save(dir: &Path, name: &str, tensors: &[(String, Tensor)], meta: &[(&str, &str)]) -> PathBuf {
    let path = dir.join(name);
    let meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    save_safetensors(&path, tensors, &meta).unwrap();
    path
}

#[test]
fn pytorch_pth_loads_with_the_same_outputs() {
    // tv_small.pth was written by torch.save(model.state_dict()) from the same formula weights.
    let ckpt = Checkpoint::open(fixture("tv_small.pth")).unwrap();
    assert_eq!(ckpt.format(), Format::Pth);
    let from_pth = ckpt.load(&Device::Cpu).unwrap();
    let reference = AlexNet::load(det_var_builder(&small(Layout::TorchVision))).unwrap();
    assert_eq!(from_pth.config(), reference.config());
    assert_eq!(logits(&from_pth), logits(&reference));
}

#[test]
fn safetensors_round_trip_and_layout_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let caffenet = AlexNet::new(
        &small(Layout::CaffeNet),
        det_var_builder(&small(Layout::CaffeNet)),
    )
    .unwrap();
    // Without metadata, Caffe keys mean the BVLC AlexNet order; with it, CaffeNet's.
    let bare = save(
        dir.path(),
        "bare.safetensors",
        &caffenet.named_tensors(),
        &[],
    );
    assert_eq!(
        Checkpoint::open(&bare)
            .unwrap()
            .load(&Device::Cpu)
            .unwrap()
            .layout(),
        Layout::BvlcAlexNet
    );
    let tagged = save(
        dir.path(),
        "tagged.safetensors",
        &caffenet.named_tensors(),
        &[(META_LAYOUT, "caffenet")],
    );
    let ckpt = Checkpoint::open(&tagged).unwrap();
    assert_eq!(ckpt.format(), Format::Safetensors);
    assert_eq!(ckpt.preprocess().unwrap().preset().name(), "caffe");
    let loaded = ckpt.load(&Device::Cpu).unwrap();
    assert_eq!(loaded.layout(), Layout::CaffeNet);
    assert_eq!(logits(&loaded), logits(&caffenet));
    // Metadata that contradicts the keys is refused.
    let lying = save(
        dir.path(),
        "lying.safetensors",
        &caffenet.named_tensors(),
        &[(META_LAYOUT, "torchvision")],
    );
    let err = load_error(&lying).to_string();
    assert!(
        err.contains("lying.safetensors") && err.contains("metadata says layout `torchvision`"),
        "{err}"
    );
}

/// The error of loading `path`, which must open (its header is fine) but not load.
fn load_error(path: &Path) -> Error {
    Checkpoint::open(path)
        .unwrap()
        .load(&Device::Cpu)
        .unwrap_err()
}

fn caffe_tensors() -> Vec<(String, Tensor)> {
    AlexNet::load(det_var_builder(&small(Layout::BvlcAlexNet)))
        .unwrap()
        .named_tensors()
}

#[test]
fn missing_key_names_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = caffe_tensors()
        .into_iter()
        .filter(|(k, _)| k != "conv4.bias")
        .collect();
    let path = save(dir.path(), "partial.safetensors", &tensors, &[]);
    let err = load_error(&path);
    let msg = err.to_string();
    assert!(matches!(err, Error::MissingKey { .. }), "{msg}");
    assert!(
        msg.contains("`conv4.bias`") && msg.contains("partial.safetensors"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_names_the_key_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<_> = caffe_tensors()
        .into_iter()
        .map(|(k, t)| {
            if k == "conv2.weight" {
                // As if conv2 were single-tower: 16x8x5x5 instead of 16x4x5x5.
                (
                    k,
                    Tensor::zeros((16, 8, 5, 5), DType::F32, &Device::Cpu).unwrap(),
                )
            } else {
                (k, t)
            }
        })
        .collect();
    let path = save(dir.path(), "shape.safetensors", &tensors, &[]);
    let msg = load_error(&path).to_string();
    assert!(
        msg.contains("shape.safetensors") && msg.contains("`conv2.weight`"),
        "{msg}"
    );
    assert!(
        msg.contains("[16, 4, 5, 5]") && msg.contains("[16, 8, 5, 5]"),
        "{msg}"
    );
}

#[test]
fn unknown_keys_are_not_an_alexnet() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let path = save(
        dir.path(),
        "other.safetensors",
        &[("encoder.layer.0".into(), t)],
        &[],
    );
    let msg = load_error(&path).to_string();
    assert!(
        msg.contains("not an AlexNet checkpoint") && msg.contains("encoder.layer.0"),
        "{msg}"
    );
}

#[test]
fn truncated_and_corrupt_files_are_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let good = save(dir.path(), "good.safetensors", &caffe_tensors(), &[]);
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let msg = Checkpoint::open(&truncated).unwrap_err().to_string();
    assert!(
        msg.contains("truncated.safetensors") && msg.contains("truncated safetensors"),
        "{msg}"
    );

    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"garbage!");
    let path = dir.path().join("corrupt.safetensors");
    std::fs::write(&path, corrupt).unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("corrupt.safetensors") && msg.contains("corrupt safetensors header"),
        "{msg}"
    );

    let path = dir.path().join("text.safetensors");
    std::fs::write(&path, "this is not a checkpoint at all, just text").unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("neither safetensors nor a PyTorch zip checkpoint"),
        "{msg}"
    );

    let path = dir.path().join("empty.pth");
    std::fs::write(&path, b"").unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("empty.pth") && msg.contains("too short"),
        "{msg}"
    );

    let path = dir.path().join("broken.pth");
    let pth = std::fs::read(fixture("tv_small.pth")).unwrap();
    std::fs::write(&path, &pth[..pth.len() / 2]).unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("broken.pth") && msg.contains("not a readable PyTorch zip"),
        "{msg}"
    );

    let msg = Checkpoint::open(fixture("legacy.pth"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("legacy (pre-1.6"), "{msg}");

    let msg = Checkpoint::open(dir.path().join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.safetensors"), "{msg}");
}

#[test]
fn preprocessing_follows_metadata_then_layout() {
    use candle_zoo::data::preprocess::{Preprocess, Preset};
    let dir = tempfile::tempdir().unwrap();
    let bare = save(dir.path(), "bare.safetensors", &caffe_tensors(), &[]);
    let bare = Checkpoint::open(&bare).unwrap();
    assert_eq!(bare.preprocess().unwrap(), Preprocess::caffe());
    let pth = Checkpoint::open(fixture("tv_small.pth")).unwrap();
    assert_eq!(pth.preprocess().unwrap(), Preprocess::torchvision());
    // Metadata wins over the layout, whatever layout the weights are loaded as.
    let tagged = save(
        dir.path(),
        "tagged.safetensors",
        &caffe_tensors(),
        &[(META_PREPROCESS, "torchvision")],
    );
    let tagged = Checkpoint::open(&tagged).unwrap();
    assert_eq!(tagged.preprocess().unwrap().preset(), Preset::TorchVision);
    let as_caffenet = tagged.with_layout(Layout::CaffeNet).unwrap();
    assert_eq!(
        as_caffenet.preprocess().unwrap().preset(),
        Preset::TorchVision
    );
    // Bad metadata is an error naming the file and the value, never a silent default: a BGR
    // Caffe file falling back to torchvision's RGB pipeline would classify garbage.
    for (key, value) in [(META_PREPROCESS, "jpeg"), ("preprocess.crop", "12")] {
        let bad = save(
            dir.path(),
            "bad.safetensors",
            &caffe_tensors(),
            &[(key, value)],
        );
        let msg = Checkpoint::open(&bad)
            .unwrap()
            .preprocess()
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("bad.safetensors") && msg.contains(value),
            "{msg}"
        );
    }
}

/// A `.pth` archive (`torch.save`'s layout, entries stored) holding `pickle` as `x/data.pkl`
/// and `storages` as `x/data/<key>`.
fn crafted_pth(dir: &Path, name: &str, pickle: &[u8], storages: &[(&str, &[u8])]) -> PathBuf {
    use std::io::Write;
    let path = dir.join(name);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("x/data.pkl", stored).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("x/data/{key}"), stored).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
    path
}

/// `{"w": _rebuild_tensor_v2(('storage', torch.FloatStorage, '0', 'cpu', numel), 0, size,
/// stride, False, OrderedDict())}` as protocol-2 pickle bytes.
fn state_dict_pickle(numel: u32, size: &[u32], stride: &[u32]) -> Vec<u8> {
    let mut p = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000");
    p.extend_from_slice(b"X\x03\x00\x00\x00cpuJ");
    p.extend_from_slice(&numel.to_le_bytes());
    p.extend_from_slice(b"tQK\x00(");
    for d in size {
        p.push(b'J');
        p.extend_from_slice(&d.to_le_bytes());
    }
    p.extend_from_slice(b"t(");
    for s in stride {
        p.push(b'J');
        p.extend_from_slice(&s.to_le_bytes());
    }
    p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

/// Crafted `.pth` files end in an error naming the file: no abort, no stack overflow, no
/// panic, and memory bounded by the file (candle's own reader took 4 GB for the first, and
/// overflowed the stack on the second).
#[test]
fn crafted_pth_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let open_err = |path: &Path| -> String {
        match Checkpoint::open(path) {
            Ok(ckpt) => ckpt.load(&Device::Cpu).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        }
    };
    // A list that holds two references to the last one, 60 times over: 2^60 if copied.
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for _ in 0..60 {
        bomb.extend_from_slice(b"](h\x00h\x00eq\x00");
    }
    bomb.push(b'.');
    assert!(bomb.len() < 600);
    // A megabyte of nested one-element tuples.
    let mut nested = b"\x80\x02N".to_vec();
    nested.extend(std::iter::repeat_n(0x85u8, (1 << 20) - 16));
    nested.push(b'.');
    // A rebuild call with one argument.
    let malformed =
        b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\nK\x01\x85Ru.".to_vec();
    // (file, pickle, storages, what the error says)
    type Case<'a> = (&'a str, Vec<u8>, &'a [(&'a str, &'a [u8])], &'a str);
    let cases: [Case; 5] = [
        ("bomb.pth", bomb, &[], "not a state dict"),
        ("nested.pth", nested, &[], "not a state dict"),
        (
            "malformed.pth",
            malformed,
            &[],
            "_rebuild_tensor_v2 with 1 arguments",
        ),
        // 2^30 x 2^30 floats declared over a storage of 4.
        (
            "huge.pth",
            state_dict_pickle(4, &[1 << 30, 1 << 30], &[1 << 30, 1]),
            &[("0", &[0u8; 16])],
            "reach past its storage of 4 elements",
        ),
        // A storage that declares more than its entry holds.
        (
            "short.pth",
            state_dict_pickle(1 << 28, &[2, 2], &[2, 1]),
            &[("0", &[0u8; 16])],
            "holds 16 bytes",
        ),
    ];
    for (name, pickle, storages, want) in cases {
        let path = crafted_pth(dir.path(), name, &pickle, storages);
        let msg = open_err(&path);
        assert!(msg.contains(name) && msg.contains(want), "{name}: {msg}");
    }
    // The same pickle with a storage that fits loads.
    let floats: Vec<u8> = [1f32, 2., 3., 4.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let path = crafted_pth(
        dir.path(),
        "fine.pth",
        &state_dict_pickle(4, &[2, 2], &[2, 1]),
        &[("0", &floats)],
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.keys(), ["w"]);
    let w = ckpt
        .var_builder(DType::F32, &Device::Cpu)
        .unwrap()
        .get((2, 2), "w")
        .unwrap();
    assert_eq!(w.to_vec2::<f32>().unwrap(), [[1., 2.], [3., 4.]]);
}
