//! Decode, resize and crop per image on one core: what `extract-fc7`'s workers do per image.
//!
//! ```text
//! cargo bench --bench decode -- DIR [ROUNDS] [MODE]   # every .jpg in DIR, fastest of ROUNDS rounds
//! ```
//! Prints one JSON line per decode mode (`full`, and `dct-scaled`, the default; MODE picks one,
//! for a profiler): wall and CPU milliseconds per image. CPU time counts every thread of the
//! process: work handed to other threads costs a busy machine's cores that time.
//! `benches/decode_vs_pil.py` runs it beside PIL + torchvision's transforms on the same files.

use std::time::Instant;

use candle_zoo::data::preprocess::Preprocess;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let dir = args.first().expect("usage: decode DIR [ROUNDS] [MODE]");
    let rounds: usize = args.get(1).map_or(3, |r| r.parse().expect("ROUNDS"));
    // One mode only (`full` or `dct-scaled`), for a profiler.
    let only = args.get(2);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("DIR")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    for dct_scaling in [false, true] {
        let mode = if dct_scaling { "dct-scaled" } else { "full" };
        if only.is_some_and(|m| m != mode) {
            continue;
        }
        let p = Preprocess {
            dct_scaling,
            ..Preprocess::torchvision()
        };
        let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..rounds {
            let (start, start_cpu) = (Instant::now(), cpu_seconds());
            for f in &files {
                std::hint::black_box(p.load_pixels(f).expect("a readable image"));
            }
            let n = files.len() as f64;
            wall = wall.min(start.elapsed().as_secs_f64() / n);
            cpu = cpu.min((cpu_seconds() - start_cpu) / n);
        }
        println!(
            "{{\"mode\": \"{}\", \"images\": {}, \"ms_per_image\": {:.3}, \"cpu_ms_per_image\": {:.3}}}",
            mode,
            files.len(),
            wall * 1e3,
            cpu * 1e3
        );
    }
}

/// User and system time of the whole process (all threads), in seconds.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` writes a `rusage` into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(usage.ru_utime) + t(usage.ru_stime)
}
