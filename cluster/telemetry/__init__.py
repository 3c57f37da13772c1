"""Telemetry: metrics sinks (JSONL, wandb), per-step rollout statistics, the HTML run report."""
