"""grpo-ray benchmarks: one fixed workload, measured against baselines. Entry point: benchmarks/run.py."""
