#!/usr/bin/env bash
# The GPU-machine side of scripts/mlc_cuda.py (device tool, carry [".gpu"]): installs the bundle
# from `mlc_cuda.py bundle` and runs `mlc_cuda.py run` on the libraries from `mlc_cuda.py build`.
# Usage: bash scripts/mlc_cuda_device.sh [run options, e.g. --only smollm2-135m]
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 3
tar -C /tmp/site -xzf .gpu/tvm-runtime.tgz || exit 3
# runtime-only TVM; nvcc compiles the kernels at load (NVRTC segfaulted on them here)
export PYTHONPATH=/tmp/site:$PWD TVM_USE_RUNTIME_LIB=1 TVM_CUDA_COMPILE_MODE=nvcc PYTHONUNBUFFERED=1
for d in $(find / -xdev -name 'libcudart.so.13*' -printf '%h\n' 2>/dev/null | sort -u); do
    export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH
done
mkdir -p "${OUT:-.gpu/out}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python3 scripts/mlc_cuda.py run --dir .gpu/build --out "${OUT:-.gpu/out}" "$@" 2>&1 | tee "${OUT:-.gpu/out}/log.txt"
