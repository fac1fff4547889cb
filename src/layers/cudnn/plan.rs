//! The arithmetic of cuDNN's descriptors, kept apart from the calls so that it is tested on
//! every machine.

use candle_core::Result;

/// `dims` as the `c_int`s cuDNN's descriptors take. cuDNN's legacy API also indexes each tensor
/// with 32-bit integers, so the element count must fit one too.
pub(crate) fn dims_i32(op: &str, what: &str, dims: &[usize]) -> Result<[i32; 4]> {
    let fits = |n: usize| i32::try_from(n).ok();
    let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    match (dims, elems.and_then(fits)) {
        (&[a, b, c, d], Some(_)) => match (fits(a), fits(b), fits(c), fits(d)) {
            (Some(a), Some(b), Some(c), Some(d)) => Ok([a, b, c, d]),
            _ => unreachable!("each dimension is at most the element count"),
        },
        (&[_, _, _, _], None) => candle_core::bail!(
            "{op}: the {what} of shape {dims:?} has more than 2^31 - 1 elements, cuDNN's limit \
             per tensor: split the batch"
        ),
        _ => candle_core::bail!("{op}: the {what} must be (N, C, H, W), got {dims:?}"),
    }
}

/// The rows (or columns) of `-inf` to add after an input of `size` so that a floor-mode pool
/// (cuDNN's only mode) gives `ceil_out` windows: PyTorch's ceil mode, whose last window may run
/// past the input (and always starts inside it).
pub(crate) fn ceil_extra(size: usize, kernel: usize, stride: usize, ceil_out: usize) -> usize {
    ((ceil_out - 1) * stride + kernel).saturating_sub(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::pooled_size;

    #[test]
    fn dims_fit_cudnns_int_or_name_the_operand() {
        assert_eq!(
            dims_i32("conv2d", "input", &[256, 3, 224, 224]).unwrap(),
            [256, 3, 224, 224]
        );
        let err = dims_i32("conv2d", "output", &[4096, 64, 128, 128])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv2d: the output of shape [4096, 64, 128, 128]"),
            "{err}"
        );
        assert!(err.contains("2^31"), "{err}");
        let err = dims_i32("max pool", "input", &[1, 2, 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("(N, C, H, W)"), "{err}");
        assert!(dims_i32("x", "y", &[usize::MAX, 2, 1, 1]).is_err());
    }

    /// Padding a floor-mode pool's input with `ceil_extra` rows gives PyTorch's ceil-mode
    /// window count, and never a window that starts in the padding.
    #[test]
    fn ceil_mode_padding_gives_pytorchs_window_count() {
        for size in 1..40 {
            for kernel in 1..=5 {
                for stride in 1..=4 {
                    let (Some(ceil), Some(floor)) = (
                        pooled_size(size, kernel, stride, true),
                        pooled_size(size, kernel, stride, false),
                    ) else {
                        continue;
                    };
                    let extra = ceil_extra(size, kernel, stride, ceil);
                    let padded = size + extra;
                    assert_eq!(
                        (padded - kernel) / stride + 1,
                        ceil,
                        "{size} {kernel} {stride}"
                    );
                    assert!((ceil - 1) * stride < size, "a window starts in the padding");
                    if ceil == floor {
                        assert_eq!(extra, 0, "{size} {kernel} {stride}");
                    }
                }
            }
        }
        // AlexNet's pools (3/2 on 55, 27, 13) are the same in both modes: no padding.
        for size in [55, 27, 13] {
            assert_eq!(
                ceil_extra(size, 3, 2, pooled_size(size, 3, 2, true).unwrap()),
                0
            );
        }
    }
}
