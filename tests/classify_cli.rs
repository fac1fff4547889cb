//! The `classify` example end to end: local weights, the registry default through a local hub
//! (HF_ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE), JSON output and failures.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_zoo::models::alexnet::{AlexNet, Layout};
use candle_zoo::weights::{save_safetensors, AlexNetWeights};
use common::hub_server::{HubServer, ServedFile};
use common::{det_var_builder, example_bin, small};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(example_bin("classify"));
    cmd.args(args).current_dir(root());
    for k in [
        "HF_ENDPOINT",
        "HF_HUB_CACHE",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
        "RUST_BACKTRACE",
    ] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run classify")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A small torchvision-layout model with ImageNet's 1000 classes, saved as safetensors.
fn imagenet_sized_checkpoint(dir: &Path) -> PathBuf {
    let model = AlexNet::load(det_var_builder(
        &small(Layout::TorchVision).with_classes(1000),
    ))
    .unwrap();
    let path = dir.join("small-1000.safetensors");
    save_safetensors(&path, &model.named_tensors(), &BTreeMap::new()).unwrap();
    path
}

#[test]
fn local_weights_print_top5_imagenet_labels_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let weights = imagenet_sized_checkpoint(dir.path());
    let out = run(
        &[
            "--device",
            "cpu",
            "--weights",
            weights.to_str().unwrap(),
            "assets/chelsea.png",
            "assets/coffee.png",
        ],
        &[],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 12, "{stdout}");
    assert_eq!(lines[0], "assets/chelsea.png");
    assert_eq!(lines[6], "assets/coffee.png");
    let labels = candle_zoo::data::imagenet::classes();
    for line in lines[1..6].iter().chain(&lines[7..12]) {
        let (pct, label) = line.trim().split_once("%  ").expect("`  NN.NN%  label`");
        assert!(pct.trim().parse::<f32>().is_ok(), "{line}");
        assert!(
            labels.contains(&label),
            "`{label}` is not an ImageNet label"
        );
    }
}

#[test]
fn json_output_is_sorted_probabilities() {
    let out = run(
        &[
            "--device",
            "cpu",
            "--weights",
            "tests/fixtures/tv_small.pth",
            "--json",
            "--top-k",
            "3",
            "assets/coffee.png",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let top = v[0]["top"].as_array().unwrap();
    assert_eq!(v[0]["image"], "assets/coffee.png");
    assert_eq!(top.len(), 3);
    let p: Vec<f64> = top
        .iter()
        .map(|t| t["probability"].as_f64().unwrap())
        .collect();
    assert!(
        p.windows(2).all(|w| w[0] >= w[1]) && p.iter().sum::<f64>() <= 1.0 + 1e-6,
        "{p:?}"
    );
}

/// The registry's default goes through `HF_ENDPOINT` to its pinned commit and checks the file's
/// SHA-256 there: the small test checkpoint served in its place is refused by name. The same
/// file named with `--model-id` and its own checksum downloads, classifies, and then classifies
/// offline from the cache.
#[test]
fn hub_downloads_honour_the_env_pin_and_offline_mode() {
    let dir = tempfile::tempdir().unwrap();
    let weights = imagenet_sized_checkpoint(dir.path());
    let bytes = std::fs::read(&weights).unwrap();
    let sha = common::hub_server::sha256_hex(&bytes);
    let file = AlexNetWeights::default().hub_file().unwrap();
    let (pinned_rev, pinned_sha) = (file.revision.clone(), file.sha256.clone().unwrap());
    // Built before the server starts: it stops by itself after a minute.
    example_bin("classify");
    let cache = dir.path().join("hub-cache");
    let cache_s = cache.to_str().unwrap();
    let server = HubServer::start(vec![ServedFile {
        repo: file.repo.clone(),
        file: file.file.clone(),
        bytes,
        etag: None,
    }]);
    let endpoint = server.endpoint().to_string();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache_s),
    ];

    let out = run(&["--device", "cpu"], &env);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("checksum mismatch")
            && stderr.contains(&pinned_sha)
            && stderr.contains(&pinned_rev)
            && stderr.contains("--weights"),
        "{stderr}"
    );

    let by_id = [
        "--device",
        "cpu",
        "--model-id",
        file.repo.as_str(),
        "--hub-file",
        file.file.as_str(),
        "--revision",
        pinned_rev.as_str(),
        "--sha256",
        sha.as_str(),
    ];
    let out = run(&by_id, &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("{}/assets/chelsea.png", root().display())));
    drop(server);
    let offline = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache_s),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let out = run(&by_id, &offline);
    assert!(
        out.status.success(),
        "offline from the cache: {}",
        text(&out.stderr)
    );
}

#[test]
fn failures_exit_nonzero_with_a_named_cause() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().to_str().unwrap();
    let out = run(
        &["--device", "cpu"],
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("HF_HUB_CACHE", cache),
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("theunnecessarythings/vision_models")
            && stderr.contains("HF_HUB_OFFLINE")
            && stderr.contains("--weights PATH"),
        "{stderr}"
    );

    let out = run(
        &[
            "--device",
            "cpu",
            "--weights",
            "tests/fixtures/tv_small.pth",
            "Cargo.toml",
            "assets/coffee.png",
        ],
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Cargo.toml: not a readable image"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 2 images"), "{stderr}");
    assert!(
        text(&out.stdout).contains("assets/coffee.png"),
        "the good image is still classified"
    );

    let out = run(&["--device", "tpu"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown device `tpu`"));
}
