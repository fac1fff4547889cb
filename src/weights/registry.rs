//! The published AlexNet weights this crate knows, with where to get them and how to trust them.
//! `weights/README.md` documents each file in full.
//!
//! | name | layout | top-1 / top-5 | where from |
//! |---|---|---|---|
//! | `torchvision` (default) | torchvision | 56.522 / 79.066 | the hub: a safetensors copy of torchvision's `alexnet-owt-7be5be79.pth`, pinned to a commit and its SHA-256 |
//! | `bvlc-alexnet` | bvlc-alexnet (two towers) | 57.1 / 80.2 | installed: Caffe's `bvlc_alexnet.caffemodel`, converted and checked against its published SHA-1 |
//! | `bvlc-caffenet` | caffenet | 57.4 / 80.4 | installed: Caffe's `bvlc_reference_caffenet.caffemodel`, likewise |
//!
//! The Caffe weights have no copy on the hub. Download the original once and install it
//! (`cargo run --release --example convert -- bvlc_alexnet.caffemodel --install`, or
//! [`AlexNetWeights::install`]): it is converted, checked against the published checksum, and
//! written to [`install_dir`], where [`AlexNetWeights::load`] finds it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Device;

use super::convert::Converted;
use super::{metadata, Checkpoint};
use crate::data::preprocess::Preprocess;
use crate::error::{Error, Result};
use crate::models::alexnet::{AlexNet, Layout};

/// A safetensors copy of published weights on the Hugging Face hub, pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubCopy {
    pub repo: &'static str,
    pub file: &'static str,
    /// The commit the file is fetched at.
    pub revision: &'static str,
    /// The file's SHA-256 (the hub's LFS checksum), checked on every load.
    pub sha256: &'static str,
}

/// A checksum as its publisher gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// A full SHA-1, as Caffe's model zoo gives.
    Sha1(&'static str),
    /// The first hex digits of the SHA-256, as torchvision puts in its file names.
    Sha256Prefix(&'static str),
}

impl Published {
    /// Whether a file with these digests is the published one.
    fn matches(self, sha256: &str, sha1: &str) -> bool {
        match self {
            Published::Sha1(want) => sha1 == want,
            Published::Sha256Prefix(want) => sha256.starts_with(want),
        }
    }

    fn algorithm(self) -> &'static str {
        match self {
            Published::Sha1(_) => "sha1",
            Published::Sha256Prefix(_) => "sha256",
        }
    }

    fn value(self) -> &'static str {
        match self {
            Published::Sha1(v) | Published::Sha256Prefix(v) => v,
        }
    }
}

impl fmt::Display for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Published::Sha1(v) => write!(f, "sha1 {v}"),
            Published::Sha256Prefix(v) => write!(f, "sha256 {v}..."),
        }
    }
}

/// What is known about one published set of AlexNet weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightsInfo {
    pub name: &'static str,
    pub layout: Layout,
    /// The copy [`AlexNetWeights::load`] downloads, if there is one; else it loads the installed
    /// conversion of the original.
    pub hub: Option<HubCopy>,
    /// Where the original release is published.
    pub original: &'static str,
    /// The original's checksum as published.
    pub original_checksum: Published,
    pub license: &'static str,
    /// ImageNet-1k validation accuracy (centre crop) reported by the publisher, in percent.
    pub top1: f32,
    pub top5: f32,
}

/// The published AlexNet weights, by name (torchvision's `AlexNet_Weights`).
///
/// | name | layout | top-1 / top-5 | source |
/// |---|---|---|---|
/// | `torchvision` (default) | torchvision | 56.522 / 79.066 | `alexnet-owt-7be5be79.pth`, torchvision `IMAGENET1K_V1` |
/// | `bvlc-alexnet` | bvlc-alexnet (two-tower) | 57.1 / 80.2 | Caffe `bvlc_alexnet.caffemodel` |
/// | `bvlc-caffenet` | caffenet | 57.4 / 80.4 | Caffe `bvlc_reference_caffenet.caffemodel` |
///
/// ```
/// use candle_zoo::weights::AlexNetWeights;
/// let w: AlexNetWeights = "torchvision".parse()?;
/// assert_eq!(w, AlexNetWeights::default());
/// assert_eq!(w.info().top1, 56.522);
/// assert_eq!(w.info().hub.unwrap().revision, "1b72e7cf3485d46675a53c2e969e3f5669635efa");
/// # Ok::<(), candle_zoo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AlexNetWeights {
    /// torchvision `AlexNet_Weights.IMAGENET1K_V1`.
    #[default]
    TorchVisionV1,
    /// Caffe's BVLC AlexNet, two towers.
    BvlcAlexNet,
    /// Caffe's BVLC reference CaffeNet.
    BvlcCaffeNet,
}

