//! Data-parallel training over MPI (`cargo test --features mpi --test dist`; needs `mpirun`,
//! Debian's `openmpi-bin`): two processes on loopback train to the weights and metrics of one,
//! and a run whose process dies, hangs or fails ends everywhere, promptly, with a message.
//!
//! Each test starts `mpirun -np 2` on this test binary's ignored `rank` test, which reads its
//! job from `CANDLE_ZOO_DIST_JOB`, and compares with the same job run here as one process.
#![cfg(feature = "mpi")]

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_zoo::data::dataset::ImageFolder;
use candle_zoo::data::preprocess::Preprocess;
use candle_zoo::dist::{self, Engine, Placement};
use candle_zoo::models::alexnet::{Layout, Tap};
use candle_zoo::rng::Rng;
use candle_zoo::train::optim::{LrSchedule, SgdConfig};
use candle_zoo::train::{ParamPolicy, TrainConfig, Trainer, CHECKPOINT, METRICS_CSV};
use common::rel_err;

/// What a rank does: `layout caffe_biases freeze epochs mode data out`, space-separated.
#[derive(Debug, Clone)]
struct Job {
    layout: Layout,
    caffe_biases: bool,
    freeze: Option<Tap>,
    epochs: usize,
    /// `train`; `resume` (the run in `out`, to `epochs`); `hang` (rank 1 never joins).
    mode: String,
    data: PathBuf,
    out: PathBuf,
}

impl Job {
    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {}",
            self.layout,
            self.caffe_biases,
            self.freeze.map_or("none".to_string(), |t| t.to_string()),
            self.epochs,
            self.mode,
            self.data.display(),
            self.out.display()
        )
    }

    fn decode(s: &str) -> Self {
        let f: Vec<&str> = s.split(' ').collect();
        Self {
            layout: f[0].parse().unwrap(),
            caffe_biases: f[1].parse().unwrap(),
            freeze: (f[2] != "none").then(|| f[2].parse().unwrap()),
            epochs: f[3].parse().unwrap(),
            mode: f[4].to_string(),
            data: f[5].into(),
            out: f[6].into(),
        }
    }

    fn settings(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            // 39 images: three full batches, then 3 images, all in rank 0's half.
            batch_size: 12,
            // The Caffe layouts see 0-255 pixels: at 0.01 their fresh He-initialised weights
            // diverge, and rounding differences grow with them.
            sgd: SgdConfig {
                lr: 0.001,
                ..SgdConfig::default()
            },
            schedule: LrSchedule::Constant,
            policy: ParamPolicy {
                caffe_biases: self.caffe_biases,
                freeze_through: self.freeze,
                ..ParamPolicy::default()
            },
            seed: 5,
            workers: 1,
            random_crop: true,
            flip: true,
            lighting: 0.1,
            ten_crop: false,
            checkpoint_every: 0,
            precision: candle_zoo::train::Precision::F32,
        }
    }

    /// The run, as one process (`placement` from `&Device::Cpu`) or as a rank.
    fn trainer(&self, placement: impl Into<Placement>) -> candle_zoo::Result<Trainer> {
        let (train, val) = ImageFolder::open_splits(&self.data)?;
        if self.mode == "resume" {
            let epochs = Some(self.epochs);
            return Trainer::resume(&self.out, train, Some(val), epochs, None, placement);
        }
        let model = common::small(self.layout)
            .with_classes(train.classes().len())
            .with_dropout(0.5);
        let preprocess = match self.layout {
            Layout::TorchVision => Preprocess::for_layout(self.layout).scaled_to(64),
            _ => Preprocess::for_layout(self.layout),
        };
        Trainer::new(
            &model,
            preprocess,
            train,
            Some(val),
            self.settings(),
            &self.out,
            placement,
        )
    }
}

/// One rank of a job, started by `mpirun` from the tests below.
#[test]
#[ignore = "a rank of the mpirun jobs the other tests start"]
fn rank() {
    let job = Job::decode(&std::env::var("CANDLE_ZOO_DIST_JOB").expect("CANDLE_ZOO_DIST_JOB"));
    let placement = dist::connect(Engine::Mpi, &Device::Cpu).unwrap();
    let comm = placement.comm.clone();
    let me = comm.rank();
    std::fs::create_dir_all(job.out.parent().unwrap()).unwrap();
    std::fs::write(
        job.out.with_extension(format!("pid{me}")),
        std::process::id().to_string(),
    )
    .unwrap();
    if job.mode == "hang" && me == 1 {
        std::thread::sleep(Duration::from_secs(600));
    }
    let result = job
        .trainer(placement)
        .and_then(|mut t| t.run(&mut |_| ControlFlow::Continue(())));
    dist::abort_on_error(&*comm, result).unwrap();
}

/// 80x80 PNGs of noise around a colour per class: `train/` 13 per class, `val/` 4.
fn dataset(root: &Path) {
    let mut rng = Rng::new(11);
    for (split, n) in [("train", 13), ("val", 4)] {
        for (label, class) in ["a", "b", "c"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(80, 80, |x, _| {
                    let base = [
                        60 + 70 * label as u32,
                        200 - 60 * label as u32,
                        (x * 3) % 256,
                    ];
                    image::Rgb(base.map(|c| (c + rng.below(60) as u32).min(255) as u8))
                });
                img.save(dir.join(format!("{i:02}.png"))).unwrap();
            }
        }
    }
}

