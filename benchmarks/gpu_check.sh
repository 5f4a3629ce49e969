#!/usr/bin/env bash
# The GPU check: decode throughput (eager vs compiled sampler, fraction of the bandwidth limit) and a full GRPO
# step for the qwen0.5b and paper presets with random weights, plus torchrun steps when there are several GPUs.
# Writes one JSON (default results/gpu_check.json; any argument goes to benchmarks/gpu_check.py, e.g.
# --out PATH). Runs unchanged on a fresh machine: it uses the python on PATH (or $PYTHON) when it has the
# requirements, otherwise it makes a virtualenv .venv-gpu and installs requirements.txt into it.
# Sized for under 8 minutes on one H100-class GPU (installation not counted).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if ! "$py" -c "import torch, transformers, tokenizers, safetensors" 2>/dev/null; then
    if [ ! -x .venv-gpu/bin/python ]; then
        "$py" -m venv .venv-gpu
    fi
    py=.venv-gpu/bin/python
    "$py" -m pip install --quiet -r requirements.txt
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$py" benchmarks/gpu_check.py "$@"
