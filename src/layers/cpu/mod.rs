//! What the CPU custom ops share: checked f32 views of candle's storages, the thread count, the
//! ReLU's gradient; a gemm split over threads (`gemm.rs`) with AVX2 kernels for the narrow
//! products of the fully connected layers (`narrow.rs`); and [`WeightOp`] (`op.rs`), the
//! custom-op plumbing of the conv and linear ops.

mod gemm;
pub(crate) mod narrow;
mod op;

pub(crate) use gemm::{matmul, matmul_few_rows, DstPtr, Split};
pub(crate) use op::{apply, WeightOp};

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage};

/// The number of elements of an operand's `dims`, or an error naming the operand (`what` of
/// op `op`) when it does not fit in memory. candle's own count wraps around in release builds
/// (a `((1 << 63) + 1, 2)` tensor over 2 floats passes its checks), and a kernel trusting it
/// would index past its buffer: every op checks its operands and results here first.
pub(crate) fn checked_elems(op: &str, what: &str, dims: &[usize]) -> Result<usize> {
    // A buffer of f32 (or f64) must fit in `isize::MAX` bytes.
    const MAX: usize = isize::MAX as usize / 8;
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{op}: the {what} of shape {dims:?} has more elements than fit in memory"
            ))
        })
}

/// The contiguous f32 data of a CPU storage, checked against the `len` elements that op `op`
/// expects of its operand `what` (both named in the error).
pub(crate) fn cpu_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!(
            "{op}: the CPU op takes f32, got a {:?} {what}",
            storage.dtype()
        );
    };
    match layout.contiguous_offsets() {
        Some((start, end)) if end - start == len => Ok(&data[start..end]),
        _ => candle_core::bail!(
            "{op}: the CPU op needs a contiguous {what} of {len} elements, got shape {:?} \
             strides {:?}",
            layout.dims(),
            layout.stride()
        ),
    }
}

/// [`cpu_f32`] of a tensor's storage (a guard from `storage_and_layout`), which a backward pass
/// gets on the device of its forward.
pub(crate) fn tensor_f32<'a>(
    storage: &'a Storage,
    layout: &Layout,
    len: usize,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => cpu_f32(s, layout, len, op, what),
        _ => candle_core::bail!("{op}: the CPU op's backward got a {what} on another device"),
    }
}

/// The threads the CPU ops split their work into: candle's count (`RAYON_NUM_THREADS`, else the
/// physical cores), read once. Candle's `get_num_threads` re-reads the environment and parses
/// `/proc/cpuinfo` on every call (61 us on a 2-core machine, more with more cores): called
/// per op, that was 2% of a batch-1 forward pass. Rayon's pool is fixed once built, so a later
/// change of the variable would not take effect anyway.
pub(crate) fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// The gradient through an optional ReLU: `grad` where the ReLU's output `res` is positive
/// (PyTorch's choice, 0 at 0), else 0; `grad` itself without one.
pub(crate) fn relu_grad<'a>(relu: bool, grad: &'a [f32], res: &[f32]) -> Cow<'a, [f32]> {
    if !relu {
        return Cow::Borrowed(grad);
    }
    let mut masked = vec![0f32; grad.len()];
    relu_grad_into(&mut masked, grad, res);
    Cow::Owned(masked)
}

/// [`relu_grad`] of a ReLU into `dst`.
pub(crate) fn relu_grad_into(dst: &mut [f32], grad: &[f32], res: &[f32]) {
    for ((d, &g), &r) in dst.iter_mut().zip(grad).zip(res) {
        *d = if r > 0.0 { g } else { 0.0 };
    }
}
