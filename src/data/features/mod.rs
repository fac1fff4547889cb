//! Feature matrices for many images: extracted batch by batch, kept on disk as the job goes so
//! that a killed run can resume, and published atomically as safetensors or `.npy` with a CSV
//! manifest.
//!
//! A run writing `OUT` holds the lock `OUT.lock` (one run per output; a second fails at once)
//! and keeps its work in the folder `OUT.partial/` (the rows so far, a manifest of the images
//! done, and what the run is), flushed to disk batch by batch. [`FeatureWriter::finish`] writes
//! the manifest and then `OUT` through temporary files and renames, then removes the folder: a
//! run killed at any point, or stopped by a full disk, leaves either no `OUT` or a complete one,
//! and a resumed run continues from its last whole batch.
//!
//! A job too large for one process is split into [`Shard`]s (`extract-fc7 --shard K/N`): each
//! writes its own file from a contiguous part of the input list, and [`merge`] joins them into the
//! file one process would have written, byte for byte.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the file formats, what a file records ([`RunInfo`]), [`extract_to`] |
//! | `writer.rs` | [`FeatureWriter`]: the resumable, atomic writer |
//! | `shard.rs` | [`Shard`], [`merge`] |
//!
//! ```no_run
//! use candle_core::Device;
//! use candle_zoo::data::features::{extract_to, FeatureFormat, FeatureWriter};
//! use candle_zoo::data::{collect_images, BatchLoader};
//! use candle_zoo::models::alexnet::Tap;
//! use candle_zoo::weights::AlexNetWeights;
//!
//! let device = Device::Cpu;
//! let (model, preprocess) = AlexNetWeights::default().load(&device)?;
//! let paths = collect_images(&["photos/"])?;
//! let mut writer = FeatureWriter::create(
//!     "fc7.safetensors", FeatureFormat::Safetensors, &paths, Default::default(), false)?;
//! let loader = BatchLoader::new(paths, preprocess, 32, 2, writer.done())?;
//! extract_to(&model, Tap::Fc7, loader, &mut writer, &device, |_| std::ops::ControlFlow::Continue(()))?;
//! let summary = writer.finish()?;
//! println!("{} rows of {} values", summary.rows, summary.dim);
//! # Ok::<(), candle_zoo::Error>(())
//! ```

mod shard;
mod writer;

pub use shard::{merge, Shard};
pub use writer::FeatureWriter;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device};
use sha2::{Digest, Sha256};

use super::preprocess::Preprocess;
use super::BatchLoader;
use crate::error::{Error, Result};
use crate::models::alexnet::{AlexNet, Layout, Tap};

/// The file format of the feature matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureFormat {
    /// One `[N, D]` f32 tensor named `features`, with string metadata.
    Safetensors,
    /// NumPy's `.npy` (`<f4`, C order); the metadata goes to a `.json` file beside it.
    Npy,
}

impl FeatureFormat {
    pub fn name(self) -> &'static str {
        match self {
            FeatureFormat::Safetensors => "safetensors",
            FeatureFormat::Npy => "npy",
        }
    }
}

impl fmt::Display for FeatureFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FeatureFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "safetensors" | "st" => Ok(FeatureFormat::Safetensors),
            "npy" | "numpy" => Ok(FeatureFormat::Npy),
            _ => Err(Error::parse("feature format", s, "safetensors or npy")),
        }
    }
}

/// The name of the tensor in a features safetensors file.
pub const FEATURES_KEY: &str = "features";

