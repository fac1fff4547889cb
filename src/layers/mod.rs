//! Layers AlexNet needs that candle 0.11 does not ship.
//!
//! Each is built from differentiable candle ops, so gradients flow through it on every device.

mod lrn;
mod pool;

pub use lrn::LocalResponseNorm;
pub use pool::{max_pool2d, pooled_size, AdaptiveAvgPool2d};
