//! Forward-pass throughput of the published AlexNet shapes (fresh weights: speed does not depend
//! on their values), per layout and batch size.
//!
//! `cargo bench --bench inference` — the PyTorch side of the comparison is issue #5's
//! `benches/` script; no speed claim is made from this file alone.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, VarBuilder, VarMap};
use candle_zoo::alexnet::{AlexNet, Config, Layer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn inference(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut group = c.benchmark_group("alexnet_forward");
    group.sample_size(10);
    for config in [Config::torchvision(), Config::alexnet()] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        let model = AlexNet::new(&config, vb).expect("build model");
        let side = config.layout.input_size();
        for batch in [1usize, 16] {
            let x = Tensor::randn(0f32, 1., (batch, 3, side, side), &device).expect("input");
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new(config.layout.name(), batch), &x, |b, x| {
                b.iter(|| model.forward(x).expect("forward"))
            });
        }
        // fc7 features stop before fc8: the cost of feature extraction.
        let x = Tensor::randn(0f32, 1., (16, 3, side, side), &device).expect("input");
        group.bench_with_input(
            BenchmarkId::new(format!("{}-fc7", config.layout.name()), 16),
            &x,
            |b, x| b.iter(|| model.extract(x, Layer::Fc7).expect("extract")),
        );
    }
    group.finish();
}

criterion_group!(benches, inference);
criterion_main!(benches);