/// What a feature file records about the run that made it (safetensors metadata, or the `.json`
/// beside a `.npy`): what a resumed run must match, and what shards must share to be merged.
///
/// | key | value |
/// |---|---|
/// | `model` | where the weights came from, in the caller's words |
/// | `layout` | the model's layout |
/// | `layer` | the tap |
/// | `preprocess` | the input pipeline ([`Preprocess`]'s `Display`) |
/// | `producer` | the program |
/// | `batch` | the batch size (the CPU ops' arithmetic depends on it; shards are whole batches) |
/// | `inputs` | the whole input list's fingerprint: its length and the SHA-256 of its paths |
/// | `shard` | `K/N`, only in a shard's file ([`merge`] drops it) |
///
/// ```
/// use std::path::PathBuf;
/// use candle_zoo::data::{features::{RunInfo, Shard}, preprocess::Preprocess};
/// use candle_zoo::models::alexnet::{Layout, Tap};
/// let inputs = vec![PathBuf::from("a.jpg"), PathBuf::from("b.jpg")];
/// let info = RunInfo {
///     model: "alexnet.safetensors",
///     layout: Layout::TorchVision,
///     tap: Tap::Fc7,
///     preprocess: &Preprocess::torchvision(),
///     producer: "my-tool 1.0",
///     batch_size: 32,
///     inputs: &inputs,
///     shard: Some("1/2".parse::<Shard>()?),
/// };
/// let meta = info.metadata();
/// assert_eq!((meta["layer"].as_str(), meta["shard"].as_str()), ("fc7", "1/2"));
/// assert!(meta["inputs"].starts_with("2 paths, sha256 "));
/// # Ok::<(), candle_zoo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct RunInfo<'a> {
    pub model: &'a str,
    pub layout: Layout,
    pub tap: Tap,
    pub preprocess: &'a Preprocess,
    pub producer: &'a str,
    pub batch_size: usize,
    /// The whole input list (all shards').
    pub inputs: &'a [PathBuf],
    pub shard: Option<Shard>,
}

/// The metadata key of a shard's `K/N`.
const SHARD_KEY: &str = "shard";

impl RunInfo<'_> {
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut meta = BTreeMap::from([
            ("model".to_string(), self.model.to_string()),
            ("layout".to_string(), self.layout.to_string()),
            ("layer".to_string(), self.tap.to_string()),
            ("preprocess".to_string(), self.preprocess.to_string()),
            ("producer".to_string(), self.producer.to_string()),
            ("batch".to_string(), self.batch_size.to_string()),
            ("inputs".to_string(), inputs_fingerprint(self.inputs)),
        ]);
        if let Some(shard) = self.shard {
            meta.insert(SHARD_KEY.to_string(), shard.to_string());
        }
        meta
    }
}

/// An input list's fingerprint: its length and the SHA-256 of its paths, one per line.
fn inputs_fingerprint(paths: &[PathBuf]) -> String {
    let mut sha = Sha256::new();
    for p in paths {
        sha.update(p.as_os_str().as_encoded_bytes());
        sha.update(b"\n");
    }
    let hex: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{} paths, sha256 {hex}", paths.len())
}

/// What a finished run wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub features: PathBuf,
    pub manifest: PathBuf,
    /// Rows written (images that loaded).
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    /// `(path, reason)` of every image that failed.
    pub failed: Vec<(PathBuf, String)>,
}

/// `out` with `suffix` added to its name: `fc7.safetensors.lock`.
fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    out.with_file_name(name)
}

