#!/usr/bin/env bash
# Sets up .venv if needed, then trains the shipped tiny model on the shipped task (configs/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
exec .venv/bin/grpo-ray train configs/demo.yaml "$@"
