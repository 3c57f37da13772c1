"""Orchestration: the typed run config, the step loop, the rollout pool, placement, checkpoints, export,
the typed actor handles (`handles`), the one CLI (`cli`: every entry point, also `python -m cluster.cli`
for `ray job submit`), the job helpers (`job`) and the Ray cluster files.

Subpackages: `data` (prompts and held-out evaluation), `planning` (batch and memory plans),
`telemetry` (metrics, step statistics, the run report). Nothing below cluster/ imports it.
"""
