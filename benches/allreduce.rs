//! What the gradient all-reduce of a data-parallel step costs: `GradSync::all_reduce_grads` over
//! the full AlexNet's 61.1M parameters (244 MB of f32 gradients) in its buckets.
//!
//! ```text
//! cargo bench --features mpi --bench allreduce --no-run
//! mpirun -np 2 target/release/deps/allreduce-* [ROUNDS]      # add --oversubscribe on 2 cores
//! ```
//! Rank 0 prints one JSON line: ranks, buckets, MB, the fastest round's ms and the algorithm
//! bandwidth (MB / s) and the bus bandwidth (x 2(N-1)/N, what a ring moves per rank).

use std::rc::Rc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_zoo::dist::{self, Engine, GradSync, BUCKET_BYTES};
use candle_zoo::models::alexnet::{AlexNet, Config};

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .map_or(5, |r| r.parse().expect("ROUNDS"));
    let placement = dist::connect(Engine::Mpi, &Device::Cpu).expect("mpirun -np N");
    let comm: Rc<dyn dist::Collective> = placement.comm.clone();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
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
        let g = Tensor::ones(v.shape(), DType::F32, &Device::Cpu).unwrap();
        grads.insert(v.as_tensor(), g);
    }
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let mut sync_point = [0.0];
        sync.all_reduce_f64(&mut sync_point).unwrap();
        let t = Instant::now();
        let out = sync.all_reduce_grads(Some(&grads), 1.0).unwrap();
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
            "{{\"ranks\": {n}, \"buckets\": {}, \"mb\": {mb:.1}, \"ms\": {:.1}, \"algbw_mb_s\": {:.0}, \"busbw_mb_s\": {:.0}}}",
            sync.buckets().len(),
            best * 1e3,
            mb / best,
            mb / best * 2.0 * (n - 1.0) / n
        );
    }
}
