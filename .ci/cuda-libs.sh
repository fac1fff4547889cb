#!/usr/bin/env bash
# Installs (once, cached) the CUDA libraries a `--features cuda`/`cudnn`/`nccl` build links
# against (cuBLAS, cuRAND, NVRTC, cuDNN, NCCL: PyPI's CUDA 13 wheels, as the GPU machine has
# them) and a stub of the driver library, and prints the environment that links and loads them:
#
#   eval "$(bash .ci/cuda-toolchain.sh)" && eval "$(bash .ci/cuda-libs.sh)"
#   cargo test --features cudnn --lib layers::cudnn     # cuDNN's descriptors, no GPU needed
#
# The linker finds the libraries through LIBRARY_PATH (not RUSTFLAGS, which would rebuild every
# crate), the binaries through LD_LIBRARY_PATH. Without a GPU, only what needs no device runs.
set -euo pipefail
LIBS="${CANDLE_ZOO_CUDA_LIBS:-$HOME/.cache/candle-zoo/cuda-libs-13}"
if [ ! -d "$LIBS/nvidia" ]; then
    rm -rf "$LIBS.partial"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --no-deps --target "$LIBS.partial" nvidia-cublas nvidia-curand nvidia-cuda-nvrtc \
        nvidia-cudnn-cu13 nvidia-nccl-cu13 >&2
    mv "$LIBS.partial" "$LIBS"
fi
dirs=""
for lib in "$LIBS"/nvidia/*/lib; do
    [ -d "$lib" ] || continue
    # Unversioned names for the linker, beside the wheels' versioned files.
    for so in "$lib"/*.so.*; do
        [ -e "$so" ] || continue
        base="${so%%.so.*}.so"
        [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
    done
    dirs="$dirs:$lib"
done
# The driver library (libcuda) comes with the GPU's driver, not with a wheel: link against a stub
# with its soname and the driver API's symbols (as NVIDIA's toolkit stubs do); a GPU machine's
# driver provides the real one at run time.
if [ ! -e "$LIBS/stubs/libcuda.so" ]; then
    mkdir -p "$LIBS/stubs"
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | sort -u |
        sed 's/^pub unsafe fn \(.*\)/void \1(void) {}/' > "$LIBS/stubs/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LIBS/stubs/libcuda.so" "$LIBS/stubs/cuda_stub.c"
    ln -sf libcuda.so "$LIBS/stubs/libcuda.so.1"
fi
# The CUDA runtime (libcudart) of the compiler's toolchain, when cuda-toolchain.sh set it up.
if [ -n "${CUDA_ROOT:-}" ] && [ -d "$CUDA_ROOT/lib" ]; then
    dirs="$dirs:$CUDA_ROOT/lib"
fi
dirs="${dirs#:}"
echo "export LIBRARY_PATH='$dirs:$LIBS/stubs'\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
echo "export LD_LIBRARY_PATH='$dirs'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
# The stub only where no driver is installed: a GPU machine's real libcuda must win.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1'; then
    echo "export LD_LIBRARY_PATH=\"\$LD_LIBRARY_PATH:$LIBS/stubs\""
fi
