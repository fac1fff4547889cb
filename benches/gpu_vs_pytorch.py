#!/usr/bin/env python3
"""Model speed on a GPU, candle-zoo against PyTorch, same workloads, same GPU, same run.

    python3 benches/gpu_vs_pytorch.py --speed PATH/speed [--device cuda] [--quick] [--json F]

Workloads (fresh weights, random inputs): eval-mode logits at batch 1, 64 and 256, and a
training step (forward with dropout, cross-entropy, backward, SGD with momentum 0.9 and weight
decay 5e-4) at batch 128 and 256, for torchvision's layout (224 px) and the two-tower model
(227 px, `compare.py`'s `two_tower`), and the training step at batch 256 in mixed precision
(`--precision bf16`; PyTorch under `torch.autocast` in bfloat16). PyTorch runs eager, f32 (its
default TF32 convolutions, as candle-zoo's), `cudnn.benchmark = True`, in this process; candle-zoo is `examples/speed.rs --device cuda`, built elsewhere (the GPU machine has no
cargo), one process per workload. Both sides synchronise the GPU after every iteration and report
the median over the timed iterations after warm-up. Peak GPU memory: PyTorch's
`max_memory_allocated` (its caching allocator holds more) and, for candle-zoo, the largest
`used_memory` that `nvidia-smi` reports for its process while it runs (sampled every 20 ms).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import torch_step  # noqa: E402

INFER = [1, 64, 256]
TRAIN = [128, 256]


def torch_run(layout, mode, batch, iters, warmup, device, precision):
    torch.cuda.reset_peak_memory_stats()
    step = torch_step(layout, mode, batch, torch.Generator().manual_seed(5), device, precision)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 1e6
    del step
    torch.cuda.empty_cache()
    return {"median_s": median, "images_per_s": batch / median, "peak_gpu_mb": peak}


def gpu_used_mb(pid):
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        p, mb = [c.strip() for c in line.split(",")]
        if p == str(pid):
            return float(mb) * 1.048576  # MiB -> MB
    return 0.0


def candle_run(speed, layout, mode, batch, iters, warmup, device, precision):
    cmd = [speed, "--device", device, "--layout", layout, "--mode", mode, "--batch", str(batch),
           "--iters", str(iters), "--warmup", str(warmup), "--precision", precision]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], gpu_used_mb(child.pid))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"}
    line = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    return {"median_s": line["median_s"], "images_per_s": line["images_per_s"],
            "peak_gpu_mb": peak[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speed", required=True, help="examples/speed built with --features cuda")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    iters, warmup = (5, 2) if args.quick else (20, 5)
    rows = []
    for layout in ["torchvision", "alexnet"]:
        for mode, batches, precision in [("infer", INFER, "f32"), ("train", TRAIN, "f32"),
                                         ("train", [256], "bf16")]:
            for batch in batches:
                run = (layout, mode, batch, iters, warmup, args.device, precision)
                ours = candle_run(args.speed, *run)
                theirs = torch_run(*run)
                rows.append({"layout": layout, "mode": mode, "batch": batch,
                             "precision": precision, "candle": ours, "torch": theirs})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}, f32, eager, cudnn.benchmark")
    print("| workload | candle-zoo img/s | PyTorch img/s | ratio | candle-zoo peak MB | PyTorch peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        c, t = r["candle"], r["torch"]
        name = f"{r['mode']} {r['layout']} b{r['batch']}"
        if r["precision"] != "f32":
            name += f" {r['precision']}"
        if "error" in c:
            print(f"| {name} | error: {c['error']} | {t['images_per_s']:.0f} | | | {t['peak_gpu_mb']:.0f} |")
            continue
        print(f"| {name} | {c['images_per_s']:.0f} | {t['images_per_s']:.0f} | "
              f"{c['images_per_s'] / t['images_per_s']:.2f}x | {c['peak_gpu_mb']:.0f} | "
              f"{t['peak_gpu_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
