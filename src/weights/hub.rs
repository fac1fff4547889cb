//! Downloads from the Hugging Face hub into its standard cache (the layout `huggingface_hub` and
//! `hf-hub` share), with its environment variables, pinned revisions, offline use, timeouts and
//! checksum verification.
//!
//! | variable | effect |
//! |---|---|
//! | `HF_ENDPOINT` | the hub's base URL (a mirror, or a local server in tests) |
//! | `HF_HUB_CACHE` | the cache folder (default `$HF_HOME/hub`) |
//! | `HF_HOME` | the hub's home (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`) |
//! | `HF_TOKEN` | a token for gated or private repos (default: the `token` file in `HF_HOME`) |
//! | `HF_HUB_OFFLINE` | `1`: never touch the network, use the cache or fail |
//! | `HF_HUB_ETAG_TIMEOUT` | seconds to connect and to wait for the answer that names the file's commit (default 10) |
//! | `HF_HUB_DOWNLOAD_TIMEOUT` | seconds a download may stall before it fails (default 30) |
//!
//! A file already in the cache for the requested revision is used without any network access.
//! A file whose SHA-256 is not the one asked for is moved out of the cache (to
//! `.candle-zoo-quarantine/` in it), so that the next attempt downloads it again. Two processes
//! that download the same file share one download: the second waits for the first.
//!
//! ```no_run
//! use candle_zoo::weights::hub::{Hub, HubFile};
//! let file = HubFile::new("theunnecessarythings/vision_models", "alexnet.safetensors")
//!     .with_revision("1b72e7cf3485d46675a53c2e969e3f5669635efa")
//!     .with_sha256("7372cbb9161c5253fcb272a1839229e282f2533e540449fb2907ee32d9ef3279");
//! let path = Hub::from_env().get(&file)?;
//! # Ok::<(), candle_zoo::Error>(())
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, HubError, Result};
use crate::io::OutputLock;

pub use super::checksum::{sha256_file, verify_sha256};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// One file of a model repo on the hub, at a revision, with its SHA-256 where known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub repo: String,
    pub file: String,
    /// A branch, tag or commit hash. Pin a commit hash for reproducible downloads.
    pub revision: String,
    /// Lower-case hex SHA-256 of the file, all 64 digits; checked after every fetch when set.
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

    /// The file's SHA-256: 64 hex digits ([`Hub::get`] refuses anything else).
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
    /// To connect, and to wait for the file's metadata.
    metadata_timeout: Duration,
    /// How long a download may stall.
    read_timeout: Duration,
    /// How long to wait for another process downloading the same file.
    wait_for_others: Duration,
}

impl Hub {
    /// Settings from the environment variables listed in the [module docs](self).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::home_dir().map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"));
        let seconds = |k: &str, default: u64| {
            var(k)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .map_or(Duration::from_secs(default), Duration::from_secs_f64)
        };
        Self {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            token,
            offline,
            progress: true,
            metadata_timeout: seconds("HF_HUB_ETAG_TIMEOUT", 10),
            read_timeout: seconds("HF_HUB_DOWNLOAD_TIMEOUT", 30),
            wait_for_others: Duration::from_secs(30 * 60),
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

    /// Whether to report a download's progress on a terminal (on by default; never in a log).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// The time to connect and get the file's metadata, and the time a download may stall
    /// (`HF_HUB_ETAG_TIMEOUT`, `HF_HUB_DOWNLOAD_TIMEOUT`).
    pub fn with_timeouts(mut self, metadata: Duration, stall: Duration) -> Self {
        self.metadata_timeout = metadata;
        self.read_timeout = stall;
        self
    }

    /// How long to wait for another process that downloads the same file (default 30 min).
    pub fn with_wait_for_others(mut self, wait: Duration) -> Self {
        self.wait_for_others = wait;
        self
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The local path of `file`: from the cache if it holds the revision, else downloaded into
    /// it. The SHA-256 is checked either way when `file` names one; a file that fails the check
    /// is moved out of the cache.
    pub fn get(&self, file: &HubFile) -> Result<PathBuf> {
        if let Some(sha) = &file.sha256 {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Error::Invalid(format!(
                    "`{sha}` is not a SHA-256 (64 hex digits) for `{}` of hub repo `{}`",
                    file.file, file.repo
                )));
            }
        }
        let repo = RepoCache::new(&self.cache_dir, &file.repo);
        let path = match repo.cached(&file.revision, &file.file) {
            Some(path) => path,
            None if self.offline => {
                return Err(Error::NotInCache {
                    repo: file.repo.clone(),
                    file: file.file.clone(),
                    revision: file.revision.clone(),
                    cache: self.cache_dir.clone(),
                })
            }
            None => self.download(&repo, file)?,
        };
        if let Some(expected) = &file.sha256 {
            let actual = sha256_file(&path)?;
            if &actual != expected {
                let moved_to = repo.quarantine(&path)?;
                return Err(Error::Checksum {
                    path,
                    algorithm: "sha256",
                    expected: expected.clone(),
                    actual,
                    moved_to: Some(moved_to),
                });
            }
        }
        Ok(path)
    }

