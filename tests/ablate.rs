//! The architecture variants the paper's claims compare, against PyTorch, through checkpoints,
//! and the `ablate` example's mechanics (`--quick`): its files, `--resume`, and a refused study.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use candle_zoo::models::alexnet::{Activation, AlexNet, Config, Layout, Pooling, Tap};
use candle_zoo::weights::Checkpoint;
use common::{det_values, det_var_builder, example_bin, rel_err, sample};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `scripts/make_variant_fixtures.py`'s cases: tanh, non-overlapping pools, LRN added to the
/// torchvision layout and removed from CaffeNet, with the formula weights and inputs. Logits and
/// pool5 agree with PyTorch's to 5e-5 of their scale, conv2 too (measured: at most 1.6e-5, on
/// conv2 of the two-tower tanh model, whose conv1 saturates on inputs of Caffe's 0..255 scale;
/// the rest at most 5.8e-6).
#[test]
fn variants_equal_pytorchs() {
    let want =
        candle_core::safetensors::load(fixture("variants.safetensors"), &Device::Cpu).unwrap();
    let cases = [
        (
            "tv_tanh_nonoverlapping_lrn",
            Layout::TorchVision,
            Activation::Tanh,
            Pooling::NonOverlapping,
            true,
            (96, 80),
        ),
        (
            "tv_lrn",
            Layout::TorchVision,
            Activation::Relu,
            Pooling::Overlapping,
            true,
            (96, 80),
        ),
        (
            "alexnet_tanh_nonoverlapping",
            Layout::BvlcAlexNet,
            Activation::Tanh,
            Pooling::NonOverlapping,
            true,
            (227, 227),
        ),
        (
            "caffenet_no_lrn_nonoverlapping",
            Layout::CaffeNet,
            Activation::Relu,
            Pooling::NonOverlapping,
            false,
            (227, 227),
        ),
    ];
    for (name, layout, activation, pooling, lrn, (h, w)) in cases {
        let config = common::small(layout)
            .with_activation(activation)
            .with_pooling(pooling)
            .with_lrn(lrn);
        assert!(!config.is_published_variant());
        let model = AlexNet::new(&config, det_var_builder(&config)).unwrap();
        let bound = if layout == Layout::TorchVision {
            1.0
        } else {
            128.0
        };
        let x = Tensor::from_vec(
            det_values("input", 2 * 3 * h * w, bound),
            (2, 3, h, w),
            &Device::Cpu,
        )
        .unwrap();
        let taps = model
            .extract_many(&x, &[Tap::Conv2, Tap::Pool5, Tap::Fc8])
            .unwrap();
        for (tap, got) in ["conv2.sample", "pool5", "logits"].into_iter().zip(&taps) {
            let expected = &want[&format!("{name}/{tap}")];
            let got = if tap.ends_with("sample") {
                sample(got, 2048)
            } else {
                assert_eq!(got.dims(), expected.dims(), "{name} {tap}");
                got.flatten_all().unwrap().to_vec1().unwrap()
            };
            let err = rel_err(&got, &expected.flatten_all().unwrap().to_vec1().unwrap());
            eprintln!("{name} {tap}: relative error {err:.2e}");
            assert!(err <= 5e-5, "{name} {tap}: relative error {err:.2e}");
        }
    }
}

/// A variant's checkpoint loads as that variant; a file that records none (any pretrained file)
/// loads as the published model.
#[test]
fn checkpoints_record_the_variant_and_pretrained_files_stay_published() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::small(Layout::TorchVision)
        .with_activation(Activation::Tanh)
        .with_pooling(Pooling::NonOverlapping)
        .with_lrn(true);
    let model = AlexNet::new(&config, det_var_builder(&config)).unwrap();
    let path = dir.path().join("tanh.safetensors");
    let mut meta = std::collections::BTreeMap::new();
    meta.extend(candle_zoo::weights::metadata::variant_entries(&config));
    meta.insert("layout".to_string(), "torchvision".to_string());
    candle_zoo::weights::save_safetensors(&path, &model.named_tensors(), &meta).unwrap();
    let loaded = Checkpoint::open(&path).unwrap().config().unwrap();
    assert_eq!(
        (loaded.activation, loaded.pooling, loaded.lrn),
        (Activation::Tanh, Pooling::NonOverlapping, true)
    );

    let published = Checkpoint::open(fixture("tv_small.pth"))
        .unwrap()
        .config()
        .unwrap();
    assert!(published.is_published_variant(), "{published:?}");
    assert_eq!(published.activation, Activation::Relu);
    assert!(!published.lrn);

    meta.insert("model.activation".into(), "sigmoid".into());
    candle_zoo::weights::save_safetensors(&path, &model.named_tensors(), &meta).unwrap();
    let err = Checkpoint::open(&path)
        .unwrap()
        .config()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.activation") && err.contains("sigmoid"),
        "{err}"
    );
}

