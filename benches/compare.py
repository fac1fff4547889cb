#!/usr/bin/env python3
"""Model speed, candle-zoo against PyTorch on the CPU, same workloads, same machine, same run.

    pip install torch torchvision
    python3 benches/compare.py                        # every workload (issue #5)
    python3 benches/compare.py --quick                # fewer iterations
    python3 benches/compare.py --only infer-torchvision,train --quick
    python3 benches/compare.py --batches 1,8 --train-batch 16 --json results.json

Workloads (fresh weights, random inputs; speed does not depend on the values):
- infer-LAYOUT-bN: eval-mode logits of a batch of N (1, 16, 64); candle-zoo `model.forward`,
  PyTorch under `torch.inference_mode()`;
- train-LAYOUT-b32: one training step on a batch: forward with dropout, cross-entropy, backward,
  SGD with momentum 0.9 and weight decay 5e-4 (candle-zoo's `optim::Sgd`, `torch.optim.SGD`);
- sgemm-2048: one 2048x2048 by 2048x2048 f32 matmul (candle's matmul, i.e. the `gemm` crate;
  `torch.mm`), the yardstick of each side's FLOP rate.
LAYOUT is `torchvision` (torchvision's `alexnet()`, 224 px input) or `alexnet` (the original
two-tower model, 227 px: `TwoTower` below, after Caffe's bvlc_alexnet, as candle-zoo's
`Config::alexnet()`).

The candle-zoo side is `examples/speed.rs` (the criterion benches' workloads,
`benches/workloads.rs`), built here with `cargo build --release` (into `$CARGO_TARGET_DIR` if
set, else `target/`). Every workload of each side runs in its own process, alternating sides:
its peak memory is the child's peak resident set (`ru_maxrss` from `wait4`), nothing
subtracted: the interpreter and libraries are part of it. The "idle" line gives the resident set
of a process with the model built and nothing run yet. Both sides use their default threads.

Per workload: the median seconds per iteration after warm-up, as images/s, of the fastest of
`--rounds` runs per side (3 by default, the sides alternating which goes first: on a shared
machine other work only ever slows a run, and two single runs of the same binaries differed by
up to 15% here; every round is in `--json`); the ratio is candle-zoo's over PyTorch's; "% sgemm" is the FLOP rate reached (images/s x FLOPs per image:
2 x the multiply-adds of the convolutions and linear layers, counted from the shapes of the
PyTorch modules below; a training step is counted as 3x the forward pass) as a share of the same
side's measured sgemm rate. These are a direct convolution's FLOPs: candle-zoo's Winograd layers
(conv3-5) do about half of theirs, so its share can pass 100%.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ["torchvision", "alexnet"]
SIDE = {"torchvision": 224, "alexnet": 227}
MB = 1e6


# ---------------------------------------------------------------------------------------------
# PyTorch side (imported lazily: the parent process only needs torch for the FLOP count).

def two_tower():
    """The original AlexNet as Caffe's bvlc_alexnet: two towers (groups=2 on conv2, conv4,
    conv5), LRN after the ReLU of conv1 and conv2 and before pooling, ceil-mode 3x3/2 pooling,
    dropout after relu6 and relu7."""
    from torch import nn

    def lrn():
        return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)

    def pool():
        return nn.MaxPool2d(3, 2, ceil_mode=True)

    return nn.Sequential(
        nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(inplace=True), lrn(), pool(),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True), lrn(), pool(),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True), pool(),
        nn.Flatten(),
        nn.Linear(9216, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(4096, 1000),
    )


def torch_model(layout):
    import torchvision
    return torchvision.models.alexnet() if layout == "torchvision" else two_tower()


def forward_flops(layout):
    """FLOPs of one image's forward pass: 2 x multiply-adds of every conv and linear layer, from
    the output shapes of a forward pass of the PyTorch model at the layout's input size."""
    import torch
    from torch import nn
    model = torch_model(layout).eval()
    macs = []

    def hook(module, _inputs, out):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_output = module.in_channels // module.groups * kh * kw
            macs.append(out[0].numel() * per_output)
        elif isinstance(module, nn.Linear):
            macs.append(module.in_features * module.out_features)

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.inference_mode():
        model(torch.zeros(1, 3, SIDE[layout], SIDE[layout]))
    return 2 * sum(macs)