    fn download(&self, repo: &RepoCache, file: &HubFile) -> Result<PathBuf> {
        let hub_err = |reason: String| {
            Error::Hub(Box::new(HubError {
                repo: file.repo.clone(),
                file: file.file.clone(),
                revision: file.revision.clone(),
                endpoint: self.endpoint.clone(),
                reason,
            }))
        };
        let url = format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            file.repo,
            file.revision.replace('/', "%2F"),
            file.file
        );
        let meta = self.metadata(&url).map_err(hub_err)?;
        let blob = repo.root.join("blobs").join(&meta.etag);
        let blobs = blob.parent().expect("in blobs/");
        std::fs::create_dir_all(blobs).map_err(|e| Error::io(blobs, e))?;
        // Another process downloading the same blob: wait for it and use its download.
        let lock = OutputLock::acquire_within(blob.with_extension("lock"), self.wait_for_others)?
            .remove_on_release();
        if !blob.exists() {
            crate::io::remove_stale_temps(blobs, &[&meta.etag])?;
            let what = format!("{}/{}", file.repo, file.file);
            self.fetch_body(&url, &blob, meta.size, &what)
                .map_err(|e| match e {
                    Error::Io { .. } => e,
                    e => hub_err(e.to_string()),
                })?;
        }
        drop(lock);
        let pointer = repo.link(&meta.commit, &file.file, &blob)?;
        repo.set_ref(&file.revision, &meta.commit)?;
        Ok(pointer)
    }

    fn agent(&self, timeout: Duration, redirects: u32) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(self.metadata_timeout)
            .timeout_read(timeout)
            .redirects(redirects)
            .build()
    }

    fn request(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let request = agent.get(url).set(
            "User-Agent",
            concat!("candle-zoo/", env!("CARGO_PKG_VERSION")),
        );
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// The file's commit, blob id (its ETag: the SHA-256 of an LFS file) and size, from the
    /// hub's answer to a one-byte request: its own redirects (relative) are followed, a
    /// redirect to a CDN is not.
    fn metadata(&self, url: &str) -> std::result::Result<Metadata, String> {
        let agent = self.agent(self.metadata_timeout, 0);
        let mut url = url.to_string();
        for _ in 0..5 {
            let response = match self.request(&agent, &url).set("Range", "bytes=0-0").call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, r)) => {
                    let why = r
                        .header("X-Error-Code")
                        .or(r.header("X-Error-Message"))
                        .unwrap_or("")
                        .to_string();
                    return Err(format!("HTTP {code} {why}").trim().to_string());
                }
                Err(e) => return Err(e.to_string()),
            };
            let location = response.header("Location").map(str::to_string);
            if (300..400).contains(&response.status()) {
                match location {
                    Some(l) if l.starts_with('/') => {
                        url = format!("{}{l}", self.endpoint);
                        continue;
                    }
                    _ => {}
                }
            }
            let etag = response
                .header("X-Linked-Etag")
                .or(response.header("ETag"))
                .ok_or("the answer has no ETag")?
                .trim_start_matches("W/")
                .replace('"', "");
            if etag.is_empty() || !etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("the answer's ETag `{etag}` is not a blob id"));
            }
            let commit = response
                .header("X-Repo-Commit")
                .ok_or("the answer has no X-Repo-Commit")?
                .to_string();
            if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "the answer's commit `{commit}` is not a commit hash"
                ));
            }
            let size = response
                .header("Content-Range")
                .and_then(|r| r.rsplit('/').next())
                .and_then(|n| n.parse().ok())
                .or_else(|| {
                    response
                        .header("X-Linked-Size")
                        .and_then(|n| n.parse().ok())
                });
            return Ok(Metadata { etag, commit, size });
        }
        Err("too many redirects".into())
    }

    /// Downloads `url` into `blob` through a temporary file beside it, renamed when complete.
    fn fetch_body(&self, url: &str, blob: &Path, size: Option<u64>, what: &str) -> Result<()> {
        let agent = self.agent(self.read_timeout, 5);
        let response = self
            .request(&agent, url)
            .call()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let mut reader = response.into_reader();
        let show = self.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let (mut done, mut shown) = (0u64, Instant::now());
        crate::io::write_atomic_with(blob, |w| {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n])?;
                done += n as u64;
                if show && shown.elapsed() > Duration::from_millis(500) {
                    shown = Instant::now();
                    let of =
                        size.map_or(String::new(), |s| format!(" of {:.1} MB", s as f64 / 1e6));
                    eprint!("\rdownloading {what}: {:.1} MB{of}", done as f64 / 1e6);
                }
            }
            if let Some(size) = size.filter(|&s| s != done) {
                return Err(std::io::Error::other(format!(
                    "the download ended after {done} of {size} bytes"
                )));
            }
            Ok(())
        })?;
        if show {
            eprintln!("\rdownloading {what}: {:.1} MB, done", done as f64 / 1e6);
        }
        Ok(())
    }
}

