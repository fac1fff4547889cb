//! The SGD update of f32 CUDA parameters in place: two elementwise kernels per parameter (the
//! momentum buffer, then the parameter), where candle's tensor ops take six passes and allocate
//! a new parameter and buffer every step.
//!
//! The kernels are compiled by NVRTC on first use, for the GPU at hand, without fused
//! multiply-adds: each rounds as the CPU kernel in `sgd.rs` does (PyTorch's
//! `_single_tensor_sgd`), so CPU and GPU updates agree to the bit on the same gradients.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{backend::BackendStorage, DType, InplaceOp3, Layout, Result, Tensor};

use super::sgd::Coeffs;

const SOURCE: &str = r#"
typedef unsigned long long u64;

// buf = first ? d : m * buf + keep * d, with d = g + wd * p (wd = 0: d = g).
extern "C" __global__ void sgd_momentum_f32(float* buf, const float* g, const float* p, u64 n,
                                            float wd, float m, float keep, int first) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) {
        float d = g[i];
        if (wd != 0.0f) d = d + wd * p[i];
        buf[i] = first ? d : m * buf[i] + keep * d;
    }
}

// p -= lr * d, with d = g + wd * p (mode 0: no momentum), buf (mode 1), or
// g + wd * p + m * buf (mode 2: Nesterov).
extern "C" __global__ void sgd_param_f32(float* p, const float* g, const float* buf, u64 n,
                                         float lr, float wd, float m, int mode) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)blockDim.x * gridDim.x) {
        float d;
        if (mode == 1) {
            d = buf[i];
        } else {
            d = g[i];
            if (wd != 0.0f) d = d + wd * p[i];
            if (mode == 2) d = d + m * buf[i];
        }
        p[i] = p[i] + (-lr) * d;
    }
}
"#;

const MODULE: &str = "candle_zoo_sgd";

/// The kernels' PTX, compiled once per process.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = CompileOptions {
            fmad: Some(false),
            ..Default::default()
        };
        compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("sgd: compiling the CUDA update kernels with NVRTC failed: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Updates `param` in place from `grad`, and `buf` (the momentum buffer, made on the first
/// step) in place before it. Both tensors are contiguous f32 on one CUDA device.
pub(super) fn update(
    param: &Tensor,
    grad: &Tensor,
    buf: Option<Tensor>,
    c: &Coeffs,
) -> Result<Option<Tensor>> {
    let momentum = c.momentum != 0.0;
    let (buf, first) = match buf {
        Some(b) if momentum => (Some(b), false),
        _ if momentum => (Some(param.zeros_like()?), true),
        _ => (None, false),
    };
    if let Some(b) = &buf {
        b.inplace_op3(grad, param, &Kernel::Momentum { c: *c, first })?;
    }
    let mode = match (&buf, c.nesterov) {
        (None, _) => 0,
        (Some(_), false) => 1,
        (Some(_), true) => 2,
    };
    // Without momentum the buffer operand is the gradient (unread).
    param.inplace_op3(
        grad,
        buf.as_ref().unwrap_or(grad),
        &Kernel::Param { c: *c, mode },
    )?;
    Ok(buf)
}

enum Kernel {
    Momentum { c: Coeffs, first: bool },
    Param { c: Coeffs, mode: i32 },
}

/// The f32 slice of a contiguous CUDA operand.
fn range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("sgd: the CUDA update needs a contiguous {what}"))
    })
}

impl InplaceOp3 for Kernel {
    fn name(&self) -> &'static str {
        match self {
            Self::Momentum { .. } => "sgd-momentum-cuda",
            Self::Param { .. } => "sgd-param-cuda",
        }
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("sgd: the CUDA update got CPU tensors")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        dl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<()> {
        if [dst.dtype(), a.dtype(), b.dtype()] != [DType::F32; 3] {
            candle_core::bail!("sgd: the CUDA update takes f32 parameters, gradients and buffers")
        }
        let (d0, d1) = range(dl, "destination")?;
        let (a0, a1) = range(al, "operand")?;
        let (b0, b1) = range(bl, "operand")?;
        let n = d1 - d0;
        if a1 - a0 != n || b1 - b0 != n {
            candle_core::bail!("sgd: parameter, gradient and buffer differ in size")
        }
        let dev: CudaDevice = dst.device().clone();
        let name = match self {
            Self::Momentum { .. } => "sgd_momentum_f32",
            Self::Param { .. } => "sgd_param_f32",
        };
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let a = a.as_cuda_slice::<f32>()?.slice(a0..a1);
        let b = b.as_cuda_slice::<f32>()?.slice(b0..b1);
        let mut d = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
        let len = n as u64;
        let mut args = func.builder();
        args.arg(&mut d).arg(&a).arg(&b).arg(&len);
        // Kernel scalars in f32, as the CPU kernel computes with the group's f64 coefficients
        // rounded to the parameter's type.
        let (f, i): ([f32; 3], i32) = match self {
            Self::Momentum { c, first } => (
                [
                    c.weight_decay as f32,
                    c.momentum as f32,
                    (1.0 - c.dampening) as f32,
                ],
                *first as i32,
            ),
            Self::Param { c, mode } => (
                [c.lr as f32, c.weight_decay as f32, c.momentum as f32],
                *mode,
            ),
        };
        args.arg(&f[0]).arg(&f[1]).arg(&f[2]).arg(&i);
        let threads = 256u32;
        let blocks = (n as u64).div_ceil(threads as u64).clamp(1, 4096) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel's arguments are the three f32 buffers of `n` elements, `n` as u64,
        // three f32 and an int, in its parameters' order.
        unsafe { args.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// NVRTC (a compiler: no GPU needed) builds both kernels, without fused multiply-adds, so
    /// that they round as the CPU kernel does.
    #[test]
    fn the_update_kernels_compile_without_fma() {
        let ptx = super::ptx().unwrap();
        for kernel in ["sgd_momentum_f32", "sgd_param_f32"] {
            assert!(
                ptx.contains(&format!(".entry {kernel}(")),
                "{kernel} missing"
            );
        }
        assert!(!ptx.contains("fma."), "the PTX contracts multiply-adds");
        assert!(ptx.contains("mul.rn.f32") && ptx.contains("add.rn.f32"));
    }
}
