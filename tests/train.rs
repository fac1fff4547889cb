//! Training: it learns, it resumes to the same weights, and one SGD step matches PyTorch.
//!
//! The learning and resume tests train a small AlexNet on a generated image folder (four
//! classes of shapes in random colours, positions and sizes over noise), written as PNG files
//! so that the whole pipeline runs: ImageFolder, the paper's augmentation on worker threads,
//! seeded dropout, SGD with momentum, evaluation, checkpoints.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{Device, ModuleT, Tensor};
use candle_zoo::data::dataset::ImageFolder;
use candle_zoo::data::preprocess::Preprocess;
use candle_zoo::models::alexnet::{Config, Layout};
use candle_zoo::rng::Rng;
use candle_zoo::train::optim::{LrSchedule, SgdConfig};
use candle_zoo::train::{
    Event, ParamPolicy, Precision, TrainConfig, Trainer, BEST, CHECKPOINT, CONFUSION_CSV,
    METRICS_CSV, METRICS_PNG,
};
use common::example_bin;

const CLASSES: [&str; 4] = ["disc", "hstripes", "square", "vstripes"];

/// Writes `root/{train,val}/<class>/NNN.png`: 80x80 images of one shape each.
fn shapes_dataset(root: &Path, train_per_class: usize, val_per_class: usize) {
    let mut rng = Rng::new(2024);
    for (split, n) in [("train", train_per_class), ("val", val_per_class)] {
        for (label, class) in CLASSES.iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                shape_image(label, &mut rng)
                    .save(dir.join(format!("{i:03}.png")))
                    .unwrap();
            }
        }
    }
}

fn shape_image(label: usize, rng: &mut Rng) -> image::RgbImage {
    let side = 80u32;
    // A light shape on a dark ground or the reverse, so that every image shows its shape.
    let mut colour = |lo: usize| [0; 3].map(|_| (lo + rng.below(110)) as u8);
    let (light, dark) = (colour(145), colour(0));
    let (fg, bg) = if rng.below(2) == 0 {
        (light, dark)
    } else {
        (dark, light)
    };
    let size = 32 + rng.below(24) as i64;
    let cx = size / 2 + rng.below((side as i64 - size) as usize) as i64;
    let cy = size / 2 + rng.below((side as i64 - size) as usize) as i64;
    let period = 4 + rng.below(5) as i64;
    let mut img = image::RgbImage::new(side, side);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as i64 - cx, y as i64 - cy);
        let inside = dx.abs() <= size / 2 && dy.abs() <= size / 2;
        let on = match label {
            0 => dx * dx + dy * dy <= size * size / 4,
            1 => inside && (y as i64 / period) % 2 == 0,
            2 => inside,
            _ => inside && (x as i64 / period) % 2 == 0,
        };
        let base = if on { fg } else { bg };
        let noise = rng.below(41) as i32 - 20;
        *px = image::Rgb(base.map(|c| (c as i32 + noise).clamp(0, 255) as u8));
    }
    img
}

fn small_model() -> Config {
    Config::torchvision()
        .with_widths([16, 32, 48, 32, 32], 64)
        .with_classes(CLASSES.len())
        .with_dropout(0.2)
}

fn settings(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 16,
        // Without batch norm, a small AlexNet from scratch diverges at 0.01 here; 0.003 learns.
        sgd: SgdConfig {
            lr: 0.003,
            ..SgdConfig::default()
        },
        schedule: LrSchedule::Constant,
        policy: ParamPolicy::default(),
        seed: 7,
        workers: 2,
        random_crop: true,
        flip: true,
        lighting: 0.1,
        ten_crop: false,
        checkpoint_every: 0,
        precision: Precision::F32,
    }
}

fn trainer(data: &Path, out: &Path, config: TrainConfig) -> Trainer {
    let (train, val) = ImageFolder::open_splits(data).unwrap();
    Trainer::new(
        &small_model(),
        Preprocess::torchvision().scaled_to(64),
        train,
        Some(val),
        config,
        out,
        &Device::Cpu,
    )
    .unwrap()
}

fn go(_: Event) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
    t.model()
        .named_tensors()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn training_learns_the_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 48, 16);
    let out = dir.path().join("run");
    let mut t = trainer(&data, &out, settings(15));
    let started = std::time::Instant::now();
    t.run(&mut go).unwrap();
    for r in t.history() {
        println!(
            "epoch {}: train loss {:.3}, val top-1 {:.3}",
            r.epoch,
            r.train_loss,
            r.val_top1.unwrap()
        );
    }
    let last = t.history().last().unwrap().clone();
    let best = t
        .history()
        .iter()
        .filter_map(|r| r.val_top1)
        .fold(0.0, f64::max);
    println!(
        "shapes, 4 classes (chance 25%): after {} epochs val top-1 {:.1}% (best {:.1}%), train \
         loss {:.3} -> {:.3}, {:.1} s",
        last.epoch,
        100.0 * last.val_top1.unwrap(),
        100.0 * best,
        t.history()[0].train_loss,
        last.train_loss,
        started.elapsed().as_secs_f64()
    );
    assert!(
        best >= 0.6,
        "validation top-1 only reached {:.1}% (chance: 25%)",
        100.0 * best
    );
    assert!(last.train_loss < t.history()[0].train_loss);
    for file in [CHECKPOINT, BEST, METRICS_CSV, METRICS_PNG, CONFUSION_CSV] {
        assert!(out.join(file).is_file(), "{file} was not written");
    }
    let csv = std::fs::read_to_string(out.join(METRICS_CSV)).unwrap();
    assert_eq!(csv.lines().count(), 16, "{csv}");
    // The best weights load on their own, with the pipeline they were trained with.
    let ckpt = candle_zoo::weights::Checkpoint::open(out.join(BEST)).unwrap();
    let model = ckpt.load(&Device::Cpu).unwrap();
    let pre = ckpt.preprocess().unwrap();
    assert_eq!((model.num_classes(), pre.crop), (4, 64));
}