/// What the hub says of a file before it is downloaded.
struct Metadata {
    etag: String,
    commit: String,
    size: Option<u64>,
}

/// One repo's folder in the cache: `models--OWNER--NAME/{blobs,snapshots,refs}`.
struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    fn new(cache: &Path, repo: &str) -> Self {
        Self {
            root: cache.join(format!("models--{}", repo.replace('/', "--"))),
        }
    }

    /// The cached file of `revision`, if any: through the ref a branch or tag names, or the
    /// snapshot of a commit hash.
    fn cached(&self, revision: &str, file: &str) -> Option<PathBuf> {
        let commit = std::fs::read_to_string(self.root.join("refs").join(revision))
            .ok()
            .map(|c| c.trim().to_string())
            .or_else(|| is_commit(revision).then(|| revision.to_string()))?;
        let path = self.root.join("snapshots").join(commit).join(file);
        path.exists().then_some(path)
    }

    /// `snapshots/COMMIT/FILE`, a relative link to the blob (a copy where links are not
    /// available).
    fn link(&self, commit: &str, file: &str, blob: &Path) -> Result<PathBuf> {
        let pointer = self.root.join("snapshots").join(commit).join(file);
        let dir = pointer.parent().expect("in snapshots/");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if pointer.exists() {
            return Ok(pointer);
        }
        // snapshots/COMMIT/a/b/FILE -> ../../../../blobs/ETAG
        let depth = Path::new(file).components().count() + 1;
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().expect("a blob name"));
        #[cfg(unix)]
        let made = std::os::unix::fs::symlink(&target, &pointer);
        #[cfg(not(unix))]
        let made = std::fs::copy(blob, &pointer).map(|_| ());
        match made {
            Ok(()) => {}
            // Another process made it first.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(&pointer, e)),
        }
        crate::io::sync_dir(dir)?;
        Ok(pointer)
    }

    /// Records that `revision` is at `commit` (`refs/REVISION`).
    fn set_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let path = self.root.join("refs").join(revision);
        let dir = path.parent().expect("in refs/");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::io::write_atomic(&path, commit.as_bytes())
    }

    /// Moves a cached file that failed its checksum out of the cache, into
    /// `.candle-zoo-quarantine/` beside the repos, so that it is neither used nor lost; the
    /// snapshot's link goes too. Returns where it went.
    fn quarantine(&self, pointer: &Path) -> Result<PathBuf> {
        let blob = std::fs::canonicalize(pointer).map_err(|e| Error::io(pointer, e))?;
        let cache = self.root.parent().expect("in the cache");
        let dir = cache.join(".candle-zoo-quarantine");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = format!(
            "{}-{}",
            self.root.file_name().unwrap_or_default().to_string_lossy(),
            blob.file_name().unwrap_or_default().to_string_lossy()
        );
        let to = dir.join(name);
        std::fs::rename(&blob, &to).map_err(|e| Error::io(&blob, e))?;
        if pointer != blob {
            let _ = std::fs::remove_file(pointer);
        }
        crate::io::sync_dir(&dir)?;
        Ok(to)
    }
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}
