//! Data-parallel training: N processes, one per device or machine, each training on its own
//! slice of every batch and summing gradients with an all-reduce, so that every process applies
//! the same update and the weights stay identical everywhere.
//!
//! The processes are started by the launchers clusters already run (`mpirun`, `srun`,
//! `torchrun`) and talk through the engines they already have: MPI (feature `mpi`) and NCCL
//! (feature `nccl`). A plain build is one process and pulls in neither.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`Collective`] (what an engine does), [`Single`], [`Launch`] (rank and world from the launcher's environment), [`connect`] |
//! | `sync.rs` | [`GradSync`]: gradients into flat buckets, one all-reduce each; rank 0's weights to all |
//! | `watchdog.rs` | a collective that waits too long for a peer ends the process |
//! | `mpi.rs` | (feature `mpi`) `Mpi`, through rsmpi |
//! | `nccl.rs` | (feature `nccl`) `Nccl`, through cudarc; its unique id over MPI or [`share_from_rank0`] |
//! | `rendezvous.rs` | rank 0 hands a few bytes to the others over TCP at `MASTER_ADDR:MASTER_PORT` |
//!
//! What makes N processes train as one (see [`crate::train::Trainer`]): the batch size is the
//! global batch, split evenly over the ranks; every rank shuffles with the same seed and takes its
//! slice of each batch; augmentation and dropout masks are functions of (seed, epoch, sample), not
//! of the process; each rank's gradient of its mean loss is weighted by its share of the batch
//! before the sum. So a run's weights do not depend on the number of processes, up to the order
//! of floating-point sums.

mod rendezvous;
mod sync;
mod watchdog;

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

pub use rendezvous::share_from_rank0;
pub use sync::{GradSync, BUCKET_BYTES};

use std::fmt::Display;
use std::rc::Rc;
use std::str::FromStr;
use std::time::Duration;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// A group of processes that sum numbers together: the one thing data-parallel SGD needs.
///
/// Every rank must call the same collectives in the same order with the same sizes; a rank that
/// dies or stops calling makes the others wait, which the engines bound with a timeout
/// ([`collective_timeout`]).
pub trait Collective {
    /// This process's 0-based rank.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn world_size(&self) -> usize;
    /// The engine's name, for messages: `single`, `mpi`, `nccl`.
    fn engine(&self) -> &'static str;
    /// The element-wise sum over all ranks of a flat, contiguous f32 tensor, on every rank, on
    /// the tensor's device.
    fn all_reduce(&self, flat: &Tensor) -> Result<Tensor>;
    /// Sums `values` over all ranks, in place, on every rank.
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Ends every process of the run at once (after an error on this one), rather than leaving
    /// the others waiting in a collective. Returns only for a world of one.
    fn abort(&self, code: i32);
}

/// The world of one process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "single"
    }
    fn all_reduce(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn all_reduce_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _code: i32) {}
}

/// Where a [`Trainer`](crate::train::Trainer) runs: its device and the processes it trains
/// with. A `&Device` converts into the placement of a single process.
pub struct Placement {
    pub device: Device,
    pub comm: Rc<dyn Collective>,
}

impl Placement {
    /// Rank `comm.rank()` of a data-parallel run, on `device`.
    pub fn new(device: &Device, comm: Rc<dyn Collective>) -> Self {
        Self {
            device: device.clone(),
            comm,
        }
    }
}

impl From<&Device> for Placement {
    fn from(device: &Device) -> Self {
        Self::new(device, Rc::new(Single))
    }
}

/// Which engine a run uses: `auto` (the launcher's environment decides), `none`, `mpi`, `nccl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// One process unless a launcher started several: then NCCL on CUDA (feature `nccl`), else
    /// MPI (feature `mpi`).
    #[default]
    Auto,
    /// One process, whatever the environment says.
    None,
    Mpi,
    Nccl,
}

impl FromStr for Engine {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "none" | "single" => Ok(Self::None),
            "mpi" => Ok(Self::Mpi),
            "nccl" => Ok(Self::Nccl),
            _ => Err(Error::parse("engine", s, "auto, none, mpi or nccl")),
        }
    }
}

/// Where a launcher put this process: its rank, the world size and its rank on this host (which
/// GPU it takes), read from the variables of `mpirun` (Open MPI), MPICH/Hydra, Slurm's `srun`
/// or `torchrun`, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// The variable the rank came from, for messages.
    pub source: &'static str,
}

