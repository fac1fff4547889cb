//! The crate's error type: every variant names the file, key, shape or setting at fault.
//!
//! Library errors speak of files, keys, shapes and settings, never of command-line flags: the
//! examples (and [`crate::cli`]) add what their own flags are called.

use std::path::PathBuf;

/// Errors returned by `candle_zoo`. New variants may be added in minor releases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A checkpoint lacks a tensor the model needs.
    #[error("missing key `{key}` in the checkpoint{}", hint_suffix(hint))]
    MissingKey { key: String, hint: String },

    /// A checkpoint tensor has another shape than the model expects.
    #[error("key `{key}`: the model expects shape {expected:?} but the checkpoint has {actual:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    /// No known AlexNet key layout was found in a checkpoint.
    #[error(
        "not an AlexNet checkpoint: expected `features.0.weight` (torchvision layout) or \
         `conv1.weight` (Caffe layout); found keys {found}"
    )]
    UnknownLayout { found: String },

    /// A model configuration that cannot be built.
    #[error("invalid AlexNet config: {0}")]
    Config(String),

    /// A name that is not one of the values it can take (a layout, tap, preset, device, format
    /// or registry entry).
    #[error("unknown {what} `{input}`; expected {expected}")]
    Parse {
        /// What was being parsed, e.g. `"layout"`.
        what: &'static str,
        input: String,
        expected: String,
    },

    /// A setting or argument outside what it can be (a batch size of 0, a negative rate).
    #[error("{0}")]
    Invalid(String),

    /// An input tensor the model cannot take.
    #[error("input of shape {shape:?}: {reason}")]
    Input { shape: Vec<usize>, reason: String },

    /// A weights file that cannot be read or parsed.
    #[error("{}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    /// A file that could not be decoded as an image.
    #[error("{}: not a readable image: {reason}", path.display())]
    Image { path: PathBuf, reason: String },

    /// An image too small to be classified meaningfully.
    #[error("{}: image is {width}x{height}, smaller than the minimum side of {min} px", path.display())]
    ImageTooSmall {
        path: PathBuf,
        width: u32,
        height: u32,
        min: u32,
    },

    /// The hub could not be reached or refused the file.
    #[error(transparent)]
    Hub(Box<HubError>),

    /// Offline mode was requested and the file is not in the cache.
    #[error(
        "`{file}` from hub repo `{repo}` (revision `{revision}`) is not in the cache at {} \
         and offline mode (HF_HUB_OFFLINE) forbids downloading it",
        cache.display()
    )]
    NotInCache {
        repo: String,
        file: String,
        revision: String,
        cache: PathBuf,
    },

    /// Registry weights with no hub copy whose converted original is not installed yet.
    #[error(
        "`{name}` has no copy on the hub and is not installed at {}: download the original \
         ({original}, {checksum}) and install it (`AlexNetWeights::install`, as the `convert` \
         example does)",
        path.display()
    )]
    NotInstalled {
        name: String,
        path: PathBuf,
        original: String,
        checksum: String,
    },

    /// Another run holds the lock of an output this run would write.
    #[error("{}: another run is writing this output ({holder}); wait for it to end", path.display())]
    Locked { path: PathBuf, holder: String },

    /// A shard of a job that [`crate::data::features::merge`] cannot join.
    #[error("shard {}: {reason}; nothing was merged", path.display())]
    Shard { path: PathBuf, reason: String },

    /// An output's work folder holds an interrupted run, which a new run will not overwrite.
    #[error("{}: holds an interrupted run; resume it, or delete the folder to start again", work.display())]
    Interrupted { work: PathBuf },

    /// A downloaded or local file does not have the expected checksum.
    #[error(
        "{}: checksum mismatch: expected {algorithm} {expected}, got {actual}; the file is \
         corrupt or not the one the registry names{}",
        path.display(),
        moved_to.as_ref().map_or(String::new(), |p| format!(
            " (moved out of the cache to {}; the next attempt downloads it again)",
            p.display()
        ))
    )]
    Checksum {
        path: PathBuf,
        /// `sha256` or `sha1`.
        algorithm: &'static str,
        expected: String,
        actual: String,
        /// Where a cached file that failed the check was moved.
        moved_to: Option<PathBuf>,
    },

    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A data-parallel run that cannot go on: a peer died or hangs, or the processes disagree.
    #[error("rank {rank} of {world}: {reason}")]
    Distributed {
        rank: usize,
        world: usize,
        reason: String,
    },

    /// An error raised inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Why a hub download failed, with what was asked of which hub.
#[derive(Debug, thiserror::Error)]
#[error(
    "could not fetch `{file}` from hub repo `{repo}` (revision `{revision}`) at {endpoint}: {reason}\n\
     hint: a machine without network can use a warm cache (set HF_HUB_OFFLINE=1, HF_HOME or \
     HF_HUB_CACHE), point HF_ENDPOINT at a mirror, or load a local copy of the file"
)]
pub struct HubError {
    pub repo: String,
    pub file: String,
    pub revision: String,
    pub endpoint: String,
    pub reason: String,
}

fn hint_suffix(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(" ({hint})")
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Self::Checkpoint {
            path: path.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn parse(what: &'static str, input: &str, expected: impl Into<String>) -> Self {
        Self::Parse {
            what,
            input: input.to_string(),
            expected: expected.into(),
        }
    }
}

/// Lets `?` carry crate errors through candle's `Module::forward`, keeping candle's own errors as
/// they are.
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(e) => e,
            other => candle_core::Error::Wrapped(Box::new(other)),
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
