//! The NCCL engine (feature `nccl`): one process per GPU, gradients summed on the GPUs by
//! NCCL through cudarc, as PyTorch's DDP does. NCCL needs every rank to hold the same unique id
//! before it connects them: rank 0 makes it and hands it over MPI when `mpirun`/`srun` started
//! the run (and the `mpi` feature is on), else over TCP at `MASTER_ADDR:MASTER_PORT` as
//! `torchrun` sets them (the port after it under torchrun, whose agent serves its own store on
//! `MASTER_PORT`; [`share_from_rank0`](super::share_from_rank0)).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::{collective_timeout, share_from_rank0, Collective, Launch};
use crate::error::{Error, Result};

/// This process's NCCL communicator, on its GPU.
pub struct Nccl {
    comm: Comm,
    device: Device,
    rank: usize,
    world: usize,
    /// Kept for `abort` (and alive until NCCL is done) when MPI started the run.
    #[cfg(feature = "mpi")]
    mpi: Option<super::mpi::Mpi>,
}

impl Nccl {
    /// Joins the run `launch` describes on `device` (a CUDA device: the process's GPU).
    pub fn init(launch: Launch, device: &Device) -> Result<Self> {
        let fail = |reason: String| Error::Distributed {
            rank: launch.rank,
            world: launch.world_size,
            reason,
        };
        let Device::Cuda(cuda) = device else {
            return Err(fail("NCCL runs on CUDA devices: pass --device cuda".into()));
        };
        let mine = if launch.rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("making NCCL's unique id: {e:?}")))?;
            Some(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        #[cfg(feature = "mpi")]
        let mpi = match launch.source {
            "OMPI_COMM_WORLD_RANK" | "PMI_RANK" | "SLURM_PROCID" => {
                Some(super::mpi::Mpi::init(launch)?)
            }
            _ => None,
        };
        #[cfg(feature = "mpi")]
        let shared = match &mpi {
            Some(mpi) => mpi.broadcast_bytes(mine.as_deref(), 128)?,
            None => rendezvous(launch, mine.as_deref())?,
        };
        #[cfg(not(feature = "mpi"))]
        let shared = rendezvous(launch, mine.as_deref())?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(&shared) {
            *c = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            launch.rank,
            launch.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| fail(format!("NCCL could not connect the ranks: {e:?}")))?;
        Ok(Self {
            comm,
            device: device.clone(),
            rank: launch.rank,
            world: launch.world_size,
            #[cfg(feature = "mpi")]
            mpi,
        })
    }
}

/// The id over TCP from `MASTER_ADDR:MASTER_PORT` (torchrun's variables).
fn rendezvous(launch: Launch, mine: Option<&[u8]>) -> Result<Vec<u8>> {
    let var = |k: &str| {
        std::env::var(k).map_err(|_| Error::Distributed {
            rank: launch.rank,
            world: launch.world_size,
            reason: format!(
                "{k} is not set: launch with torchrun (or set MASTER_ADDR and MASTER_PORT), or \
                 with mpirun in a build with --features mpi"
            ),
        })
    };
    let port: u16 = var("MASTER_PORT")?
        .parse()
        .map_err(|_| Error::Distributed {
            rank: launch.rank,
            world: launch.world_size,
            reason: "MASTER_PORT is not a port number".into(),
        })?;
    // torchrun's agent already serves its own store on MASTER_PORT: take the next port.
    let port = match std::env::var("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
        Ok("True") => port.wrapping_add(1),
        _ => port,
    };
    let addr = format!("{}:{port}", var("MASTER_ADDR")?);
    share_from_rank0(
        launch.rank,
        launch.world_size,
        &addr,
        mine,
        128,
        collective_timeout()?,
    )
}

/// `ncclAllReduce(sum)` of a contiguous f32 or f64 tensor, as a custom op on the CUDA storage.
struct AllReduce<'a>(&'a Comm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce takes CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce takes contiguous tensors")
        };
        let device = s.device().clone();
        macro_rules! reduce {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                let mut dst = unsafe { device.alloc::<$t>(end - start)? };
                self.0
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::msg(format!("NCCL all-reduce: {e:?}")))?;
                CudaStorage::wrap_cuda_slice(dst, device)
            }};
        }
        let out = match s.dtype() {
            DType::F32 => reduce!(f32),
            DType::F64 => reduce!(f64),
            d => candle_core::bail!("the NCCL all-reduce takes f32 or f64, not {d:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn engine(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce(&self, flat: &Tensor) -> Result<Tensor> {
        let flat = flat.to_device(&self.device)?.contiguous()?;
        Ok(flat.apply_op1_no_bwd(&AllReduce(&self.comm))?)
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let t = Tensor::from_slice(values, values.len(), &self.device)?;
        let summed = t
            .apply_op1_no_bwd(&AllReduce(&self.comm))?
            .to_vec1::<f64>()?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.abort(code);
        }
        // Under torchrun the agent ends the other ranks when this one exits.
        std::process::exit(code);
    }
}
