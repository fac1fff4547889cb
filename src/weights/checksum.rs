//! File checksums: SHA-256 (the hub's, torchvision's) and SHA-1 (what Caffe's model zoo
//! published).

use std::io::Read;
use std::path::Path;

use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The lower-case hex SHA-256 and SHA-1 of a file, from one pass over it.
pub fn digests(path: impl AsRef<Path>) -> Result<(String, String)> {
    let path = path.as_ref();
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let (mut sha256, mut sha1) = (Sha256::new(), Sha1::new());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        sha256.update(&buf[..n]);
        sha1.update(&buf[..n]);
    }
    Ok((hex(&sha256.finalize()), hex(&sha1.finalize())))
}

/// The lower-case hex SHA-256 of a file.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<String> {
    Ok(digests(path)?.0)
}

/// Checks a file against its SHA-256: all 64 hex digits (a prefix would let a one-character
/// "checksum" pass).
///
/// ```
/// use candle_zoo::weights::checksum::verify_sha256;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("f");
/// std::fs::write(&path, b"abc")?;
/// verify_sha256(&path, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")?;
/// assert!(verify_sha256(&path, "ba7816bf").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn verify_sha256(path: impl AsRef<Path>, expected: &str) -> Result<()> {
    let path = path.as_ref();
    let expected = expected.to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Invalid(format!(
            "`{expected}` is not a SHA-256 (64 hex digits) to check {} against",
            path.display()
        )));
    }
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            algorithm: "sha256",
            expected,
            actual,
            moved_to: None,
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
