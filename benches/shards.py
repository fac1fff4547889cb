#!/usr/bin/env python3
"""What `extract-fc7 --shard K/N` costs: N shard processes plus `merge-features` against one
process over the same JPEGs, on the same machine in the same run.

    pip install torch torchvision pillow numpy safetensors
    python3 benches/shards.py                 # 400 JPEGs, 2 shards, best of 2
    python3 benches/shards.py --images 1000 --shards 2 --repeat 3

One process uses every core (decoding threads and the model's threads); each of the N shards gets
cores / N of both (`--workers`, `RAYON_NUM_THREADS`), as N processes sharing one machine would be
given. The shards run at once; their time is the wall clock from the first start to the last
exit, plus the merge. The merged file must equal the single run's byte for byte. The JPEGs and
weights are those of `benches/extract_vs_pytorch.py` (mixed sizes made from the bundled photos;
torchvision's structure with seeded random values).
"""

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time

import torch
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from extract_vs_pytorch import make_jpegs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    per_shard = max(1, cores // args.shards)

    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "extract-fc7",
                    "--example", "merge-features"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    binary = lambda name: os.path.join(target, "release", "examples", name)  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "jpegs")
        os.makedirs(folder)
        make_jpegs(folder, args.images)
        torch.manual_seed(0)
        sd = torchvision.models.alexnet().state_dict()
        weights = os.path.join(tmp, "alexnet.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, weights)

        def extract(out, extra, env=None):
            return subprocess.Popen(
                [binary("extract-fc7"), "--weights", weights, "--device", "cpu", "--out", out,
                 "--batch-size", str(args.batch_size), "--force", *extra, folder],
                env=env, stderr=subprocess.DEVNULL)

        one_times, shard_times, merge_times = [], [], []
        for _ in range(args.repeat):
            one = os.path.join(tmp, "one.safetensors")
            start = time.perf_counter()
            assert extract(one, []).wait() == 0
            one_times.append(time.perf_counter() - start)

            env = dict(os.environ, RAYON_NUM_THREADS=str(per_shard))
            outs = [os.path.join(tmp, f"shard{k}.safetensors") for k in range(args.shards)]
            start = time.perf_counter()
            procs = [extract(out, ["--shard", f"{k}/{args.shards}", "--workers", str(per_shard)],
                             env) for k, out in enumerate(outs)]
            assert all(p.wait() == 0 for p in procs)
            shard_times.append(time.perf_counter() - start)

            merged = os.path.join(tmp, "merged.safetensors")
            if os.path.exists(merged):
                os.remove(merged)
            start = time.perf_counter()
            subprocess.run([binary("merge-features"), "--out", merged, *outs], check=True,
                           stderr=subprocess.DEVNULL)
            merge_times.append(time.perf_counter() - start)
            assert filecmp.cmp(one, merged, shallow=False), "merged bytes differ from one run's"

        one, shards, merge = min(one_times), min(shard_times), min(merge_times)
        n = args.images
        print(f"{n} JPEGs, batch {args.batch_size}, {cores} cores; best of {args.repeat}")
        print("| run | seconds | images/s | vs one process |")
        print("|---|---:|---:|---:|")
        print(f"| 1 process, {cores} threads | {one:.2f} | {n / one:.1f} | 1.00x |")
        print(f"| {args.shards} shards x {per_shard} threads, at once | {shards:.2f} | "
              f"{n / shards:.1f} | {one / shards:.2f}x |")
        print(f"| + merge-features | {merge:.2f} | | |")
        print(f"| shards + merge | {shards + merge:.2f} | {n / (shards + merge):.1f} | "
              f"{one / (shards + merge):.2f}x |")
        print("merged file identical to the single run's: yes")


if __name__ == "__main__":
    main()
