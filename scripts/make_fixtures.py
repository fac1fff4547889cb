#!/usr/bin/env python3
"""Writes the PyTorch reference fixtures that `tests/parity.rs` checks candle-zoo against.

Weights and inputs are not stored: both sides compute them from a formula (a hash of the element
index, seeded by the tensor's name, see `det_values`), so only small samples of each output are
committed. Every tap of `AlexNet::extract` and the logits are recorded for the torchvision layout
(torchvision's own `alexnet()`, plus a small model of the same structure) and for the two-tower
AlexNet and CaffeNet layouts (written here in PyTorch after Caffe's prototxt).

    pip install torch torchvision safetensors
    python3 scripts/make_fixtures.py   # rewrites tests/fixtures/{parity.json,parity.safetensors,*.pth}
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures")
SAMPLES = 2048  # values kept per tap (all of them when a tap is smaller than 2 * SAMPLES)

TAPS = ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "logits"]
TV_KEYS = ["features.0", "features.3", "features.6", "features.8", "features.10",
           "classifier.1", "classifier.4", "classifier.6"]
CAFFE_KEYS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]


def fnv1a32(name: str) -> int:
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def det_values(name: str, n: int, bound: float) -> np.ndarray:
    """n float32 values in [-bound, bound), a pure function of (name, index).

    Mirrors `det_values` in tests/common/mod.rs: integer hashing, then float64 arithmetic in the
    same order, then one rounding to float32, so both sides get bit-identical values.
    """
    s = fnv1a32(name)
    h = (np.arange(n, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(s)) & np.uint64(0xFFFFFFFF)
    for _ in range(2):
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x45D9F3B)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    v = (h.astype(np.float64) / 4294967296.0 * 2.0 - 1.0) * bound
    return v.astype(np.float32)


def det_state_dict(model: nn.Module) -> dict:
    """Weights bounded by sqrt(6 / fan_in) (He-uniform, so activations keep their scale) and
    biases by 0.1, each from det_values seeded by its key."""
    sd = {}
    for key, p in model.state_dict().items():
        if key.endswith(".weight"):
            fan_in = int(np.prod(p.shape[1:]))
            bound = math.sqrt(6.0 / fan_in)
        else:
            bound = 0.1
        sd[key] = torch.from_numpy(det_values(key, p.numel(), bound).reshape(tuple(p.shape)))
    return sd


def tv_model(channels, hidden, classes) -> nn.Module:
    """torchvision's AlexNet structure with other widths (same module indices, same keys)."""
    c = channels
    m = torchvision.models.AlexNet(num_classes=classes)
    m.features = nn.Sequential(
        nn.Conv2d(3, c[0], 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )
    m.classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(c[4] * 36, hidden), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, classes),
    )
    return m


def tv_taps(m: nn.Module, x: torch.Tensor) -> dict:
    taps = {}
    hooks = {"conv1": m.features[1], "conv2": m.features[4], "conv3": m.features[7],
             "conv4": m.features[9], "conv5": m.features[11], "pool5": m.avgpool,
             "fc6": m.classifier[2], "fc7": m.classifier[5], "logits": m.classifier[6]}
    handles = [mod.register_forward_hook(lambda _m, _i, out, k=k: taps.__setitem__(k, out.clone()))
               for k, mod in hooks.items()]
    m(x)
    for h in handles:
        h.remove()
    return taps


