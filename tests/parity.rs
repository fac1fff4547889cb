//! Numerical parity with PyTorch: every `Tap` and the logits, for every layout, full-size
//! and small models, against `tests/fixtures/parity.*` written by `scripts/make_fixtures.py`.
//!
//! Weights and inputs come from the same index-hash formula on both sides (`det_values`), so the
//! fixtures hold only outputs: a strided sample of each tap plus its L1 and L2 norms over the
//! whole tensor. The bound is a relative error of 1e-5.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_zoo::models::alexnet::{AlexNet, Config, Layout, Tap};
use common::{det_values, det_var_builder, rel_err, sample};
use serde_json::Value;

const TOLERANCE: f64 = 1e-5;

fn fixtures() -> (Value, std::collections::HashMap<String, Tensor>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/parity.json")).unwrap())
            .unwrap();
    (meta, common::parity_tensors())
}

fn norms(t: &Tensor) -> [f64; 2] {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let l1 = v.iter().map(|x| x.abs() as f64).sum();
    let l2 = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    [l1, l2]
}

fn check_case(name: &str) {
    let (meta, fx) = fixtures();
    let samples = meta["samples"].as_u64().unwrap() as usize;
    let case = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no fixture case {name}; rerun scripts/make_fixtures.py"));
    let layout: Layout = case["layout"].as_str().unwrap().parse().unwrap();
    let ints = |v: &Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    let ch = ints(&case["channels"]);
    let config = Config::for_layout(layout)
        .with_widths(
            [ch[0], ch[1], ch[2], ch[3], ch[4]],
            case["hidden"].as_u64().unwrap() as usize,
        )
        .with_classes(case["classes"].as_u64().unwrap() as usize);

    // Load as a user would: the layout comes from the keys (CaffeNet's order cannot, so it is
    // named explicitly), the widths and class count from the shapes.
    let vb = det_var_builder(&config);
    let model = if layout == Layout::CaffeNet {
        let inferred = Config::from_checkpoint(&vb).unwrap();
        assert_eq!(inferred, config.clone().with_layout(Layout::BvlcAlexNet));
        AlexNet::new(&inferred.with_layout(Layout::CaffeNet), vb).unwrap()
    } else {
        AlexNet::load(vb).unwrap()
    };
    assert_eq!(model.config(), &config);

    let dims = ints(&case["input"]);
    let n: usize = dims.iter().product();
    let x = Tensor::from_vec(
        det_values("input", n, case["input_bound"].as_f64().unwrap()),
        dims.as_slice(),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(DType::F32)
    .unwrap();
    assert_eq!(
        sample(&x, samples),
        fx[&format!("{name}/input.sample")]
            .to_vec1::<f32>()
            .unwrap(),
        "the input formula differs from the script's"
    );

    let taps = model.extract_many(&x, &Tap::ALL).unwrap();
    let mut report = Vec::new();
    for (tap, got) in Tap::ALL.iter().zip(&taps) {
        // The fixture script names fc8's output as PyTorch users do.
        let key = match tap {
            Tap::Fc8 => "logits",
            tap => tap.name(),
        };
        assert_eq!(
            got.dims(),
            ints(&case["shapes"][key]).as_slice(),
            "{name}/{key} shape"
        );
        let want = fx[&format!("{name}/{key}.sample")]
            .to_vec1::<f32>()
            .unwrap();
        let err = rel_err(&sample(got, samples), &want);
        let want_norms = fx[&format!("{name}/{key}.stats")].to_vec1::<f64>().unwrap();
        let got_norms = norms(got);
        let norm_err = (0..2)
            .map(|i| (got_norms[i] - want_norms[i]).abs() / want_norms[i].max(f64::MIN_POSITIVE))
            .fold(0f64, f64::max);
        report.push(format!("{key} {err:.1e}/{norm_err:.1e}"));
        assert!(
            err <= TOLERANCE,
            "{name}/{key}: relative error {err:e} > {TOLERANCE:e}"
        );
        assert!(
            norm_err <= TOLERANCE,
            "{name}/{key}: norms {got_norms:?} vs {want_norms:?}"
        );
    }
    // The single-tap path and `forward` agree with the multi-tap pass.
    let logits = candle_nn::Module::forward(&model, &x).unwrap();
    assert_eq!(
        logits.to_vec2::<f32>().unwrap(),
        taps[8].to_vec2::<f32>().unwrap()
    );
    let fc7 = model.extract(&x, Tap::Fc7).unwrap();
    assert_eq!(
        fc7.to_vec2::<f32>().unwrap(),
        taps[7].to_vec2::<f32>().unwrap()
    );
    println!("{name}: sample/norm relative errors: {}", report.join(", "));
}

macro_rules! parity {
    ($($test:ident => $case:literal,)*) => {$(
        #[test]
        fn $test() {
            check_case($case);
        }
    )*};
}

parity! {
    torchvision_full_224 => "tv_full_224",
    torchvision_full_non_square_193x257 => "tv_full_193x257",
    torchvision_small_96x80 => "tv_small_96x80",
    alexnet_full_227 => "alexnet_full_227",
    alexnet_full_224_ceil_mode => "alexnet_full_224",
    caffenet_full_227 => "caffenet_full_227",
    alexnet_small_227 => "alexnet_small_227",
    caffenet_small_211x229 => "caffenet_small_211x229",
}
