#!/usr/bin/env bash
# Build megablocks 0.10.0 (with grouped-gemm 0.3.0 and stanford-stk 0.7.1) from sdists on a Hopper GPU
# machine with no network, against the torch that is already installed there.
#
#   scripts/build_megablocks.sh [SDIST_DIR=.sdist] [TARGET=.gpu_build/site]
#   export PYTHONPATH=$PWD/.gpu_build/site:$PYTHONPATH
#
# One source fix is needed for CUDA 13: its CUB dropped the `debug_synchronous` argument of
# cub::DeviceScan, which megablocks' csrc/cumsum.h still passes. The build is skipped when TARGET already
# holds an importable megablocks (a warm machine keeps it between calls). Takes about 3.5 minutes on H100.
set -euo pipefail
sdists=$(realpath "${1:-.sdist}")
target=$(realpath -m "${2:-.gpu_build/site}")
if PYTHONPATH="$target" python3 -c "import megablocks.layers.dmoe, grouped_gemm" 2>/dev/null; then
    echo "megablocks already built in $target"; exit 0
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
work=$(mktemp -d)
for archive in "$sdists"/stanford_stk-0.7.1.tar.gz "$sdists"/grouped_gemm-0.3.0.tar.gz \
               "$sdists"/megablocks-0.10.0.tar.gz; do
    tar -xzf "$archive" -C "$work"
done
python3 - "$work/megablocks-0.10.0/csrc/cumsum.h" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
patched = re.sub(r",\s*debug_synchronous\)\);", "));", src)
assert patched != src and "debug_synchronous))" not in patched, "cumsum.h changed upstream: check the fix"
open(path, "w").write(patched)
PY
mkdir -p "$target"
for pkg in stanford_stk-0.7.1 grouped_gemm-0.3.0 megablocks-0.10.0; do
    echo "building $pkg"
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$target" "$work/$pkg"
done
rm -rf "$work"
PYTHONPATH="$target" python3 -c "import megablocks.layers.dmoe, grouped_gemm; print('megablocks built in $target')"