/// Loading still builds exactly the published models: the published configs are the published
/// variant, and the Caffe layouts keep LRN.
#[test]
fn presets_are_the_published_variant() {
    for layout in Layout::ALL {
        let c = Config::for_layout(layout);
        assert!(c.is_published_variant());
        assert_eq!(c.lrn, layout.is_caffe());
        assert_eq!(c.activation, Activation::Relu);
        assert_eq!(c.pooling, Pooling::Overlapping);
    }
    // LRN follows a layout change unless it was set.
    assert!(Config::torchvision().with_layout(Layout::CaffeNet).lrn);
    assert!(
        Config::torchvision()
            .with_lrn(true)
            .with_layout(Layout::TorchVision)
            .lrn
    );
    assert!("2x2s2".parse::<Pooling>().unwrap() == Pooling::NonOverlapping);
    assert!("Tanh".parse::<Activation>().unwrap() == Activation::Tanh);
}

/// Two classes of noisy 40 px images, one reddish and one bluish, 6 training and 2 validation
/// images each.
fn tiny_folder(root: &Path) {
    let mut rng = candle_zoo::rng::Rng::new(5);
    for (split, n) in [("train", 6), ("val", 2)] {
        for (class, tint) in [("red", [200u8, 40, 40]), ("blue", [40, 40, 200])] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(40, 40, |_, _| {
                    image::Rgb(tint.map(|c| c.saturating_add((rng.uniform() * 50.0) as u8)))
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

fn ablate(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(example_bin("ablate"))
        .args([
            "--quick",
            "--epochs",
            "1",
            "--workers",
            "1",
            "--batch-size",
            "4",
        ])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

/// `ablate --quick`: every variant x 2 seeds, the three reports, then `--resume` reads the
/// finished runs back and retrains a deleted one to the same figures; a second study in the
/// same folder is refused.
#[test]
fn ablate_quick_study_reports_resumes_and_refuses_another_study() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("study"));
    tiny_folder(&data);
    let run = ablate(&data, &out, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");

    let csv = std::fs::read_to_string(out.join("ablation.csv")).unwrap();
    let rows: Vec<_> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 7 * 2, "{csv}");
    for v in candle_zoo::train::ablation::VARIANTS {
        for seed in [0, 1] {
            assert!(
                rows.iter()
                    .any(|r| r.starts_with(&format!("{v},{seed},1,"))),
                "{v} {seed}"
            );
        }
    }
    let md = std::fs::read_to_string(out.join("ablation.md")).unwrap();
    for claim in [
        "tanh",
        "Overlapping pooling",
        "Response normalization",
        "Dropout",
        "PCA lighting",
        "Crops and flips",
    ] {
        assert!(md.contains(claim), "{claim} missing:\n{md}");
    }
    let png = image::open(out.join("ablation.png")).unwrap();
    assert_eq!(png.height(), 2 * candle_zoo::train::plot::PANEL_HEIGHT);
    assert!(out.join("runs/tanh/seed-1/checkpoint.safetensors").exists());
    // The run's best weights load as its variant.
    let tanh = Checkpoint::open(out.join("runs/tanh/seed-0/best.safetensors"))
        .unwrap()
        .config()
        .unwrap();
    assert_eq!(tanh.activation, Activation::Tanh);

    let again = ablate(&data, &out, &[]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already holds this study"), "{stderr}");

    std::fs::remove_dir_all(out.join("runs/no-lighting/seed-1")).unwrap();
    let resumed = ablate(&data, &out, &["--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let csv_again = std::fs::read_to_string(out.join("ablation.csv")).unwrap();
    let figures = |csv: &str| -> Vec<String> {
        // Everything but the seconds column.
        csv.lines()
            .map(|l| l.rsplit_once(',').unwrap().0.to_string())
            .collect()
    };
    assert_eq!(figures(&csv_again), figures(&csv));

    let other = ablate(&data, &out, &["--resume", "--lr", "0.01"]);
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("holds another study"), "{stderr}");
}