impl Launch {
    /// The launch the environment describes; `None` when no launcher variables are set.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any variable lookup (testable without touching the
    /// environment).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        const SCHEMES: [(&str, &str, &str); 4] = [
            (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ];
        let number = |key: &str| -> Result<Option<usize>> {
            var(key)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Invalid(format!("environment variable {key}=`{v}` is not a number"))
                    })
                })
                .transpose()
        };
        for (rank_key, size_key, local_key) in SCHEMES {
            let (Some(rank), Some(world_size)) = (number(rank_key)?, number(size_key)?) else {
                continue;
            };
            if world_size == 0 || rank >= world_size {
                return Err(Error::Invalid(format!(
                    "environment: {rank_key}={rank} is not a rank of {size_key}={world_size}"
                )));
            }
            return Ok(Some(Self {
                rank,
                world_size,
                local_rank: number(local_key)?.unwrap_or(0),
                source: rank_key,
            }));
        }
        Ok(None)
    }
}

/// How long a collective may wait for the other processes before this one gives up and exits:
/// `CANDLE_ZOO_COLLECTIVE_TIMEOUT` seconds, 1800 by default (PyTorch's NCCL default). Rank 0
/// evaluates and writes checkpoints while the others wait, so it must exceed those.
pub fn collective_timeout() -> Result<Duration> {
    match std::env::var("CANDLE_ZOO_COLLECTIVE_TIMEOUT") {
        Err(_) => Ok(Duration::from_secs(1800)),
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "CANDLE_ZOO_COLLECTIVE_TIMEOUT=`{v}`: expected a positive number of seconds"
                ))
            }),
    }
}

/// The engine `engine` asks for, joined with the other processes of this launch, and the device
/// this rank computes on: `device` itself, except that a CUDA device becomes `cuda:LOCAL_RANK`
/// in a multi-process launch (one GPU per process).
///
/// Without a launcher (or with [`Engine::None`]) this is [`Single`]. A launch of several
/// processes in a build without the engine it needs is an error, not N independent runs.
pub fn connect(engine: Engine, device: &Device) -> Result<Placement> {
    let launch = match engine {
        Engine::None => None,
        _ => Launch::from_env()?,
    };
    let Some(launch) = launch.filter(|l| l.world_size > 1 || engine != Engine::Auto) else {
        return Ok(device.into());
    };
    let device = match device {
        Device::Cuda(_) if launch.world_size > 1 => {
            crate::device::DeviceChoice::Cuda(launch.local_rank).device()?
        }
        d => d.clone(),
    };
    let engine = match engine {
        Engine::Auto if device.is_cuda() && cfg!(feature = "nccl") => Engine::Nccl,
        Engine::Auto => Engine::Mpi,
        e => e,
    };
    let comm = join(engine, launch, &device)?;
    Ok(Placement::new(&device, comm))
}

/// The engine `engine` for `launch`, or an error naming the feature a build lacks.
fn join(engine: Engine, launch: Launch, device: &Device) -> Result<Rc<dyn Collective>> {
    let _ = device; // only NCCL needs it
    match engine {
        #[cfg(feature = "mpi")]
        Engine::Mpi => Ok(Rc::new(mpi::Mpi::init(launch)?)),
        #[cfg(feature = "nccl")]
        Engine::Nccl => Ok(Rc::new(nccl::Nccl::init(launch, device)?)),
        other => {
            let feature = match other {
                Engine::Nccl => "nccl",
                _ => "mpi",
            };
            Err(Error::Invalid(format!(
                "launched as rank {} of {} ({}), but this build has no {feature} engine: \
                 rebuild with --features {feature}",
                launch.rank, launch.world_size, launch.source
            )))
        }
    }
}

/// Passes `result` through, except that an error in a data-parallel run is printed and ends
/// every process at once ([`Collective::abort`]): returning would finalise the engine while the
/// other ranks wait in a collective for this one.
pub fn abort_on_error<T, E: Display>(
    comm: &dyn Collective,
    result: std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if let Err(e) = &result {
        if comm.world_size() > 1 {
            eprintln!(
                "error: rank {} of {}: {e:#}",
                comm.rank(),
                comm.world_size()
            );
            comm.abort(1);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn launchers_are_read_in_order_and_checked() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        let l = Launch::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world_size, l.local_rank, l.source),
            (1, 4, 1, "RANK")
        );
        // mpirun's variables win over torchrun's.
        let l = Launch::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (3, 8, 0));
        let err = Launch::from_vars(vars(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SLURM_PROCID=4") && err.contains("SLURM_NTASKS=4"),
            "{err}"
        );
        let err = Launch::from_vars(vars(&[("RANK", "x"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("RANK=`x`"), "{err}");
    }

    #[test]
    fn engines_parse() {
        assert_eq!("MPI".parse::<Engine>().unwrap(), Engine::Mpi);
        assert_eq!("none".parse::<Engine>().unwrap(), Engine::None);
        assert!("gloo"
            .parse::<Engine>()
            .unwrap_err()
            .to_string()
            .contains("gloo"));
    }
}
