#!/usr/bin/env bash
# The CPU kernels' unit tests (everything under `layers::`: conv with its im2col, Winograd and
# backward, the AVX2 gemm kernels, linear, pooling, LRN) under valgrind's memcheck. Miri cannot
# follow the kernels' AVX2 intrinsics; valgrind runs the machine code itself, so an invalid read
# or write, a jump on uninitialised memory or a bad free makes this script fail. Leaks are not
# counted (rayon's and candle's caches live as long as the process).
#
#   bash scripts/valgrind_kernels.sh            # about 4 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
bin=$(cargo test --lib --no-run 2>&1 | sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "could not find the library's test binary" >&2; exit 1; }
RAYON_NUM_THREADS=2 valgrind --error-exitcode=99 --errors-for-leak-kinds=none -q \
    "$bin" layers:: --test-threads 1
