//! Hub downloads end to end against a local server that speaks the hub's `resolve` protocol:
//! download, a second run from the cache with the server gone, pinned revisions, offline mode,
//! checksum mismatches and an unreachable hub. No test touches the internet.

mod common;

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use candle_nn::Module;
use candle_zoo::models::alexnet::{AlexNet, Layout};
use candle_zoo::weights::hub::{Hub, HubFile};
use candle_zoo::weights::{save_safetensors, AlexNetWeights, Checkpoint};
use candle_zoo::Error;
use common::hub_server::{sha256_hex, HubServer, ServedFile, COMMIT};
use common::{det_var_builder, small};

const REPO: &str = "candle-zoo/alexnet-test";
const FILE: &str = "alexnet.safetensors";

/// A small torchvision-layout checkpoint's bytes, and the model they hold.
fn checkpoint_bytes() -> (Vec<u8>, AlexNet) {
    let model = AlexNet::load(det_var_builder(&small(Layout::TorchVision))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    save_safetensors(&path, &model.named_tensors(), &BTreeMap::new()).unwrap();
    (std::fs::read(path).unwrap(), model)
}

fn served(bytes: &[u8]) -> ServedFile {
    ServedFile {
        repo: REPO.into(),
        file: FILE.into(),
        bytes: bytes.to_vec(),
        etag: None,
    }
}

fn hub(endpoint: &str, cache: &std::path::Path) -> Hub {
    Hub::from_env()
        .with_endpoint(endpoint)
        .with_cache_dir(cache)
        .with_token(None)
        .offline(false)
        .with_progress(false)
}

fn logits(model: &AlexNet) -> Vec<Vec<f32>> {
    let x = Tensor::ones((1, 3, 96, 96), candle_core::DType::F32, &Device::Cpu).unwrap();
    model.forward(&x).unwrap().to_vec2().unwrap()
}

#[test]
fn downloads_then_serves_from_cache_without_the_server() {
    let (bytes, model) = checkpoint_bytes();
    let sha = sha256_hex(&bytes);
    let cache = tempfile::tempdir().unwrap();
    let file = HubFile::new(REPO, FILE)
        .with_revision(COMMIT)
        .with_sha256(&sha);

    let server = HubServer::start(vec![served(&bytes)]);
    let endpoint = server.endpoint().to_string();
    let path = hub(&endpoint, cache.path()).get(&file).unwrap();
    assert!(server.requests() >= 1, "nothing was downloaded");
    assert!(
        path.starts_with(cache.path()),
        "{} is outside the cache",
        path.display()
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let loaded = Checkpoint::open(&path).unwrap().load(&Device::Cpu).unwrap();
    assert_eq!(logits(&loaded), logits(&model));
    drop(server); // the hub is gone from now on

    // Same settings: served from the cache, checksum checked again.
    assert_eq!(hub(&endpoint, cache.path()).get(&file).unwrap(), path);
    // Offline mode, and an endpoint nobody listens on: still the cache, no network.
    assert_eq!(
        hub(&endpoint, cache.path())
            .offline(true)
            .get(&file)
            .unwrap(),
        path
    );
    assert_eq!(
        hub("http://127.0.0.1:9", cache.path()).get(&file).unwrap(),
        path
    );
}

#[test]
fn pinned_revisions_are_cached_separately() {
    let (bytes, _) = checkpoint_bytes();
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served(&bytes)]);
    let h = hub(server.endpoint(), cache.path());
    let main = h.get(&HubFile::new(REPO, FILE)).unwrap();
    let pinned = h
        .get(&HubFile::new(REPO, FILE).with_revision(COMMIT))
        .unwrap();
    // Both resolve to the snapshot of the commit the server reports.
    assert_eq!(main, pinned);
    assert!(pinned.to_string_lossy().contains(COMMIT));
    // A revision the hub does not have is an error that names it.
    let err = h
        .get(&HubFile::new(REPO, FILE).with_revision("v9"))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Hub(_)), "{msg}");
    assert!(
        msg.contains("revision `v9`") && msg.contains(REPO) && msg.contains(FILE),
        "{msg}"
    );
}

#[test]
fn checksum_mismatch_is_an_error() {
    let (bytes, _) = checkpoint_bytes();
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served(&bytes)]);
    let wrong = "0".repeat(64);
    let err = hub(server.endpoint(), cache.path())
        .get(&HubFile::new(REPO, FILE).with_sha256(&wrong))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Checksum { .. }), "{msg}");
    assert!(
        msg.contains(&wrong) && msg.contains(&sha256_hex(&bytes)),
        "{msg}"
    );
}

#[test]
fn unreachable_hub_names_repo_file_and_the_way_out() {
    let cache = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback: nothing listens there.
    let err = hub("http://127.0.0.1:9", cache.path())
        .get(&HubFile::new(REPO, FILE))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Hub(_)), "{msg}");
    for needle in [
        REPO,
        FILE,
        "http://127.0.0.1:9",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "local copy",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    assert!(!msg.contains("--"), "a library error names no flag: {msg}");
    // Offline with a cold cache: says so, without trying the network.
    let err = hub("http://127.0.0.1:9", cache.path())
        .offline(true)
        .get(&HubFile::new(REPO, FILE))
        .unwrap_err();
    assert!(matches!(err, Error::NotInCache { .. }), "{err}");
}

