//! Forward-pass throughput of the published AlexNet shapes (fresh weights: speed does not depend
//! on their values), per layout (torchvision at 224 px, the two-tower model at 227 px) and batch
//! size (1, 16, 64), plus fc7 extraction at batch 16.
//!
//! `cargo bench --bench inference` — the same workloads against PyTorch, with peak memory and
//! the share of the sgemm peak: `python3 benches/compare.py`.

#[path = "../benches/workloads.rs"]
mod workloads;

use candle_core::Device;
use candle_zoo::models::alexnet::Tap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use workloads::{Inference, Sgemm, INFER_BATCHES, LAYOUTS, SGEMM_N};

fn inference(c: &mut Criterion) {
    // As the examples do (see `candle_zoo::memory`).
    candle_zoo::memory::retain_freed_memory();
    let device = Device::Cpu;
    let mut group = c.benchmark_group("alexnet_forward");
    group.sample_size(10);
    for layout in LAYOUTS {
        for batch in INFER_BATCHES {
            let w = Inference::new(layout, batch, &device).expect("build workload");
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(layout.name(), batch), |b| {
                b.iter(|| w.run().expect("forward"))
            });
        }
        // fc7 features stop before fc8: the cost of feature extraction.
        let w = Inference::new(layout, 16, &device).expect("build workload");
        group.throughput(Throughput::Elements(16));
        group.bench_function(
            BenchmarkId::new(format!("{}-fc7", layout.name()), 16),
            |b| b.iter(|| w.model.extract(&w.x, Tap::Fc7).expect("extract")),
        );
    }
    group.finish();
}

/// The yardstick: one 2048^3 f32 matmul through candle (the `gemm` crate).
fn sgemm(c: &mut Criterion) {
    let w = Sgemm::new(SGEMM_N, &Device::Cpu).expect("build workload");
    let mut group = c.benchmark_group("sgemm");
    group.sample_size(10);
    group.throughput(Throughput::Elements(w.flops() as u64));
    group.bench_function(BenchmarkId::from_parameter(SGEMM_N), |b| {
        b.iter(|| w.run().expect("matmul"))
    });
    group.finish();
}

criterion_group!(benches, inference, sgemm);
criterion_main!(benches);
