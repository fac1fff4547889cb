//! Labelled image folders (torchvision's `ImageFolder`) and a training loader that decodes and
//! augments batches on worker threads.
//!
//! Reproducibility: the epoch's order comes from [`epoch_order`] and each image's augmentation
//! from `Rng::stream(seed, &[epoch, sample_index])`, so a run's batches depend only on the seed,
//! never on the number of workers or their timing.
//!
//! ```
//! use std::sync::Arc;
//! use candle_zoo::data::augment::Augment;
//! use candle_zoo::data::dataset::{epoch_order, ImageFolder, LabelledLoader};
//! use candle_zoo::data::preprocess::Preprocess;
//!
//! // A tiny two-class folder: root/<class>/<image>.
//! let root = tempfile::tempdir().unwrap();
//! for (class, n) in [("cat", 3), ("dog", 2)] {
//!     std::fs::create_dir(root.path().join(class)).unwrap();
//!     for i in 0..n {
//!         let image = image::RgbImage::from_pixel(40, 30, image::Rgb([i * 50, 90, 200]));
//!         image.save(root.path().join(class).join(format!("{i}.png"))).unwrap();
//!     }
//! }
//! let data = Arc::new(ImageFolder::open(root.path())?);
//! assert_eq!((data.classes().len(), data.len(), data.class_counts()), (2, 5, vec![3, 2]));
//!
//! let preprocess = Preprocess { crop: 24, ..Preprocess::torchvision() };
//! let (seed, epoch) = (42, 0);
//! let order = epoch_order(data.len(), seed, epoch, true);
//! let loader = LabelledLoader::new(
//!     data, order, Augment::train(preprocess), 2, false, 2, seed, epoch,
//! )?;
//! assert_eq!(loader.len(), 3);
//! for batch in loader {
//!     let batch = batch?;
//!     let (images, labels) = batch.tensors(&candle_core::Device::Cpu)?;
//!     assert_eq!(images.dims()[1..], [3, 24, 24]);
//!     assert_eq!(labels.dims(), [batch.len()]);
//! }
//! # Ok::<(), candle_zoo::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::augment::Augment;
use super::{check_batch_size, OrderedPool};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// File extensions (compared case-insensitively) that [`ImageFolder`] takes as images, as
/// torchvision's `IMG_EXTENSIONS`. This crate decodes JPEG and PNG; other formats are listed so
/// that they are reported per image (in [`LabelledBatch::failed`]) rather than silently dropped.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"];

/// The stream id [`epoch_order`] shuffles with: `Rng::stream(seed, &[epoch, SHUFFLE_ID])`. It is
/// above any sample index, so it never collides with a sample's stream `[epoch, index]`.
pub const SHUFFLE_ID: u64 = u64::MAX;

