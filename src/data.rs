//! Image inputs for batch jobs: finding the images, and decoding them on worker threads while the
//! model runs.
//!
//! ```no_run
//! use candle_zoo::data::{collect_images, BatchLoader};
//! use candle_zoo::preprocess::Preprocess;
//!
//! let paths = collect_images(&["photos/", "@more.txt", "one.jpg"])?;
//! for batch in BatchLoader::new(paths, Preprocess::torchvision(), 32, 2, 0) {
//!     let (tensor, ok) = batch.tensor(&candle_core::Device::Cpu)?;
//!     // `ok` lists the input indices of the tensor's rows; `batch.failed()` the others.
//! }
//! # Ok::<(), candle_zoo::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::preprocess::Preprocess;

/// File extensions a directory search picks up (the codecs this crate is built with). Files
/// named one by one, or in a list, are decoded whatever their extension.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Expands inputs into image paths, in order:
/// - a file is taken as it is;
/// - a directory is searched recursively for [`IMAGE_EXTENSIONS`] (any case), sorted by path;
/// - `@list.txt` reads one path per line (blank lines and lines starting with `#` skipped);
///   relative paths are relative to the list's folder.
///
/// A path that does not exist is an error naming it, so that a typo does not silently drop
/// images; files that exist but cannot be decoded are reported later, per image.
pub fn collect_images<S: AsRef<str>>(inputs: &[S]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let input = input.as_ref();
        if let Some(list) = input.strip_prefix('@') {
            let list = Path::new(list);
            let text = std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?;
            let base = list.parent().unwrap_or(Path::new(""));
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let path = base.join(line);
                if !path.exists() {
                    return Err(Error::Invalid(format!(
                        "{}, line {}: {} does not exist",
                        list.display(),
                        n + 1,
                        path.display()
                    )));
                }
                out.push(path);
            }
            continue;
        }
        let path = Path::new(input);
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found)?;
            found.sort();
            out.extend(found);
        } else {
            out.push(path.to_path_buf());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    walk_images(dir, &IMAGE_EXTENSIONS, false, out)
}

/// Appends the files under `dir` (recursively, following symlinked folders) whose extension is
/// one of `extensions` (case-insensitive), skipping names that start with `.` when
/// `skip_hidden`. Unsorted.
pub(crate) fn walk_images(
    dir: &Path,
    extensions: &[&str],
    skip_hidden: bool,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let hidden = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with('.'));
        if skip_hidden && hidden {
            continue;
        }
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() || (kind.is_symlink() && path.is_dir()) {
            walk_images(&path, extensions, skip_hidden, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// One image, decoded and preprocessed into `(3, crop, crop)` values, or why it could not be.
pub type Loaded = std::result::Result<Vec<f32>, Error>;

/// A batch of consecutive inputs, in input order.
#[derive(Debug)]
pub struct Batch {
    /// Index of the batch's first input in the whole list.
    pub start: usize,
    /// `(input index, path, pixels or error)`, in input order.
    pub items: Vec<(usize, PathBuf, Loaded)>,
    side: usize,
}

impl Batch {
    /// The images that loaded, as one `(n, 3, side, side)` tensor, with their input indices (in
    /// row order). `None` when none of them loaded.
    pub fn tensor(&self, device: &Device) -> Result<(Option<Tensor>, Vec<usize>)> {
        let ok: Vec<usize> = self
            .items
            .iter()
            .filter(|(_, _, r)| r.is_ok())
            .map(|(i, _, _)| *i)
            .collect();
        if ok.is_empty() {
            return Ok((None, ok));
        }
        let mut data = Vec::with_capacity(ok.len() * 3 * self.side * self.side);
        for (_, _, r) in &self.items {
            if let Ok(px) = r {
                data.extend_from_slice(px);
            }
        }
        let t = Tensor::from_vec(data, (ok.len(), 3, self.side, self.side), device)?;
        Ok((Some(t), ok))
    }

    /// The inputs that failed, with their errors.
    pub fn failed(&self) -> impl Iterator<Item = (usize, &Path, &Error)> {
        self.items.iter().filter_map(|(i, p, r)| match r {
            Err(e) => Some((*i, p.as_path(), e)),
            Ok(_) => None,
        })
    }
}

/// Decodes and preprocesses images on `workers` threads, yielding [`Batch`]es in input order.
///
/// Workers take whole batches; at most `2 * workers` finished batches wait for the consumer,
/// so memory stays bounded however many images there are. Dropping the loader stops the
/// workers.
pub struct BatchLoader {
    rx: Option<mpsc::Receiver<Batch>>,
    pending: BTreeMap<usize, Batch>,
    next: usize,
    batches: usize,
    batch_size: usize,
    start: usize,
    handles: Vec<JoinHandle<()>>,
    cancel: Arc<AtomicUsize>,
}

impl BatchLoader {
    /// Loads `paths[skip..]` in batches of `batch_size` (the first batch starts at `skip`, so a
    /// resumed run continues where the last one stopped).
    pub fn new(
        paths: Vec<PathBuf>,
        preprocess: Preprocess,
        batch_size: usize,
        workers: usize,
        skip: usize,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let workers = workers.max(1);
        let remaining = paths.len().saturating_sub(skip);
        let batches = remaining.div_ceil(batch_size);
        let (tx, rx) = mpsc::sync_channel::<Batch>(2 * workers);
        let paths = Arc::new(paths);
        let preprocess = Arc::new(preprocess);
        let counter = Arc::new(AtomicUsize::new(0));
        let cancel = Arc::new(AtomicUsize::new(0));
        let side = preprocess.crop as usize;
        let handles = (0..workers.min(batches.max(1)))
            .map(|_| {
                let (tx, paths, preprocess, counter, cancel) = (
                    tx.clone(),
                    paths.clone(),
                    preprocess.clone(),
                    counter.clone(),
                    cancel.clone(),
                );
                std::thread::spawn(move || loop {
                    let b = counter.fetch_add(1, Ordering::SeqCst);
                    if b >= batches || cancel.load(Ordering::SeqCst) != 0 {
                        break;
                    }
                    let from = skip + b * batch_size;
                    let to = (from + batch_size).min(paths.len());
                    let items = (from..to)
                        .map(|i| {
                            let p = &paths[i];
                            (i, p.clone(), preprocess.load_pixels(p))
                        })
                        .collect();
                    let batch = Batch {
                        start: from,
                        items,
                        side,
                    };
                    if tx.send(batch).is_err() {
                        break;
                    }
                })
            })
            .collect();
        Self {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: 0,
            batches,
            batch_size,
            start: skip,
            handles,
            cancel,
        }
    }

    /// How many batches this loader yields.
    pub fn len(&self) -> usize {
        self.batches
    }

    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }
}

impl Iterator for BatchLoader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.batches {
            return None;
        }
        let want = self.start + self.next * self.batch_size;
        loop {
            if let Some(b) = self.pending.remove(&want) {
                self.next += 1;
                return Some(b);
            }
            // A worker that panicked drops its sender; the channel then ends early.
            let batch = self.rx.as_ref()?.recv().ok()?;
            self.pending.insert(batch.start, batch);
        }
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        self.cancel.store(1, Ordering::SeqCst);
        // Dropping the receiver unblocks workers waiting to send.
        self.rx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
