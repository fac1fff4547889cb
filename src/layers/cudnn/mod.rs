//! AlexNet's layers on CUDA through cuDNN (feature `cudnn`): what PyTorch runs on a GPU.
//!
//! Why: candle 0.11.1 computes a conv's input gradient with a direct kernel (one thread per
//! output element), its weight gradient as a dilated conv with a non-contiguous kernel, and
//! max-pool, LRN and adaptive pooling as chains of generic ops (`../shared/reference/gpu-facts.md`).
//! Here each of those is one cuDNN call, forward and backward:
//!
//! | layer | forward | backward |
//! |---|---|---|
//! | conv (+ bias, + ReLU) | `cudnnConvolutionBiasActivationForward` where the algorithm allows, else `Forward`, `AddTensor`, `ActivationForward` | `ActivationBackward` (ReLU), `BackwardData` (only for a tracked input), `BackwardFilter`, `BackwardBias` |
//! | max pool (floor or ceil) | `cudnnPoolingForward` | `cudnnPoolingBackward` |
//! | adaptive avg pool (whole bins) | `cudnnPoolingForward` (average) | `cudnnPoolingBackward` |
//! | LRN (odd size) | `cudnnLRNCrossChannelForward` | `cudnnLRNCrossChannelBackward` |
//!
//! Convolutions take f32, f16 and bf16 (`--precision bf16`); pooling and LRN f32 and f16, so
//! mixed precision runs them in f32. f64 stays on candle's ops (the device tests' reference).
//!
//! Conv algorithms are chosen by `cudnnFind*` (timed on the GPU, as PyTorch's
//! `cudnn.benchmark = True`) once per shape and kept per thread. f32 convolutions may use
//! TF32 tensor cores, as PyTorch's by default (`torch.backends.cudnn.allow_tf32`); [`set_tf32`]
//! turns that off.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`set_tf32`], which layers and dtypes go to cuDNN |
//! | `plan.rs` | the arithmetic of descriptors: `i32` dimensions, ceil-mode padding (tested everywhere) |
//! | `handle.rs` | the handle per thread and device, device pointers, buffers, errors |
//! | `desc.rs` | descriptors, each destroyed with its value |
//! | `conv.rs` | the convolution and its backward ops, the algorithm cache |
//! | `pool.rs` | max and average pooling |
//! | `lrn.rs` | local response normalisation |

use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(feature = "cudnn")]
use candle_core::{DType, Tensor};

// Compiled and tested in every build; only the `cudnn` build calls it.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) mod plan;

#[cfg(feature = "cudnn")]
mod conv;
#[cfg(feature = "cudnn")]
mod desc;
#[cfg(feature = "cudnn")]
mod handle;
#[cfg(feature = "cudnn")]
mod lrn;
#[cfg(feature = "cudnn")]
mod pool;

#[cfg(feature = "cudnn")]
pub(crate) use conv::conv2d;
#[cfg(feature = "cudnn")]
pub(crate) use lrn::{lrn, supports as lrn_supports};
#[cfg(feature = "cudnn")]
pub(crate) use pool::{avg_pool2d, max_pool2d};

static TF32: AtomicBool = AtomicBool::new(true);

/// Whether f32 convolutions through cuDNN may use TF32 tensor cores (10-bit mantissas in the
/// products, f32 sums): on by default, as in PyTorch (`torch.backends.cudnn.allow_tf32`).
/// Off, they compute in full f32 (cuDNN's FMA math), as the CPU does; the device tests turn it
/// off to compare with the CPU at f32 precision. Applies to convolutions planned after the call.
///
/// ```
/// candle_zoo::layers::set_tf32(false);
/// assert!(!candle_zoo::layers::tf32());
/// candle_zoo::layers::set_tf32(true);
/// ```
pub fn set_tf32(allow: bool) {
    TF32.store(allow, Ordering::Relaxed)
}

/// See [`set_tf32`].
pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

#[cfg(feature = "cudnn")]
/// Whether `t` is a CUDA tensor of a dtype cuDNN computes (f32, f16, bf16). f64 stays on
/// candle's ops.
pub(crate) fn handles(t: &Tensor, dtypes: &[DType]) -> bool {
    t.device().is_cuda() && dtypes.contains(&t.dtype())
}

/// The dtypes each layer takes through cuDNN: convolutions in every float type but f64 (f16
/// and bf16 accumulate in f32); pooling and LRN in f32 and f16, the types cuDNN's legacy
/// pooling and LRN kernels document.
#[cfg(feature = "cudnn")]
pub(crate) const CONV_DTYPES: &[DType] = &[DType::F32, DType::F16, DType::BF16];
#[cfg(feature = "cudnn")]
pub(crate) const NORM_DTYPES: &[DType] = &[DType::F32, DType::F16];