/// `mpirun -np 2` on the `rank` test with `job`, killed after `limit`.
fn mpirun(job: &Job, timeout_s: f64, then: impl FnOnce(&Job)) -> (Output, Duration) {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(exe)
        .args([
            "--exact",
            "rank",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CANDLE_ZOO_DIST_JOB", job.encode())
        .env("CANDLE_ZOO_COLLECTIVE_TIMEOUT", timeout_s.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mpirun (Debian: apt install openmpi-bin libopenmpi-dev)");
    let started = Instant::now();
    then(job);
    let out = child.wait_with_output().unwrap();
    (out, started.elapsed())
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<_> = candle_core::safetensors::load(out.join(CHECKPOINT), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Two ranks with 6 images each train to one rank's weights with 12 (momentum buffers included),
/// and log the same metrics; with `resume`, the two ranks stop after the first epoch and resume.
fn two_ranks_equal_one(layout: Layout, caffe_biases: bool, freeze: Option<Tap>, resume: bool) {
    let dir = tempfile::tempdir().unwrap();
    dataset(&dir.path().join("data"));
    let job = |out: &str| Job {
        layout,
        caffe_biases,
        freeze,
        epochs: 2,
        mode: "train".into(),
        data: dir.path().join("data"),
        out: dir.path().join(out),
    };
    let single = job("single");
    single
        .trainer(&Device::Cpu)
        .unwrap()
        .run(&mut |_| ControlFlow::Continue(()))
        .unwrap();
    let two = job("two");
    let stages = match resume {
        true => vec![
            Job {
                epochs: 1,
                ..two.clone()
            },
            Job {
                mode: "resume".into(),
                ..two.clone()
            },
        ],
        false => vec![two.clone()],
    };
    for stage in &stages {
        let (out, _) = mpirun(stage, 120.0, |_| {});
        assert!(out.status.success(), "{}", text(&out));
    }

    let (a, b) = (weights(&two.out), weights(&single.out));
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let mut worst = (0.0f64, String::new());
    for ((key, x), (_, y)) in a.iter().zip(&b) {
        let e = rel_err(x, y);
        if e > worst.0 {
            worst = (e, key.clone());
        }
    }
    println!("{layout}, caffe biases {caffe_biases}, frozen {freeze:?}, resumed {resume}: worst relative difference {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 <= 1e-5, "{worst:?}");
    let rows = |out: &Path| -> Vec<Vec<f64>> {
        std::fs::read_to_string(out.join(METRICS_CSV))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let cells: Vec<f64> = l
                    .split(',')
                    .map(|c| c.parse().unwrap_or(f64::NAN))
                    .collect();
                cells[..cells.len() - 1].to_vec() // all but seconds
            })
            .collect()
    };
    let (ma, mb) = (rows(&two.out), rows(&single.out));
    assert_eq!(ma.len(), 2);
    for (ra, rb) in ma.iter().zip(&mb) {
        for (x, y) in ra.iter().zip(rb) {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "metrics differ: {ra:?} vs {rb:?}"
            );
        }
    }
    // Rank 1 wrote nothing but its pid file.
    assert!(!dir.path().join("two").join(".candle-zoo.lock").exists());
}

#[test]
fn two_ranks_equal_one_torchvision() {
    two_ranks_equal_one(Layout::TorchVision, false, None, false);
}

#[test]
fn two_ranks_equal_one_two_towers_with_caffe_biases() {
    two_ranks_equal_one(Layout::BvlcAlexNet, true, None, false);
}

#[test]
fn two_ranks_equal_one_with_a_frozen_backbone() {
    two_ranks_equal_one(Layout::TorchVision, true, Some(Tap::Conv5), false);
}

#[test]
fn two_ranks_resumed_after_an_epoch_equal_one() {
    two_ranks_equal_one(Layout::TorchVision, false, None, true);
}

fn job(dir: &Path, mode: &str) -> Job {
    dataset(&dir.join("data"));
    Job {
        layout: Layout::TorchVision,
        caffe_biases: false,
        freeze: None,
        epochs: 1,
        mode: mode.into(),
        data: dir.join("data"),
        out: dir.join("run"),
    }
}

#[test]
fn a_killed_rank_ends_the_run_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let long = Job {
        epochs: 10_000,
        ..job(dir.path(), "train")
    };
    let (out, took) = mpirun(&long, 20.0, |job| {
        let pid = job.out.with_extension("pid1");
        let deadline = Instant::now() + Duration::from_secs(60);
        // Once rank 0 has checkpointed, both are training (in the second epoch).
        while !(pid.exists() && job.out.join(CHECKPOINT).exists()) {
            assert!(Instant::now() < deadline, "the run did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let pid = std::fs::read_to_string(pid).unwrap();
        Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
    });
    let log = text(&out);
    println!("ended {:.1} s after the start:\n{log}", took.as_secs_f64());
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(90), "{took:?}");
    assert!(log.contains("rank 1") && log.contains("signal 9"), "{log}");
}

#[test]
fn a_rank_that_hangs_ends_the_run_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (out, took) = mpirun(&job(dir.path(), "hang"), 3.0, |_| {});
    let log = text(&out);
    println!("ended {:.1} s after the start:\n{log}", took.as_secs_f64());
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(
        log.contains("rank 0 of 2") && log.contains("has waited"),
        "{log}"
    );
}

#[test]
fn an_error_on_one_rank_ends_every_rank_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "train");
    std::fs::create_dir_all(&job.out).unwrap();
    std::fs::write(job.out.join(CHECKPOINT), b"an earlier run").unwrap();
    let (out, took) = mpirun(&job, 600.0, |_| {});
    let log = text(&out);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(
        log.contains("rank 0 of 2") && log.contains("already holds a run"),
        "{log}"
    );
}