/// The registry's old name.
#[deprecated(
    since = "0.2.0",
    note = "renamed `AlexNetWeights`: the zoo will hold more models"
)]
pub type Pretrained = AlexNetWeights;

impl AlexNetWeights {
    pub const ALL: [AlexNetWeights; 3] = [
        AlexNetWeights::TorchVisionV1,
        AlexNetWeights::BvlcAlexNet,
        AlexNetWeights::BvlcCaffeNet,
    ];

    pub fn info(self) -> WeightsInfo {
        match self {
            AlexNetWeights::TorchVisionV1 => WeightsInfo {
                name: "torchvision",
                layout: Layout::TorchVision,
                // The same author's `tch-models` loads this file into torchvision's module
                // names; added in this commit (2024-02-02) and unchanged since.
                hub: Some(HubCopy {
                    repo: "theunnecessarythings/vision_models",
                    file: "alexnet.safetensors",
                    revision: "1b72e7cf3485d46675a53c2e969e3f5669635efa",
                    sha256: "7372cbb9161c5253fcb272a1839229e282f2533e540449fb2907ee32d9ef3279",
                }),
                original: "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                original_checksum: Published::Sha256Prefix("7be5be79"),
                license: "BSD-3-Clause (torchvision); ImageNet terms of access apply",
                top1: 56.522,
                top5: 79.066,
            },
            AlexNetWeights::BvlcAlexNet => WeightsInfo {
                name: "bvlc-alexnet",
                layout: Layout::BvlcAlexNet,
                hub: None,
                original: "http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel",
                original_checksum: Published::Sha1("9116a64c0fbe4459d18f4bb6b56d647b63920377"),
                license: "unrestricted use (BVLC model zoo)",
                top1: 57.1,
                top5: 80.2,
            },
            AlexNetWeights::BvlcCaffeNet => WeightsInfo {
                name: "bvlc-caffenet",
                layout: Layout::CaffeNet,
                hub: None,
                original: "http://dl.caffe.berkeleyvision.org/bvlc_reference_caffenet.caffemodel",
                original_checksum: Published::Sha1("4c8d77deb20ea792f84eb5e6d0a11ca0a8660a46"),
                license: "unrestricted use (BVLC model zoo)",
                top1: 57.4,
                top5: 80.4,
            },
        }
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The hub file holding these weights, pinned and with its checksum, if there is one.
    #[cfg(feature = "pretrained")]
    pub fn hub_file(self) -> Option<super::hub::HubFile> {
        let copy = self.info().hub?;
        Some(
            super::hub::HubFile::new(copy.repo, copy.file)
                .with_revision(copy.revision)
                .with_sha256(copy.sha256),
        )
    }

    /// Where [`AlexNetWeights::install`] puts these weights: `<install_dir>/<name>.safetensors`.
    pub fn installed_path(self) -> PathBuf {
        install_dir().join(format!("{}.safetensors", self.name()))
    }

    /// The registry entry `converted` was converted from, told by the source checksums the
    /// converter recorded.
    pub fn of_converted(converted: &Converted) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|w| w.is_source_of(&converted.metadata))
    }

    /// Whether weights with this metadata were converted from this entry's original.
    fn is_source_of(self, meta: &std::collections::BTreeMap<String, String>) -> bool {
        let get = |k| meta.get(k).map_or("", String::as_str);
        self.info()
            .original_checksum
            .matches(get(metadata::SOURCE_SHA256), get(metadata::SOURCE_SHA1))
    }

    /// Writes `converted` (the conversion of this entry's original, see
    /// [`crate::weights::convert`]) to [`AlexNetWeights::installed_path`], atomically, after
    /// checking that its source is the published file and its layout this entry's.
    pub fn install(self, converted: &Converted) -> Result<PathBuf> {
        let info = self.info();
        let source = converted
            .metadata
            .get(metadata::SOURCE)
            .map_or("the converted file", String::as_str);
        if !self.is_source_of(&converted.metadata) {
            let published = info.original_checksum;
            let key = match published {
                Published::Sha1(_) => metadata::SOURCE_SHA1,
                Published::Sha256Prefix(_) => metadata::SOURCE_SHA256,
            };
            return Err(Error::Checksum {
                path: PathBuf::from(source),
                algorithm: published.algorithm(),
                expected: published.value().to_string(),
                actual: converted
                    .metadata
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| "none recorded".into()),
                moved_to: None,
            });
        }
        if converted.layout() != info.layout {
            return Err(Error::Invalid(format!(
                "{source} converted as layout `{}`, but `{}` is `{}`",
                converted.layout(),
                info.name,
                info.layout
            )));
        }
        let path = self.installed_path();
        let dir = path.parent().expect("a file in a folder");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        converted.save(&path)?;
        Ok(path)
    }

    /// The local file of these weights: the hub copy (downloaded through `hub`'s cache, checked
    /// against its pinned SHA-256), or the installed conversion of the original (checked against
    /// the original's published checksum).
    #[cfg(feature = "pretrained")]
    pub fn fetch(self, hub: &super::hub::Hub) -> Result<PathBuf> {
        match self.hub_file() {
            Some(file) => hub.get(&file),
            None => self.installed(),
        }
    }

    /// The installed conversion of the original, checked.
    fn installed(self) -> Result<PathBuf> {
        let info = self.info();
        let path = self.installed_path();
        if !path.exists() {
            return Err(Error::NotInstalled {
                name: info.name.to_string(),
                path,
                original: info.original.to_string(),
                checksum: info.original_checksum.to_string(),
            });
        }
        let ckpt = Checkpoint::open(&path)?;
        if !self.is_source_of(ckpt.metadata()) {
            let recorded = |k| ckpt.metadata().get(k).map_or("none", String::as_str);
            return Err(Error::checkpoint(
                &path,
                format!(
                    "installed as `{}` but converted from another file (recorded {} {}, \
                     {} {}; the original is {}); install it again",
                    info.name,
                    metadata::SOURCE_SHA1,
                    recorded(metadata::SOURCE_SHA1),
                    metadata::SOURCE_SHA256,
                    recorded(metadata::SOURCE_SHA256),
                    info.original_checksum
                ),
            ));
        }
        Ok(path)
    }

    /// The model in f32 on `device` and its input pipeline: from the hub (settings from the
    /// environment, see `weights::hub`) where there is a copy, else from the installed
    /// conversion of the original.
    pub fn load(self, device: &Device) -> Result<(AlexNet, Preprocess)> {
        #[cfg(feature = "pretrained")]
        let path = self.fetch(&super::hub::Hub::from_env())?;
        #[cfg(not(feature = "pretrained"))]
        let path = match self.info().hub {
            Some(_) => {
                return Err(Error::Invalid(format!(
                    "`{}` comes from the hub, which this build leaves out: enable the \
                     `pretrained` feature, or load a local copy with `Checkpoint::open`",
                    self.name()
                )))
            }
            None => self.installed()?,
        };
        let ckpt = Checkpoint::open(path)?.with_layout(self.info().layout)?;
        Ok((ckpt.load(device)?, ckpt.preprocess()?))
    }
}

