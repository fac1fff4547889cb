//! Decoding images on worker threads while the model runs, in input order.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};

use super::preprocess::Preprocess;
use crate::error::{Error, Result};

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
/// Workers take whole batches and run at most `2 * workers` batches ahead of the consumer, so
/// memory stays bounded however many images there are. Dropping the loader stops the workers.
/// An item is an error only if a worker died (a bug), never for an unreadable image: those are
/// in [`Batch::failed`].
pub struct BatchLoader {
    pool: OrderedPool<Batch>,
}

impl BatchLoader {
    /// Loads `paths[skip..]` in batches of `batch_size` (the first batch starts at `skip`, so a
    /// resumed run continues where the last one stopped), on `workers` threads (0 is taken as
    /// 1). A `batch_size` of 0 is an error, as everywhere in this crate.
    pub fn new(
        paths: Vec<PathBuf>,
        preprocess: Preprocess,
        batch_size: usize,
        workers: usize,
        skip: usize,
    ) -> Result<Self> {
        check_batch_size(batch_size)?;
        let workers = workers.max(1);
        let batches = paths.len().saturating_sub(skip).div_ceil(batch_size);
        let side = preprocess.crop as usize;
        let job = move |b: usize| {
            let from = skip + b * batch_size;
            let to = (from + batch_size).min(paths.len());
            let items = (from..to)
                .map(|i| {
                    let path = &paths[i];
                    let pixels = guard_decode(path, || preprocess.load_pixels(path));
                    (i, path.clone(), pixels)
                })
                .collect();
            Batch {
                start: from,
                items,
                side,
            }
        };
        Ok(Self {
            pool: OrderedPool::new(0..batches, workers, 2 * workers, job),
        })
    }

    /// How many batches this loader yields.
    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pool.len() == 0
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.pool.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len(), Some(self.len()))
    }
}

impl ExactSizeIterator for BatchLoader {}

/// The one rule for batch sizes: at least 1.
pub(crate) fn check_batch_size(batch_size: usize) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    Ok(())
}

/// Runs `job(i)` for each `i` of a range on worker threads and yields the results in index
/// order: the worker pool behind [`BatchLoader`] and [`super::dataset::LabelledLoader`].
///
/// Workers claim indices in turn and wait while they are `ahead` items or more past the
/// consumer, so at most about `ahead + workers` results are held; they start at construction
/// and stop (after their current item) when the pool is dropped. A worker that panics ends the
/// iteration with an error naming the item that never arrived.
pub(crate) struct OrderedPool<T> {
    /// `(index, job(index))`, or the message of a job that panicked.
    rx: Option<mpsc::Receiver<(usize, std::result::Result<T, String>)>>,
    pending: BTreeMap<usize, std::result::Result<T, String>>,
    next: usize,
    end: usize,
    /// `(next index the consumer wants, cancelled)`: what the workers wait on.
    gate: Arc<(Mutex<(usize, bool)>, Condvar)>,
    handles: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> OrderedPool<T> {
    pub(crate) fn new<F>(range: Range<usize>, workers: usize, ahead: usize, job: F) -> Self
    where
        F: Fn(usize) -> T + Send + Sync + 'static,
    {
        let (first, end) = (range.start, range.end.max(range.start));
        let ahead = ahead.max(1);
        let (tx, rx) = mpsc::channel();
        let counter = Arc::new(AtomicUsize::new(first));
        let gate = Arc::new((Mutex::new((first, false)), Condvar::new()));
        let job = Arc::new(job);
        let handles = (0..workers.clamp(1, (end - first).max(1)))
            .map(|_| {
                let (tx, job, counter, gate) =
                    (tx.clone(), job.clone(), counter.clone(), gate.clone());
                std::thread::spawn(move || loop {
                    let i = counter.fetch_add(1, Ordering::SeqCst);
                    if i >= end {
                        break;
                    }
                    // Wait until the consumer is close enough, or the pool is dropped.
                    {
                        let (lock, cvar) = &*gate;
                        let Ok(mut g) = lock.lock() else { break };
                        while !g.1 && i >= g.0 + ahead {
                            g = match cvar.wait(g) {
                                Ok(g) => g,
                                Err(_) => return,
                            };
                        }
                        if g.1 {
                            break;
                        }
                    }
                    // A job that panics must not end this thread silently: the consumer would wait
                    // for its item while the other workers wait at the gate for the consumer.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(i)))
                        .map_err(|p| panic_message(&*p));
                    let failed = result.is_err();
                    if tx.send((i, result)).is_err() || failed {
                        break;
                    }
                })
            })
            .collect();
        Self {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: first,
            end,
            gate,
            handles,
        }
    }
}

impl<T: Send + 'static> Iterator for OrderedPool<T> {
    type Item = Result<T>;

