//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod hub_server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_zoo::models::alexnet::{Config, Layout};

pub fn fnv1a32(name: &str) -> u32 {
    name.bytes().fold(0x811C9DC5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x01000193)
    })
}

/// `n` f32 values in `[-bound, bound)`, a pure function of `(name, index)`: the same formula as
/// `det_values` in `scripts/make_fixtures.py`, bit for bit.
pub fn det_values(name: &str, n: usize, bound: f64) -> Vec<f32> {
    let s = fnv1a32(name) as u64;
    (0..n as u64)
        .map(|i| {
            let mut h = (i * 2654435761 + s) & 0xFFFF_FFFF;
            for _ in 0..2 {
                h ^= h >> 16;
                h = (h * 0x45D9F3B) & 0xFFFF_FFFF;
            }
            h ^= h >> 16;
            ((h as f64 / 4294967296.0 * 2.0 - 1.0) * bound) as f32
        })
        .collect()
}

/// The deterministic weights of an AlexNet config under its checkpoint key names: weights
/// bounded by `sqrt(6 / fan_in)`, biases by 0.1, as in `det_state_dict` of the fixture script.
pub fn det_weights(config: &Config) -> HashMap<String, Tensor> {
    let c = config.channels;
    let groups = config.layout.groups();
    let inputs = [3, c[0], c[1], c[2], c[3]];
    let kernels = [11, 5, 3, 3, 3];
    let mut shapes: Vec<Vec<usize>> = (0..5)
        .map(|i| vec![c[i], inputs[i] / groups[i], kernels[i], kernels[i]])
        .collect();
    shapes.push(vec![config.hidden, c[4] * 36]);
    shapes.push(vec![config.hidden, config.hidden]);
    shapes.push(vec![config.num_classes, config.hidden]);
    let mut map = HashMap::new();
    for (prefix, shape) in config.layout.key_prefixes().iter().zip(shapes) {
        let fan_in: usize = shape[1..].iter().product();
        let w_key = format!("{prefix}.weight");
        let b_key = format!("{prefix}.bias");
        let n: usize = shape.iter().product();
        let w = det_values(&w_key, n, (6.0 / fan_in as f64).sqrt());
        let b = det_values(&b_key, shape[0], 0.1);
        map.insert(
            w_key,
            Tensor::from_vec(w, shape.as_slice(), &Device::Cpu).unwrap(),
        );
        map.insert(b_key, Tensor::from_vec(b, shape[0], &Device::Cpu).unwrap());
    }
    map
}

pub fn det_var_builder(config: &Config) -> VarBuilder<'static> {
    VarBuilder::from_tensors(det_weights(config), DType::F32, &Device::Cpu)
}

/// A small config, cheap enough for debug-build tests.
pub fn small(layout: Layout) -> Config {
    Config::for_layout(layout)
        .with_widths([8, 16, 24, 16, 16], 32)
        .with_classes(10)
}

/// `max |a - b| / max |b|`: the error relative to the tensor's scale.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(f64::MIN_POSITIVE);
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    diff / scale
}

/// The tensors of `tests/fixtures/parity.safetensors`.
pub fn parity_tensors() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/parity.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The script's strided sample: everything below `2 * samples` values, else every
/// `numel / samples`-th value, `samples` of them.
pub fn sample(t: &Tensor, samples: usize) -> Vec<f32> {
    let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    if flat.len() < 2 * samples {
        return flat;
    }
    let stride = flat.len() / samples;
    flat.into_iter().step_by(stride).take(samples).collect()
}

/// An example's binary, built by cargo on first use in this test process (cargo test builds
/// examples too, but a filtered `cargo test --test NAME` does not).
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    built
        .entry(name.to_string())
        .or_insert_with(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--example", name])
                .current_dir(root)
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the {name} example failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target.join("debug/examples").join(name)
        })
        .clone()
}
