#!/usr/bin/env python3
"""Writes `tests/fixtures/grads.safetensors`: PyTorch's gradients of the layers candle-zoo
implements itself (overlapping max-pool, LRN, adaptive average pool, conv + bias + ReLU, linear +
bias + ReLU), for
`tests/gradients.rs`.

For each case the loss is `sum(f(x) * w)`, with `x` and `w` from `det_values` (see
scripts/make_fixtures.py; tests/common/mod.rs computes the same f32 values bit for bit), so the
fixture stores, per case, `<case>.x` (the input, to check that both sides agree on it),
`<case>.y` (f(x)) and `<case>.grad` (d loss / dx), all float32. Conv cases also store their
parameters (and linear cases theirs) `<case>.weight` and `<case>.bias` (from `det_values` too) and the parameter gradients
`<case>.grad_weight` and `<case>.grad_bias`. Max-pool runs in float32 (its gradient is a sum of
`w` values, so the CPU op must match it exactly, ties included); LRN, adaptive pooling, conv and
linear run in float64 and are rounded to float32 once.

The case list must match `CASES` in tests/gradients.rs.

    pip install torch numpy safetensors
    python3 scripts/make_grad_fixtures.py   # rewrites tests/fixtures/grads.safetensors
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import det_values  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "grads.safetensors")

# name, op, params, input shape, input bound, ties
#   maxpool: (kernel, stride, ceil_mode); lrn: (size, alpha, beta, k); adaptive: (out_h, out_w);
#   conv: (out_channels, kernel, stride, padding, groups, relu); linear: (out_features, relu), on
#   the input flattened from dim 1 as AlexNet's fc6 takes pool5
CASES = [
    ("maxpool_floor_13x13", "maxpool", (3, 2, False), (2, 3, 13, 13), 1.0, False),
    ("maxpool_floor_14x15", "maxpool", (3, 2, False), (1, 2, 14, 15), 1.0, False),
    ("maxpool_ceil_14x14", "maxpool", (3, 2, True), (1, 2, 14, 14), 1.0, False),
    ("maxpool_ceil_13x16", "maxpool", (3, 2, True), (2, 2, 13, 16), 1.0, False),
    ("maxpool_ceil_7x6", "maxpool", (3, 2, True), (1, 3, 7, 6), 1.0, False),
    ("maxpool_ties_floor_13x13", "maxpool", (3, 2, False), (2, 3, 13, 13), 1.0, True),
    ("maxpool_ties_ceil_14x12", "maxpool", (3, 2, True), (2, 3, 14, 12), 1.0, True),
    ("lrn_alexnet", "lrn", (5, 1e-4, 0.75, 1.0), (2, 7, 5, 6), 100.0, False),
    ("lrn_sensitive", "lrn", (3, 0.5, 0.75, 2.0), (2, 6, 4, 5), 2.0, False),
    ("adaptive_13x13", "adaptive", (6, 6), (2, 3, 13, 13), 1.0, False),
    ("adaptive_7x9", "adaptive", (6, 6), (1, 2, 7, 9), 1.0, False),
    ("adaptive_5x5", "adaptive", (6, 6), (1, 2, 5, 5), 1.0, False),
    # AlexNet's conv1 (11x11/4) on a non-square input, with two towers as in conv2/4/5.
    ("conv_k11_s4_groups2_relu", "conv", (6, 11, 4, 2, 2, True), (3, 4, 27, 31), 1.0, False),
    ("conv_k5_groups2_relu", "conv", (8, 5, 1, 2, 2, True), (2, 6, 9, 8), 1.0, False),
    ("conv_k3_pad0", "conv", (4, 3, 1, 0, 1, False), (1, 3, 7, 6), 1.0, False),
    # >= 128 input channels per group: the CPU op takes the input gradient as a convolution.
    ("conv_k3_cin256_groups2_relu", "conv", (4, 3, 1, 1, 2, True), (1, 256, 4, 5), 1.0, False),
    ("conv_k3_cin128_pad0", "conv", (4, 3, 1, 0, 1, False), (1, 128, 5, 4), 1.0, False),
    ("linear_relu", "linear", (7, True), (3, 2, 4, 5), 1.0, False),
    ("linear_b17", "linear", (33, False), (17, 3, 2, 5), 1.0, False),
]


def layer_params(name, op, params, shape):
    """Weight (bound 1 / sqrt(fan_in), as torch's default init) and bias (bound 0.1)."""
    if op == "conv":
        cout, k, _, _, groups, _ = params
        wshape = (cout, shape[1] // groups, k, k)
    else:
        cout = params[0]
        wshape = (cout, int(np.prod(shape[1:])))
    fan_in = int(np.prod(wshape[1:]))
    w = det_values(f"{name}.weight", int(np.prod(wshape)), 1.0 / np.sqrt(fan_in)).reshape(wshape)
    b = det_values(f"{name}.bias", cout, 0.1)
    return torch.from_numpy(w), torch.from_numpy(b)


def case_input(name, shape, bound, ties):
    x = det_values(f"{name}.x", int(np.prod(shape)), bound).reshape(shape)
    if ties:
        # ReLU of values on a 0.25 grid: many zeros and repeated maxima. Every step is exact in
        # float32 (times 4, floor, divide by 4), so the Rust side gets the same numbers.
        x = np.maximum(np.floor(x * np.float32(4.0)) / np.float32(4.0), np.float32(0.0))
    return torch.from_numpy(x.astype(np.float32))


def apply(op, params, x, weight=None, bias=None):
    if op == "linear":
        y = F.linear(x.flatten(1), weight, bias)
        return F.relu(y) if params[1] else y
    if op == "conv":
        _, _, stride, padding, groups, relu = params
        y = F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=groups)
        return F.relu(y) if relu else y
    if op == "maxpool":
        k, s, ceil = params
        return F.max_pool2d(x, k, s, ceil_mode=ceil)
    if op == "lrn":
        size, alpha, beta, k = params
        return torch.nn.LocalResponseNorm(size, alpha, beta, k)(x)
    if op == "adaptive":
        return F.adaptive_avg_pool2d(x, params)
    raise ValueError(op)


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tensors = {}
    for name, op, params, shape, bound, ties in CASES:
        x32 = case_input(name, shape, bound, ties)
        # Max-pool in f32 so that the gradient (a sum of w's) compares exactly; the others in f64.
        dtype = torch.float32 if op == "maxpool" else torch.float64
        x = x32.to(dtype).requires_grad_(True)
        params32 = layer_params(name, op, params, shape) if op in ("conv", "linear") else ()
        weights = [p.to(dtype).requires_grad_(True) for p in params32]
        y = apply(op, params, x, *weights)
        w = torch.from_numpy(det_values(f"{name}.w", y.numel(), 1.0).reshape(tuple(y.shape)))
        (y * w.to(dtype)).sum().backward()
        tensors[f"{name}.x"] = x32
        tensors[f"{name}.y"] = y.detach().float().contiguous()
        tensors[f"{name}.grad"] = x.grad.float().contiguous()
        for key, p32, p in zip(("weight", "bias"), params32, weights):
            tensors[f"{name}.{key}"] = p32
            tensors[f"{name}.grad_{key}"] = p.grad.float().contiguous()
        zeros = (x.grad == 0).float().mean().item()
        print(f"{name}: y {tuple(y.shape)}, |grad| max {x.grad.abs().max().item():.4g}, "
              f"{zeros:.0%} zero")
    save_file(tensors, OUT, metadata={"torch": torch.__version__})
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
