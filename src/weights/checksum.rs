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

/// Checks a file against a full SHA-256, or against a prefix of one (torchvision names its files
/// `name-<first 8 hex digits of the sha256>.pth`).
pub fn verify_sha256(path: impl AsRef<Path>, expected: &str) -> Result<()> {
    let path = path.as_ref();
    let actual = sha256_file(path)?;
    let expected = expected.to_ascii_lowercase();
    if expected.is_empty() || !actual.starts_with(&expected) {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            algorithm: "sha256",
            expected,
            actual,
        });
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
