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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::preprocess::Preprocess;
use super::BatchLoader;
use crate::error::{Error, Result};
use crate::io::{csv_field, OutputLock};
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
/// beside a `.npy`), and what a resumed run must match: the model (`model`: where its weights
/// came from, in the caller's words; `layout`), the tap (`layer`), the input pipeline
/// (`preprocess`) and the program (`producer`).
///
/// ```
/// use candle_zoo::data::{features::run_metadata, preprocess::Preprocess};
/// use candle_zoo::models::alexnet::{Layout, Tap};
/// let meta = run_metadata("alexnet.safetensors", Layout::TorchVision, Tap::Fc7,
///                         &Preprocess::torchvision(), "my-tool 1.0");
/// assert_eq!(meta["layer"], "fc7");
/// ```
pub fn run_metadata(
    model: &str,
    layout: Layout,
    tap: Tap,
    preprocess: &Preprocess,
    producer: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("model".to_string(), model.to_string()),
        ("layout".to_string(), layout.to_string()),
        ("layer".to_string(), tap.to_string()),
        ("preprocess".to_string(), preprocess.to_string()),
        ("producer".to_string(), producer.to_string()),
    ])
}

/// What a run is, recorded in its work folder so that `--resume` continues only the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunState {
    format: String,
    metadata: BTreeMap<String, String>,
    inputs: Vec<PathBuf>,
}

/// One line of the work folder's manifest (JSON lines: a line cut short by a kill is ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    index: usize,
    row: Option<usize>,
    error: Option<String>,
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

/// Appends feature rows for a list of inputs, in input order, and publishes them at the end.
#[derive(Debug)]
pub struct FeatureWriter {
    out: PathBuf,
    format: FeatureFormat,
    work: PathBuf,
    rows: File,
    manifest: File,
    state: RunState,
    entries: Vec<Entry>,
    dim: Option<usize>,
    n_rows: usize,
    /// `OUT.lock`, held from `create` to `finish` (or until dropped).
    _lock: OutputLock,
}

