//! Feature extraction for many images: rows equal single-image `AlexNet::extract`, order holds
//! across batch sizes and worker counts, bad images are reported and skipped, a resumed run
//! writes the same bytes as an uninterrupted one, and the preprocessing gives torchvision's fc7.

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_zoo::data::features::{
    extract_to, merge, work_dir, FeatureFormat, FeatureWriter, RunInfo, Shard, Summary,
};
use candle_zoo::data::preprocess::Preprocess;
use candle_zoo::data::{collect_images, BatchLoader};
use candle_zoo::models::alexnet::{AlexNet, Config, Layout, Tap};
use common::{det_var_builder, small};

fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/extract")
        .join(name)
}

fn small_model() -> AlexNet {
    AlexNet::new(
        &small(Layout::TorchVision),
        det_var_builder(&small(Layout::TorchVision)),
    )
    .unwrap()
}

/// A folder of real photos (PNG and JPEG, in subfolders) with broken files in the middle:
/// `b.jpg` is not an image, `d.png` is a PNG cut short.
fn photo_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(asset("chelsea.png"), dir.join("a.png")).unwrap();
    std::fs::write(dir.join("b.jpg"), b"not a jpeg").unwrap();
    std::fs::copy(asset("rocket.jpg"), dir.join("c.JPG")).unwrap();
    let png = std::fs::read(asset("coffee.png")).unwrap();
    std::fs::write(dir.join("d.png"), &png[..png.len() / 3]).unwrap();
    std::fs::copy(asset("coffee.png"), dir.join("sub/e.png")).unwrap();
    std::fs::copy(asset("rocket.jpg"), dir.join("sub/f.jpeg")).unwrap();
    std::fs::write(dir.join("notes.txt"), b"skipped: not an image extension").unwrap();
    collect_images(&[dir.to_str().unwrap()]).unwrap()
}

fn run(
    model: &AlexNet,
    paths: &[PathBuf],
    out: &Path,
    batch: usize,
    workers: usize,
    stop_after: Option<usize>,
    resume: bool,
) -> Option<Summary> {
    let meta = BTreeMap::from([("layer".to_string(), "fc7".to_string())]);
    let format = FeatureFormat::Safetensors;
    run_with(
        model,
        paths,
        out,
        format,
        meta,
        (batch, workers),
        stop_after,
        resume,
    )
}

