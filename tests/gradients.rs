//! Gradients of candle-zoo's own layers against PyTorch's, from
//! `tests/fixtures/grads.safetensors` (written by `scripts/make_grad_fixtures.py`).
//!
//! Each case differentiates `sum(f(x) * w)`, with `x` and `w` from `det_values`, and checks
//! the forward output and the input gradient at a max relative error of 1e-5 (relative to the
//! largest |value| of PyTorch's tensor); conv and linear cases also check the weight and bias gradients.
//! Max-pool gradients are sums of `w` values routed to each window's first maximum, so on the
//! CPU they match PyTorch exactly, ties included.

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::{Conv2dConfig, Module};
use candle_zoo::layers::{conv2d, linear, max_pool2d, AdaptiveAvgPool2d, LocalResponseNorm};
use common::{det_values, rel_err};

enum Op {
    MaxPool {
        kernel: usize,
        stride: usize,
        ceil: bool,
    },
    Lrn(LocalResponseNorm),
    Adaptive(usize, usize),
    /// conv2d + bias (+ ReLU) with a `(cout, cin / groups, kernel, kernel)` weight.
    Conv {
        cout: usize,
        kernel: usize,
        cfg: Conv2dConfig,
        relu: bool,
    },
    /// The input flattened from dim 1, then linear + bias (+ ReLU) with an `(out, in)` weight.
    Linear {
        out: usize,
        relu: bool,
    },
}

/// `(out_channels, kernel, stride, padding, groups, relu)`, as the script lists them.
fn conv(
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    relu: bool,
) -> Op {
    let cfg = Conv2dConfig {
        padding,
        stride,
        groups,
        ..Default::default()
    };
    Op::Conv {
        cout,
        kernel,
        cfg,
        relu,
    }
}

struct Case {
    name: &'static str,
    op: Op,
    shape: [usize; 4],
    bound: f64,
    /// ReLU of the input on a 0.25 grid: many zeros and tied maxima.
    ties: bool,
}

const fn pool(kernel: usize, stride: usize, ceil: bool) -> Op {
    Op::MaxPool {
        kernel,
        stride,
        ceil,
    }
}

/// Must match `CASES` in scripts/make_grad_fixtures.py.
fn cases() -> Vec<Case> {
    let case = |name, op, shape, bound, ties| Case {
        name,
        op,
        shape,
        bound,
        ties,
    };
    let lrn = |s, a, b, k| Op::Lrn(LocalResponseNorm::new(s, a, b, k));
    vec![
        case(
            "maxpool_floor_13x13",
            pool(3, 2, false),
            [2, 3, 13, 13],
            1.0,
            false,
        ),
        case(
            "maxpool_floor_14x15",
            pool(3, 2, false),
            [1, 2, 14, 15],
            1.0,
            false,
        ),
        case(
            "maxpool_ceil_14x14",
            pool(3, 2, true),
            [1, 2, 14, 14],
            1.0,
            false,
        ),
        case(
            "maxpool_ceil_13x16",
            pool(3, 2, true),
            [2, 2, 13, 16],
            1.0,
            false,
        ),
        case(
            "maxpool_ceil_7x6",
            pool(3, 2, true),
            [1, 3, 7, 6],
            1.0,
            false,
        ),
        case(
            "maxpool_ties_floor_13x13",
            pool(3, 2, false),
            [2, 3, 13, 13],
            1.0,
            true,
        ),
        case(
            "maxpool_ties_ceil_14x12",
            pool(3, 2, true),
            [2, 3, 14, 12],
            1.0,
            true,
        ),
        case(
            "lrn_alexnet",
            lrn(5, 1e-4, 0.75, 1.0),
            [2, 7, 5, 6],
            100.0,
            false,
        ),
        case(
            "lrn_sensitive",
            lrn(3, 0.5, 0.75, 2.0),
            [2, 6, 4, 5],
            2.0,
            false,
        ),
        case(
            "adaptive_13x13",
            Op::Adaptive(6, 6),
            [2, 3, 13, 13],
            1.0,
            false,
        ),
        case("adaptive_7x9", Op::Adaptive(6, 6), [1, 2, 7, 9], 1.0, false),
        case("adaptive_5x5", Op::Adaptive(6, 6), [1, 2, 5, 5], 1.0, false),
        case(
            "conv_k11_s4_groups2_relu",
            conv(6, 11, 4, 2, 2, true),
            [3, 4, 27, 31],
            1.0,
            false,
        ),
        case(
            "conv_k5_groups2_relu",
            conv(8, 5, 1, 2, 2, true),
            [2, 6, 9, 8],
            1.0,
            false,
        ),
        case(
            "conv_k3_pad0",
            conv(4, 3, 1, 0, 1, false),
            [1, 3, 7, 6],
            1.0,
            false,
        ),
        case(
            "conv_k3_cin256_groups2_relu",
            conv(4, 3, 1, 1, 2, true),
            [1, 256, 4, 5],
            1.0,
            false,
        ),
        case(
            "conv_k3_cin128_pad0",
            conv(4, 3, 1, 0, 1, false),
            [1, 128, 5, 4],
            1.0,
            false,
        ),
        case(
            "linear_relu",
            Op::Linear { out: 7, relu: true },
            [3, 2, 4, 5],
            1.0,
            false,
        ),
        case(
            "linear_b17",
            Op::Linear {
                out: 33,
                relu: false,
            },
            [17, 3, 2, 5],
            1.0,
            false,
        ),
    ]
}

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/grads.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).expect("load grads.safetensors")
}

