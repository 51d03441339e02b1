#!/usr/bin/env bash
# On an offline CUDA machine, from the repository root with .gpu/h carried
# (python scripts/gpu_harness_bundle.py made it): install the bundle beside the image's torch and run
# the harness on a random-weight model. Arguments go to `python -m harness run`; the default model is
# SmolLM2-135M's architecture (--model .gpu/h/models/llama3-8b for Llama-3-8B). Results: $OUT/run/.
set -euo pipefail
bundle=${BUNDLE:-.gpu/h}
site=${SITE:-/tmp/quantarena-site}
pip install --quiet --no-deps --no-index --target "$site" "$bundle"/whl/*.whl 2>&1 | grep -v "Running pip as" || true
export PYTHONPATH="$site:$PWD/$bundle/site:$PWD" HARNESS_DATA_DIR="$PWD/$bundle/data"
export QUANTARENA_CACHE=${QUANTARENA_CACHE:-/tmp/quantarena-cache}
out=${OUT:-/tmp}/run
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -m harness run --model "$bundle/models/smollm2-135m" --random-weights --out "$out" "$@"
