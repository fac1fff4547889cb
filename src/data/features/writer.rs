//! [`FeatureWriter`]: a run's rows and manifest kept on disk as it goes, resumable, and
//! published atomically at the end.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{npy_header, parent, safetensors_header, sibling, work_dir, FeatureFormat, Summary};
use crate::error::{Error, Result};
use crate::io::{csv_field, OutputLock};

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

    /// How many inputs the run has.
    pub fn total(&self) -> usize {
        self.state.inputs.len()
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
