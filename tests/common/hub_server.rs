//! A minimal Hugging Face hub on 127.0.0.1: it answers `GET /{repo}/resolve/{revision}/{file}`
//! for `main` and any commit hash the way the hub does for LFS files (ETag = SHA-256,
//! `X-Repo-Commit`, byte ranges with 206 and `Content-Range`), and 404 with
//! `X-Error-Code: EntryNotFound` otherwise. It stops when dropped,
//! and by itself after a minute in any case.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub struct ServedFile {
    pub repo: String,
    pub file: String,
    pub bytes: Vec<u8>,
    /// The ETag to send; the real SHA-256 of `bytes` when `None`.
    pub etag: Option<String>,
}

pub struct HubServer {
    endpoint: String,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    downloads: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl HubServer {
    pub fn start(files: Vec<ServedFile>) -> Self {
        Self::start_slow(files, Duration::ZERO)
    }

    /// A server that waits `delay` before each whole-file answer (not before the one-byte
    /// answers that tell a file's metadata), one thread per connection.
    pub fn start_slow(files: Vec<ServedFile>, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let downloads = Arc::new(AtomicUsize::new(0));
        let (stop2, requests2, downloads2) = (stop.clone(), requests.clone(), downloads.clone());
        let files = Arc::new(files);
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        requests2.fetch_add(1, Ordering::SeqCst);
                        let (files, downloads) = (files.clone(), downloads2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(stream, &files, delay, &downloads);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            endpoint,
            stop,
            requests,
            downloads,
            thread: Some(thread),
        }
    }

    /// Whole-file answers sent so far.
    pub fn downloads(&self) -> usize {
        self.downloads.load(Ordering::SeqCst)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    files: &[ServedFile],
    delay: Duration,
    downloads: &AtomicUsize,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    // `main` resolves to COMMIT; a commit hash (40 hex digits) to itself.
    let is_commit = |rev: &str| rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit());
    let mut commit = COMMIT;
    let found = files.iter().find(|f| {
        let Some(rest) = path.strip_prefix(&format!("/{}/resolve/", f.repo)) else {
            return false;
        };
        match rest.split_once('/') {
            Some((rev, file)) if file == f.file && (rev == "main" || is_commit(rev)) => {
                if rev != "main" {
                    commit = rev;
                }
                true
            }
            _ => false,
        }
    });
    let mut out = stream;
    let Some(f) = found else {
        let body = b"Entry not found";
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        return out.write_all(body);
    };
    let total = f.bytes.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b
                .parse()
                .map(|b: usize| b.min(total - 1))
                .unwrap_or(total - 1);
            (a, b)
        }
        None => (0, total - 1),
    };
    let etag = f.etag.clone().unwrap_or_else(|| sha256_hex(&f.bytes));
    let body = &f.bytes[start..=end];
    if body.len() > 1 {
        downloads.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
    }
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{total}\r\n\
         ETag: \"{etag}\"\r\nX-Repo-Commit: {commit}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)
}
