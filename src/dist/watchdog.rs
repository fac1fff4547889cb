//! A collective that waits too long for the other processes ends this one, with a message,
//! so that a dead or hung peer never leaves a run waiting forever. Under `mpirun`, `srun` or
//! `torchrun` the launcher then ends the rest.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the watching thread sees: the collective in progress (since when, what), and whether
/// the watchdog was dropped.
#[derive(Default)]
struct Watched {
    running: Option<(Instant, &'static str)>,
    stop: bool,
}

pub(crate) struct Watchdog {
    shared: Arc<(Mutex<Watched>, Condvar)>,
}

impl Watchdog {
    /// Watches the collectives of rank `rank` of `world`; one that takes longer than `timeout`
    /// exits the process with status 1.
    pub fn new(rank: usize, world: usize, timeout: Duration) -> Self {
        let shared = Arc::new((Mutex::new(Watched::default()), Condvar::new()));
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || {
                let (lock, cvar) = &*watched;
                let Ok(mut w) = lock.lock() else { return };
                loop {
                    if w.stop {
                        return;
                    }
                    let wait = match w.running {
                        Some((since, what)) if since.elapsed() >= timeout => {
                            eprintln!(
                                "error: rank {rank} of {world}: {what} has waited {:.0} s for \
                                 the other processes (CANDLE_ZOO_COLLECTIVE_TIMEOUT); one of \
                                 them has died or hangs. Exiting.",
                                since.elapsed().as_secs_f64()
                            );
                            std::process::exit(1);
                        }
                        Some((since, _)) => timeout - since.elapsed(),
                        None => timeout,
                    };
                    w = match cvar.wait_timeout(w, wait) {
                        Ok((w, _)) => w,
                        Err(_) => return,
                    };
                }
            })
            .expect("spawning the collective watchdog thread");
        Self { shared }
    }

    /// Runs the collective `f`, watched.
    pub fn watch<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        self.set(Some((Instant::now(), what)));
        let out = f();
        self.set(None);
        out
    }

    fn set(&self, running: Option<(Instant, &'static str)>) {
        let (lock, cvar) = &*self.shared;
        if let Ok(mut w) = lock.lock() {
            w.running = running;
            cvar.notify_all();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.shared;
        if let Ok(mut w) = lock.lock() {
            w.stop = true;
            cvar.notify_all();
        }
    }
}
