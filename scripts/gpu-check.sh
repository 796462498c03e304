#!/usr/bin/env bash
# gpu-check.sh: a node's training step and SFPrompt's split step on CUDA (bf16 autocast where
# the GPU has it) against the CPU, seconds per step. Exits 0 with "no CUDA device" where there
# is none. Options go to scripts/gpu_check.py (--steps, --batch, --devices cpu,cuda, --json).
#   scripts/gpu-check.sh
#   docker compose -f docker/compose.yaml -f docker/compose.gpu.yaml run --rm --no-deps \
#     split-server python /app/scripts/gpu_check.py        # inside the CUDA image
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