def status_mb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


def torch_step(layout, mode, batch, generator, device="cpu", precision="f32"):
    """PyTorch's iteration of a workload, as a function: eval-mode logits (`infer`) or a training
    step (`train`: forward with dropout, cross-entropy, backward, SGD with momentum 0.9 and
    weight decay 5e-4), on fresh weights and a random batch drawn from `generator`. `precision`
    "bf16" trains under `torch.autocast` in bfloat16 (f32 weights and updates), PyTorch's mixed
    precision."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = torch_model(layout).to(device)
    x = torch.randn(batch, 3, SIDE[layout], SIDE[layout], generator=generator).to(device)
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)
        return step
    model.train()
    y = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def torch_worker(spec):
    """Runs one workload in this process and prints one JSON line (as examples/speed.rs)."""
    import torch
    mode, layout, batch = spec["mode"], spec["layout"], spec["batch"]
    if mode == "import":
        import torchvision  # noqa: F401  (as every other workload)
        print(json.dumps({"side": "torch", "mode": mode, "rss_mb": status_mb("VmRSS:")}))
        return
    g = torch.Generator().manual_seed(5)
    if mode == "sgemm":
        n = spec["n"]
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)

        def step():
            torch.mm(a, b)
        per_iter = 2 * n ** 3 / 1e9
    else:
        step = torch_step(layout, mode, batch, g)
        per_iter = batch
    setup = status_mb("VmRSS:")
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["iters"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    unit = "gflops" if mode == "sgemm" else "images_per_s"
    print(json.dumps({
        "side": "torch", "layout": layout if mode != "sgemm" else "-", "mode": mode,
        "batch": batch if mode != "sgemm" else None, "n": spec.get("n"),
        "iters": len(times), "warmup": spec["warmup"], "median_s": median,
        "mean_s": statistics.mean(times), "min_s": min(times), unit: per_iter / median,
        "setup_rss_mb": setup, "peak_rss_mb": status_mb("VmHWM:"),
        "threads": torch.get_num_threads(), "version": torch.__version__,
    }))


# ---------------------------------------------------------------------------------------------
# Driver.

def run_child(cmd):
    """Runs `cmd`, returns (its JSON line, its peak RSS in MB from wait4's ru_maxrss)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        out = p.stdout.read()
        p.stdout.close()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err.read()}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        sys.exit(f"no JSON line from: {' '.join(cmd)}\n{out}")
    return json.loads(lines[-1]), usage.ru_maxrss * 1024 / MB


def iterations(mode, batch, quick):
    """(warmup, iters) per workload: a few seconds each on 2 cores at full size."""
    if mode == "sgemm":
        return (1, 3) if quick else (2, 10)
    if mode == "train":
        return (1, 2) if quick else (1, 5)
    if batch <= 1:
        return (2, 5) if quick else (3, 20)
    if batch <= 16:
        return (1, 3) if quick else (2, 10)
    return (1, 2) if quick else (1, 5)


def workloads(args):
    out = []
    for layout in args.layouts:
        for b in args.batches:
            out.append({"name": f"infer-{layout}-b{b}", "mode": "infer", "layout": layout,
                        "batch": b})
    for layout in args.layouts:
        out.append({"name": f"train-{layout}-b{args.train_batch}", "mode": "train",
                    "layout": layout, "batch": args.train_batch})
    if args.only:
        # A pattern matches a name that has each of its dash-separated parts: `b1` picks
        # infer-*-b1, not b16; `infer-alexnet` picks every alexnet inference batch.
        def matches(pattern, name):
            return set(pattern.split("-")) <= set(name.split("-"))
        out = [w for w in out if any(matches(p, w["name"]) for p in args.only)]
        if not out:
            sys.exit(f"no workload matches --only {','.join(args.only)}")
    if not args.no_sgemm:
        out.insert(0, {"name": f"sgemm-{args.n}", "mode": "sgemm", "layout": "torchvision",
                       "batch": 1, "n": args.n})
    for w in out:
        w.setdefault("n", None)
        warmup, iters = iterations(w["mode"], w["batch"], args.quick)
        w["warmup"] = args.warmup if args.warmup is not None else warmup
        w["iters"] = args.iters if args.iters is not None else iters
    return out


