//! Image inputs for batch jobs: files, folders searched recursively, and `@lists`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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
/// `skip_hidden`. Unsorted. Each folder is searched once, however many links lead to it, so a
/// link back up the tree (`x -> .`) adds nothing and cannot loop.
pub(crate) fn walk_images(
    dir: &Path,
    extensions: &[&str],
    skip_hidden: bool,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    walk_once(dir, extensions, skip_hidden, out, &mut HashSet::new())
}

fn walk_once(
    dir: &Path,
    extensions: &[&str],
    skip_hidden: bool,
    out: &mut Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
) -> Result<()> {
    let real = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    if !seen.insert(real) {
        return Ok(());
    }
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
            walk_once(&path, extensions, skip_hidden, out, seen)?;
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// Links back up the tree once listed every image 41 times (one `x -> .`), and two of them
    /// made millions of folder visits.
    #[test]
    fn links_back_up_the_tree_add_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("a.jpg"), b"").unwrap();
        std::fs::write(root.join("sub/b.png"), b"").unwrap();
        std::os::unix::fs::symlink(".", root.join("x")).unwrap();
        std::os::unix::fs::symlink("..", root.join("sub/up")).unwrap();
        let found = collect_images(&[root.to_str().unwrap()]).unwrap();
        assert_eq!(found, [root.join("a.jpg"), root.join("sub/b.png")]);
    }
}
