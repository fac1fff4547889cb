//! Process memory settings for programs that run the model over and over.
//!
//! A training step allocates and frees the same large buffers every time: activations, and for
//! each parameter the gradient candle's backprop zero-fills and adds to (fc6's weight alone is
//! 151 MB). glibc's `malloc` serves blocks above 32 MiB (and, by its default adaptive threshold,
//! many smaller ones) with `mmap` and returns them to the kernel on `free`, so the next step
//! faults every page in again: about 5 µs per 4 KiB page on the 2-core VM of the benchmarks,
//! 10 to 20% of a torchvision step at batch 32.

/// Keeps freed memory in the process for the next allocation instead of returning it to the
/// kernel: on Linux with glibc, `malloc` stops using `mmap` and never trims its heap
/// (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, i32::MAX)`, the runtime equivalent of
/// `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`). Returns whether the
/// setting took effect (`false` elsewhere, where it does nothing).
///
/// The cost is memory: the resident set stays at its peak, a little above it where the heap
/// fragments (+290 MB on a 1 GB torchvision training step at batch 32, still below PyTorch's
/// peak). Call it once, first thing in `main`, in programs that train or run many batches; the
/// examples `train`, `finetune`, `extract-fc7` and `speed` do. A library should leave it to
/// the program.
///
/// ```
/// // First thing in `main`:
/// let kept = candle_zoo::memory::retain_freed_memory();
/// assert_eq!(kept, cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's parameters; it is thread-safe in glibc (it
        // takes the arena locks) and both values are in range.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