impl FeatureWriter {
    /// Starts a run writing `out`, or with `resume` continues the interrupted one in
    /// `out.partial/`. Resuming checks that the inputs and metadata are the same as before.
    /// Without `resume`, an interrupted run's folder is an error, [`Error::Interrupted`]
    /// (nothing is thrown away unasked).
    ///
    /// The run holds `OUT.lock` until it finishes or the writer is dropped: a second run on the
    /// same `OUT` fails at once with [`Error::Locked`]. Holding it, the writer removes what
    /// killed runs left behind: their temporary files, and a work folder whose creation never
    /// finished.
    pub fn create(
        out: impl AsRef<Path>,
        format: FeatureFormat,
        inputs: &[PathBuf],
        metadata: BTreeMap<String, String>,
        resume: bool,
    ) -> Result<Self> {
        let out = out.as_ref().to_path_buf();
        let work = work_dir(&out);
        let lock = OutputLock::acquire(sibling(&out, ".lock"))?.remove_on_release();
        let dir = parent(&out);
        let names = [
            &out,
            &out.with_extension("csv"),
            &out.with_extension("json"),
        ]
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        });
        crate::io::remove_stale_temps(dir, &names.each_ref().map(String::as_str))?;
        let state = RunState {
            format: format.name().to_string(),
            metadata,
            inputs: inputs.to_vec(),
        };
        let state_path = work.join(RUN_JSON);
        // A folder without its run record is a create that never finished: nothing to resume.
        if work.exists() && !state_path.exists() {
            std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        }
        if work.exists() {
            if !resume {
                return Err(Error::Interrupted { work });
            }
            crate::io::remove_stale_temps(&work, &[RUN_JSON, DIM, MANIFEST])?;
            let text = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
            let before: RunState = serde_json::from_slice(&text).map_err(|e| {
                Error::Invalid(format!(
                    "{}: unreadable run state: {e}",
                    state_path.display()
                ))
            })?;
            if before != state {
                return Err(Error::Invalid(format!(
                    "cannot resume {}: {}; delete the folder to start again",
                    work.display(),
                    difference(&before, &state)
                )));
            }
            return Self::reopen(out, format, work, state, lock);
        }
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        let open = |name: &str| {
            let p = work.join(name);
            File::create(&p).map_err(|e| Error::io(&p, e))
        };
        let (rows, manifest) = (open(ROWS)?, open(MANIFEST)?);
        // Last: the record that says the folder holds a run.
        let json = serde_json::to_vec_pretty(&state).expect("serialisable");
        crate::io::write_atomic(&state_path, &json)?;
        Ok(Self {
            rows,
            manifest,
            out,
            format,
            work,
            state,
            entries: Vec::new(),
            dim: None,
            n_rows: 0,
            _lock: lock,
        })
    }

    fn reopen(
        out: PathBuf,
        format: FeatureFormat,
        work: PathBuf,
        state: RunState,
        lock: OutputLock,
    ) -> Result<Self> {
        let manifest_path = work.join(MANIFEST);
        let (entries, valid) = read_manifest(&manifest_path)?;
        let n_rows = entries.iter().filter(|e| e.row.is_some()).count();
        let dim_path = work.join(DIM);
        let dim = match std::fs::read_to_string(&dim_path) {
            Ok(s) => Some(
                s.trim()
                    .parse::<usize>()
                    .map_err(|e| Error::Invalid(format!("{}: {e}", dim_path.display())))?,
            ),
            Err(_) if n_rows == 0 => None,
            Err(e) => return Err(Error::io(&dim_path, e)),
        };
        // Rows written after the last manifest line belong to a batch that never finished, and
        // so does a manifest line cut short: both are cut off in place, which needs no space.
        let rows_path = work.join(ROWS);
        let rows = OpenOptions::new()
            .write(true)
            .open(&rows_path)
            .map_err(|e| Error::io(&rows_path, e))?;
        let keep = n_rows
            .checked_mul(dim.unwrap_or(0))
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| Error::Invalid(format!("{}: too many rows", rows_path.display())))?
            as u64;
        let len = rows.metadata().map_err(|e| Error::io(&rows_path, e))?.len();
        if len < keep {
            return Err(Error::Invalid(format!(
                "{}: {len} bytes, but the manifest records {n_rows} rows of {} values",
                rows_path.display(),
                dim.unwrap_or(0)
            )));
        }
        rows.set_len(keep).map_err(|e| Error::io(&rows_path, e))?;
        let mut rows = rows;
        use std::io::Seek;
        rows.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(&rows_path, e))?;
        let manifest = OpenOptions::new()
            .append(true)
            .open(&manifest_path)
            .map_err(|e| Error::io(&manifest_path, e))?;
        manifest
            .set_len(valid)
            .and_then(|_| manifest.sync_all())
            .map_err(|e| Error::io(&manifest_path, e))?;
        Ok(Self {
            out,
            format,
            work,
            rows,
            manifest,
            state,
            entries,
            dim,
            n_rows,
            _lock: lock,
        })
    }

    /// How many inputs (from the start of the list) are already done: a resumed run skips them.
    pub fn done(&self) -> usize {
        self.entries.len()
    }

    /// Values per row, once the first row is written.
    pub fn dim(&self) -> Option<usize> {
        self.dim
    }

    /// Records the next inputs: `results` gives, for each input in order, its feature row or why
    /// it failed. Rows reach the disk before the manifest lines that name them.
    pub fn append(
        &mut self,
        results: Vec<(usize, std::result::Result<Vec<f32>, String>)>,
    ) -> Result<()> {
        let rows_path = self.work.join(ROWS);
        let mut bytes = Vec::new();
        let mut lines = String::new();
        for (index, result) in results {
            if index != self.entries.len() {
                return Err(Error::Invalid(format!(
                    "feature rows out of order: input {index} after {}",
                    self.entries.len()
                )));
            }
            let entry = match result {
                Ok(row) => {
                    match self.dim {
                        None => {
                            let dim_path = self.work.join(DIM);
                            crate::io::write_atomic(&dim_path, row.len().to_string().as_bytes())?;
                            self.dim = Some(row.len());
                        }
                        Some(d) if d != row.len() => {
                            return Err(Error::Invalid(format!(
                                "input {index}: {} values where earlier rows have {d}",
                                row.len()
                            )))
                        }
                        Some(_) => {}
                    }
                    for v in &row {
                        bytes.extend_from_slice(&v.to_le_bytes());
                    }
                    self.n_rows += 1;
                    Entry {
                        index,
                        row: Some(self.n_rows - 1),
                        error: None,
                    }
                }
                Err(reason) => Entry {
                    index,
                    row: None,
                    error: Some(reason),
                },
            };
            lines.push_str(&serde_json::to_string(&entry).expect("serialisable"));
            lines.push('\n');
            self.entries.push(entry);
        }
        crate::io::append_durably(&mut self.rows, &rows_path, &bytes)?;
        let manifest_path = self.work.join(MANIFEST);
        crate::io::append_durably(&mut self.manifest, &manifest_path, lines.as_bytes())?;
        Ok(())
    }

    /// The sidecar manifest's path: `OUT` with the extension `csv`.
    pub fn manifest_path(&self) -> PathBuf {
        self.out.with_extension("csv")
    }

    /// Writes the CSV manifest and the features file atomically and removes the work folder.
    /// Every input must have been recorded.
    ///
    /// The order is what makes a crash at any point safe: an old `OUT` (replaced on request) is
    /// removed first, then the manifest is written, then `OUT`, last because its presence says
    /// the job is complete; the folder is flushed after each step. A crash in between leaves no
    /// `OUT` and the work folder, so a resumed run finishes the job: never new features beside
    /// an old manifest.
    pub fn finish(self) -> Result<Summary> {
        let total = self.state.inputs.len();
        if self.entries.len() != total {
            return Err(Error::Invalid(format!(
                "{} of {total} inputs recorded; the run is not finished",
                self.entries.len()
            )));
        }
        let dir = parent(&self.out);
        for old in [self.out.clone(), self.out.with_extension("json")] {
            match std::fs::remove_file(&old) {
                Ok(()) => crate::io::sync_dir(dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&old, e)),
            }
        }
        let manifest = self.manifest_path();
        let mut csv = String::from("row,path,status,reason\n");
        let mut failed = Vec::new();
        for e in &self.entries {
            let path = &self.state.inputs[e.index];
            let row = e.row.map(|r| r.to_string()).unwrap_or_default();
            let status = if e.row.is_some() { "ok" } else { "failed" };
            let reason = e.error.clone().unwrap_or_default();
            csv.push_str(&format!(
                "{row},{},{status},{}\n",
                csv_field(&path.display().to_string()),
                csv_field(&reason)
            ));
            if let Some(reason) = &e.error {
                failed.push((path.clone(), reason.clone()));
            }
        }
        crate::io::write_atomic(&manifest, csv.as_bytes())?;
        if self.format == FeatureFormat::Npy {
            let json = serde_json::to_vec_pretty(&self.state.metadata).expect("serialisable");
            crate::io::write_atomic(self.out.with_extension("json"), &json)?;
        }
        let dim = self.dim.unwrap_or(0);
        let (n, data_len) = (self.n_rows, (self.n_rows * dim * 4) as u64);
        let rows_path = self.work.join(ROWS);
        let header = match self.format {
            FeatureFormat::Safetensors => safetensors_header(&self.state.metadata, n, dim),
            FeatureFormat::Npy => npy_header(n, dim),
        };
        crate::io::write_atomic_with(&self.out, |w| {
            w.write_all(&header)?;
            let mut rows = File::open(&rows_path)?.take(data_len);
            let copied = std::io::copy(&mut rows, w)?;
            if copied != data_len {
                return Err(std::io::Error::other(format!(
                    "{}: {copied} bytes where {data_len} were expected",
                    rows_path.display()
                )));
            }
            Ok(())
        })?;
        std::fs::remove_dir_all(&self.work).map_err(|e| Error::io(&self.work, e))?;
        crate::io::sync_dir(dir)?;
        Ok(Summary {
            features: self.out,
            manifest,
            rows: n,
            dim,
            failed,
        })
    }
}