#[test]
fn a_stopped_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 12, 4);
    let mut config = settings(2);
    config.checkpoint_every = 2;
    config.schedule = LrSchedule::Step {
        step_size: 1,
        gamma: 0.5,
    };

    let mut whole = trainer(&data, &dir.path().join("whole"), config.clone());
    whole.run(&mut go).unwrap();

    // Stopped in the second epoch after batch 2 of 3, past the checkpoint at batch 2.
    let out = dir.path().join("stopped");
    let mut first = trainer(&data, &out, config);
    let mut seen = 0;
    first
        .run(&mut |e| match e {
            Event::Batch {
                epoch: 2, batch: 3, ..
            } => ControlFlow::Break(()),
            Event::Batch { .. } => {
                seen += 1;
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        })
        .unwrap();
    assert_eq!(seen, 5, "the first run should have trained 5 batches");
    drop(first);

    let (train, val) = ImageFolder::open_splits(&data).unwrap();
    let mut resumed = Trainer::resume(&out, train, Some(val), None, Some(1), &Device::Cpu).unwrap();
    assert_eq!(resumed.history().len(), 1);
    resumed.run(&mut go).unwrap();

    let strip = |t: &Trainer| {
        t.history()
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.seconds = 0.0;
                r
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&resumed), strip(&whole));
    for ((k, a), (_, b)) in weights(&resumed).iter().zip(weights(&whole)) {
        assert_eq!(a, &b, "{k} differs after resuming");
    }
}

#[test]
fn bad_runs_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 2, 1);
    let (train, val) = ImageFolder::open_splits(&data).unwrap();
    let wrong = small_model().with_classes(3);
    let err = Trainer::new(
        &wrong,
        Preprocess::torchvision().scaled_to(64),
        train.clone(),
        Some(val.clone()),
        settings(1),
        dir.path().join("a"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("4 classes") && err.contains("3 outputs"),
        "{err}"
    );

    let err = Trainer::resume(
        dir.path().join("nothing"),
        train.clone(),
        Some(val.clone()),
        None,
        None,
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("nothing to resume"), "{err}");

    // Mixed precision needs CUDA (candle's CPU convolution has no bf16 kernels).
    let bf16 = TrainConfig {
        precision: "bf16".parse().unwrap(),
        ..settings(1)
    };
    let err = Trainer::new(
        &small_model(),
        Preprocess::torchvision().scaled_to(64),
        train.clone(),
        Some(val.clone()),
        bf16,
        dir.path().join("c"),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("--precision bf16") && err.contains("cuda"),
        "{err}"
    );
    let err = "f8".parse::<Precision>().unwrap_err().to_string();
    assert!(err.contains("f8") && err.contains("f32 or bf16"), "{err}");

    // One run per output folder: a second fails at once, naming the first; killed writes'
    // temporary files are cleared by the next run.
    let out = dir.path().join("b");
    std::fs::create_dir(&out).unwrap();
    let stale = out.join(".checkpoint.safetensors.tmp-K1ll3d");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let start = || {
        Trainer::new(
            &small_model(),
            Preprocess::torchvision().scaled_to(64),
            train.clone(),
            Some(val.clone()),
            settings(1),
            &out,
            &Device::Cpu,
        )
    };
    let first = start().unwrap();
    assert!(!stale.exists());
    let err = start().err().unwrap().to_string();
    assert!(
        err.contains("another run") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(first);
    start().unwrap();
}

#[test]
fn frozen_layers_get_no_gradient_and_do_not_move() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 4, 1);
    let (train, val) = ImageFolder::open_splits(&data).unwrap();
    let mut config = settings(1);
    config.policy.freeze_through = Some(candle_zoo::models::alexnet::Tap::Conv5);
    config.policy.head_lr_mult = 10.0;
    let mut t = Trainer::new(
        &small_model(),
        Preprocess::torchvision().scaled_to(64),
        train,
        Some(val),
        config,
        dir.path().join("run"),
        &Device::Cpu,
    )
    .unwrap();
    let before = weights(&t);
    t.run(&mut go).unwrap();
    for ((k, a), (_, b)) in weights(&t).iter().zip(before) {
        let moved = a != &b;
        let frozen = k.starts_with("features.");
        assert_eq!(moved, !frozen, "{k}: moved {moved}, frozen {frozen}");
    }
}

