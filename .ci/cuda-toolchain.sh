#!/usr/bin/env bash
# Installs (once, cached) the CUDA compiler that candle 0.11.1 builds with, from PyPI, and prints the
# environment a `--features cuda` build needs. No GPU is needed: this is for compiling only.
#
#   eval "$(bash .ci/cuda-toolchain.sh)" && cargo check --features cuda
#
# nvcc 13.0.88 is the newest release cudarc (through candle 0.11.1) accepts; 13.5 is rejected.
set -euo pipefail
CUDA_DIR="${CANDLE_ZOO_CUDA_DIR:-$HOME/.cache/candle-zoo/cuda-13.0.88}"
PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-nvvm==13.0.88
)
if [ ! -x "$CUDA_DIR/nvidia/cu13/bin/nvcc" ]; then
    rm -rf "$CUDA_DIR.partial"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
        --target "$CUDA_DIR.partial" "${PACKAGES[@]}" >&2
    rm -rf "$CUDA_DIR"
    mv "$CUDA_DIR.partial" "$CUDA_DIR"
fi
ROOT="$CUDA_DIR/nvidia/cu13"
"$ROOT/bin/nvcc" --version >&2
echo "export CUDA_ROOT='$ROOT'"
echo "export PATH='$ROOT/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
