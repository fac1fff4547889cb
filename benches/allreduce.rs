//! What the gradient all-reduce of a data-parallel step costs: `GradSync::all_reduce_grads` over
//! the full AlexNet's 61.1M parameters (244 MB of f32 gradients) in its buckets.
//!
//! ```text
//! cargo bench --features mpi --bench allreduce --no-run
//! mpirun -np 2 target/release/deps/allreduce-* [ROUNDS]      # add --oversubscribe on 2 cores
//! # NCCL on one GPU (world size 1: what the engine costs a step before any link is crossed)
//! RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 allreduce-* 20 nccl cuda
//! ```
//! Arguments: `[ROUNDS] [ENGINE] [DEVICE]` (default `5 mpi cpu`). Rank 0 prints one JSON line:
//! engine, ranks, buckets, MB, the fastest round's ms and the algorithm bandwidth (MB / s) and
//! the bus bandwidth (x 2(N-1)/N, what a ring moves per rank).

use std::rc::Rc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_zoo::device::DeviceChoice;
use candle_zoo::dist::{self, Engine, GradSync, BUCKET_BYTES};
use candle_zoo::models::alexnet::{AlexNet, Config};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let rounds: usize = args.first().map_or(5, |r| r.parse().expect("ROUNDS"));
    let engine: Engine = args
        .get(1)
        .map_or(Engine::Mpi, |e| e.parse().expect("ENGINE"));
    let device: DeviceChoice = args
        .get(2)
        .map_or(DeviceChoice::Cpu, |d| d.parse().expect("DEVICE"));
    let device = device.device().expect("the device");
    let placement = dist::connect(engine, &device).expect("a launch (mpirun -np N, or RANK etc.)");
    let device = placement.device.clone();
    let comm: Rc<dyn dist::Collective> = placement.comm.clone();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let _model = AlexNet::new(&Config::torchvision(), vb).unwrap();
    let params: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let elems: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let sync = GradSync::new(comm.clone(), params.clone(), BUCKET_BYTES).unwrap();
    let mut grads = candle_core::backprop::GradStore::default();
    for (_, v) in &params {
        let g = Tensor::ones(v.shape(), DType::F32, &device).unwrap();
        grads.insert(v.as_tensor(), g);
    }
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let mut sync_point = [0.0];
        sync.all_reduce_f64(&mut sync_point).unwrap();
        device.synchronize().unwrap();
        let t = Instant::now();
        let out = sync.all_reduce_grads(Some(&grads), 1.0).unwrap();
        device.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        let (_, v) = &params[0];
        let first = out.get(v.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(
            first.get(0).unwrap().to_scalar::<f32>().unwrap(),
            comm.world_size() as f32
        );
    }
    if comm.rank() == 0 {
        let (n, mb) = (comm.world_size() as f64, elems as f64 * 4.0 / 1e6);
        println!(
            "{{\"engine\": \"{}\", \"ranks\": {n}, \"buckets\": {}, \"mb\": {mb:.1}, \"ms\": {:.1}, \"algbw_mb_s\": {:.0}, \"busbw_mb_s\": {:.0}}}",
            comm.engine(),
            sync.buckets().len(),
            best * 1e3,
            mb / best,
            mb / best * 2.0 * (n - 1.0) / n
        );
    }
}
