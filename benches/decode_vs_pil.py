#!/usr/bin/env python3
"""Decode + resize + crop per image on one core: the crate against PIL + torchvision.

    pip install torch torchvision pillow
    python3 benches/decode_vs_pil.py [--rounds 3] [DIR]

Without DIR it measures two sets, made in a temporary folder:
- `mixed`: the bundled photos (assets/) enlarged with Lanczos to 2, 3, 4 and 6 MP, JPEG quality 90:
  12 files of mixed size and aspect;
- `camera`: jpeg-decoder's own benchmark photo (`benches/large_image.jpg`, a 3.4 MP camera JPEG),
  found in cargo's registry once the crate has been built.

Per set it prints ms/image of torchvision's `Resize(256)`, `CenterCrop(224)`, `ToTensor`,
`Normalize` on `PIL.Image.open(f).convert("RGB")`; the same with PIL's `draft()` (its DCT-scaled
decode); and `cargo bench --bench decode`'s two modes: the crate's full decode and its default
DCT-scaled decode. Fastest of --rounds rounds. Each side runs one image at a time; the CPU time
counts every thread (the crate's fallback for progressive JPEGs, jpeg-decoder, runs its IDCT rows
on rayon's pool), so images/s per core is 1000 / CPU ms.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time

import torch
from PIL import Image
from torchvision import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = T.Compose([
    T.Resize(256), T.CenterCrop(224), T.ToTensor(),
    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])


def make_mixed(out):
    for name in ["chelsea.png", "coffee.png", "rocket.jpg"]:
        image = Image.open(os.path.join(ROOT, "assets", name)).convert("RGB")
        for mp in [2, 3, 4, 6]:
            k = (mp * 1e6 / (image.width * image.height)) ** 0.5
            big = image.resize((round(image.width * k), round(image.height * k)), Image.LANCZOS)
            big.save(os.path.join(out, f"{name.split('.')[0]}-{mp}mp.jpg"), quality=90)


def camera_photo():
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    found = sorted(glob.glob(f"{home}/registry/src/*/jpeg-decoder-0.3.*/benches/large_image.jpg"))
    return found[-1] if found else None


def pil_ms(files, rounds, draft):
    """Wall and CPU (all threads) milliseconds per image, fastest of `rounds`."""
    def load(f):
        image = Image.open(f)
        if draft:
            image.draft("RGB", (256, 256))
        return PIPELINE(image.convert("RGB"))
    wall = cpu = float("inf")
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for f in files:
            load(f)
        wall = min(wall, (time.perf_counter() - start) / len(files))
        cpu = min(cpu, (time.process_time() - start_cpu) / len(files))
    return wall * 1e3, cpu * 1e3


def crate_ms(folder, rounds):
    out = subprocess.run(
        ["cargo", "bench", "-q", "--bench", "decode", "--", folder, str(rounds)],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["mode"]: (row["ms_per_image"], row["cpu_ms_per_image"]) for row in rows}


def measure(name, folder, rounds):
    files = sorted(glob.glob(os.path.join(folder, "*.jpg")))
    mp = sum(w * h for w, h in (Image.open(f).size for f in files)) / len(files) / 1e6
    pil = pil_ms(files, rounds, draft=False)
    draft = pil_ms(files, rounds, draft=True)
    crate = crate_ms(folder, rounds)
    print(f"## {name}: {len(files)} JPEGs, {mp:.1f} MP on average")
    print("| path | wall ms/image | CPU ms/image | images/s per core (CPU) | vs PIL + torchvision (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for label, (ms, cpu) in [("PIL + torchvision", pil), ("PIL draft() + torchvision", draft),
                             ("candle-zoo, full decode", crate["full"]),
                             ("candle-zoo, DCT-scaled decode (default)", crate["dct-scaled"])]:
        print(f"| {label} | {ms:.2f} | {cpu:.2f} | {1e3 / cpu:.0f} | {pil[1] / cpu:.2f}x |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", nargs="?", help="a folder of .jpg files (default: the sets above)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    subprocess.run(["cargo", "bench", "--no-run", "-q", "--bench", "decode"], cwd=ROOT, check=True)
    if args.dir:
        measure(args.dir, args.dir, args.rounds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        mixed = os.path.join(tmp, "mixed")
        os.makedirs(mixed)
        make_mixed(mixed)
        measure("mixed (bundled photos enlarged to 2-6 MP)", mixed, args.rounds)
        photo = camera_photo()
        if photo:
            camera = os.path.join(tmp, "camera")
            os.makedirs(camera)
            shutil.copy(photo, camera)
            measure("camera (jpeg-decoder's large_image.jpg)", camera, max(args.rounds, 10))
        else:
            print("(jpeg-decoder's large_image.jpg not found in cargo's registry: camera set skipped)")


if __name__ == "__main__":
    main()
