"""The step loop as a pipeline: generate -> score -> train -> sync, with the rollout pool allowed to
run up to `max_staleness` steps ahead of the learner.

The rule that bounds staleness is where a step's prompts enter the pool's queue. With k =
max_staleness, step s is queued once the learner has trained step s - 1 - k and that policy's load
was sent to every worker; a worker runs its calls in the order they were sent, so every chunk of
step s runs under that policy or a newer one, and when step s trains (the learner at the policy of
step s - 1) none of its groups is more than k versions old. k = 0 is the synchronous loop: step s
is queued after step s - 1's sync, so it is sampled by exactly the newest policy.
Should a group still be older than k when its step trains (nothing in this loop produces one; a
safety net for what it does not foresee), it is dropped, counted in `async/dropped_stale`, and its
prompt resampled with the same seed by the newest policy before the step trains.

Everything else a step does happens as soon as it can: a step's groups are scored when its last
chunk arrives (while the learner trains an earlier step), the next update starts as soon as its
batch is scored, and held-out evaluation of a policy is queued right after its sync, pinned to that
version (cluster/data/evaluate.py), so it runs while the learner trains the next step. A step's
metrics are logged, and its checkpoint written, in step order once its evaluation (if due) is done.

Checkpoints carry the data cursor *after the trained step*: the prompts of the steps in flight
past it are taken again on resume and resampled under the restored policy, so no prompt is lost or
trained twice.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.checkpoint import TrainerState, save_checkpoint
from cluster.data.evaluate import EvalRound
from cluster.data.prompts import Prompt, PromptSet, PromptStream
from cluster.policy_sync import send_step_update
from cluster.telemetry.step_stats import rollout_stats
from grpo_ray.records import Batch, Group
from grpo_ray.seeds import eval_round_seed, prompt_seeds
from rewards.config import CORRECTNESS_LABEL


class PipelineStall(RuntimeError):
    """Nothing is running and nothing can start: a bug in the step loop, never a user error."""


@dataclass
class _Step:
    """One step on its way through the pipeline."""

    step: int
    prompts: list[Prompt]
    seeds: list[int]
    cursor: int  # the prompt stream's cursor after this step's prompts
    key: int  # its request in the rollout pool
    queued_at: float
    groups: list[Group] | None = None  # in prompt order, once sampled
    scored: Any = None  # rewards.ScoredBatch of `groups`
    batch: Batch | None = None  # what the learner trains on, once scored
    generate_s: float = 0.0
    reward_s: float = 0.0
    dropped: int = 0  # groups dropped as older than max_staleness (and resampled)
    resample: int | None = None  # pool request resampling the dropped prompts


@dataclass
class _Finishing:
    """A trained step (or step 0's evaluation) waiting to be logged and checkpointed, in step order."""

    step: int
    values: dict[str, float]
    state: TrainerState | None  # None: nothing to checkpoint (step 0)
    version: int
    learner_state: dict[str, Any] | None = None  # taken right after the update, when a checkpoint is due
    evaluation: EvalRound | None = None


class StepLoop:
    """Trains steps `state.step + 1 .. cfg.steps` with the session's learner, pool and scorer.

    `session` is the driver's `_Session`; `version` the policy version every worker holds now.
    `eval_first`: queue the held-out evaluation of this policy as step 0's (a fresh run).
    `run()` returns the final (TrainerState, version); a learner that dies raises RayActorError
    from it, after the pipeline was emptied (`abandon`), so the caller can restart it.
    """

    def __init__(self, session: Any, train: PromptSet, state: TrainerState, version: int) -> None:
        self.session, self.cfg, self.pool = session, session.cfg, session.pool
        self.stream = PromptStream(train.prompts, seed=self.cfg.seed, cursor=state.cursor)
        self.state, self.version = state, version
        self.next_queued = state.step + 1  # the next step whose prompts enter the queue
        self.trained = state.step  # the newest step the learner has trained
        self.steps: dict[int, _Step] = {}
        self.training: tuple[_Step, Any, float] | None = None  # (step, pending update, start)
        self.finishing: deque[_Finishing] = deque()
        self.learner_free_since = time.perf_counter()
        self.last_step_done = time.perf_counter()
        self.first_step = state.step + 1
        self.started_epoch = time.time()
        self.pool.take_metrics()  # idle time and events count from here, not from the pool's start

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, eval_first: bool = False) -> tuple[TrainerState, int]:
        try:
            self._queue_steps()
            if eval_first:
                self.finishing.append(_Finishing(0, {}, None, self.version, evaluation=self._eval_round(0)))
            while self.state.step < self.cfg.steps:
                self._advance()
            self.pool.drain()  # the last loads' acks; nothing is queued past the last step
            clock = self.session.clock
            first = [p for p in clock.phases if p.name == "first step"] if clock is not None else []
            if clock is not None and first and self.cfg.steps > self.first_step:
                clock.add("later steps", first[-1].end, time.time())
            return self.state, self.version
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Cancel every queued request and wait for the calls still running (their results dropped)."""
        for step in self.steps.values():
            self.pool.cancel(step.key)
            if step.resample is not None:
                self.pool.cancel(step.resample)
        for item in self.finishing:
            if item.evaluation is not None:
                item.evaluation.cancel()
        self.steps.clear()
        self.finishing.clear()
        # The run is failing already: the first error is the one to show, not one met while draining.
        with contextlib.suppress(Exception):
            self.pool.drain()

    def _advance(self) -> None:
        """One turn: hand out work, start what can start, wait for one thing to finish."""
        self.pool.dispatch()
        self._score_sampled_steps()
        started = self._start_update()
        self._finish_in_order()
        if self.state.step >= self.cfg.steps:
            return
        also = self._update_running()  # the learner ranks still training (empty: none, or all done)
        if self.training is not None and not also:
            self._end_update()
            return
        if started:
            return
        busy = self.pool.busy or also or self.pool.queue.waiting
        if not busy and not self._ready_to_finish():
            raise PipelineStall(self._describe())
        self.pool.wait(also=also)

    # ---- queueing (the staleness bound) ---------------------------------------------------------

    def _queue_steps(self) -> None:
        """Queue every step the staleness bound allows now (see the module docstring)."""
        cfg = self.cfg
        while self.next_queued <= min(cfg.steps, self.trained + 1 + cfg.max_staleness):
            step = self.next_queued
            prompts = self.stream.take(cfg.prompts_per_step)
            seeds = prompt_seeds(cfg.seed, step, cfg.prompts_per_step, cfg.group_size)
            key = self.pool.submit(prompts, cfg.group_size, seeds)
            self.steps[step] = _Step(step, prompts, seeds, self.stream.cursor, key, time.perf_counter())
            self.next_queued += 1

    def _score_sampled_steps(self) -> None:
        """Score every step whose groups are all in (oldest first), while the learner may be busy."""
        for item in sorted(self.steps.values(), key=lambda s: s.step):
            if item.groups is None and self.pool.complete(item.key):
                item.generate_s = time.perf_counter() - item.queued_at
                item.groups = self.pool.results(item.key)
                self._score(item)
            if item.resample is not None and self.pool.complete(item.resample):
                fresh = {g.prompt_index: g for g in self.pool.results(item.resample)}
                assert item.groups is not None
                item.groups = [fresh.get(g.prompt_index, g) for g in item.groups]
                item.resample = None
                self._score(item)

    def _score(self, item: _Step) -> None:
        start = time.perf_counter()
        assert item.groups is not None
        rows = {p.index: p.row for p in item.prompts}
        flat_rows = [rows[g.prompt_index] for g in item.groups for _ in g.completions]
        texts = [c.text for g in item.groups for c in g.completions]
        item.scored = self.session.scorer.score(texts, flat_rows)
        item.reward_s += time.perf_counter() - start

    # ---- the learner ----------------------------------------------------------------------------

    def _start_update(self) -> bool:
        """Start the next step's update if its batch is scored and the learner is free."""
        if self.training is not None:
            return False
        item = self.steps.get(self.trained + 1)
        if item is None or item.scored is None or item.resample is not None:
            return False
        if self._drop_stale(item):
            return False
        cfg = self.cfg
        assert item.groups is not None
        item.batch = Batch(
            groups=item.groups,
            rewards_P_G=_regroup(item.scored.rewards, cfg.group_size),
            max_new_tokens=cfg.rollout.sampling.max_new_tokens,
        )
        if cfg.placement == "colocate":
            # One device: the engine finishes what it holds (a queued evaluation), then sleeps (no-op on CPU).
            while self.pool.in_flight or self.pool.queue.waiting:
                self.pool.dispatch()
                self.pool.wait()
            self.pool.sleep()
        self.pool.step = item.step  # for the pool's log lines
        start = time.perf_counter()
        self.training = (item, self.session.learner.start_train_step(item.batch), start)
        return True

    def _drop_stale(self, item: _Step) -> bool:
        """Groups older than max_staleness leave the batch and their prompts are resampled at the
        front of the queue; True while that resampling is outstanding (never, as the loop queues)."""
        assert item.groups is not None
        oldest = self.version - self.cfg.max_staleness
        stale = [g.prompt_index for g in item.groups if g.policy_version < oldest]
        if not stale:
            return False
        item.dropped += len(stale)
        slot_of = {p.index: i for i, p in enumerate(item.prompts)}
        prompts = [item.prompts[slot_of[index]] for index in stale]
        seeds = [item.seeds[slot_of[index]] for index in stale]
        item.resample = self.pool.submit(prompts, self.cfg.group_size, seeds, front=True)
        return True

    def _update_running(self) -> list[Any]:
        """The refs of the learner ranks still in the update (waiting on a finished one would spin)."""
        import ray

        if self.training is None:
            return []
        refs = self.training[1].refs
        _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
        return list(running)

    def _end_update(self) -> None:
        """The update is done: export and send the new policy, queue what it unlocks, note the step."""
        cfg, session = self.cfg, self.session
        assert self.training is not None
        item, pending, start = self.training
        train_metrics = pending.result()  # RayActorError here when the learner died
        end = time.perf_counter()
        staleness = [self.version - g.policy_version for g in item.groups or []]
        if cfg.placement == "colocate":
            self.pool.wake_up()  # weights come back from CPU; the new ones arrive from the object store
        # An evaluation pinned to the previous policy must be handed out before its successor is sent.
        while self.pool.queue.pinned_waiting(below=self.version + 1):
            self.pool.dispatch()
            self.pool.wait()
        self.version = send_step_update(cfg, session.learner, self.pool)
        sync_s = time.perf_counter() - end
        self.training = None
        self.trained = item.step
        del self.steps[item.step]
        self._queue_steps()  # what the new policy unlocks, before anything else is handed out
        self.pool.dispatch()

        assert item.groups is not None and item.scored is not None
        correct = item.scored.per_term[CORRECTNESS_LABEL]
        assert item.batch is not None
        verdicts_P_G = _regroup([v == 1.0 for v in correct], cfg.group_size)
        stats = rollout_stats(item.groups, item.batch.rewards_P_G, verdicts_P_G)
        now = time.perf_counter()
        values = {
            **stats,
            **item.scored.metrics,
            **train_metrics,
            "time/generate": item.generate_s,
            "time/reward": item.reward_s,
            "time/train": end - start,
            "time/sync": sync_s,
            "time/learner_wait": start - self.learner_free_since,
            "time/step": now - self.last_step_done,
            **self.pool.take_metrics(),
            "async/staleness_mean": sum(staleness) / max(1, len(staleness)),
            "async/staleness_max": float(max(staleness, default=0)),
            "async/dropped_stale": float(item.dropped),
            "data/cursor": float(item.cursor),
            "rollout/groups": float(len(item.groups)),
            "policy_version": float(self.version),
        }
        self.learner_free_since = self.last_step_done = now
        if session.clock is not None and item.step == self.first_step:
            session.clock.add("first step", self.started_epoch, time.time())
        state = TrainerState(item.step, self.version, item.cursor, self.state.accuracy_before)
        due = item.step == cfg.steps or (cfg.checkpoint_every and item.step % cfg.checkpoint_every == 0)
        learner_state = session.learner.checkpoint_state() if due else None  # before the next update starts
        evaluation = None
        if cfg.eval_every and item.step % cfg.eval_every == 0 and item.step < cfg.steps:
            evaluation = self._eval_round(item.step)
        self.finishing.append(_Finishing(item.step, values, state, self.version, learner_state, evaluation))
        # A `grpo-ray scale` request, and workers restarted meanwhile, join at this step boundary.
        assert session.pool_size is not None
        session.pool_size.apply(self.pool)
        self.pool.admit()
        self._start_update()  # the next batch may be waiting already

    # ---- logging, evaluation, checkpoints (in step order) ---------------------------------------

    def _eval_round(self, step: int) -> EvalRound | None:
        if not self.session.held_out:
            return None
        return EvalRound(
            self.pool,
            self.session.held_out,
            self.cfg.data.eval_samples,
            eval_round_seed(self.cfg.seed, step),
            policy_version=self.version,
        )

    def _ready_to_finish(self) -> bool:
        if not self.finishing:
            return False
        head = self.finishing[0]
        return (head.evaluation is None or head.evaluation.complete()) and self.pool.acked(head.version)

    def _finish_in_order(self) -> None:
        session, run_dir = self.session, self.cfg.run_dir
        while self._ready_to_finish():
            head = self.finishing.popleft()
            values = dict(head.values)
            if head.evaluation is not None:
                values.update(
                    head.evaluation.finish(session.scorer, run_dir / "eval", f"step_{head.step:04d}")
                )
                ran_on = values.get("eval/policy_version", head.version)
                if ran_on != head.version:  # every worker that held it died before it was handed out
                    session.echo(
                        f"WARNING: step {head.step}'s evaluation ran on policy v{ran_on:.0f}, not "
                        f"v{head.version}: no rollout worker held that version any more (they were restarted)"
                    )
            if head.state is None:  # step 0: the policy before training
                if values:
                    session.sink.log(0, values)
                self.state = TrainerState(
                    self.state.step, self.state.version, self.state.cursor, values.get("eval/accuracy")
                )
                session.step0_done = True  # a learner restarted later must not evaluate step 0 again
                session.accuracy_before = self.state.accuracy_before
                for later in self.finishing:  # steps trained meanwhile carry the accuracy before
                    if later.state is not None:
                        later.state = TrainerState(
                            later.state.step,
                            later.state.version,
                            later.state.cursor,
                            self.state.accuracy_before,
                        )
                continue
            acks = [self.pool.last_acks[s] for s in self.pool.active if s in self.pool.last_acks]
            values["sync/worker_load_s_max"] = max(
                (a.seconds for a in acks), default=0.0
            )  # checksum + reload
            # every active worker has acked this version (or a newer one) by now; a wrong ack raised
            values["sync/workers_acked"] = float(sum(a.version >= head.version for a in acks))
            session.sink.log(head.step, values)
            session.progress(head.step, values)
            self.state = head.state
            if head.learner_state is not None:
                save_checkpoint(
                    run_dir, head.state, head.learner_state, session.config_yaml, self.cfg.keep_checkpoints
                )

    def _describe(self) -> str:
        return (
            f"step loop stalled: trained {self.trained}, logged {self.state.step}, queued up to "
            f"{self.next_queued - 1}, steps waiting {sorted(self.steps)}, pool: {self.pool.in_flight} in flight, "
            f"{self.pool.queue.waiting} waiting, {len(self.pool.active)} active workers"
        )


def _regroup(flat: list, group_size: int) -> list[list]:
    return [flat[i : i + group_size] for i in range(0, len(flat), group_size)]
