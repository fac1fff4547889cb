//! Files written so that a crash never leaves a half-written one under the final name, outputs
//! locked for one run at a time ([`OutputLock`]), and the safetensors container ([`safetensors`])
//! the weights, checkpoints and feature files share.

#[cfg(test)]
pub(crate) mod fault;
mod lock;
pub mod safetensors;

pub use lock::OutputLock;

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: into a temporary file in the same folder
/// (`.NAME.tmp-XXXXXX`), flushed to disk, renamed over `path`, and the folder flushed too, so
/// that the rename itself survives a power cut. A crash leaves either the old file or the new
/// one, and at worst a temporary file that [`remove_stale_temps`] clears.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("out.txt");
/// candle_zoo::io::write_atomic(&path, b"hello")?;
/// assert_eq!(std::fs::read(&path)?, b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] for content written piece by piece (a large file streamed from elsewhere).
/// The file gets mode 0644 on Unix, as a plain `File::create` under the usual umask would.
///
/// ```
/// use std::io::Write;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("out.txt");
/// candle_zoo::io::write_atomic_with(&path, |w| {
///     w.write_all(b"hello, ")?;
///     w.write_all(b"world")
/// })?;
/// assert_eq!(std::fs::read(&path)?, b"hello, world");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_atomic_with(
    path: impl AsRef<Path>,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    #[cfg(test)]
    fault::check_write(path, 0).map_err(|e| Error::io(path, e))?;
    let mut builder = tempfile::Builder::new();
    let prefix = temp_prefix(path);
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file());
        write(&mut w)
            .and_then(|_| w.flush())
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_dir(dir)
}

/// The prefix of `path`'s temporary files: `.NAME.tmp-`.
fn temp_prefix(path: &Path) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".tmp-");
    prefix
}

/// Flushes a folder's entries (a rename, a new or removed file) to disk. Without it a power cut
/// can undo a rename that `fsync` of the file alone did not make durable.
pub fn sync_dir(dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    // Elsewhere a folder cannot be opened as a file; its entries are flushed with the volume.
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Removes the temporary files that killed writes of `targets` (file names in `dir`) left
/// behind. Call it only while holding the targets' [`OutputLock`]: a temporary file of a write
/// still under way would be removed too. Returns the files removed.
pub fn remove_stale_temps(dir: impl AsRef<Path>, targets: &[&str]) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let prefixes: Vec<OsString> = targets.iter().map(|t| temp_prefix(Path::new(t))).collect();
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let stale = prefixes
            .iter()
            .any(|p| name.as_encoded_bytes().starts_with(p.as_encoded_bytes()));
        if stale {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Appends `bytes` to `file` (at `path`, for errors and tests' injected faults) and flushes
/// them to disk.
pub(crate) fn append_durably(file: &mut File, path: &Path, bytes: &[u8]) -> Result<()> {
    #[cfg(test)]
    if let Err(e) = fault::check_write(path, bytes.len()) {
        // A full disk: what fitted was written.
        let fitted = fault::fitted(path, bytes.len());
        let _ = file.write_all(&bytes[..fitted]);
        return Err(Error::io(path, e));
    }
    file.write_all(bytes)
        .and_then(|_| file.sync_data())
        .map_err(|e| Error::io(path, e))
}

/// A CSV field, quoted when it holds a comma, quote or line break (RFC 4180).
///
/// ```
/// assert_eq!(candle_zoo::io::csv_field("a.jpg"), "a.jpg");
/// assert_eq!(candle_zoo::io::csv_field("a,\"b\".jpg"), "\"a,\"\"b\"\".jpg\"");
/// ```
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