    fn next(&mut self) -> Option<Result<T>> {
        if self.next >= self.end {
            return None;
        }
        let want = self.next;
        let item = loop {
            if let Some(item) = self.pending.remove(&want) {
                break item;
            }
            match self.rx.as_ref()?.recv() {
                Ok((i, item)) => {
                    self.pending.insert(i, item);
                }
                // Every sender is gone before item `want` arrived: a worker died.
                Err(_) => break Err("it stopped without a result".into()),
            }
        };
        let item = match item {
            Ok(item) => item,
            Err(why) => {
                self.next = self.end;
                self.stop();
                return Some(Err(Error::Invalid(format!(
                    "a data loader worker failed on batch {want}: {why}"
                ))));
            }
        };
        self.next += 1;
        let (lock, cvar) = &*self.gate;
        if let Ok(mut g) = lock.lock() {
            g.0 = self.next;
        }
        cvar.notify_all();
        Some(Ok(item))
    }
}

/// Runs `decode` on the image at `path`, turning a panic in a decoder (a corrupt file can
/// trigger one) into that image's error, so that one bad file fails alone.
pub(crate) fn guard_decode<T>(path: &Path, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|p| {
        Err(Error::Image {
            path: path.to_path_buf(),
            reason: format!("the decoder {}", panic_message(&*p)),
        })
    })
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => format!("panicked: {s}"),
        (_, Some(s)) => format!("panicked: {s}"),
        _ => "panicked".into(),
    }
}

impl<T> OrderedPool<T> {
    /// Items still to be yielded.
    pub(crate) fn len(&self) -> usize {
        self.end - self.next
    }

    fn stop(&mut self) {
        let (lock, cvar) = &*self.gate;
        if let Ok(mut g) = lock.lock() {
            g.1 = true;
        }
        cvar.notify_all();
        // Dropping the receiver also unblocks a worker that is sending.
        self.rx.take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl<T> Drop for OrderedPool<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn pool_yields_in_order_and_stays_bounded() {
        let started = Arc::new(AtomicUsize::new(0));
        let seen = started.clone();
        // Later items finish first, so the reorder buffer is exercised.
        let pool = OrderedPool::new(3..40, 3, 4, move |i| {
            seen.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(((40 - i) % 5) as u64));
            i * 10
        });
        assert_eq!(pool.len(), 37);
        let mut pool = pool;
        assert_eq!(pool.next().unwrap().unwrap(), 30);
        std::thread::sleep(Duration::from_millis(50));
        // One consumed: workers may have claimed up to `ahead` items past it, plus one each
        // that waits at the gate without running.
        assert!(
            started.load(Ordering::SeqCst) <= 1 + 4,
            "workers ran too far ahead"
        );
        let rest: Vec<usize> = pool.map(|r| r.unwrap()).collect();
        assert_eq!(rest, (4..40).map(|i| i * 10).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_worker_ends_the_pool_with_an_error() {
        let pool = OrderedPool::new(0..6, 1, 2, |i| {
            assert!(i != 2, "deliberate panic in a worker");
            i
        });
        let got: Vec<_> = pool.collect();
        assert_eq!(got.len(), 3);
        assert!(matches!(got[..2], [Ok(0), Ok(1)]));
        let err = got[2].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("batch 2") && err.contains("deliberate panic"),
            "{err}"
        );
    }

    /// With several workers, the survivors used to wait at the gate for a consumer that waited
    /// for the dead worker's item: a deadlock. Now the pool ends with the panic's message.
    #[test]
    fn a_panic_among_several_workers_ends_the_pool_instead_of_hanging() {
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let pool = OrderedPool::new(0..50, 3, 2, |i| {
                assert!(i != 1, "deliberate panic in a worker");
                std::thread::sleep(Duration::from_millis(2));
                i
            });
            let _ = done.send(
                pool.map(|r| r.map_err(|e| e.to_string()))
                    .collect::<Vec<_>>(),
            );
        });
        let got = result
            .recv_timeout(Duration::from_secs(30))
            .expect("the pool hung");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Ok(0));
        let err = got[1].as_ref().unwrap_err();
        assert!(
            err.contains("batch 1") && err.contains("deliberate panic"),
            "{err}"
        );
    }

    #[test]
    fn dropping_a_pool_stops_its_workers() {
        let started = Arc::new(AtomicUsize::new(0));
        let seen = started.clone();
        let mut pool = OrderedPool::new(0..1000, 2, 2, move |i| {
            seen.fetch_add(1, Ordering::SeqCst);
            i
        });
        assert_eq!(pool.next().unwrap().unwrap(), 0);
        drop(pool); // joins the workers
        assert!(started.load(Ordering::SeqCst) < 10);
    }
}