/// [`run`] with the file's format and metadata given.
#[allow(clippy::too_many_arguments)]
fn run_with(
    model: &AlexNet,
    paths: &[PathBuf],
    out: &Path,
    format: FeatureFormat,
    meta: BTreeMap<String, String>,
    (batch, workers): (usize, usize),
    stop_after: Option<usize>,
    resume: bool,
) -> Option<Summary> {
    let mut writer = FeatureWriter::create(out, format, paths, meta, resume).unwrap();
    let loader = BatchLoader::new(
        paths.to_vec(),
        Preprocess::torchvision(),
        batch,
        workers,
        writer.done(),
    )
    .unwrap();
    let mut batches = 0;
    extract_to(model, Tap::Fc7, loader, &mut writer, &Device::Cpu, |_| {
        batches += 1;
        if Some(batches) == stop_after {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    if stop_after.is_some() {
        return None; // a "killed" run: the writer is dropped without finishing
    }
    Some(writer.finish().unwrap())
}

/// The metadata of a run over `all` (or shard `shard` of it) as extract-fc7 records it.
fn job_metadata(all: &[PathBuf], shard: Option<Shard>, tap: Tap) -> BTreeMap<String, String> {
    RunInfo {
        model: "small",
        layout: Layout::TorchVision,
        tap,
        preprocess: &Preprocess::torchvision(),
        producer: "tests/extract.rs",
        batch_size: 2,
        inputs: all,
        shard,
    }
    .metadata()
}

/// Runs shard `k` of `n` of `all` into `out` in batches of 2, as the single runs here do
/// (stopping after `stop_after` batches, or resuming).
fn run_shard(
    model: &AlexNet,
    all: &[PathBuf],
    (k, n): (usize, usize),
    out: &Path,
    format: FeatureFormat,
    stop_after: Option<usize>,
    resume: bool,
) {
    let shard = Shard::new(k, n).unwrap();
    let meta = job_metadata(all, Some(shard), Tap::Fc7);
    let part = &all[shard.range(all.len(), 2)];
    run_with(model, part, out, format, meta, (2, 2), stop_after, resume);
}

fn features(path: &Path) -> Vec<Vec<f32>> {
    let t = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    t["features"].to_vec2().unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    common::rel_err(a, b)
}

#[test]
fn directory_search_is_recursive_sorted_and_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    let paths = photo_dir(dir.path());
    let names: Vec<String> = paths
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "a.png",
            "b.jpg",
            "c.JPG",
            "d.png",
            "sub/e.png",
            "sub/f.jpeg"
        ]
    );

    // A list file: relative to its folder, comments and blank lines skipped; a missing entry is
    // an error naming the line.
    let list = dir.path().join("list.txt");
    std::fs::write(&list, "# photos\nsub/e.png\n\na.png\n").unwrap();
    let arg = format!("@{}", list.display());
    let listed = collect_images(&[arg.as_str(), paths[0].to_str().unwrap()]).unwrap();
    assert_eq!(
        listed,
        vec![
            dir.path().join("sub/e.png"),
            dir.path().join("a.png"),
            paths[0].clone()
        ]
    );
    std::fs::write(&list, "a.png\nmissing.jpg\n").unwrap();
    let err = collect_images(&[arg.as_str()]).unwrap_err().to_string();
    assert!(
        err.contains("line 2") && err.contains("missing.jpg"),
        "{err}"
    );
    let err = collect_images(&["/no/such/folder"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/folder"), "{err}");
}

#[test]
fn rows_equal_single_image_extract_and_failures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let paths = photo_dir(&dir.path().join("photos"));
    let model = small_model();
    let out = dir.path().join("fc7.safetensors");
    let summary = run(&model, &paths, &out, 3, 2, None, false).unwrap();

    // The broken files in the middle are reported with their reasons; the others have rows.
    let failed: Vec<&Path> = summary.failed.iter().map(|(p, _)| p.as_path()).collect();
    assert_eq!(failed, [paths[1].as_path(), paths[3].as_path()]);
    assert!(
        summary.failed[0].1.contains("b.jpg"),
        "{:?}",
        summary.failed
    );
    assert_eq!((summary.rows, summary.dim), (4, 32));

    let rows = features(&out);
    let ok = [0, 2, 4, 5];
    for (row, &i) in rows.iter().zip(&ok) {
        let x = Preprocess::torchvision()
            .load(&paths[i], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want: Vec<f32> = model
            .extract(&x, Tap::Fc7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = rel_err(row, &want);
        assert!(
            err <= 1e-5,
            "{}: relative error {err:.2e}",
            paths[i].display()
        );
    }

    // The manifest: one line per input, rows for the images that loaded, reasons for the rest.
    let csv = std::fs::read_to_string(&summary.manifest).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "row,path,status,reason");
    assert_eq!(lines.len(), 1 + paths.len());
    assert!(lines[1].starts_with("0,") && lines[1].contains("a.png,ok,"));
    assert!(lines[2].starts_with(",") && lines[2].contains("b.jpg,failed,"));
    assert!(lines[4].contains("d.png,failed,"));
    assert!(lines[6].starts_with("3,") && lines[6].contains("f.jpeg,ok,"));
    assert!(!work_dir(&out).exists(), "the work folder is removed");
}

#[test]
fn order_is_the_same_for_every_batch_size_and_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let photos = photo_dir(&dir.path().join("photos"));
    // Twelve inputs, so that batches end at different places.
    let paths: Vec<PathBuf> = photos.iter().chain(&photos).cloned().collect();
    let model = small_model();
    let reference = {
        let out = dir.path().join("b1.safetensors");
        run(&model, &paths, &out, 1, 1, None, false).unwrap();
        (
            features(&out),
            std::fs::read_to_string(out.with_extension("csv")).unwrap(),
        )
    };
    assert_eq!(reference.0.len(), 8);
    assert_eq!(
        reference.0[0..4],
        reference.0[4..8],
        "the same images give the same rows"
    );
    for (batch, workers) in [(2, 2), (5, 3), (16, 2)] {
        let out = dir.path().join(format!("b{batch}.safetensors"));
        run(&model, &paths, &out, batch, workers, None, false).unwrap();
        let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
        assert_eq!(csv, reference.1, "batch {batch}");
        for (a, b) in features(&out).iter().zip(&reference.0) {
            assert!(rel_err(a, b) <= 1e-5, "batch {batch}");
        }
    }
}

#[test]
fn a_resumed_run_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let photos = photo_dir(&dir.path().join("photos"));
    let paths: Vec<PathBuf> = photos.iter().chain(&photos).cloned().collect();
    let model = small_model();

    let whole = dir.path().join("whole.safetensors");
    run(&model, &paths, &whole, 4, 2, None, false).unwrap();

    // Killed after the first batch, in the middle of writing the second: rows and a manifest
    // line cut short.
    let out = dir.path().join("resumed.safetensors");
    assert!(run(&model, &paths, &out, 4, 2, Some(1), false).is_none());
    let work = work_dir(&out);
    assert!(work.exists() && !out.exists());
    use std::io::Write;
    let mut rows = std::fs::OpenOptions::new()
        .append(true)
        .open(work.join("rows.f32"))
        .unwrap();
    rows.write_all(&[0u8; 50]).unwrap();
    let mut manifest = std::fs::OpenOptions::new()
        .append(true)
        .open(work.join("manifest.jsonl"))
        .unwrap();
    manifest.write_all(b"{\"index\":4,\"ro").unwrap();

    // Without --resume the interrupted run is not thrown away.
    let meta = BTreeMap::from([("layer".to_string(), "fc7".to_string())]);
    let err = FeatureWriter::create(
        &out,
        FeatureFormat::Safetensors,
        &paths,
        meta.clone(),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("resume it") && err.contains(".partial"),
        "{err}"
    );
    // Another input list cannot resume it.
    let err = FeatureWriter::create(
        &out,
        FeatureFormat::Safetensors,
        &paths[1..],
        meta.clone(),
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("cannot resume"), "{err}");
    let writer =
        FeatureWriter::create(&out, FeatureFormat::Safetensors, &paths, meta, true).unwrap();
    assert_eq!(writer.done(), 4, "the first batch is not redone");
    drop(writer);

    run(&model, &paths, &out, 4, 2, None, true).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
    assert_eq!(
        std::fs::read(out.with_extension("csv")).unwrap(),
        std::fs::read(whole.with_extension("csv")).unwrap()
    );
}