/// The folder `out` is in.
fn parent(out: &Path) -> &Path {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The work folder of a run writing `out`: `OUT.partial`, beside it.
pub fn work_dir(out: &Path) -> PathBuf {
    sibling(out, ".partial")
}

fn safetensors_header(metadata: &BTreeMap<String, String>, n: usize, dim: usize) -> Vec<u8> {
    let header = BTreeMap::from([
        ("__metadata__".to_string(), serde_json::json!(metadata)),
        (
            FEATURES_KEY.to_string(),
            serde_json::json!({
                "data_offsets": [0, n * dim * 4],
                "dtype": "F32",
                "shape": [n, dim],
            }),
        ),
    ]);
    crate::io::safetensors::header_prefix(&header)
}

/// NumPy format 1.0: magic, version, header length, then a Python dict literal padded so that
/// the data starts 64-byte aligned.
fn npy_header(n: usize, dim: usize) -> Vec<u8> {
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {dim}), }}");
    while !(10 + dict.len() + 1).is_multiple_of(64) {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// A finished feature file as this crate writes it: its metadata, its `[rows, dim]` shape, and
/// where its f32 data starts.
#[derive(Debug, Clone)]
struct FeatureFile {
    format: FeatureFormat,
    metadata: BTreeMap<String, String>,
    rows: usize,
    dim: usize,
    data_start: u64,
}

impl FeatureFile {
    /// Reads a feature file's header (and a `.npy`'s `.json` beside it).
    fn open(path: &Path) -> Result<Self> {
        let bad = |why: String| Error::Invalid(format!("{}: {why}", path.display()));
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut head = [0u8; 10];
        f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
        let (format, metadata, shape, data_start) = if head.starts_with(b"\x93NUMPY") {
            let n = u16::from_le_bytes([head[8], head[9]]) as usize;
            let mut dict = vec![0u8; n];
            f.read_exact(&mut dict).map_err(|e| Error::io(path, e))?;
            let dict = String::from_utf8_lossy(&dict);
            let shape = dict
                .split_once("'shape': (")
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(s, _)| s.to_string())
                .ok_or_else(|| bad("a .npy header without its shape".into()))?;
            let shape: Vec<usize> = shape
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| {
                    d.trim()
                        .parse()
                        .map_err(|_| bad(format!("shape ({shape})")))
                })
                .collect::<Result<_>>()?;
            let json = path.with_extension("json");
            let text = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
            let metadata = serde_json::from_slice(&text)
                .map_err(|e| bad(format!("{}: {e}", json.display())))?;
            (FeatureFormat::Npy, metadata, shape, 10 + n as u64)
        } else {
            let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            if n > crate::io::safetensors::MAX_HEADER || 8 + n > len {
                return Err(bad("not a feature file (.safetensors or .npy)".into()));
            }
            let mut header = head[8..].to_vec();
            header.resize(n as usize, 0);
            f.read_exact(&mut header[2..])
                .map_err(|e| Error::io(path, e))?;
            let json: serde_json::Value =
                serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
            let metadata = serde_json::from_value(json["__metadata__"].clone())
                .map_err(|e| bad(format!("metadata: {e}")))?;
            let shape = serde_json::from_value(json[FEATURES_KEY]["shape"].clone())
                .map_err(|_| bad(format!("no `{FEATURES_KEY}` tensor")))?;
            (FeatureFormat::Safetensors, metadata, shape, 8 + n)
        };
        let [rows, dim] = <[usize; 2]>::try_from(shape)
            .map_err(|s| bad(format!("features of shape {s:?}; expected [rows, dim]")))?;
        let fits = (rows as u64)
            .checked_mul(dim as u64)
            .and_then(|n| n.checked_mul(4))
            .is_some_and(|n| data_start + n == len);
        if !fits {
            return Err(bad(format!(
                "{len} bytes do not hold {rows} x {dim} f32 values"
            )));
        }
        Ok(Self {
            format,
            metadata,
            rows,
            dim,
            data_start,
        })
    }
}

/// Progress after each batch of [`extract_to`].
#[derive(Debug, Clone)]
pub struct BatchReport<'a> {
    /// Inputs done so far, including those of earlier runs.
    pub done: usize,
    pub total: usize,
    /// Images in this batch.
    pub images: usize,
    /// `(path, reason)` of this batch's failures.
    pub failed: Vec<(&'a Path, String)>,
}

/// Runs `model` up to `tap` on every batch of `loader` and appends the rows (flattened, f32)
/// to `writer`. `on_batch` sees each batch's progress; returning `ControlFlow::Break` stops
/// after that batch, with everything so far on disk for a resumed run.
pub fn extract_to(
    model: &AlexNet,
    tap: Tap,
    loader: BatchLoader,
    writer: &mut FeatureWriter,
    device: &Device,
    mut on_batch: impl FnMut(&BatchReport) -> ControlFlow<()>,
) -> Result<()> {
    let total = writer.total();
    for batch in loader {
        let batch = batch?;
        let (tensor, ok) = batch.tensor(device)?;
        let mut rows = match tensor {
            Some(x) => {
                let f = model.extract(&x, tap)?.flatten_from(1)?;
                f.to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?
                    .to_vec2::<f32>()?
            }
            None => Vec::new(),
        }
        .into_iter();
        debug_assert_eq!(rows.len(), ok.len());
        let mut results = Vec::with_capacity(batch.items.len());
        let mut failed = Vec::new();
        for (index, path, loaded) in &batch.items {
            match loaded {
                Ok(_) => results.push((*index, Ok(rows.next().expect("one row per image")))),
                Err(e) => {
                    results.push((*index, Err(e.to_string())));
                    failed.push((path.as_path(), e.to_string()));
                }
            }
        }
        writer.append(results)?;
        let report = BatchReport {
            done: writer.done(),
            total,
            images: batch.items.len(),
            failed,
        };
        if on_batch(&report).is_break() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_64_byte_aligned_and_parsable() {
        let h = npy_header(3, 4096);
        assert_eq!(h.len() % 64, 0);
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.contains("'shape': (3, 4096)") && text.ends_with('\n'));
    }

    #[test]
    fn work_dir_sits_beside_the_output() {
        assert_eq!(
            work_dir(Path::new("out/fc7.safetensors")),
            Path::new("out/fc7.safetensors.partial")
        );
    }
}
