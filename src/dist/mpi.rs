//! The MPI engine (feature `mpi`): rsmpi over the system's MPI library (Open MPI, MPICH), for
//! CPU processes on one machine or many, under `mpirun -np N` or Slurm's `srun`.

use candle_core::{Device, Tensor};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use super::{Collective, Launch};
use crate::error::{Error, Result};

/// This process's place in `MPI_COMM_WORLD`. MPI is finalised when it is dropped, so it must
/// live until the run's last collective.
pub struct Mpi {
    world: SimpleCommunicator,
    // Dropped after `world`: finalises MPI.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI (once per process) and checks that its world is the launch's.
    pub fn init(launch: Launch) -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| Error::Distributed {
            rank: launch.rank,
            world: launch.world_size,
            reason: "MPI was already initialised in this process".into(),
        })?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world_size) {
            return Err(Error::Distributed {
                rank,
                world: size,
                reason: format!(
                    "MPI says rank {rank} of {size}, but {} says rank {} of {}: launch with \
                     mpirun or srun, or unset the other launcher's variables",
                    launch.source, launch.rank, launch.world_size
                ),
            });
        }
        Ok(Self {
            world,
            _universe: universe,
        })
    }
}

impl Mpi {
    /// Rank 0's `len` bytes on every rank (NCCL's unique id).
    pub fn broadcast_bytes(&self, mine: Option<&[u8]>, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        if let Some(mine) = mine {
            buf.copy_from_slice(mine);
        }
        self.world.process_at_rank(0).broadcast_into(&mut buf[..]);
        Ok(buf)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn engine(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce(&self, flat: &Tensor) -> Result<Tensor> {
        // MPI reduces host memory: a GPU tensor goes through the host (use NCCL on GPUs).
        let send = flat.flatten_all()?.to_vec1::<f32>()?;
        let mut recv = vec![0f32; send.len()];
        self.world
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        let device: &Device = flat.device();
        Ok(Tensor::from_vec(recv, flat.shape(), device)?)
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn abort(&self, code: i32) {
        self.world.abort(code)
    }
}