/// A labelled image folder: `root/<class>/**/<image>` (torchvision's `ImageFolder`).
///
/// Classes are the sub-directories of `root`, sorted by name, and class `i`'s label is `i`.
/// Hidden entries (names starting with `.`, such as `.ipynb_checkpoints`) are ignored, as are
/// files directly in `root`; symbolic links to folders are followed.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// Scans `root`: classes are the sub-directory names, sorted; samples are sorted by path;
    /// files are images by extension ([`IMAGE_EXTENSIONS`], any case).
    ///
    /// Errors name what is wrong: `root` missing or not a folder, no class folders, a class
    /// folder without images.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let classes = class_dirs(root)?;
        if classes.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no class folders; an image folder holds one sub-folder of images per class",
                root.display()
            )));
        }
        Self::scan(root, classes)
    }

    /// [`ImageFolder::open`] with the class list fixed, e.g. a validation split that must use
    /// the training split's labels: a folder whose name is not in `classes` is an error naming
    /// it; classes without a folder are allowed (they have no samples).
    pub fn open_with_classes(root: impl AsRef<Path>, classes: &[String]) -> Result<Self> {
        let root = root.as_ref();
        for name in class_dirs(root)? {
            if !classes.contains(&name) {
                return Err(Error::Invalid(format!(
                    "{}: folder `{name}` is not one of the {} expected classes (e.g. those of \
                     the training split)",
                    root.display(),
                    classes.len()
                )));
            }
        }
        Self::scan(root, classes.to_vec())
    }

    /// `root/train` and `root/val` (the torchvision/ImageNet layout); `val` uses `train`'s
    /// classes.
    pub fn open_splits(root: impl AsRef<Path>) -> Result<(Self, Self)> {
        let root = root.as_ref();
        let train = Self::open(root.join("train"))?;
        let val = Self::open_with_classes(root.join("val"), &train.classes)?;
        Ok((train, val))
    }

    fn scan(root: &Path, classes: Vec<String>) -> Result<Self> {
        let mut samples = Vec::new();
        for (label, name) in classes.iter().enumerate() {
            let dir = root.join(name);
            if !dir.is_dir() {
                continue; // Only `open_with_classes` lets a class have no folder.
            }
            let mut found = Vec::new();
            walk(&dir, &mut found)?;
            if found.is_empty() {
                return Err(Error::Invalid(format!(
                    "{}: class folder `{name}` holds no images ({})",
                    dir.display(),
                    IMAGE_EXTENSIONS.join(", ")
                )));
            }
            found.sort();
            samples.extend(found.into_iter().map(|p| (p, label)));
        }
        if samples.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no images in any class folder",
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            samples,
        })
    }

    /// The folder this was read from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names; a sample's label indexes this list.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// `(path, label)` of every image, sorted by class, then path.
    pub fn samples(&self) -> &[(PathBuf, usize)] {
        &self.samples
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no images (never true for a folder that opened).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of images of each class, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for (_, label) in &self.samples {
            counts[*label] += 1;
        }
        counts
    }
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The names of `root`'s visible sub-folders, sorted.
fn class_dirs(root: &Path) -> Result<Vec<String>> {
    let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: not a folder; expected root/<class>/<image>",
            root.display()
        )));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let path = entry.map_err(|e| Error::io(root, e))?.path();
        if path.is_dir() && !is_hidden(&path) {
            let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: class folder name is not valid UTF-8",
                    path.display()
                ))
            })?;
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Image files under `dir`, recursively (following links to folders).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    super::walk_images(dir, &IMAGE_EXTENSIONS, true, out)
}

/// The order of the samples in `epoch`: `0..n`, shuffled (when `shuffle`) by
/// `Rng::stream(seed, &[epoch, SHUFFLE_ID])`, so every epoch has its own, reproducible order.
///
/// ```
/// use candle_zoo::data::dataset::epoch_order;
/// assert_eq!(epoch_order(4, 1, 0, false), [0, 1, 2, 3]);
/// assert_eq!(epoch_order(100, 1, 3, true), epoch_order(100, 1, 3, true));
/// assert_ne!(epoch_order(100, 1, 3, true), epoch_order(100, 1, 4, true));
/// ```
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        Rng::stream(seed, &[epoch, SHUFFLE_ID]).shuffle(&mut order);
    }
    order
}

/// One batch of decoded, augmented, normalised images with their labels. Images that could not
/// be read are left out (so a batch can be shorter than asked, even empty) and listed in
/// `failed`.
#[derive(Debug)]
pub struct LabelledBatch {
    /// `(len, 3, side, side)` values, row-major.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u32>,
    /// The images' side.
    pub side: usize,
    /// The images' sample indices (into the dataset), in batch order.
    pub indices: Vec<usize>,
    /// Images that could not be read, with why; the caller should log them.
    pub failed: Vec<(PathBuf, Error)>,
}

impl LabelledBatch {
    /// Number of images (those that loaded).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether no image of the batch loaded.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `(images (N, 3, S, S) f32, labels (N,) u32)` on `device`.
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let n = self.len();
        let images = Tensor::from_slice(&self.images, (n, 3, self.side, self.side), device)?;
        let labels = Tensor::from_slice(&self.labels, n, device)?;
        Ok((images, labels))
    }
}

/// What the workers share.
struct Job {
    dataset: Arc<ImageFolder>,
    order: Vec<usize>,
    augment: Augment,
    batch_size: usize,
    batches: usize,
    seed: u64,
    epoch: u64,
}