/// The folder installed weights live in: `$CANDLE_ZOO_WEIGHTS`, else
/// `$XDG_CACHE_HOME/candle-zoo/weights`, else `~/.cache/candle-zoo/weights`.
pub fn install_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(dir) = var("CANDLE_ZOO_WEIGHTS") {
        return PathBuf::from(dir);
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("candle-zoo").join("weights")
}

impl fmt::Display for AlexNetWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AlexNetWeights {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase().replace('_', "-");
        AlexNetWeights::ALL
            .into_iter()
            .find(|w| w.name() == lower)
            .ok_or_else(|| {
                Error::parse(
                    "pretrained weights",
                    s,
                    AlexNetWeights::ALL.map(|w| w.name()).join(", "),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_checksums_match_only_their_file() {
        let sha1 = Published::Sha1("9116a64c0fbe4459d18f4bb6b56d647b63920377");
        assert!(sha1.matches("", "9116a64c0fbe4459d18f4bb6b56d647b63920377"));
        assert!(!sha1.matches("9116a64c", "9116a64c"));
        let prefix = Published::Sha256Prefix("7be5be79");
        assert!(prefix.matches("7be5be79aa", ""));
        assert!(!prefix.matches("", ""));
    }

    #[test]
    fn every_entry_has_a_full_checksum_to_check() {
        for w in AlexNetWeights::ALL {
            let info = w.info();
            if let Some(copy) = info.hub {
                assert_eq!(copy.sha256.len(), 64, "{w}");
                assert_eq!(copy.revision.len(), 40, "{w}: pin a commit, not a branch");
            } else {
                assert!(
                    matches!(info.original_checksum, Published::Sha1(s) if s.len() == 40),
                    "{w}: an installed original needs its full published checksum"
                );
            }
        }
    }
}
