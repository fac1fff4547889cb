//! Faults injected into this thread's writes, for tests: a full disk after so many bytes of a
//! file, or a write that fails outright.

use std::cell::RefCell;
use std::path::Path;

thread_local! {
    /// `(file name, bytes that still fit)`.
    static DISK: RefCell<Option<(String, usize)>> = const { RefCell::new(None) };
}

/// From now on in this thread, appends to files named `name` fail once `room` more bytes have
/// been written to them (what fits is written), and atomic writes of such files fail at once.
/// `None` ends the fault.
pub(crate) fn disk_full(fault: Option<(&str, usize)>) {
    DISK.with(|d| *d.borrow_mut() = fault.map(|(n, room)| (n.to_string(), room)));
}

fn matches(path: &Path, name: &str) -> bool {
    path.file_name().is_some_and(|n| n == name)
}

/// Whether `len` more bytes fit in `path`; when they do not, the room left is used up.
pub(crate) fn check_write(path: &Path, len: usize) -> std::io::Result<()> {
    DISK.with(|d| match &mut *d.borrow_mut() {
        Some((name, room)) if matches(path, name) => {
            if len > 0 && len <= *room {
                *room -= len;
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device (injected)",
                ))
            }
        }
        _ => Ok(()),
    })
}

/// How many of `len` bytes fit in `path` before the injected fault (then none fit anymore).
pub(crate) fn fitted(path: &Path, len: usize) -> usize {
    DISK.with(|d| match &mut *d.borrow_mut() {
        Some((name, room)) if matches(path, name) => {
            let fits = (*room).min(len);
            *room = 0;
            fits
        }
        _ => len,
    })
}