#[test]
fn missing_file_on_the_hub_is_an_error() {
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![]);
    let err = hub(server.endpoint(), cache.path())
        .get(&HubFile::new(REPO, "nope.safetensors"))
        .unwrap_err();
    assert!(err.to_string().contains("nope.safetensors"), "{err}");
}

/// The registry's default is pinned: it asks the hub for the file at its commit, and a file
/// whose SHA-256 is not the recorded one (here the small test checkpoint) is refused.
#[test]
fn registry_default_is_pinned_to_a_commit_and_checksum() {
    let (bytes, _) = checkpoint_bytes();
    let weights = AlexNetWeights::default();
    let file = weights.hub_file().expect("the default has a hub file");
    let copy = weights.info().hub.unwrap();
    assert_eq!(
        (file.revision.as_str(), file.sha256.as_deref()),
        (copy.revision, Some(copy.sha256))
    );
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![ServedFile {
        repo: file.repo.clone(),
        file: file.file.clone(),
        bytes: bytes.clone(),
        etag: None,
    }]);
    let err = weights
        .fetch(&hub(server.endpoint(), cache.path()))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Checksum { .. }), "{msg}");
    assert!(
        msg.contains(copy.sha256) && msg.contains(&sha256_hex(&bytes)),
        "{msg}"
    );
    // The download went to the pinned commit, and failing its check, left the cache.
    let repo = cache
        .path()
        .join("models--theunnecessarythings--vision_models");
    let pinned = std::fs::read_to_string(repo.join("refs").join(copy.revision)).unwrap();
    assert_eq!(pinned, copy.revision);
    let Error::Checksum {
        moved_to: Some(moved),
        ..
    } = &err
    else {
        panic!("{msg}")
    };
    assert_eq!(std::fs::read(moved).unwrap(), bytes);
    assert!(!repo
        .join("snapshots")
        .join(copy.revision)
        .join(copy.file)
        .exists());
}

/// A hub that accepts the connection and never answers: the download fails within its
/// timeout (0.1's client, hf-hub's, had none and waited for more than 75 s).
#[test]
fn a_silent_hub_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(4) {
            held.push(stream);
        }
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    let cache = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let second = std::time::Duration::from_secs(1);
    let err = hub(&endpoint, cache.path())
        .with_timeouts(second, second)
        .get(&HubFile::new(REPO, FILE))
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Hub(_)), "{msg}");
    assert!(msg.contains("timed out"), "{msg}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

/// A checksum is all 64 hex digits: a prefix would let a one-character "checksum" pass.
#[test]
fn a_checksum_must_be_whole() {
    let cache = tempfile::tempdir().unwrap();
    for short in ["7", "7372cbb9", &"g".repeat(64)] {
        let err = hub("http://127.0.0.1:9", cache.path())
            .get(&HubFile::new(REPO, FILE).with_sha256(short))
            .unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
}

/// A cached file that fails its checksum is moved out of the cache (kept, for a look), and the
/// next attempt downloads it again.
#[test]
fn a_file_that_fails_its_checksum_leaves_the_cache() {
    let (bytes, _) = checkpoint_bytes();
    let sha = sha256_hex(&bytes);
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(vec![served(&bytes)]);
    let h = hub(server.endpoint(), cache.path());
    let file = HubFile::new(REPO, FILE).with_sha256(&sha);
    let path = h.get(&file).unwrap();
    // Damage the cached copy.
    let blob = std::fs::canonicalize(&path).unwrap();
    std::fs::write(&blob, b"not what was downloaded").unwrap();
    let err = h.get(&file).unwrap_err();
    let Error::Checksum {
        moved_to: Some(moved),
        ..
    } = &err
    else {
        panic!("{err}")
    };
    assert!(err.to_string().contains("moved out of the cache"), "{err}");
    assert_eq!(std::fs::read(moved).unwrap(), b"not what was downloaded");
    assert!(!path.exists() && !blob.exists());
    // Downloaded again, whole.
    let again = h.get(&file).unwrap();
    assert_eq!(std::fs::read(again).unwrap(), bytes);
}

/// Two processes (here threads) downloading the same file: the second waits for the first and
/// uses its download (0.1's client, hf-hub's, failed the second after 5 s of waiting for its
/// lock).
#[test]
fn concurrent_downloads_of_one_file_wait_for_each_other() {
    let (bytes, _) = checkpoint_bytes();
    let sha = sha256_hex(&bytes);
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start_slow(vec![served(&bytes)], std::time::Duration::from_secs(6));
    let file = HubFile::new(REPO, FILE).with_sha256(&sha);
    let paths: Vec<_> = std::thread::scope(|s| {
        let get = || {
            let h = hub(server.endpoint(), cache.path());
            let file = file.clone();
            s.spawn(move || h.get(&file))
        };
        let (a, b) = (get(), get());
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let paths: Vec<_> = paths.into_iter().map(|p| p.unwrap()).collect();
    assert_eq!(paths[0], paths[1]);
    assert_eq!(std::fs::read(&paths[0]).unwrap(), bytes);
    assert_eq!(server.downloads(), 1, "one download, shared");
}