#[test]
fn npy_output_holds_the_same_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let paths = vec![asset("chelsea.png"), asset("rocket.jpg")];
    let model = small_model();
    let st = dir.path().join("f.safetensors");
    run(&model, &paths, &st, 2, 1, None, false).unwrap();
    let npy = dir.path().join("f.npy");
    let meta = BTreeMap::from([("layer".to_string(), "fc7".to_string())]);
    let mut writer = FeatureWriter::create(&npy, FeatureFormat::Npy, &paths, meta, false).unwrap();
    let loader = BatchLoader::new(paths.clone(), Preprocess::torchvision(), 2, 1, 0).unwrap();
    extract_to(&model, Tap::Fc7, loader, &mut writer, &Device::Cpu, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    writer.finish().unwrap();
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'shape': (2, 32)"),
        "{header}"
    );
    let values: Vec<f32> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(values, features(&st).concat());
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(npy.with_extension("json")).unwrap()).unwrap();
    assert_eq!(meta["layer"], "fc7");
}

/// torchvision's pipeline on real photos (PIL decode, `Resize(256)`, `CenterCrop(224)`,
/// `ToTensor`, `Normalize`) against the crate's, through the full-size torchvision model with
/// the formula weights (`scripts/make_extract_fixtures.py`): fc7 rows agree to a cosine of at
/// least 0.999, with the full decode and with the default DCT-scaled decode, which only the
/// 2.5 MP `rocket-3x.jpg` is large enough to take. Fed torch's own crop, the crate's model gives
/// torch's fc7 to 1e-5.
#[test]
fn preprocessing_gives_torchvisions_fc7_on_real_photos() {
    let config = Config::torchvision();
    let model = AlexNet::new(&config, det_var_builder(&config)).unwrap();
    let torch =
        candle_core::safetensors::load(fixture("torch_fc7.safetensors"), &Device::Cpu).unwrap();
    let scaled = Preprocess::torchvision();
    assert!(scaled.dct_scaling, "the scaled decode is the default");
    let full = Preprocess {
        dct_scaling: false,
        ..Preprocess::torchvision()
    };
    let fc7 = |x: Tensor| -> Vec<f32> {
        model
            .extract(&x.unsqueeze(0).unwrap(), Tap::Fc7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f64 = a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let photos = [
        asset("chelsea.png"),
        asset("coffee.png"),
        asset("rocket.jpg"),
        fixture("rocket-3x.jpg"),
    ];
    for path in photos {
        let photo = path.file_name().unwrap().to_str().unwrap();
        let want: Vec<f32> = torch[photo].to_vec1().unwrap();
        let crop = image::open(fixture(&format!("{photo}.crop.png")))
            .unwrap()
            .to_rgb8();
        // The crop itself, decoded whole: Pillow's bilinear filter, within rounding (measured:
        // at most 1 level on the PNGs, 2 on the JPEGs, whose decoders differ too).
        let ours = full.resize_and_crop(&full.open(&path).unwrap()).unwrap();
        let worst = ours
            .as_raw()
            .iter()
            .zip(crop.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            worst <= 2,
            "{photo}: a pixel differs from PIL's by {worst} levels"
        );
        let same_input = fc7(full.to_tensor(&crop, &Device::Cpu).unwrap());
        let err = rel_err(&same_input, &want);
        assert!(
            err <= 1e-5,
            "{photo}: the model alone differs from torch by {err:.2e}"
        );

        let whole = full.load_pixels(&path).unwrap();
        let default = scaled.load_pixels(&path).unwrap();
        assert_eq!(
            whole != default,
            photo == "rocket-3x.jpg",
            "{photo}: the scaled decode runs exactly on images at least twice the resize target"
        );
        for (mode, values) in [("full", whole), ("DCT-scaled", default)] {
            let ours = fc7(Tensor::from_vec(values, (3, 224, 224), &Device::Cpu).unwrap());
            let cosine = cosine(&ours, &want);
            eprintln!(
                "{photo}: fc7 cosine with torchvision's pipeline, {mode} decode: {cosine:.6}"
            );
            assert!(cosine >= 0.999, "{photo}, {mode} decode: cosine {cosine}");
        }
    }
}

fn extract_cli(args: &[std::ffi::OsString]) -> std::process::Command {
    let mut cmd = std::process::Command::new(common::example_bin("extract-fc7"));
    cmd.args(args).env_remove("RUST_BACKTRACE");
    cmd
}

/// The example end to end: a folder with a broken image, then a run killed mid-way and resumed.
#[test]
fn extract_fc7_example_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    photo_dir(&photos);
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tv_small.pth");
    let out = dir.path().join("fc7.safetensors");
    let base = |out: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "--weights".into(),
            weights.clone().into(),
            "--device".into(),
            "cpu".into(),
            "--out".into(),
            out.into(),
        ]
    };

    let mut args = base(&out);
    args.push(photos.clone().into());
    let run = extract_cli(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(1),
        "a failed image makes the exit code 1: {stderr}"
    );
    assert!(
        stderr.contains("b.jpg") && stderr.contains("2 of 6 images failed"),
        "{stderr}"
    );
    assert_eq!(features(&out).len(), 4);
    let meta = candle_zoo::weights::Checkpoint::open(&out)
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(meta["layer"], "fc7");
    assert!(meta["preprocess"].starts_with("torchvision"), "{meta:?}");
    assert!(meta["model"].ends_with("tv_small.pth"), "{meta:?}");

    // An existing output is not replaced without --force.
    let again = extract_cli(&args).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    // The same job in 2 shards (separate processes), merged: the same bytes. The shards' batches
    // are the single run's (batch 2 here), so their arithmetic is too.
    let mut unsharded = base(&dir.path().join("unsharded.safetensors"));
    unsharded.extend(["--batch-size".into(), "2".into(), photos.clone().into()]);
    extract_cli(&unsharded).output().unwrap();
    let mut shards = Vec::new();
    for k in 0..2 {
        let shard = dir.path().join(format!("fc7-{k}.safetensors"));
        let mut args = base(&shard);
        args.extend([
            "--batch-size".into(),
            "2".into(),
            "--shard".into(),
            format!("{k}/2").into(),
        ]);
        args.push(photos.clone().into());
        let run = extract_cli(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            stderr.contains(&format!("shard {k}/2 of 6 images")),
            "{stderr}"
        );
        shards.push(shard);
    }
    let merged = dir.path().join("merged.safetensors");
    let merge = std::process::Command::new(common::example_bin("merge-features"))
        .arg("--out")
        .arg(&merged)
        .args(&shards)
        .output()
        .unwrap();
    assert!(
        merge.status.success(),
        "{}",
        String::from_utf8_lossy(&merge.stderr)
    );
    for ext in ["safetensors", "csv"] {
        assert_eq!(
            std::fs::read(merged.with_extension(ext)).unwrap(),
            std::fs::read(dir.path().join("unsharded").with_extension(ext)).unwrap(),
            ".{ext}"
        );
    }

    // Killed mid-way, then resumed: the same bytes as a run that was never stopped.
    let many = dir.path().join("many");
    std::fs::create_dir_all(&many).unwrap();
    for i in 0..40 {
        std::fs::copy(asset("rocket.jpg"), many.join(format!("{i:02}.jpg"))).unwrap();
    }
    let whole = dir.path().join("whole.safetensors");
    let mut args = base(&whole);
    args.extend([
        "--batch-size".into(),
        "2".into(),
        many.clone().into_os_string(),
    ]);
    assert!(extract_cli(&args).output().unwrap().status.success());

    let killed = dir.path().join("killed.safetensors");
    let mut args = base(&killed);
    args.extend([
        "--batch-size".into(),
        "2".into(),
        many.clone().into_os_string(),
    ]);

    // While another run writes an output (here this process holds its lock), a run on it fails
    // at once, naming the lock and its holder.
    let held =
        candle_zoo::io::OutputLock::acquire(dir.path().join("killed.safetensors.lock")).unwrap();
    let refused = extract_cli(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains("killed.safetensors.lock")
            && stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
    drop(held);
    let mut child = extract_cli(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let manifest = work_dir(&killed).join("manifest.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&manifest).map_or(0, |s| s.lines().count()) < 2 {
        assert!(start.elapsed().as_secs() < 60, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.exists(),
        "a killed run leaves no output that looks complete"
    );
    let done = std::fs::read_to_string(&manifest).unwrap().lines().count();
    assert!(done < 40, "the run was killed before the end ({done} done)");

    // Run again without --resume: refused, with the flag that continues it.
    let again = extract_cli(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && stderr.contains("--resume") && stderr.contains(".partial"),
        "{stderr}"
    );

    args.push("--resume".into());
    let resumed = extract_cli(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after"), "{stderr}");
    assert_eq!(
        std::fs::read(&killed).unwrap(),
        std::fs::read(&whole).unwrap()
    );
    assert_eq!(
        std::fs::read(killed.with_extension("csv")).unwrap(),
        std::fs::read(whole.with_extension("csv")).unwrap()
    );
}

/// Shards 0..N of a job, N = 1, 2, 3, merge to the bytes of one run over all the inputs
/// (failed images, and so the rows' numbering, included), in safetensors and `.npy`; a shard
/// stopped and resumed changes nothing.
#[test]
fn shards_merge_to_the_bytes_of_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let all = photo_dir(&dir.path().join("photos"));
    let model = small_model();
    for format in [FeatureFormat::Safetensors, FeatureFormat::Npy] {
        let ext = format.name();
        let whole = dir.path().join(format!("whole.{ext}"));
        let meta = job_metadata(&all, None, Tap::Fc7);
        run_with(&model, &all, &whole, format, meta, (2, 2), None, false);
        for n in 1..=3 {
            let shards: Vec<PathBuf> = (0..n)
                .map(|k| dir.path().join(format!("s{n}-{k}.{ext}")))
                .collect();
            for (k, out) in shards.iter().enumerate() {
                if n == 2 && k == 1 {
                    // Stopped after its first batch, then resumed.
                    run_shard(&model, &all, (k, n), out, format, Some(1), false);
                    assert!(!out.exists() && work_dir(out).exists());
                    run_shard(&model, &all, (k, n), out, format, None, true);
                } else {
                    run_shard(&model, &all, (k, n), out, format, None, false);
                }
            }
            let merged = dir.path().join(format!("merged{n}.{ext}"));
            // In any order.
            let mut given = shards.clone();
            given.reverse();
            let summary = merge(&given, &merged).unwrap();
            assert_eq!(summary.rows, 4);
            assert_eq!(summary.failed.len(), 2);
            let same = |a: &Path, b: &Path| std::fs::read(a).unwrap() == std::fs::read(b).unwrap();
            assert!(same(&merged, &whole), "{ext}, {n} shards: features differ");
            for sidecar in ["csv", "json"] {
                let (m, w) = (
                    merged.with_extension(sidecar),
                    whole.with_extension(sidecar),
                );
                assert_eq!(m.exists(), w.exists());
                assert!(
                    !w.exists() || same(&m, &w),
                    "{ext}, {n} shards: .{sidecar} differs"
                );
            }
        }
    }
}

/// A merge that cannot be right merges nothing, and names the shard at fault.
#[test]
fn merge_refuses_bad_shard_sets_naming_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let all = photo_dir(&dir.path().join("photos"));
    let model = small_model();
    let st = FeatureFormat::Safetensors;
    let path = |name: &str| dir.path().join(name);
    for (k, n) in [(0, 2), (1, 2), (0, 3), (2, 3)] {
        run_shard(
            &model,
            &all,
            (k, n),
            &path(&format!("s{k}of{n}.safetensors")),
            st,
            None,
            false,
        );
    }
    // Shard 1/2 of another job (another tap), an unfinished shard 1/2, and a whole run.
    let other = path("other.safetensors");
    let meta = job_metadata(&all, Some(Shard::new(1, 2).unwrap()), Tap::Fc6);
    let part = &all[Shard::new(1, 2).unwrap().range(all.len(), 2)];
    run_with(&model, part, &other, st, meta, (2, 2), None, false);
    let unfinished = path("unfinished.safetensors");
    run_shard(&model, &all, (1, 2), &unfinished, st, Some(1), false);
    let whole = path("whole.safetensors");
    run_with(
        &model,
        &all,
        &whole,
        st,
        job_metadata(&all, None, Tap::Fc7),
        (2, 2),
        None,
        false,
    );
    let dup = path("dup.safetensors");
    std::fs::copy(path("s0of2.safetensors"), &dup).unwrap();
    std::fs::copy(path("s0of2.csv"), dup.with_extension("csv")).unwrap();

    let s = |name: &str| path(name);
    let cases: [(Vec<PathBuf>, &str, &str); 6] = [
        (
            vec![s("s0of3.safetensors"), s("s2of3.safetensors")],
            "1/3",
            "missing",
        ),
        (
            vec![
                s("s0of2.safetensors"),
                s("dup.safetensors"),
                s("s1of2.safetensors"),
            ],
            "dup.safetensors",
            "twice",
        ),
        (
            vec![s("s0of2.safetensors"), unfinished.clone()],
            "unfinished.safetensors",
            "unfinished",
        ),
        (
            vec![s("s0of2.safetensors"), other.clone()],
            "other.safetensors",
            "layer",
        ),
        (
            vec![s("s0of2.safetensors"), s("s2of3.safetensors")],
            "s2of3.safetensors",
            "another split",
        ),
        (vec![whole.clone()], "whole.safetensors", "records no shard"),
    ];
    for (i, (shards, names, says)) in cases.into_iter().enumerate() {
        let out = path(&format!("merged{i}.safetensors"));
        let err = merge(&shards, &out).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, candle_zoo::Error::Shard { .. })
                && msg.contains(names)
                && msg.contains(says)
                && msg.contains("nothing was merged"),
            "case {i}: {msg}"
        );
        assert!(
            !out.exists() && !out.with_extension("csv").exists(),
            "case {i}"
        );
    }
}
