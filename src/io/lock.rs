//! One run per output at a time: an OS file lock (`flock` on Unix, `LockFileEx` on Windows,
//! through std) held for the whole run, which the OS releases however the process ends.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// An exclusive lock on an output, held until dropped.
///
/// ```
/// use candle_zoo::io::OutputLock;
/// let dir = tempfile::tempdir()?;
/// let lock = OutputLock::acquire(dir.path().join("fc7.safetensors.lock"))?;
/// // A second run on the same output fails at once, naming the holder.
/// let err = OutputLock::acquire(lock.path()).unwrap_err();
/// assert!(err.to_string().contains(&format!("pid {}", std::process::id())));
/// drop(lock);
/// OutputLock::acquire(dir.path().join("fc7.safetensors.lock"))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct OutputLock {
    file: File,
    path: PathBuf,
    remove: bool,
}

impl OutputLock {
    /// Takes the lock file `path` (created if need be), or fails at once with
    /// [`Error::Locked`], which names the process that holds it.
    pub fn acquire(path: impl AsRef<Path>) -> Result<Self> {
        Self::acquire_within(path, Duration::ZERO)
    }

    /// [`OutputLock::acquire`], waiting up to `wait` for another holder to let go: for work
    /// that another process may be doing already (the same download), which this one can then
    /// reuse.
    pub fn acquire_within(path: impl AsRef<Path>, wait: Duration) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let deadline = Instant::now() + wait;
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    return Err(Error::Locked {
                        path,
                        holder: holder.trim().to_string(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The holder before us removes its lock file on release: if it did so after we
            // opened the file, the lock we hold is on a file nobody else will find. Try again.
            if !is_current(&file, &path) {
                continue;
            }
            let program = std::env::args().next().unwrap_or_default();
            let program = Path::new(&program)
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            file.set_len(0)
                .and_then(|_| writeln!(file, "pid {} ({program})", std::process::id()))
                .map_err(|e| Error::io(&path, e))?;
            return Ok(Self {
                file,
                path,
                remove: false,
            });
        }
    }

    /// Removes the lock file on release, for a lock beside an output that must leave nothing
    /// behind when it is done.
    pub fn remove_on_release(mut self) -> Self {
        self.remove = true;
        self
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked, so that no other run can take the old file in between.
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = self.file.unlock();
    }
}

/// Whether `file` is (still) the file at `path`.
fn is_current(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}
