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
//!
//! With the `cudnn` feature, the conv, max-pool, LRN and adaptive pooling of CUDA tensors are
//! cuDNN calls forward and backward (`src/layers/cudnn/`); the linear layers are cuBLAS gemms
//! through candle's matmul there, as in PyTorch.

mod conv;
mod cpu;
mod cudnn;
mod linear;
mod lrn;
mod pool;

pub use conv::conv2d;
pub use cudnn::{set_tf32, tf32};
pub use linear::linear;
pub use lrn::LocalResponseNorm;
pub use pool::{max_pool2d, pooled_size, AdaptiveAvgPool2d};

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use candle_nn::{Conv2dConfig, Module};

    /// A tensor whose shape's element count wraps around in usize arithmetic to the 2 floats it
    /// holds: candle accepts it, so each op must refuse it before a kernel trusts the count.
    fn wrapping(dims: &[usize]) -> Tensor {
        Tensor::from_vec(vec![1f32, 2.], dims, &Device::Cpu).expect("candle accepts it")
    }

    #[test]
    fn shapes_whose_element_count_overflows_are_errors_naming_the_operand() {
        let huge = (1usize << 63) + 1;
        let small = |dims: &[usize]| Tensor::ones(dims, candle_core::DType::F32, &Device::Cpu);
        let check = |r: candle_core::Result<Tensor>, what: &str| {
            let err = r
                .expect_err("an overflowing shape must be refused")
                .to_string();
            assert!(
                err.contains(what) && err.contains("more elements than fit"),
                "{err}"
            );
        };
        // The case: 2^63 + 1 rows of 2 features.
        check(
            linear(&wrapping(&[huge, 2]), &small(&[3, 2]).unwrap(), None, false),
            "input",
        );
        check(
            linear(&small(&[1, 2]).unwrap(), &wrapping(&[huge, 2]), None, true),
            "weight",
        );
        let cfg = Conv2dConfig::default();
        check(
            conv2d(
                &wrapping(&[huge, 2, 1, 1]),
                &small(&[1, 2, 1, 1]).unwrap(),
                None,
                &cfg,
                true,
            ),
            "input",
        );
        check(
            conv2d(
                &small(&[1, 1, 3, 3]).unwrap(),
                &wrapping(&[huge, 1, 1, 2]),
                None,
                &cfg,
                false,
            ),
            "weight",
        );
        check(
            max_pool2d(&wrapping(&[huge, 1, 1, 2]), 1, 1, false),
            "input",
        );
        check(
            LocalResponseNorm::alexnet().forward(&wrapping(&[huge, 2])),
            "input",
        );
        check(
            AdaptiveAvgPool2d::new(1, 1).forward(&wrapping(&[huge, 1, 1, 2])),
            "input",
        );
        // A padding so large that the padded size overflows.
        let pad = Conv2dConfig {
            padding: usize::MAX / 2 + 1,
            ..Default::default()
        };
        let err = conv2d(
            &small(&[1, 1, 3, 3]).unwrap(),
            &small(&[1, 1, 3, 3]).unwrap(),
            None,
            &pad,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("too large"), "{err}");
    }
}
