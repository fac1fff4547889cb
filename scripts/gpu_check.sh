#!/usr/bin/env bash
# Every GPU check and benchmark of issue 18 in one run, for the GPU machine the `device` tool lends
# (one H200; torch, cuDNN and the CUDA libraries as PyPI wheels; no cargo). Two stages:
#
#   bash scripts/gpu_check.sh --build     # here: release binaries (cudnn, nccl) into gpu-bin.tar.xz
#   bash scripts/gpu_check.sh             # there (carry gpu-bin.tar.xz): checks and benchmarks into $OUT
#
# The run takes about 8 minutes: the device tests (forward and taps of all three layouts against
# the CPU, a training step's gradients and SGD steps, TF32, a bf16 step), `benches/gpu_vs_pytorch.py`
# (inference at batch 1, 64 and 256, a training step at 128 and 256 in f32 and 256 in bf16, both
# layouts, peak GPU memory, PyTorch eager with cudnn.benchmark), `benches/extract_vs_pytorch.py
# --device cuda` (JPEG -> fc7), the NCCL engine's all-reduce of AlexNet's gradients at world
# size 1 (`benches/allreduce.rs`), and `--precision bf16`'s accuracy cost (a short Fashion-MNIST
# run in f32 and in bf16). Each step's
# output goes to $OUT/<step>.txt; a failed step does not stop the others.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${GPU_BIN:-gpu-bin}"
FEATURES="${GPU_FEATURES:-cudnn,nccl}"

if [ "${1:-}" = "--build" ]; then
    set -e
    eval "$(bash .ci/cuda-toolchain.sh)"
    # The libraries a dynamically linked CUDA build links against, as the GPU machine has them,
    # and a stub of the driver's.
    eval "$(bash .ci/cuda-libs.sh)"
    export CARGO_TARGET_DIR="${CANDLE_ZOO_CUDA_TARGET:-$HOME/.cache/candle-zoo/target-cuda}"
    cargo build --release --features "$FEATURES" --example speed --example extract-fc7 --example train
    bench=$(cargo bench --features "$FEATURES" --bench allreduce --no-run 2>&1 |
        sed -n 's/.*Executable.*(\(.*\))$/\1/p' | tail -1)
    tests=$(cargo test --release --features "$FEATURES" --test devices --no-run 2>&1 |
        sed -n 's/.*Executable.*(\(.*\))$/\1/p' | tail -1)
    mkdir -p "$BIN"
    cp "$tests" "$BIN/devices"
    cp "$bench" "$BIN/allreduce"
    cp "$CARGO_TARGET_DIR/release/examples/speed" "$CARGO_TARGET_DIR/release/examples/extract-fc7" \
        "$CARGO_TARGET_DIR/release/examples/train" "$BIN/"
    strip "$BIN"/*
    # Fashion-MNIST (Debian's dataset-fashion-mnist, MIT) for the bf16 accuracy check: 500
    # training and 100 validation images per class.
    if [ ! -d /usr/share/datasets/fashion-mnist ]; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get install -y dataset-fashion-mnist >/dev/null
    fi
    rm -rf "$BIN/fmnist"
    python3 scripts/fashion_mnist_folder.py "$BIN/fmnist" --train-per-class 500 --val-per-class 100
    du -sh "$BIN"/*
    # 200 MB of binaries, mostly embedded PTX text: 25 MB compressed, under the device tool's
    # 64 MiB carry limit.
    tar -cJf "$BIN.tar.xz" "$BIN"
    du -sh "$BIN.tar.xz"
    exit 0
fi

OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
if [ ! -d "$BIN" ] && [ -e "$BIN.tar.xz" ]; then
    tar -xJf "$BIN.tar.xz"
fi
# The CUDA, cuDNN and cuBLAS libraries of the machine's PyPI wheels.
LD_LIBRARY_PATH="$(python3 - <<'EOF'
import glob, os, site
dirs = []
for root in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
print(":".join(dirs))
EOF
):${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH

step() {
    local name="$1"; shift
    echo "== $name: $*"
    local start=$SECONDS
    if "$@" >"$OUT/$name.txt" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED ($((SECONDS - start)) s); tail of $OUT/$name.txt:"
        tail -20 "$OUT/$name.txt"
    fi
}

step machine bash -c 'nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.backends.cudnn.version())"'
step devices "$BIN/devices" --nocapture --test-threads 1
step models timeout 300 python3 benches/gpu_vs_pytorch.py --speed "$BIN/speed" --json "$OUT/models.json"
step extract timeout 180 python3 benches/extract_vs_pytorch.py --device cuda --binary "$BIN/extract-fc7" \
    --images 2000 --batch-size 256 --workers 16 --repeat 2
# NCCL at world size 1: the data-parallel engine's cost per step on one GPU (issue 23).
step nccl env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
    "$BIN/allreduce" 20 nccl cuda
# --precision bf16's accuracy cost: the same seeded run in f32 and in bf16 (torchvision layout at
# 64 px, Fashion-MNIST 5000/1000, 6 epochs); metrics.csv of each, last rows compared.
for precision in f32 bf16; do
    step "train-$precision" timeout 120 "$BIN/train" --data "$BIN/fmnist" --out "$OUT/train-$precision" \
        --device cuda --input-size 64 --lr 0.003 --epochs 6 --batch-size 128 --seed 1 \
        --workers 16 --precision "$precision"
done
step accuracy bash -c "tail -n 3 '$OUT/train-f32/metrics.csv' '$OUT/train-bf16/metrics.csv'"
echo "figures in $OUT: $(ls "$OUT" | tr '\n' ' ')"
