"""What the step loop needs to survive and adapt: the learner-loss error and its advice, dropping the
metrics of steps that will be redone, and applying `grpo-ray scale` requests at step boundaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.config import RunConfig
from cluster.scale import requested_pool_size


class LearnerLostError(RuntimeError):
    """The learner died more often than max_learner_restarts allows."""

    @classmethod
    def after(cls, cfg: RunConfig, step: int, err: BaseException, restarts: int) -> LearnerLostError:
        return cls(
            f"the learner died at step {step} ({type(err).__name__}) after {restarts} restart(s) "
            f"(max_learner_restarts = {cfg.max_learner_restarts}). Completed checkpoints are kept: "
            f"rerun with --resume. {checkpoint_advice(cfg)}"
        )


def checkpoint_advice(cfg: RunConfig) -> str:
    """How many steps a learner restart redoes, and the knob that bounds it."""
    if cfg.checkpoint_every:
        return f"At most checkpoint_every = {cfg.checkpoint_every} steps are redone."
    return "checkpoint_every is 0 (only at the end): everything since step 0 is redone; set it to lose fewer steps."


def forget_metrics_after(run_dir: Path, step: int) -> None:
    """Metrics of steps that will be redone are dropped, as `restore_metrics` does from a checkpoint."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(f"{line}\n" for line in kept))


class PoolSizeRequests:
    """RUN_DIR/pool_size, read at each step boundary; a request is applied once, when it changes
    (so a slot dropped for crash-looping is not silently replaced every step)."""

    def __init__(self, cfg: RunConfig, echo: Any) -> None:
        self.cfg = cfg
        self.echo = echo
        self.applied: int | None = None
        self.problem: str | None = None  # the last bad file reported (reported once)

    def apply(self, pool: Any) -> None:
        wanted, problem = requested_pool_size(self.cfg.run_dir)
        if problem is not None and problem != self.problem:
            self.echo(f"WARNING: {problem}")
        self.problem = problem
        if wanted is None or wanted == self.applied:
            return
        self.applied = wanted
        if self.cfg.placement == "colocate":
            self.echo("WARNING: placement 'colocate' runs exactly one rollout worker; pool_size ignored")
            return
        pool.resize(wanted)
