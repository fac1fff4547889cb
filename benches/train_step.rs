//! Training-step throughput of the published AlexNet shapes at batch 32, per layout: forward
//! with dropout, cross-entropy, backward and an SGD update (momentum 0.9, weight decay 5e-4),
//! as `candle_zoo::train` does it. Fresh weights, random inputs and labels; the same batch is
//! stepped on repeatedly.
//!
//! `cargo bench --bench train_step` — against PyTorch: `python3 benches/compare.py`.

#[path = "../benches/workloads.rs"]
mod workloads;

use candle_core::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use workloads::{TrainStep, LAYOUTS, TRAIN_BATCH};

fn train_step(c: &mut Criterion) {
    // As the examples do (see `candle_zoo::memory`).
    candle_zoo::memory::retain_freed_memory();
    let device = Device::Cpu;
    let mut group = c.benchmark_group("alexnet_train_step");
    group.sample_size(10);
    for layout in LAYOUTS {
        let mut w = TrainStep::new(layout, TRAIN_BATCH, &device).expect("build workload");
        group.throughput(Throughput::Elements(TRAIN_BATCH as u64));
        group.bench_function(BenchmarkId::new(layout.name(), TRAIN_BATCH), |b| {
            b.iter(|| w.step().expect("train step"))
        });
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