impl Job {
    fn batch(&self, b: usize) -> LabelledBatch {
        let side = self.augment.side();
        let from = b * self.batch_size;
        let to = (from + self.batch_size).min(self.order.len());
        let mut batch = LabelledBatch {
            images: Vec::with_capacity((to - from) * 3 * side * side),
            labels: Vec::with_capacity(to - from),
            side,
            indices: Vec::with_capacity(to - from),
            failed: Vec::new(),
        };
        for &index in &self.order[from..to] {
            let (path, label) = &self.dataset.samples[index];
            let mut rng = Rng::stream(self.seed, &[self.epoch, index as u64]);
            match super::guard_decode(path, || self.augment.load(path, &mut rng)) {
                Ok(values) => {
                    batch.images.extend_from_slice(&values);
                    batch.labels.push(*label as u32);
                    batch.indices.push(index);
                }
                Err(e) => batch.failed.push((path.clone(), e)),
            }
        }
        batch
    }
}

/// Decodes and augments batches on worker threads while the caller trains; yields them in order.
///
/// Workers take whole batches and run at most `workers + 1` batches ahead of the consumer, so
/// memory stays bounded; they start on the first [`Iterator::next`] and stop when the loader is
/// dropped. Each image is augmented with `Rng::stream(seed, &[epoch, index])` (its sample
/// index), so the batches do not depend on `workers` or timing. An unreadable image is skipped
/// and reported in [`LabelledBatch::failed`]; the item is an error only if a worker died.
pub struct LabelledLoader {
    job: Arc<Job>,
    workers: usize,
    /// The next batch to yield.
    next: usize,
    /// Started on the first `next`, so that `skip_batches` decodes nothing.
    running: Option<OrderedPool<LabelledBatch>>,
}

impl LabelledLoader {
    /// Batches of `order` (indices into `dataset`, e.g. from [`epoch_order`]) in that order,
    /// `batch_size` per batch; the last one may be shorter, or is dropped with `drop_last`.
    /// `workers` threads decode (0 is taken as 1). Errors: `batch_size` 0, an index out of range.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dataset: Arc<ImageFolder>,
        order: Vec<usize>,
        augment: Augment,
        batch_size: usize,
        drop_last: bool,
        workers: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Self> {
        check_batch_size(batch_size)?;
        if let Some(&bad) = order.iter().find(|&&i| i >= dataset.len()) {
            return Err(Error::Invalid(format!(
                "sample index {bad} is out of range for {} ({} images)",
                dataset.root().display(),
                dataset.len()
            )));
        }
        let batches = if drop_last {
            order.len() / batch_size
        } else {
            order.len().div_ceil(batch_size)
        };
        Ok(Self {
            job: Arc::new(Job {
                dataset,
                order,
                augment,
                batch_size,
                batches,
                seed,
                epoch,
            }),
            workers: workers.max(1),
            next: 0,
            running: None,
        })
    }

    /// Skips the next `n` batches without decoding them, e.g. to resume mid-epoch: the batches
    /// that follow are exactly those of the uninterrupted run. Work already done ahead is
    /// discarded.
    pub fn skip_batches(mut self, n: usize) -> Self {
        self.running = None;
        self.next = self.next.saturating_add(n).min(self.job.batches);
        self
    }

    /// Number of batches it will yield in all (skipped ones excluded).
    pub fn len(&self) -> usize {
        self.job.batches - self.next.min(self.job.batches)
    }

    /// Whether it yields no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn start(&self) -> OrderedPool<LabelledBatch> {
        let job = self.job.clone();
        let workers = self.workers;
        OrderedPool::new(self.next..job.batches, workers, workers + 1, move |b| {
            job.batch(b)
        })
    }
}

impl Iterator for LabelledLoader {
    type Item = Result<LabelledBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.job.batches {
            self.running = None;
            return None;
        }
        if self.running.is_none() {
            self.running = Some(self.start());
        }
        let item = self.running.as_mut()?.next()?;
        match item {
            Ok(_) => self.next += 1,
            Err(_) => {
                self.next = self.job.batches;
                self.running = None;
            }
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len(), Some(self.len()))
    }
}

impl ExactSizeIterator for LabelledLoader {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::Preprocess;