/// One SGD step (momentum 0.9, weight decay 5e-4, parameter groups) from the same weights and
/// batch as PyTorch, twice, on small configs of both layouts: parameters within 1e-4 relative.
#[test]
fn sgd_steps_match_pytorch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let expected =
        candle_core::safetensors::load(root.join("train_step.safetensors"), &Device::Cpu).unwrap();
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("train_step.json")).unwrap())
            .unwrap();
    for (name, layout, side) in [
        ("tv", Layout::TorchVision, 79),
        ("caffe", Layout::BvlcAlexNet, 227),
    ] {
        let case = &spec["configs"][name];
        let channels: Vec<usize> = serde_json::from_value(case["channels"].clone()).unwrap();
        let config = Config::for_layout(layout)
            .with_widths(
                channels.try_into().unwrap(),
                case["hidden"].as_u64().unwrap() as usize,
            )
            .with_classes(case["classes"].as_u64().unwrap() as usize)
            .with_dropout(0.0);
        let weights = common::det_weights(&config);
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
        let model = candle_zoo::AlexNet::new(&config, vb).unwrap();
        let vars: std::collections::HashMap<String, candle_core::Var> =
            varmap.data().lock().unwrap().clone();
        for (k, v) in &vars {
            v.set(&weights[k]).unwrap();
        }
        let policy = ParamPolicy {
            weight_decay: 5e-4,
            caffe_biases: layout.is_caffe(),
            head_lr_mult: if layout.is_caffe() { 1.0 } else { 10.0 },
            freeze_through: None,
        };
        let groups = candle_zoo::train::param_groups(&model, &vars, &policy).unwrap();
        let mut sgd = candle_zoo::train::optim::Sgd::new(
            groups,
            SgdConfig {
                lr: 0.01,
                momentum: 0.9,
                ..SgdConfig::default()
            },
        )
        .unwrap();
        let bound = case["input_bound"].as_f64().unwrap();
        let x = Tensor::from_vec(
            common::det_values("input", 2 * 3 * side * side, bound),
            (2, 3, side, side),
            &Device::Cpu,
        )
        .unwrap();
        let labels: Vec<u32> = serde_json::from_value(spec["labels"].clone()).unwrap();
        let y = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let mut rng = Rng::new(0);
        for step in 1..=2 {
            let logits = model
                .train_view()
                .with_rng(&mut rng)
                .forward_t(&x, true)
                .unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
            let want_loss = case["losses"][step - 1].as_f64().unwrap();
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "{name} step {step}: loss {got_loss} vs PyTorch {want_loss}"
            );
            sgd.backward_step(&loss).unwrap();
            let mut worst = (0f64, String::new());
            for (k, v) in &vars {
                let got = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = expected[&format!("{name}.step{step}.{k}")]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let err = common::rel_err(&got, &want);
                if err > worst.0 {
                    worst = (err, k.clone());
                }
            }
            println!(
                "{name} step {step}: worst parameter error {:.2e} ({})",
                worst.0, worst.1
            );
            assert!(
                worst.0 <= 1e-4,
                "{name} step {step}: {} off by {:.2e}",
                worst.1,
                worst.0
            );
        }
    }
}

/// The examples end to end: train a few epochs, extend the run with --resume, fine-tune its
/// best weights with a frozen backbone, and refuse a folder without classes.
#[test]
fn train_and_finetune_examples_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 6, 2);
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(example_bin("train"));
        cmd.args([
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--channels",
            "8,16,16,16,16",
            "--hidden",
            "32",
            "--input-size",
            "64",
        ])
        .args(["--batch-size", "8", "--device", "cpu", "--workers", "2"])
        .args(extra)
        .env_remove("RUST_BACKTRACE");
        cmd.output().unwrap()
    };
    let o = train(&["--epochs", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train(&["--epochs", "1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already holds a run"), "{err}");
    let o = train(&["--epochs", "2", "--resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join(METRICS_CSV)).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");

    let ft = dir.path().join("ft");
    let o = std::process::Command::new(example_bin("finetune"))
        .args(["--weights", out.join(BEST).to_str().unwrap()])
        .args([
            "--data",
            data.to_str().unwrap(),
            "--out",
            ft.to_str().unwrap(),
        ])
        .args([
            "--freeze-through",
            "conv5",
            "--epochs",
            "1",
            "--batch-size",
            "8",
        ])
        .args(["--device", "cpu"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("confusion matrix") && stdout.contains("vstripes"),
        "{stdout}"
    );
    assert!(ft.join(CONFUSION_CSV).is_file());

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("train")).unwrap();
    let o = std::process::Command::new(example_bin("train"))
        .args([
            "--data",
            empty.to_str().unwrap(),
            "--out",
            dir.path().join("x").to_str().unwrap(),
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("train"), "{err}");
}