fn input(case: &Case) -> Vec<f32> {
    let n = case.shape.iter().product();
    let x = det_values(&format!("{}.x", case.name), n, case.bound);
    if case.ties {
        // As the script: every step is exact in f32.
        x.into_iter()
            .map(|v| ((v * 4.0).floor() / 4.0).max(0.0))
            .collect()
    } else {
        x
    }
}

/// A conv or linear case's weight and bias, from `det_values` as in the script: the weight
/// bounded by `1 / sqrt(fan_in)`, the bias by 0.1.
fn layer_params(case: &Case) -> Option<(Var, Var)> {
    let (cout, dims) = match &case.op {
        Op::Conv {
            cout, kernel, cfg, ..
        } => (
            *cout,
            vec![*cout, case.shape[1] / cfg.groups, *kernel, *kernel],
        ),
        Op::Linear { out, .. } => (*out, vec![*out, case.shape[1..].iter().product()]),
        _ => return None,
    };
    let fan_in: usize = dims[1..].iter().product();
    let w = det_values(
        &format!("{}.weight", case.name),
        dims.iter().product(),
        1.0 / (fan_in as f64).sqrt(),
    );
    let b = det_values(&format!("{}.bias", case.name), cout, 0.1);
    Some((
        Var::from_vec(w, dims.as_slice(), &Device::Cpu).expect("weight"),
        Var::from_vec(b, cout, &Device::Cpu).expect("bias"),
    ))
}

fn apply(op: &Op, x: &Tensor, params: Option<&(Var, Var)>) -> candle_core::Result<Tensor> {
    match op {
        Op::Conv { cfg, relu, .. } => {
            let (w, b) = params.expect("conv parameters");
            conv2d(x, w.as_tensor(), Some(b.as_tensor()), cfg, *relu)
        }
        Op::Linear { relu, .. } => {
            let (w, b) = params.expect("linear parameters");
            linear(
                &x.flatten_from(1)?,
                w.as_tensor(),
                Some(b.as_tensor()),
                *relu,
            )
        }
        Op::MaxPool {
            kernel,
            stride,
            ceil,
        } => max_pool2d(x, *kernel, *stride, *ceil),
        Op::Lrn(lrn) => lrn.forward(x),
        Op::Adaptive(h, w) => AdaptiveAvgPool2d::new(*h, *w).forward(x),
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn gradients_match_pytorch() -> anyhow::Result<()> {
    let fx = fixtures();
    let cases = cases();
    // x, y, grad per case; conv and linear cases add weight, bias and their gradients.
    let tensors: usize = cases
        .iter()
        .map(|c| {
            if matches!(c.op, Op::Conv { .. } | Op::Linear { .. }) {
                7
            } else {
                3
            }
        })
        .sum();
    assert_eq!(fx.len(), tensors, "fixture and case list disagree");
    let mut failures = Vec::new();
    for case in &cases {
        let get = |what: &str| {
            fx.get(&format!("{}.{what}", case.name))
                .unwrap_or_else(|| panic!("fixture lacks {}.{what}", case.name))
        };
        let xs = input(case);
        assert_eq!(
            xs,
            flat(get("x")),
            "{}: det_values input differs from the script's",
            case.name
        );
        let x = Var::from_vec(xs, case.shape.as_slice(), &Device::Cpu)?;
        let params = layer_params(case);
        if let Some((w, b)) = &params {
            for (what, t) in [("weight", w), ("bias", b)] {
                assert_eq!(
                    flat(t.as_tensor()),
                    flat(get(what)),
                    "{}: det_values {what} differs from the script's",
                    case.name
                );
            }
        }
        let y = apply(&case.op, x.as_tensor(), params.as_ref())?;
        let want_y = get("y");
        assert_eq!(y.dims(), want_y.dims(), "{}: output shape", case.name);
        let w = det_values(&format!("{}.w", case.name), y.elem_count(), 1.0);
        let w = Tensor::from_vec(w, y.shape(), &Device::Cpu)?;
        let grads = (&y * &w)?.sum_all()?.backward()?;
        let grad = grads.get(&x).expect("gradient of x");
        let (ey, eg) = (
            rel_err(&flat(&y), &flat(want_y)),
            rel_err(&flat(grad), &flat(get("grad"))),
        );
        // The parameter gradients of conv and linear cases, after the input's.
        let mut eg_params = Vec::new();
        if let Some((w, b)) = &params {
            for (what, t) in [("grad_weight", w), ("grad_bias", b)] {
                let g = grads.get(t.as_tensor()).expect("parameter gradient");
                eg_params.push(rel_err(&flat(g), &flat(get(what))));
            }
        }
        println!(
            "{:26} forward rel err {ey:.2e}, input gradient rel err {eg:.2e}{}",
            case.name,
            match eg_params.as_slice() {
                [w, b] => format!(", weight {w:.2e}, bias {b:.2e}"),
                _ => String::new(),
            }
        );
        // On the CPU the max-pool op follows PyTorch's first-maximum rule exactly.
        let tol = if matches!(case.op, Op::MaxPool { .. }) {
            0.0
        } else {
            1e-5
        };
        if ey > tol || eg > tol || eg_params.iter().any(|&e| e > tol) {
            failures.push(format!(
                "{}: forward {ey:.2e}, gradient {eg:.2e}, parameter gradients {eg_params:?} \
                 > {tol:e}",
                case.name
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}
