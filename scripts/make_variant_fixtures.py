#!/usr/bin/env python3
"""Writes the PyTorch reference outputs of the architecture variants that `ablate` compares
(tests/fixtures/variants.safetensors), for `tests/ablate.rs` to check `Config`'s variants
against: tanh instead of ReLU, non-overlapping 2x2/2 pooling, LRN added to the torchvision
layout or removed from the Caffe ones.

    pip install torch torchvision safetensors
    python3 scripts/make_variant_fixtures.py

Weights and inputs come from the formula of make_fixtures.py (both sides compute them); the
file holds, per case, the logits and pool5 in full and a sample of conv2.
"""

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import SMALL, det_state_dict, det_values, input_bound, sample  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "variants.safetensors")


class Variant(nn.Module):
    """AlexNet in any layout with the variant's activation, pooling and LRN, under the layout's
    checkpoint keys."""

    def __init__(self, layout, activation, pooling, lrn, channels, hidden, classes):
        super().__init__()
        c, caffe = channels, layout != "torchvision"
        self.layout, self.lrn_on = layout, lrn
        self.act = torch.tanh if activation == "tanh" else F.relu
        if pooling == "overlapping":
            self.window, self.stride, self.ceil = 3, 2, caffe
        else:
            self.window, self.stride, self.ceil = 2, 2, False
        g = 2 if caffe else 1
        convs = [nn.Conv2d(3, c[0], 11, stride=4, padding=0 if caffe else 2),
                 nn.Conv2d(c[0], c[1], 5, padding=2, groups=g),
                 nn.Conv2d(c[1], c[2], 3, padding=1),
                 nn.Conv2d(c[2], c[3], 3, padding=1, groups=g),
                 nn.Conv2d(c[3], c[4], 3, padding=1, groups=g)]
        fcs = [nn.Linear(c[4] * 36, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)]
        if caffe:
            for i, m in enumerate(convs):
                setattr(self, f"conv{i + 1}", m)
            for i, m in enumerate(fcs):
                setattr(self, f"fc{i + 6}", m)
        else:
            self.features = nn.ModuleDict({str(i): m for i, m in zip([0, 3, 6, 8, 10], convs)})
            self.classifier = nn.ModuleDict({str(i): m for i, m in zip([1, 4, 6], fcs)})
        self.convs, self.fcs = convs, fcs
        self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    def pool(self, x):
        return F.max_pool2d(x, self.window, self.stride, ceil_mode=self.ceil)

    def norm_pool(self, x):
        if not self.lrn_on:
            return self.pool(x)
        if self.layout == "caffenet":
            return self.norm(self.pool(x))
        return self.pool(self.norm(x))

    def taps(self, x):
        t = {}
        h = self.act(self.convs[0](x))
        h = self.act(self.convs[1](self.norm_pool(h)))
        t["conv2"] = h
        h = self.act(self.convs[2](self.norm_pool(h)))
        h = self.act(self.convs[3](h))
        h = self.pool(self.act(self.convs[4](h)))
        if self.layout == "torchvision":
            h = F.adaptive_avg_pool2d(h, 6)
        t["pool5"] = h
        h = self.act(self.fcs[0](h.flatten(1)))
        h = self.act(self.fcs[1](h))
        t["logits"] = self.fcs[2](h)
        return t


# name, layout, activation, pooling, lrn, (batch, height, width)
CASES = [
    ("tv_tanh_nonoverlapping_lrn", "torchvision", "tanh", "non-overlapping", True, (2, 96, 80)),
    ("tv_lrn", "torchvision", "relu", "overlapping", True, (2, 96, 80)),
    ("alexnet_tanh_nonoverlapping", "alexnet", "tanh", "non-overlapping", True, (2, 227, 227)),
    ("caffenet_no_lrn_nonoverlapping", "caffenet", "relu", "non-overlapping", False, (2, 227, 227)),
]


def main():
    torch.set_grad_enabled(False)
    tensors = {}
    for name, layout, activation, pooling, lrn, (n, h, w) in CASES:
        model = Variant(layout, activation, pooling, lrn, *SMALL, 10)
        sd = det_state_dict(model)
        model.load_state_dict(sd)
        x = torch.from_numpy(
            det_values("input", n * 3 * h * w, input_bound(layout)).reshape(n, 3, h, w))
        taps = model.taps(x)
        tensors[f"{name}/logits"] = taps["logits"]
        tensors[f"{name}/pool5"] = taps["pool5"]
        tensors[f"{name}/conv2.sample"] = sample(taps["conv2"])
        print(f"{name}: keys {list(sd)[:2]}..., logits[0,:3] = {taps['logits'][0, :3].tolist()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT,
              metadata={"torch": torch.__version__})


if __name__ == "__main__":
    main()
