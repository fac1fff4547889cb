#!/usr/bin/env python3
"""End-to-end feature extraction, candle-zoo's `extract-fc7` against PyTorch doing the same job,
on the same machine in the same run.

    pip install torch torchvision pillow numpy
    python3 benches/extract_vs_pytorch.py            # 500 JPEGs, batch 64
    python3 benches/extract_vs_pytorch.py --images 1000 --batch-size 32 --repeat 3
    python3 benches/extract_vs_pytorch.py --device cuda --binary PATH/extract-fc7   # on a GPU

Both sides start from the same JPEG files and write the same [N, 4096] fc7 matrix:
- candle-zoo: `target/release/examples/extract-fc7 --weights W --out F.safetensors DIR`, decoding
  on worker threads while the model runs;
- PyTorch: PIL decode, torchvision `Resize(256)`, `CenterCrop(224)`, `ToTensor`, `Normalize`, a
  `DataLoader` with worker processes, `torch.inference_mode()`, fc7 after ReLU, `np.save`.
Each timing is the wall clock of the whole job (start-up, model load, decoding, model, writing);
the best of `--repeat` runs is reported. The images are realistic JPEGs of mixed sizes made from
the bundled photos (random crops, scales from 200 to 900 px on the shorter side, aspect ratios
from 0.6 to 1.7, flips, quality 70 to 95), seeded. The weights are torchvision's AlexNet
structure with seeded random values (no pretrained file is reachable offline; speed does not
depend on the values). The rows of both sides are compared as a check (cosine similarity).
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg"]


def make_jpegs(folder, n, seed=0):
    rng = random.Random(seed)
    sources = [Image.open(os.path.join(ROOT, "assets", p)).convert("RGB") for p in PHOTOS]
    sizes = []
    for i in range(n):
        im = sources[i % len(sources)]
        w, h = im.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        im2 = im.crop((x, y, x + cw, y + ch))
        short = rng.randint(200, 900)
        aspect = rng.uniform(0.6, 1.7)
        size = (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))
        im2 = im2.resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            im2 = im2.transpose(Image.FLIP_LEFT_RIGHT)
        im2.save(os.path.join(folder, f"img{i:05d}.jpg"), quality=rng.randint(70, 95))
        sizes.append(size)
    return sizes


class Files(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths
        self.tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.tf(Image.open(self.paths[i]).convert("RGB"))


def run_pytorch(weights_sd, paths, out, batch_size, workers, device):
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.alexnet()
    model.load_state_dict(weights_sd)
    model.eval().to(device)
    loader = torch.utils.data.DataLoader(Files(paths), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=device != "cpu")
    rows = []
    with torch.inference_mode():
        for x in loader:
            x = x.to(device, non_blocking=True)
            h = model.avgpool(model.features(x)).flatten(1)
            rows.append(model.classifier[:6](h).cpu().numpy())
    feats = np.concatenate(rows)
    np.save(out, feats)
    return time.perf_counter() - start, feats


def run_candle(binary, weights, folder, out, batch_size, device):
    if os.path.exists(out):
        os.remove(out)
    start = time.perf_counter()
    subprocess.run([binary, "--weights", weights, "--device", device, "--out", out,
                    "--batch-size", str(batch_size), folder], check=True,
                   stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    from safetensors.numpy import load_file
    return elapsed, load_file(out)["features"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="PyTorch DataLoader workers (extract-fc7 uses the cores by default)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--binary", help="a built extract-fc7 (default: cargo build --release here)")
    args = ap.parse_args()

    binary = args.binary
    if binary is None:
        print("building extract-fc7 (release)...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "extract-fc7"],
                       cwd=ROOT, check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        binary = os.path.join(target, "release", "examples", "extract-fc7")

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "jpegs")
        os.makedirs(folder)
        sizes = make_jpegs(folder, args.images)
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
        torch.manual_seed(0)
        sd = torchvision.models.alexnet().state_dict()
        from safetensors.torch import save_file
        weights = os.path.join(tmp, "alexnet.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, weights)

        candle_times, torch_times = [], []
        for _ in range(args.repeat):
            t, ours = run_candle(binary, weights, folder, os.path.join(tmp, "f.safetensors"),
                                 args.batch_size, args.device)
            candle_times.append(t)
            t, theirs = run_pytorch(sd, paths, os.path.join(tmp, "f.npy"), args.batch_size,
                                    args.workers, args.device)
            torch_times.append(t)

        cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
                                        + 1e-12)
        n = args.images
        c, p = n / min(candle_times), n / min(torch_times)
        mp = np.mean([w * h for w, h in sizes]) / 1e6
        print(f"{n} JPEGs ({mp:.2f} MP on average), batch {args.batch_size}, on {args.device}, "
              f"{os.cpu_count()} cores, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads, {args.workers} DataLoader workers)")
        print(f"| job | candle-zoo img/s | PyTorch img/s | ratio |")
        print(f"|---|---|---|---|")
        print(f"| JPEG -> fc7, end to end | {c:.1f} | {p:.1f} | {c / p:.2f}x |")
        print(f"fc7 rows: cosine with PyTorch's min {cos.min():.5f}, mean {cos.mean():.6f}")
        print(f"times (s): candle-zoo {[round(t, 2) for t in candle_times]}, "
              f"PyTorch {[round(t, 2) for t in torch_times]}")


if __name__ == "__main__":
    main()
