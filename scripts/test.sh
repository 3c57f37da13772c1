#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (unit, integration and the slow demo test).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
.venv/bin/python -m pytest "$@"
