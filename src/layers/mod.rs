//! Layers AlexNet needs that candle 0.11 does not ship.
//!
//! Each is differentiable on every device: LRN and adaptive pooling are compositions of candle
//! ops; [`max_pool2d`] is a CPU custom op with PyTorch's backward (candle's own pool has no
//! backward for overlapping windows) and a composition of candle ops elsewhere.

mod lrn;
mod pool;

pub use lrn::LocalResponseNorm;
pub use pool::{max_pool2d, pooled_size, AdaptiveAvgPool2d};
