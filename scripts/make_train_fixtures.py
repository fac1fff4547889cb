#!/usr/bin/env python3
"""Writes the PyTorch reference for the training step-parity test: two SGD steps of two small
AlexNets, in `tests/fixtures/train_step.safetensors` and `tests/fixtures/train_step.json`.

Configs (models, deterministic weights and inputs come from scripts/make_fixtures.py):
- `tv`: torchvision layout, channels [8, 16, 24, 16, 16], hidden 32, 5 classes, input 2x3x79x79;
- `caffe`: two-tower BVLC "alexnet" layout (LRN before pool, groups=2 on conv2/4/5, ceil-mode
  pools), channels [8, 16, 24, 24, 16], hidden 32, 5 classes, input 2x3x227x227.
Initial weights: `det_state_dict`; input: `det_values("input", n, input_bound(layout))`;
labels [1, 3]; dropout off (eval mode; there is no batch norm); loss `F.cross_entropy` (mean).
Optimizer `torch.optim.SGD(momentum=0.9)` (dampening 0, no Nesterov), in float32:
- `tv`: lr 0.01, weight_decay 5e-4, except fc8 (`classifier.6.*`): lr 0.1, weight_decay 5e-4;
- `caffe` (Caffe's solver policy): weights lr 0.01, weight_decay 5e-4; biases lr 0.02, no decay.
Two steps on the same batch, so that the second uses the momentum buffer.

The safetensors file holds every parameter after each step, `<config>.step1.<key>` and
`<config>.step2.<key>` (float32; keys as in the checkpoints: `features.N.*` / `classifier.N.*`
for `tv`, `conv1.*`..`fc8.*` for `caffe`). The JSON holds the settings, each key's lr and
weight decay, the loss before each step, and the initial logits (a forward-only check).

    pip install torch torchvision numpy safetensors
    python3 scripts/make_train_fixtures.py   # rewrites tests/fixtures/train_step.{safetensors,json}
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import CaffeAlexNet, det_state_dict, det_values, input_bound, tv_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")

LABELS = [1, 3]
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
STEPS = 2

# name, layout, channels, hidden, classes, input (N, C, H, W)
CONFIGS = [
    ("tv", "torchvision", [8, 16, 24, 16, 16], 32, 5, (2, 3, 79, 79)),
    ("caffe", "alexnet", [8, 16, 24, 24, 16], 32, 5, (2, 3, 227, 227)),
]


def hyper(config: str, key: str):
    """(lr, weight_decay) of one parameter."""
    if config == "tv":
        return (LR * 10, WEIGHT_DECAY) if key.startswith("classifier.6.") else (LR, WEIGHT_DECAY)
    return (LR, WEIGHT_DECAY) if key.endswith(".weight") else (2 * LR, 0.0)


def build(config, layout, channels, hidden, classes):
    if layout == "torchvision":
        model = tv_model(channels, hidden, classes)
        forward = model
    else:
        model = CaffeAlexNet(channels, hidden, classes, caffenet=(layout == "caffenet"))

        def forward(x):
            return model.taps(x)["logits"]
    model.load_state_dict(det_state_dict(model))
    model.eval()  # dropout off
    return model, forward


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tensors = {}
    meta = {"torch": torch.__version__, "labels": LABELS, "steps": STEPS,
            "loss": "F.cross_entropy, mean over the batch",
            "optimizer": {"type": "torch.optim.SGD", "momentum": MOMENTUM, "dampening": 0.0,
                          "nesterov": False,
                          "update": "d = grad + weight_decay * p; buf = d at step 1, else "
                                    "momentum * buf + d; p -= lr * buf"},
            "dropout": 0.0, "configs": {}}
    for config, layout, channels, hidden, classes, (n, c, h, w) in CONFIGS:
        model, forward = build(config, layout, channels, hidden, classes)
        params = dict(model.named_parameters())
        groups = {}
        for key, p in params.items():
            groups.setdefault(hyper(config, key), []).append(p)
        opt = torch.optim.SGD([{"params": ps, "lr": lr, "weight_decay": wd}
                               for (lr, wd), ps in groups.items()], lr=LR, momentum=MOMENTUM)
        x = torch.from_numpy(det_values("input", n * c * h * w, input_bound(layout)).reshape(n, c, h, w))
        y = torch.tensor(LABELS)
        losses = []
        with torch.no_grad():
            initial_logits = forward(x)
        for step in range(1, STEPS + 1):
            opt.zero_grad()
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            for key, p in params.items():
                tensors[f"{config}.step{step}.{key}"] = p.detach().clone().contiguous()
        with torch.no_grad():
            loss_after = F.cross_entropy(forward(x), y).item()
        meta["configs"][config] = {
            "layout": layout, "channels": channels, "hidden": hidden, "classes": classes,
            "input": [n, c, h, w], "input_bound": input_bound(layout),
            "params": {key: {"lr": hyper(config, key)[0], "weight_decay": hyper(config, key)[1]}
                       for key in params},
            "losses": losses, "loss_after_last_step": loss_after,
            "initial_logits": initial_logits.tolist(),
        }
        print(f"{config}: losses {losses}, after {loss_after}")
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "train_step.safetensors")
    save_file(tensors, path, metadata={"torch": torch.__version__})
    with open(os.path.join(OUT, "train_step.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and train_step.json")


if __name__ == "__main__":
    main()