class CaffeAlexNet(nn.Module):
    """BVLC AlexNet / CaffeNet as in Caffe's deploy.prototxt: two towers as groups=2, LRN
    (size 5, alpha 1e-4, beta 0.75, k 1), Caffe's ceil-mode 3x3/2 pooling."""

    def __init__(self, channels, hidden, classes, caffenet: bool):
        super().__init__()
        c = channels
        self.caffenet = caffenet
        self.conv1 = nn.Conv2d(3, c[0], 11, stride=4)
        self.conv2 = nn.Conv2d(c[0], c[1], 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.conv4 = nn.Conv2d(c[2], c[3], 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(c[3], c[4], 3, padding=1, groups=2)
        self.fc6 = nn.Linear(c[4] * 36, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, classes)
        self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    def pool(self, x):
        return F.max_pool2d(x, 3, 2, ceil_mode=True)

    def norm_pool(self, x):
        return self.lrn(self.pool(x)) if self.caffenet else self.pool(self.lrn(x))

    def taps(self, x):
        t = {}
        t["conv1"] = F.relu(self.conv1(x))
        t["conv2"] = F.relu(self.conv2(self.norm_pool(t["conv1"])))
        t["conv3"] = F.relu(self.conv3(self.norm_pool(t["conv2"])))
        t["conv4"] = F.relu(self.conv4(t["conv3"]))
        t["conv5"] = F.relu(self.conv5(t["conv4"]))
        t["pool5"] = self.pool(t["conv5"])
        t["fc6"] = F.relu(self.fc6(t["pool5"].flatten(1)))
        t["fc7"] = F.relu(self.fc7(t["fc6"]))
        t["logits"] = self.fc8(t["fc7"])
        return t


FULL_TV = ([64, 192, 384, 256, 256], 4096)
FULL_CAFFE = ([96, 256, 384, 384, 256], 4096)
SMALL = ([8, 16, 24, 16, 16], 32)

# name, layout, (channels, hidden), classes, (batch, height, width)
CASES = [
    ("tv_full_224", "torchvision", FULL_TV, 1000, (2, 224, 224)),
    ("tv_full_193x257", "torchvision", FULL_TV, 1000, (2, 193, 257)),
    ("tv_small_96x80", "torchvision", SMALL, 10, (3, 96, 80)),
    ("alexnet_full_227", "alexnet", FULL_CAFFE, 1000, (2, 227, 227)),
    ("alexnet_full_224", "alexnet", FULL_CAFFE, 1000, (2, 224, 224)),
    ("caffenet_full_227", "caffenet", FULL_CAFFE, 1000, (2, 227, 227)),
    ("alexnet_small_227", "alexnet", SMALL, 10, (3, 227, 227)),
    ("caffenet_small_211x229", "caffenet", SMALL, 10, (3, 211, 229)),
]


def input_bound(layout):
    # torchvision inputs are normalised (about unit scale); Caffe's are 0..255 minus the mean,
    # large enough that LRN changes the result noticeably.
    return 1.0 if layout == "torchvision" else 128.0


def sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    if flat.numel() < 2 * SAMPLES:
        return flat.clone()
    stride = flat.numel() // SAMPLES
    return flat[::stride][:SAMPLES].clone()


def stats(t: torch.Tensor) -> torch.Tensor:
    d = t.detach().double()
    return torch.tensor([d.abs().sum().item(), d.norm().item()], dtype=torch.float64)


def main():
    torch.set_grad_enabled(False)
    tensors, meta = {}, {"samples": SAMPLES, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "cases": []}
    for name, layout, (channels, hidden), classes, (n, h, w) in CASES:
        if layout == "torchvision":
            if (channels, hidden) == FULL_TV and classes == 1000:
                model = torchvision.models.alexnet()  # the real thing: proves the key names
            else:
                model = tv_model(channels, hidden, classes)
            assert [k.rsplit(".", 1)[0] for k in model.state_dict()][::2] == TV_KEYS
        else:
            model = CaffeAlexNet(channels, hidden, classes, caffenet=(layout == "caffenet"))
            assert [k.rsplit(".", 1)[0] for k in model.state_dict()][::2] == CAFFE_KEYS
        model.load_state_dict(det_state_dict(model))
        model.eval()
        x = torch.from_numpy(det_values("input", n * 3 * h * w, input_bound(layout)).reshape(n, 3, h, w))
        taps = tv_taps(model, x) if layout == "torchvision" else model.taps(x)
        tensors[f"{name}/input.sample"] = sample(x)
        for tap in TAPS:
            tensors[f"{name}/{tap}.sample"] = sample(taps[tap])
            tensors[f"{name}/{tap}.stats"] = stats(taps[tap])
        meta["cases"].append({"name": name, "layout": layout, "channels": channels, "hidden": hidden,
                              "classes": classes, "input": [n, 3, h, w],
                              "input_bound": input_bound(layout),
                              "shapes": {k: list(taps[k].shape) for k in TAPS}})
        print(f"{name}: logits[0,:3] = {taps['logits'][0, :3].tolist()}")
    # torchvision's own preprocessing of the bundled photos (PIL open, Resize(256), CenterCrop(224),
    # ToTensor, Normalize), to check candle-zoo's pipeline against.
    from PIL import Image
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    for photo in ["chelsea.png", "coffee.png"]:
        x = tf(Image.open(os.path.join(ROOT, "assets", photo)).convert("RGB"))
        tensors[f"preprocess/{photo}.sample"] = sample(x)
        tensors[f"preprocess/{photo}.stats"] = stats(x)
    os.makedirs(OUT, exist_ok=True)
    # A PyTorch checkpoint as torchvision ships them (a zip-format state_dict), small, and one in
    # the legacy pre-1.6 format that candle cannot read, for the error test.
    small = tv_model(*SMALL, 10)
    small.load_state_dict(det_state_dict(small))
    torch.save(small.state_dict(), os.path.join(OUT, "tv_small.pth"))
    torch.save({"x": torch.zeros(1)}, os.path.join(OUT, "legacy.pth"), _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "parity.safetensors"))
    with open(os.path.join(OUT, "parity.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
