//! cuDNN descriptors, each destroyed with its value, and the arithmetic that feeds them.

use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::{DType, Result};

use super::handle::{check, data_type};

macro_rules! descriptor {
    ($name:ident, $raw:ty, $create:ident, $destroy:ident) => {
        pub(super) struct $name(pub(super) $raw);

        impl $name {
            fn create() -> Result<Self> {
                let mut raw = std::ptr::null_mut();
                // SAFETY: the create call writes a fresh descriptor to `raw`.
                check(unsafe { sys::$create(&mut raw) }, stringify!($create))?;
                Ok(Self(raw))
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: created above, destroyed once.
                unsafe { sys::$destroy(self.0) };
            }
        }
    };
}

descriptor!(
    TensorDesc,
    sys::cudnnTensorDescriptor_t,
    cudnnCreateTensorDescriptor,
    cudnnDestroyTensorDescriptor
);
descriptor!(
    FilterDesc,
    sys::cudnnFilterDescriptor_t,
    cudnnCreateFilterDescriptor,
    cudnnDestroyFilterDescriptor
);
descriptor!(
    ConvDesc,
    sys::cudnnConvolutionDescriptor_t,
    cudnnCreateConvolutionDescriptor,
    cudnnDestroyConvolutionDescriptor
);
descriptor!(
    PoolDesc,
    sys::cudnnPoolingDescriptor_t,
    cudnnCreatePoolingDescriptor,
    cudnnDestroyPoolingDescriptor
);
descriptor!(
    LrnDesc,
    sys::cudnnLRNDescriptor_t,
    cudnnCreateLRNDescriptor,
    cudnnDestroyLRNDescriptor
);
descriptor!(
    ActDesc,
    sys::cudnnActivationDescriptor_t,
    cudnnCreateActivationDescriptor,
    cudnnDestroyActivationDescriptor
);

impl TensorDesc {
    /// A packed NCHW tensor.
    pub(super) fn nchw(dtype: DType, dims: [i32; 4], op: &str) -> Result<Self> {
        let d = Self::create()?;
        let [n, c, h, w] = dims;
        // SAFETY: a valid descriptor and plain values.
        check(
            unsafe {
                sys::cudnnSetTensor4dDescriptor(
                    d.0,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    data_type(dtype, op)?,
                    n,
                    c,
                    h,
                    w,
                )
            },
            "cudnnSetTensor4dDescriptor",
        )?;
        Ok(d)
    }
}

impl FilterDesc {
    /// A packed `(C_out, C_in / groups, KH, KW)` filter.
    pub(super) fn kcrs(dtype: DType, dims: [i32; 4], op: &str) -> Result<Self> {
        let d = Self::create()?;
        let [k, c, h, w] = dims;
        // SAFETY: a valid descriptor and plain values.
        check(
            unsafe {
                sys::cudnnSetFilter4dDescriptor(
                    d.0,
                    data_type(dtype, op)?,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    k,
                    c,
                    h,
                    w,
                )
            },
            "cudnnSetFilter4dDescriptor",
        )?;
        Ok(d)
    }
}

/// What a convolution descriptor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ConvParams {
    pub padding: i32,
    pub stride: i32,
    pub dilation: i32,
    pub groups: i32,
    /// TF32 tensor cores allowed (f32 data only; f16 and bf16 always use tensor cores).
    pub tf32: bool,
}

impl ConvDesc {
    pub(super) fn new(p: ConvParams, dtype: DType, op: &str) -> Result<Self> {
        let d = Self::create()?;
        // f16 and bf16 accumulate in f32, f64 in f64 (cuDNN's "pseudo-half" configuration).
        let compute = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let math = match dtype {
            DType::F32 if !p.tf32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            DType::F32 | DType::F64 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        // SAFETY: a valid descriptor and plain values.
        unsafe {
            check(
                sys::cudnnSetConvolution2dDescriptor(
                    d.0,
                    p.padding,
                    p.padding,
                    p.stride,
                    p.stride,
                    p.dilation,
                    p.dilation,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    data_type(compute, op)?,
                ),
                "cudnnSetConvolution2dDescriptor",
            )?;
            check(
                sys::cudnnSetConvolutionGroupCount(d.0, p.groups),
                "cudnnSetConvolutionGroupCount",
            )?;
            check(
                sys::cudnnSetConvolutionMathType(d.0, math),
                "cudnnSetConvolutionMathType",
            )?;
        }
        Ok(d)
    }
}

impl PoolDesc {
    /// A `kernel` window (rows, columns) at `stride`, with no padding. NaN propagates, as in
    /// PyTorch's max pool; max pooling's backward is cuDNN's deterministic one.
    pub(super) fn new(max: bool, kernel: [i32; 2], stride: [i32; 2]) -> Result<Self> {
        let d = Self::create()?;
        let mode = if max {
            sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC
        } else {
            sys::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING
        };
        // SAFETY: a valid descriptor and plain values.
        check(
            unsafe {
                sys::cudnnSetPooling2dDescriptor(
                    d.0,
                    mode,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    kernel[0],
                    kernel[1],
                    0,
                    0,
                    stride[0],
                    stride[1],
                )
            },
            "cudnnSetPooling2dDescriptor",
        )?;
        Ok(d)
    }
}

impl LrnDesc {
    /// cuDNN's LRN divides `alpha` by the window size itself, as PyTorch and Caffe do.
    pub(super) fn new(size: u32, alpha: f64, beta: f64, k: f64) -> Result<Self> {
        let d = Self::create()?;
        // SAFETY: a valid descriptor and plain values.
        check(
            unsafe { sys::cudnnSetLRNDescriptor(d.0, size, alpha, beta, k) },
            "cudnnSetLRNDescriptor",
        )?;
        Ok(d)
    }
}

impl ActDesc {
    /// ReLU, or the identity (the fused conv's activation when ReLU cannot be fused).
    pub(super) fn new(relu: bool) -> Result<Self> {
        let d = Self::create()?;
        let mode = if relu {
            sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU
        } else {
            sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY
        };
        // SAFETY: a valid descriptor and plain values.
        check(
            unsafe {
                sys::cudnnSetActivationDescriptor(
                    d.0,
                    mode,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    0.0,
                )
            },
            "cudnnSetActivationDescriptor",
        )?;
        Ok(d)
    }
}
