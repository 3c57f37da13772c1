#!/usr/bin/env bash
# Sets up .venv if needed, adds TRL (the end-to-end baseline), then runs every benchmark:
#   scripts/bench.sh            full: 3 repeats x (1 warm-up + 5 timed steps), TRL, the 0.5B sync cells
#   scripts/bench.sh --quick    every path but TRL's and the 0.5B model, 1 timed step (CI runs this)
# Tables: benchmarks/results/results.md and results.json (--out DIR to write elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup.sh
# --no-deps: TRL's requirements are already met by the pinned stack, which it must not move.
.venv/bin/python -c "import trl" 2>/dev/null || .venv/bin/python -m pip install -q --no-deps "trl==1.16.0"
exec .venv/bin/python benchmarks/run.py "$@"
