//! Layers AlexNet needs that candle 0.11 does not ship, or ships too slowly on the CPU.
//!
//! Each is differentiable on every device: adaptive pooling is a composition of candle ops;
//! [`LocalResponseNorm`] a fused CPU op (f32) with an analytic backward, and candle ops
//! elsewhere; [`max_pool2d`] is a CPU custom op with PyTorch's backward (candle's own pool has no
//! backward for overlapping windows) and a composition of candle ops elsewhere; [`conv2d`] (with
//! its bias and ReLU fused) is a CPU custom op with an im2col + gemm forward and backward
//! (candle's CPU conv backward is a slow direct loop), Winograd's F(2x2, 3x3) for 3x3 stride-1
//! layers on AVX2, and candle's own conv elsewhere;
//! [`linear`] (bias and ReLU fused) is a CPU custom op whose gemms are laid out for a narrow
//! batch (on AVX2 CPUs its forward and its input gradient read the weight in place, without the
//! gemm crate's copy of it), and candle's matmul elsewhere.

mod conv;
mod cpu;
mod linear;
mod lrn;
mod pool;

pub use conv::conv2d;
pub use linear::linear;
pub use lrn::LocalResponseNorm;
pub use pool::{max_pool2d, pooled_size, AdaptiveAvgPool2d};