    /// `root/<class>/<name>.png` for each `(class, name, colour)`.
    fn folder(images: &[(&str, &str, u8)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        for (class, name, colour) in images {
            let dir = root.path().join(class);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let image = image::RgbImage::from_fn(20, 18, |x, y| {
                image::Rgb([*colour, (x * 9) as u8, (y * 13) as u8])
            });
            image.save(dir.join(format!("{name}.png"))).expect("save");
        }
        root
    }

    fn small() -> Preprocess {
        Preprocess {
            crop: 12,
            resize: crate::data::preprocess::Resize::ShorterSide(14),
            min_side: 4,
            ..Preprocess::torchvision()
        }
    }

    fn sample_folder() -> tempfile::TempDir {
        let mut images = Vec::new();
        for (c, class) in ["b_dog", "a_cat", "c_eel"].iter().enumerate() {
            for i in 0..(3 + c) {
                images.push((
                    *class,
                    ["z", "m", "a", "q", "k"][i],
                    (40 * c + 10 * i) as u8,
                ));
            }
        }
        let root = folder(&images);
        std::fs::create_dir_all(root.path().join("a_cat/sub")).expect("mkdir");
        std::fs::copy(
            root.path().join("a_cat/z.png"),
            root.path().join("a_cat/sub/x.PNG"),
        )
        .expect("copy");
        std::fs::write(root.path().join("a_cat/notes.txt"), "not an image").expect("write");
        std::fs::write(root.path().join("top.png"), "files in root are ignored").expect("write");
        std::fs::create_dir_all(root.path().join(".hidden")).expect("mkdir");
        root
    }

    #[test]
    fn image_folder_lists_classes_and_samples_sorted() -> Result<()> {
        let root = sample_folder();
        let data = ImageFolder::open(root.path())?;
        assert_eq!(data.classes(), ["a_cat", "b_dog", "c_eel"]);
        assert_eq!(data.class_counts(), [5, 3, 5]);
        assert_eq!(data.len(), 13);
        let names: Vec<String> = data.samples()[..5]
            .iter()
            .map(|(p, _)| {
                p.strip_prefix(root.path())
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "a_cat/a.png",
                "a_cat/m.png",
                "a_cat/q.png",
                "a_cat/sub/x.PNG",
                "a_cat/z.png"
            ]
        );
        assert!(data.samples().windows(2).all(|w| w[0].0 < w[1].0));
        assert!(data.samples()[5..8].iter().all(|(_, l)| *l == 1));
        assert_eq!(data.root(), root.path());
        Ok(())
    }

    #[test]
    fn image_folder_errors_name_the_problem() {
        let err = |r: Result<ImageFolder>| r.expect_err("should fail").to_string();
        let root = tempfile::tempdir().expect("tempdir");
        let missing = root.path().join("nope");
        assert!(err(ImageFolder::open(&missing)).contains("nope"));
        assert!(err(ImageFolder::open(root.path())).contains("no class folders"));
        std::fs::create_dir(root.path().join("empty_class")).expect("mkdir");
        std::fs::write(root.path().join("empty_class/a.txt"), "x").expect("write");
        assert!(err(ImageFolder::open(root.path())).contains("empty_class"));

        let root = folder(&[("cat", "a", 1), ("dog", "b", 2)]);
        let classes = ["cat".to_string()];
        assert!(err(ImageFolder::open_with_classes(root.path(), &classes)).contains("`dog`"));
        let none = ["x".to_string(), "y".to_string()];
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(err(ImageFolder::open_with_classes(empty.path(), &none)).contains("no images"));
    }

    #[test]
    fn splits_share_the_training_classes() -> Result<()> {
        let root = folder(&[
            ("train/ant", "a", 1),
            ("train/bee", "b", 2),
            ("train/cow", "c", 3),
            ("val/cow", "d", 4),
            ("val/ant", "e", 5),
        ]);
        let (train, val) = ImageFolder::open_splits(root.path())?;
        assert_eq!(train.classes(), val.classes());
        let labels: Vec<usize> = val.samples().iter().map(|(_, l)| *l).collect();
        assert_eq!(labels, [0, 2]);
        assert_eq!(val.class_counts(), [1, 0, 1]);
        std::fs::create_dir_all(root.path().join("val/dog")).expect("mkdir");
        assert!(ImageFolder::open_splits(root.path()).is_err());
        Ok(())
    }

    fn run(loader: LabelledLoader) -> Vec<LabelledBatch> {
        loader.map(|b| b.expect("batch")).collect()
    }

    fn loader(data: &Arc<ImageFolder>, workers: usize, drop_last: bool) -> LabelledLoader {
        let order = epoch_order(data.len(), 9, 2, true);
        LabelledLoader::new(
            data.clone(),
            order,
            Augment::train(small()),
            4,
            drop_last,
            workers,
            9,
            2,
        )
        .expect("loader")
    }

    #[test]
    fn loader_is_independent_of_workers_and_labels_right() -> Result<()> {
        let root = sample_folder();
        let data = Arc::new(ImageFolder::open(root.path())?);
        let one = run(loader(&data, 1, false));
        let three = run(loader(&data, 3, false));
        assert_eq!(one.len(), 4); // 13 images in batches of 4
        assert_eq!(
            one.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [4, 4, 4, 1]
        );
        let order = epoch_order(data.len(), 9, 2, true);
        let indices: Vec<usize> = one.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(indices, order);
        for (a, b) in one.iter().zip(&three) {
            assert_eq!(a.indices, b.indices);
            assert_eq!(a.labels, b.labels);
            assert!(
                a.images == b.images,
                "images differ between 1 and 3 workers"
            );
            assert_eq!(a.images.len(), a.len() * 3 * 12 * 12);
            for (i, label) in a.indices.iter().zip(&a.labels) {
                assert_eq!(data.samples()[*i].1 as u32, *label);
            }
            // Each image is the augmentation of its own sample stream.
            let i = a.indices[0];
            let mut rng = Rng::stream(9, &[2, i as u64]);
            let want = Augment::train(small()).load(&data.samples()[i].0, &mut rng)?;
            assert!(a.images[..want.len()] == want[..]);
        }
        assert_eq!(run(loader(&data, 2, true)).len(), 3);
        let (x, y) = one[3].tensors(&Device::Cpu)?;
        assert_eq!((x.dims(), y.dims()), (&[1, 3, 12, 12][..], &[1][..]));
        Ok(())
    }

    #[test]
    fn skip_batches_gives_the_tail_of_the_full_run() -> Result<()> {
        let root = sample_folder();
        let data = Arc::new(ImageFolder::open(root.path())?);
        let full = run(loader(&data, 2, false));
        let tail = loader(&data, 3, false).skip_batches(2);
        assert_eq!(tail.len(), 2);
        let tail = run(tail);
        assert_eq!(tail.len(), 2);
        for (a, b) in full[2..].iter().zip(&tail) {
            assert_eq!(a.indices, b.indices);
            assert!(a.images == b.images);
        }
        // Skipping after starting: drops the work ahead and continues at the right batch.
        let mut l = loader(&data, 2, false);
        let first = l.next().expect("one")?;
        assert_eq!(first.indices, full[0].indices);
        let rest = run(l.skip_batches(1));
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].indices, full[2].indices);
        assert!(loader(&data, 1, false).skip_batches(10).next().is_none());
        Ok(())
    }

    #[test]
    fn unreadable_images_are_reported_not_fatal() -> Result<()> {
        let root = folder(&[("a", "0", 1), ("a", "1", 2), ("b", "2", 3)]);
        let bad = root.path().join("a/1.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\ntruncated").expect("write");
        let data = Arc::new(ImageFolder::open(root.path())?);
        let order: Vec<usize> = (0..3).collect();
        let loader = LabelledLoader::new(data, order, Augment::eval(small()), 8, false, 2, 0, 0)?;
        let batches = run(loader);
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(
            (b.indices.clone(), b.labels.clone()),
            (vec![0, 2], vec![0, 1])
        );
        assert_eq!(b.failed.len(), 1);
        assert_eq!(b.failed[0].0, bad);
        assert!(matches!(b.failed[0].1, Error::Image { .. }));
        Ok(())
    }

    #[test]
    fn loader_rejects_bad_arguments_and_stops_when_dropped() -> Result<()> {
        let root = sample_folder();
        let data = Arc::new(ImageFolder::open(root.path())?);
        let aug = Augment::eval(small());
        assert!(
            LabelledLoader::new(data.clone(), vec![0], aug.clone(), 0, false, 1, 0, 0).is_err()
        );
        let err = LabelledLoader::new(data.clone(), vec![99], aug, 1, false, 1, 0, 0);
        assert!(err.err().expect("out of range").to_string().contains("99"));
        // Dropping a loader mid-epoch joins its workers (this would hang otherwise).
        let mut l = loader(&data, 3, false);
        l.next().expect("one")?;
        drop(l);
        assert_eq!(epoch_order(5, 1, 0, false), [0, 1, 2, 3, 4]);
        let mut o = epoch_order(50, 1, 0, true);
        o.sort();
        assert_eq!(o, (0..50).collect::<Vec<_>>());
        Ok(())
    }
}
