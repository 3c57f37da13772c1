"""Orchestration: the typed run config, the step loop, the rollout pool, placement, checkpoints, the CLI.

Subpackages: `data` (prompts and held-out evaluation), `planning` (batch and memory plans),
`telemetry` (metrics sinks, step statistics, the run report). Nothing below cluster/ imports it.
"""