def csv_list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a rough figure)")
    ap.add_argument("--only", type=csv_list(str), default=[],
                    help="run the workloads whose name has every dash-separated part of one "
                         "of these, e.g. 'infer-alexnet,train-torchvision', 'b64' or 'train' "
                         "(sgemm always runs, see --no-sgemm)")
    ap.add_argument("--layouts", type=csv_list(str), default=LAYOUTS,
                    help="default: torchvision,alexnet")
    ap.add_argument("--batches", type=csv_list(int), default=[1, 16, 64],
                    help="inference batch sizes (default 1,16,64)")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=2048, help="sgemm matrix side")
    ap.add_argument("--no-sgemm", action="store_true",
                    help="skip the sgemm yardstick (no %% sgemm column)")
    ap.add_argument("--sides", type=csv_list(str), default=["candle", "torch"],
                    help="candle,torch (default both)")
    ap.add_argument("--iters", type=int, help="timed iterations of every workload")
    ap.add_argument("--warmup", type=int, help="untimed iterations of every workload")
    ap.add_argument("--rounds", type=int,
                    help="runs of every workload per side, alternating sides; the fastest "
                         "round counts (default 3, 1 with --quick)")
    ap.add_argument("--no-build", action="store_true", help="use the built examples/speed")
    ap.add_argument("--json", metavar="FILE", help="also write every raw result here")
    ap.add_argument("--torch-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        return torch_worker(json.loads(args.torch_worker))
    for layout in args.layouts:
        if layout not in LAYOUTS:
            ap.error(f"unknown layout {layout!r}; expected torchvision or alexnet")
    for side in args.sides:
        if side not in ("candle", "torch"):
            ap.error(f"unknown side {side!r}; expected candle or torch")

    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    todo = workloads(args)
    if not todo:
        ap.error("nothing to run")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    binary = os.path.join(target, "release", "examples", "speed")
    if "candle" in args.sides and not args.no_build:
        print("building examples/speed (release)...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "speed"],
                       cwd=ROOT, check=True)
    if "candle" in args.sides and not os.path.exists(binary):
        sys.exit(f"{binary} does not exist: build it (drop --no-build) or set CARGO_TARGET_DIR")

    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before starting ({os.cpu_count()} cores): "
              "other processes share the cores and slow both sides", file=sys.stderr)
    results = []
    for w in todo:
        runs = {side: [] for side in args.sides}
        for rnd in range(args.rounds):
            # Alternate which side goes first, so that neither always follows the other.
            for side in args.sides if rnd % 2 == 0 else args.sides[::-1]:
                if side == "candle":
                    cmd = [binary, "--mode", w["mode"], "--layout", w["layout"],
                           "--batch", str(w["batch"]), "--iters", str(w["iters"]),
                           "--warmup", str(w["warmup"])]
                    if w["n"]:
                        cmd += ["--n", str(w["n"])]
                else:
                    spec = {k: w[k] for k in ("mode", "layout", "batch", "n", "iters",
                                              "warmup")}
                    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker",
                           json.dumps(spec)]
                res, maxrss = run_child(cmd)
                res["ru_maxrss_mb"] = maxrss
                runs[side].append(res)
                rate = res.get("gflops", res.get("images_per_s"))
                print(f"{w['name']:<24} {side:<6} {rate:9.2f} "
                      f"{'GFLOP/s' if w['mode'] == 'sgemm' else 'img/s'}, "
                      f"median {res['median_s']:.4f} s of {res['iters']}, "
                      f"peak {maxrss:.0f} MB (round {rnd + 1}/{args.rounds})", file=sys.stderr)
        row = {"workload": w}
        for side, rs in runs.items():
            # The fastest round: interference from other work on the machine only slows a
            # run down. Peak memory: the largest of the rounds.
            best = dict(min(rs, key=lambda r: r["median_s"]))
            best["ru_maxrss_mb"] = max(r["ru_maxrss_mb"] for r in rs)
            best["rounds_median_s"] = [r["median_s"] for r in rs]
            row[side] = best
        results.append(row)

    loads = (load, os.getloadavg()[0])
    torch_import = None
    if "torch" in args.sides:
        spec = {"mode": "import", "layout": None, "batch": None}
        torch_import = run_child([sys.executable, os.path.abspath(__file__), "--torch-worker",
                                  json.dumps(spec)])[0]["rss_mb"]
    flops = {layout: forward_flops(layout) for layout in args.layouts}
    report(args, results, flops, loads, torch_import)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"forward_flops_per_image": flops, "results": results,
                       "load_average": loads, "torch_import_rss_mb": torch_import}, f,
                      indent=1)