/// The files of a work folder.
const RUN_JSON: &str = "run.json";
const ROWS: &str = "rows.f32";
const DIM: &str = "dim";
const MANIFEST: &str = "manifest.jsonl";

/// The entries of a work folder's manifest and the byte length of its whole lines. A line a
/// kill or a full disk cut short (anywhere: inside a multi-byte character too) ends it.
fn read_manifest(path: &Path) -> Result<(Vec<Entry>, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut entries = Vec::new();
    let mut valid = 0;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let Some(line) = line.strip_suffix(b"\n") else {
            break;
        };
        let Ok(entry) = serde_json::from_slice::<Entry>(line) else {
            break;
        };
        if entry.index != entries.len() {
            return Err(Error::Invalid(format!(
                "{}: entry for input {} where {} was expected",
                path.display(),
                entry.index,
                entries.len()
            )));
        }
        entries.push(entry);
        valid += line.len() + 1;
    }
    Ok((entries, valid as u64))
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

/// What differs between an interrupted run and the one asked for now.
fn difference(before: &RunState, now: &RunState) -> String {
    if before.format != now.format {
        return format!(
            "it wrote {} and this run asks for {}",
            before.format, now.format
        );
    }
    for (k, v) in &before.metadata {
        match now.metadata.get(k) {
            Some(w) if w == v => {}
            Some(w) => return format!("its {k} was `{v}` and is now `{w}`"),
            None => return format!("it recorded {k} = `{v}`, which this run lacks"),
        }
    }
    if before.inputs.len() != now.inputs.len() {
        return format!(
            "it had {} inputs and this run has {}",
            before.inputs.len(),
            now.inputs.len()
        );
    }
    match before
        .inputs
        .iter()
        .zip(&now.inputs)
        .position(|(a, b)| a != b)
    {
        Some(i) => format!(
            "input {i} was {} and is now {}",
            before.inputs[i].display(),
            now.inputs[i].display()
        ),
        None => "its settings differ".into(),
    }
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
    let total = writer.state.inputs.len();
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

    /// Results for inputs `from..from + n`: even ones a 2-value row, odd ones an error message
    /// with a two-byte character in it.
    fn results(from: usize, n: usize) -> Vec<(usize, std::result::Result<Vec<f32>, String>)> {
        (from..from + n)
            .map(|i| match i % 2 {
                0 => (i, Ok(vec![i as f32, -(i as f32)])),
                _ => (i, Err(format!("café {i} is not an image"))),
            })
            .collect()
    }

    fn inputs(n: usize) -> Vec<PathBuf> {
        (0..n).map(|i| PathBuf::from(format!("{i}.jpg"))).collect()
    }

    fn create(out: &Path, resume: bool) -> Result<FeatureWriter> {
        FeatureWriter::create(
            out,
            FeatureFormat::Safetensors,
            &inputs(6),
            BTreeMap::new(),
            resume,
        )
    }

    #[test]
    fn a_second_run_on_the_same_output_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fc7.safetensors");
        let first = create(&out, false).unwrap();
        for resume in [false, true] {
            let err = create(&out, resume).unwrap_err();
            assert!(matches!(err, Error::Locked { .. }), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("fc7.safetensors.lock")
                    && msg.contains(&format!("pid {}", std::process::id())),
                "{msg}"
            );
        }
        drop(first);
        assert!(!dir.path().join("fc7.safetensors.lock").exists());
        create(&out, true).unwrap();
    }

    /// A full disk cuts the manifest's last line inside `é`: the resumed run reads the lines
    /// before it, cuts the torn one off in place (no rewrite, which needs the space again), and
    /// ends with the same bytes as a run that never stopped.
    #[test]
    #[cfg(unix)]
    fn a_full_disk_leaves_a_run_that_resumes_to_the_same_output() {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.safetensors");
        let mut w = create(&whole, false).unwrap();
        w.append(results(0, 6)).unwrap();
        w.finish().unwrap();

        let out = dir.path().join("fc7.safetensors");
        let mut w = create(&out, false).unwrap();
        w.append(results(0, 2)).unwrap();
        // The next batch's manifest lines get 68 bytes: the 33 of input 2's line, and 35 of
        // input 3's, which end inside the "é" of "café".
        let manifest = work_dir(&out).join(MANIFEST);
        let before = std::fs::read(&manifest).unwrap().len();
        crate::io::fault::disk_full(Some((MANIFEST, 68)));
        let err = w.append(results(2, 2)).unwrap_err();
        crate::io::fault::disk_full(None);
        assert!(err.to_string().contains("no space left"), "{err}");
        drop(w);
        let torn = std::fs::read(&manifest).unwrap();
        assert_eq!(torn.len(), before + 68);
        assert!(
            std::str::from_utf8(&torn).is_err(),
            "the cut splits a character"
        );

        let inode = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().ino()
        };
        let old_inode = inode(&manifest);
        let mut w = create(&out, true).unwrap();
        assert_eq!(w.done(), 3);
        assert_eq!(inode(&manifest), old_inode, "cut in place, not rewritten");
        assert_eq!(std::fs::read(&manifest).unwrap().len(), before + 33);
        w.append(results(3, 3)).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
        assert_eq!(
            std::fs::read(out.with_extension("csv")).unwrap(),
            std::fs::read(whole.with_extension("csv")).unwrap()
        );
    }

    /// A run whose create died before it recorded itself leaves a folder with no run in it;
    /// killed atomic writes leave temporary files. Neither blocks the next run, which clears
    /// them.
    #[test]
    fn what_killed_runs_leave_behind_is_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fc7.safetensors");
        let stale = dir.path().join(".fc7.safetensors.tmp-Xy12ab");
        let stale_csv = dir.path().join(".fc7.csv.tmp-Zz9");
        let other = dir.path().join(".other.safetensors.tmp-Q");
        for f in [&stale, &stale_csv, &other] {
            std::fs::write(f, b"half a file").unwrap();
        }
        std::fs::create_dir(work_dir(&out)).unwrap();
        for resume in [false, true] {
            let w = create(&out, resume).unwrap();
            assert_eq!(w.done(), 0);
            drop(w);
            std::fs::remove_dir_all(work_dir(&out)).unwrap();
            std::fs::create_dir(work_dir(&out)).unwrap();
        }
        assert!(!stale.exists() && !stale_csv.exists());
        assert!(
            other.exists(),
            "another output's files are not this run's to remove"
        );
    }

    /// A crash between the two files `finish` writes must not pair new features with an old
    /// manifest: the features file goes last, after the old one is gone.
    #[test]
    fn no_new_features_beside_an_old_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fc7.safetensors");
        let mut w = create(&out, false).unwrap();
        w.append(results(0, 6)).unwrap();
        w.finish().unwrap();
        let (old_features, old_manifest) = (
            std::fs::read(&out).unwrap(),
            std::fs::read(out.with_extension("csv")).unwrap(),
        );
        // A second run (as with --force) over other inputs fails at its manifest.
        let mut w = FeatureWriter::create(
            &out,
            FeatureFormat::Safetensors,
            &inputs(4),
            BTreeMap::new(),
            false,
        )
        .unwrap();
        w.append(results(0, 4)).unwrap();
        crate::io::fault::disk_full(Some(("fc7.csv", 0)));
        let err = w.finish().unwrap_err();
        crate::io::fault::disk_full(None);
        assert!(err.to_string().contains("no space left"), "{err}");
        let manifest = std::fs::read(out.with_extension("csv")).unwrap();
        assert_eq!(manifest, old_manifest);
        match std::fs::read(&out) {
            Ok(features) => assert_eq!(features, old_features, "new features, old manifest"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        }
    }

    #[test]
    fn work_dir_sits_beside_the_output() {
        assert_eq!(
            work_dir(Path::new("out/fc7.safetensors")),
            Path::new("out/fc7.safetensors.partial")
        );
    }
}
