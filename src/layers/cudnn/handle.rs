//! The cuDNN handle of each thread and device, device pointers and buffers, errors.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape};

/// cuDNN's data type of a candle dtype.
pub(super) fn data_type(dtype: DType, op: &str) -> Result<sys::cudnnDataType_t> {
    use sys::cudnnDataType_t as T;
    Ok(match dtype {
        DType::F32 => T::CUDNN_DATA_FLOAT,
        DType::F16 => T::CUDNN_DATA_HALF,
        DType::BF16 => T::CUDNN_DATA_BFLOAT16,
        DType::F64 => T::CUDNN_DATA_DOUBLE,
        other => candle_core::bail!("{op}: cuDNN does not take {other:?} tensors"),
    })
}

/// A cuDNN status as a candle error naming the call.
pub(super) fn check(status: sys::cudnnStatus_t, call: &str) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: cudnnGetErrorString returns a static NUL-terminated string for any status.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::cudnnGetErrorString(status)) };
    candle_core::bail!("{call} failed: {} ({status:?})", text.to_string_lossy())
}

/// The scaling factors cuDNN's calls take (`alpha`, `beta`): f32 for every data type here.
pub(super) const ONE: f32 = 1.0;
pub(super) const ZERO: f32 = 0.0;
pub(super) fn scalar(v: &f32) -> *const c_void {
    v as *const f32 as *const c_void
}

/// A cuDNN handle on one device's candle stream, and the conv algorithms found for it.
/// cuDNN's handles are not thread-safe, so each thread has its own (as candle's).
pub(super) struct Handle {
    pub(super) raw: sys::cudnnHandle_t,
    pub(super) stream: Arc<CudaStream>,
    pub(super) algos: RefCell<HashMap<super::conv::Key, super::conv::Algos>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate below and destroyed once.
        unsafe { sys::cudnnDestroy(self.raw) };
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<candle_core::cuda_backend::DeviceId, Rc<Handle>>> =
        RefCell::new(HashMap::new());
}

/// This thread's handle for `dev`.
pub(super) fn handle(dev: &CudaDevice) -> Result<Rc<Handle>> {
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: cudnnCreate writes a handle to `raw`; the stream outlives the handle, which
        // holds an Arc to it.
        unsafe {
            check(sys::cudnnCreate(&mut raw), "cudnnCreate")?;
            let h = Handle {
                raw,
                stream: stream.clone(),
                algos: RefCell::new(HashMap::new()),
            };
            check(
                sys::cudnnSetStream(raw, stream.cu_stream() as sys::cudaStream_t),
                "cudnnSetStream",
            )?;
            let h = Rc::new(h);
            handles.borrow_mut().insert(dev.id(), h.clone());
            Ok(h)
        }
    })
}

/// A read pointer to `storage`'s data from `layout`'s start, with the guard that orders the
/// read on `stream` (drop it after the call that reads is enqueued). The layout must be
/// contiguous (every caller makes its operands so): descriptors here are packed NCHW.
fn read<'a>(
    stream: &'a CudaStream,
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<(*const c_void, SyncOnDrop<'a>)> {
    if !layout.is_contiguous() {
        candle_core::bail!(
            "cuDNN: the {what} must be contiguous, got strides {:?}",
            layout.stride()
        )
    }
    fn go<'a, T: CudaDType + 'a>(
        stream: &'a CudaStream,
        s: &'a CudaStorage,
        offset: usize,
    ) -> Result<(*const c_void, SyncOnDrop<'a>)> {
        let (base, sync) = s.as_cuda_slice::<T>()?.device_ptr(stream);
        let ptr = base as usize + offset * std::mem::size_of::<T>();
        Ok((ptr as *const c_void, sync))
    }
    let offset = layout.start_offset();
    match storage.dtype() {
        DType::F32 => go::<f32>(stream, storage, offset),
        DType::F16 => go::<half::f16>(stream, storage, offset),
        DType::BF16 => go::<half::bf16>(stream, storage, offset),
        DType::F64 => go::<f64>(stream, storage, offset),
        other => candle_core::bail!("cuDNN: a {other:?} {what} is not supported"),
    }
}

/// A fresh zeroed buffer for `f` to write (cuDNN reads some outputs scaled by a zero beta, and
/// 0 x NaN of uninitialised memory would be NaN), returned as candle storage.
fn write<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    stream: &CudaStream,
    n: usize,
    f: impl FnOnce(*mut c_void) -> Result<()>,
) -> Result<CudaStorage> {
    let mut out = dev.alloc_zeros::<T>(n)?;
    {
        let (ptr, _sync) = out.device_ptr_mut(stream);
        f(ptr as usize as *mut c_void)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// One cuDNN computation: `f` gets read pointers to `srcs` (storage, layout, name for errors)
/// and a write pointer to a fresh `dtype` output of `shape`, which it fills.
pub(super) fn run<const N: usize>(
    h: &Handle,
    dev: &CudaDevice,
    dtype: DType,
    srcs: [(&CudaStorage, &Layout, &str); N],
    shape: Shape,
    f: impl FnOnce([*const c_void; N], *mut c_void) -> Result<()>,
) -> Result<(CudaStorage, Shape)> {
    let stream = &*h.stream;
    let mut guards = Vec::with_capacity(N);
    let mut ptrs = [std::ptr::null(); N];
    for (i, (s, l, what)) in srcs.into_iter().enumerate() {
        let (p, g) = read(stream, s, l, what)?;
        ptrs[i] = p;
        guards.push(g);
    }
    let n = shape.elem_count();
    let out = match dtype {
        DType::F32 => write::<f32>(dev, stream, n, |o| f(ptrs, o))?,
        DType::F16 => write::<half::f16>(dev, stream, n, |o| f(ptrs, o))?,
        DType::BF16 => write::<half::bf16>(dev, stream, n, |o| f(ptrs, o))?,
        DType::F64 => write::<f64>(dev, stream, n, |o| f(ptrs, o))?,
        other => candle_core::bail!("cuDNN: no {other:?} outputs"),
    };
    drop(guards);
    Ok((out, shape))
}

/// Scratch memory for a cuDNN call (`bytes` may be 0: a null pointer then).
pub(super) fn with_workspace<R>(
    h: &Handle,
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(*mut c_void, usize) -> Result<R>,
) -> Result<R> {
    if bytes == 0 {
        return f(std::ptr::null_mut(), 0);
    }
    // SAFETY: cuDNN writes its scratch data before reading it.
    let mut ws = unsafe { dev.alloc::<u8>(bytes)? };
    let (ptr, _sync) = ws.device_ptr_mut(&h.stream);
    f(ptr as usize as *mut c_void, bytes)
}

/// The shape of packed `[N, C, H, W]` dimensions.
pub(super) fn shape(dims: [i32; 4]) -> Shape {
    Shape::from(dims.map(|d| d as usize).to_vec())
}

/// The CPU side of an op that only runs on CUDA (candle's custom ops must name one).
pub(super) fn not_on_cpu(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: a cuDNN op got a CPU tensor"))
}
