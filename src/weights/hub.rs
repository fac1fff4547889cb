//! Downloads from the Hugging Face hub through `hf-hub`, with the hub's cache layout, its
//! environment variables, pinned revisions, offline use and checksum verification.
//!
//! | variable | effect |
//! |---|---|
//! | `HF_ENDPOINT` | the hub's base URL (a mirror, or a local server in tests) |
//! | `HF_HUB_CACHE` | the cache folder (default `$HF_HOME/hub`) |
//! | `HF_HOME` | the hub's home (default `~/.cache/huggingface`) |
//! | `HF_TOKEN` | a token for gated or private repos (default: the `token` file in `HF_HOME`) |
//! | `HF_HUB_OFFLINE` | `1`: never touch the network, use the cache or fail |
//!
//! A file already in the cache for the requested revision is used without any network access.
//!
//! ```no_run
//! use candle_zoo::weights::hub::{Hub, HubFile};
//! let file = HubFile::new("theunnecessarythings/vision_models", "alexnet.safetensors");
//! let path = Hub::from_env().get(&file)?;
//! # Ok::<(), candle_zoo::Error>(())
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, HubError, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

pub use super::checksum::{sha256_file, verify_sha256};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// One file of a model repo on the hub, at a revision, with its SHA-256 where known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub repo: String,
    pub file: String,
    /// A branch, tag or commit hash. Pin a commit hash for reproducible downloads.
    pub revision: String,
    /// Lower-case hex SHA-256 of the file; checked after every fetch when set.
    pub sha256: Option<String>,
}

impl HubFile {
    /// `file` of `repo` at `main`, with no checksum.
    pub fn new(repo: impl Into<String>, file: impl Into<String>) -> Self {
        Self {
            repo: repo.into(),
            file: file.into(),
            revision: "main".into(),
            sha256: None,
        }
    }

    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    pub fn with_sha256(mut self, sha256: impl Into<String>) -> Self {
        self.sha256 = Some(sha256.into().to_ascii_lowercase());
        self
    }
}

/// Settings for reaching the hub and its cache.
#[derive(Debug, Clone)]
pub struct Hub {
    endpoint: String,
    cache_dir: PathBuf,
    token: Option<String>,
    offline: bool,
    progress: bool,
}

impl Hub {
    /// Settings from the environment variables listed in the [module docs](self).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Cache::from_env().path().clone());
        let token = var("HF_TOKEN").or_else(|| Cache::from_env().token());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into()),
            cache_dir,
            token,
            offline,
            progress: true,
        }
    }

    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into().trim_end_matches('/').to_string();
        self
    }

    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }

    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Offline: only the cache is used.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Whether to draw a progress bar while downloading (on by default; hidden off a terminal).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The local path of `file`: from the cache if it holds the revision, else downloaded into
    /// it. The SHA-256 is checked either way when `file` names one.
    pub fn get(&self, file: &HubFile) -> Result<PathBuf> {
        let repo = Repo::with_revision(file.repo.clone(), RepoType::Model, file.revision.clone());
        let cached = Cache::new(self.cache_dir.clone())
            .repo(repo.clone())
            .get(&file.file);
        let path = match cached {
            Some(path) => path,
            None if self.offline => {
                return Err(Error::NotInCache {
                    repo: file.repo.clone(),
                    file: file.file.clone(),
                    revision: file.revision.clone(),
                    cache: self.cache_dir.clone(),
                })
            }
            None => self.download(repo, file)?,
        };
        if let Some(expected) = &file.sha256 {
            verify_sha256(&path, expected)?;
        }
        Ok(path)
    }

    fn download(&self, repo: Repo, file: &HubFile) -> Result<PathBuf> {
        let hub_err = |reason: String| {
            Error::Hub(Box::new(HubError {
                repo: file.repo.clone(),
                file: file.file.clone(),
                revision: file.revision.clone(),
                endpoint: self.endpoint.clone(),
                reason,
            }))
        };
        let api = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(self.progress)
            .build()
            .map_err(|e| hub_err(e.to_string()))?;
        api.repo(repo)
            .download(&file.file)
            .map_err(|e| hub_err(e.to_string()))
    }
}