def report(args, results, flops, loads, torch_import):
    import torch
    sgemm = {}
    for r in results:
        if r["workload"]["mode"] == "sgemm":
            sgemm = {s: r[s]["gflops"] * 1e9 for s in args.sides}

    def cell(x, fmt):
        return "-" if x is None else format(x, fmt)

    threads = {s: next((r[s]["threads"] for r in results if s in r), None) for s in args.sides}
    print(f"{os.cpu_count()} cores; candle-zoo threads {threads.get('candle', '-')}, "
          f"torch {torch.__version__} threads {threads.get('torch', '-')}; "
          f"{'--quick, ' if args.quick else ''}median of the timed iterations, fastest of "
          f"{args.rounds} round{'s' if args.rounds > 1 else ''} per side; "
          f"MB = 1e6 bytes, peak RSS of the workload's own process; "
          f"load average {loads[0]:.1f} before, {loads[1]:.1f} after")
    print("FLOPs per image (forward): "
          + ", ".join(f"{k} {v / 1e9:.3f} G" for k, v in flops.items())
          + "; a training step: 3x")
    print()
    print("| workload | candle img/s | torch img/s | ratio | candle peak MB | torch peak MB "
          "| candle % sgemm | torch % sgemm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        w = r["workload"]
        c, t = r.get("candle"), r.get("torch")
        if w["mode"] == "sgemm":
            key, name = "gflops", f"sgemm {w['n']}^3 (GFLOP/s)"
        else:
            key, name = "images_per_s", w["name"]
        cr, tr = (c or {}).get(key), (t or {}).get(key)
        ratio = cr / tr if cr and tr else None
        shares = []
        for side, rate in (("candle", cr), ("torch", tr)):
            if w["mode"] == "sgemm" or rate is None or side not in sgemm:
                shares.append("-" if w["mode"] != "sgemm" or rate is None else "100%")
                continue
            f = flops[w["layout"]] * (3 if w["mode"] == "train" else 1)
            shares.append(f"{100 * rate * f / sgemm[side]:.1f}%")
        print(f"| {name} | {cell(cr, '.2f')} | {cell(tr, '.2f')} | "
              f"{cell(ratio, '.2f')}{'x' if ratio else ''} | "
              f"{cell((c or {}).get('ru_maxrss_mb'), '.0f')} | "
              f"{cell((t or {}).get('ru_maxrss_mb'), '.0f')} | {shares[0]} | {shares[1]} |")
    # The resident set once the model is built, before anything runs: the smallest inference
    # batch of each layout (its input is the smallest; 0.6 MB at batch 1).
    idle = []
    for layout in args.layouts:
        rows = [r for r in results
                if r["workload"]["mode"] == "infer" and r["workload"]["layout"] == layout]
        if rows:
            r = min(rows, key=lambda r: r["workload"]["batch"])
            parts = [f"{s} {r[s]['setup_rss_mb']:.0f} MB" for s in args.sides
                     if r.get(s, {}).get("setup_rss_mb") is not None]
            idle.append(f"{layout} ({', '.join(parts)})")
    if torch_import is not None:
        idle.append(f"python + import torch, torchvision: {torch_import:.0f} MB")
    if idle:
        print()
        print("Idle RSS (model built, input of the smallest inference batch made, nothing run): "
              + "; ".join(idle))


if __name__ == "__main__":
    main()
