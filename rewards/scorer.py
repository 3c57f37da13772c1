"""The isolated, time-limited reward scorer.

``RewardScorer(config).score(completions, rows)`` runs every reward term in a pool of worker processes
and returns per-sample combined rewards, per-term values and metrics.

Workers are fresh interpreters (``python -c`` via ``subprocess``, talking over a socket pair with
multiprocessing's Connection), never forks: the trainer may be a threaded Ray/vLLM process, where
``fork`` is unsafe. This is multiprocessing's ``spawn`` minus one thing: ``spawn`` re-runs the trainer's
``__main__`` module in every worker, which crashes an unguarded script and, in a guarded one, repeats
its imports (torch, ray...) at every worker restart. Workers get the trainer's ``sys.path`` and cwd, with
the cwd first on their path (as ``python`` in the user's shell has it; a console script does not).

Per term and per call:

1. The batch is split into ``num_workers`` contiguous chunks; each chunk is ONE call of the function,
   limited to ``timeout_s × len(chunk)`` seconds, at most ``batch_timeout_s`` (but never below ``timeout_s``).
2. If a chunk call raises or runs out of time, its samples are re-run one call per sample, each limited
   to ``timeout_s``, so a bad sample masks only itself. (Worst case for a hanging sample: its chunk's
   limit plus ``timeout_s``, plus a worker restart — see below.)
3. A worker that runs out of time is SIGKILLed and replaced by a fresh process. A replacement costs a
   python start plus the imports of the reward modules (measured: ~0.2 s for a plain module, ~0.7 s
   with math_verify/sympy); it is not given work until it reports ready, so its start-up never counts
   against a time limit, but with ``num_workers=1`` the next call waits for it.

A returned value of None / NaN / inf / a non-number, an exception, a timeout, or a worker dying all
MASK the sample (counted per term and reason); they never become 0. A wrong return type/length or
signature is a configuration bug and raises :class:`RewardError`. A term that masks more than
``max_masked_fraction`` of a batch raises :class:`RewardFailure` with one example input; the scorer
stops that call as soon as the threshold is certain to be crossed, so a reward that hangs on every
sample fails after just over ``max_masked_fraction × n`` single-sample timeouts, not ``n`` of them.

4. A worker whose resident memory passes ``max_worker_memory_mb`` during a call is killed like a hanging
   one (its samples masked with reason ``memory``); one above it after a call is restarted before the
   next. What reward functions print never reaches the trainer's console: the tail of each call's output
   goes to ``output_log`` (the driver passes RUN_DIR/reward_output.log); see :mod:`rewards.worker_limits`.

Workers ignore SIGINT (Ctrl-C is the trainer's to handle) and exit by themselves within a second if
the trainer dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import wait
from typing import Any

from grpo_ray.partition import split_evenly
from rewards.base import MASK_REASONS, SIGNATURE, RewardConfigError, RewardError, RewardFailure
from rewards.config import RewardsConfig, RewardTerm
from rewards.worker import BOOTSTRAP, PATH_ENV, Reply
from rewards.worker_limits import RewardLog, WorkerOutput, resident_mib

START_TIMEOUT_S = 120.0  # a worker must import its reward modules (and run `setup`) within this
POLL_S = 0.1  # how often busy workers' memory and output size are checked while waiting
_EXAMPLE_CHARS = 200


@dataclass
class ScoreResult:
    """Rewards for one batch. ``None`` everywhere means masked (the learner must drop that sample)."""

    rewards: list[float | None]
    """Combined reward per sample: sum of weight × value over terms; None if any weighted term is masked."""
    per_term: dict[str, list[float | None]]
    """Unweighted value of each term (by label) per sample."""
    metrics: dict[str, float]
    """Per term: ``reward/<label>/{mean,std,time_s,masked,masked_<reason>}`` (mean/std over unmasked values,
    NaN if none; time_s summed over that term's calls); per batch: ``reward/{masked,masked_fraction,time_s,
    worker_restarts,printed_bytes}``."""
    mask_reasons: dict[str, list[str | None]] = field(default_factory=dict)
    """Per term and sample, why it was masked (one of ``rewards.base.MASK_REASONS``) or None."""

    @property
    def masked(self) -> list[bool]:
        return [r is None for r in self.rewards]


@dataclass
class _Task:
    term: int
    indices: list[int]


@dataclass
class _TermState:
    n: int
    values: list[float | None] = field(init=False)
    reasons: list[str | None] = field(init=False)
    notes: list[str | None] = field(init=False)
    unsettled: int = field(init=False)
    time_s: float = 0.0

    def __post_init__(self) -> None:
        self.values, self.reasons, self.notes = [None] * self.n, [None] * self.n, [None] * self.n
        self.unsettled = self.n

    def settle(self, i: int, value: float | None, reason: str | None, note: str | None) -> None:
        self.values[i], self.reasons[i], self.notes[i] = value, reason, note
        self.unsettled -= 1

    @property
    def masked(self) -> int:
        return sum(r is not None for r in self.reasons)


class _Worker:
    """One worker process and the parent's end of its socket pair; at most one call in flight."""

    def __init__(self, functions: list[str], start_timeout_s: float, output: WorkerOutput) -> None:
        parent_conn, child_conn = Pipe(duplex=True)
        self.output = output
        # The trainer's sys.path, absolute (relative entries mean the trainer's cwd), so `module:function`
        # resolves in the worker exactly as it would here; and the working directory first, as `python`
        # run in the user's shell has it (a console script like `grpo-ray` does not put it on sys.path).
        path = [os.getcwd(), *(os.path.abspath(str(p)) for p in sys.path)]
        env = {**os.environ, PATH_ENV: json.dumps(list(dict.fromkeys(path)))}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", BOOTSTRAP, str(child_conn.fileno())],
                pass_fds=(child_conn.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=output.fileno(),
                stderr=output.fileno(),
                env=env,
            )
        finally:
            child_conn.close()  # the child holds its own copy; closing ours lets us see EOF when it dies
        self.conn = parent_conn
        with contextlib.suppress(OSError):  # a child that died at once is reported by _on_start (EOF)
            self.conn.send((functions, os.getpid()))
        self.ready = False
        self.start_deadline = time.monotonic() + start_timeout_s
        self.task: _Task | None = None
        self.sent_at = 0.0
        self.deadline = math.inf

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def exit_code(self) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        return self.process.returncode

    def kill(self) -> None:
        if self.alive:
            self.process.kill()  # SIGKILL: a reward stuck in native code ignores anything milder
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.conn.close()
        if not self.output.file.closed:
            self.output.flush("a reward worker that was stopped")
            self.output.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        if w.task is None and not w.conn.closed:
            with contextlib.suppress(OSError):
                w.conn.send(None)
    stop = time.monotonic() + 1.0
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.process.wait(timeout=max(0.0, stop - time.monotonic()))
        w.kill()


def _describe(term: RewardTerm) -> str:
    return (
        f"reward {term.function!r}"
        if term.label == term.function
        else f"reward {term.label!r} (function {term.function!r})"
    )


def _chunks(n: int, parts: int) -> list[list[int]]:
    """Sample indices 0..n-1 in at most `parts` contiguous, non-empty chunks (one reward call each)."""
    return [chunk for chunk in split_evenly(range(n), max(1, parts)) if chunk]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class RewardScorer:
    """Scores batches with the configured reward terms in isolated, time-limited worker processes.

    Construction starts ``config.num_workers`` processes and waits until each has imported every reward
    function (RewardConfigError if one cannot be resolved). Use as a context manager or call
    :meth:`close`. One ``score`` call runs at a time (calls from several threads are serialised).
    """

    def __init__(
        self, config: RewardsConfig, *, start_timeout_s: float = START_TIMEOUT_S, output_log: Any = None
    ) -> None:
        """``output_log``: file that keeps the tail of what reward functions print (default: a temp file)."""
        self.config = config
        self.log = RewardLog(output_log, config.output_tail_kib * 1024)
        self._terms: list[RewardTerm] = list(config.terms)
        self._functions = sorted({t.function for t in self._terms})
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self.restarts = 0
        """Workers killed and replaced so far (timeouts and crashes)."""
        try:
            self._workers.extend(self._spawn() for _ in range(config.num_workers))
            while not all(w.ready for w in self._workers):
                self._wait_and_handle(None)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        self._closed = True
        self._finalizer()

    def _spawn(self) -> _Worker:
        return _Worker(self._functions, self._start_timeout_s, WorkerOutput(self.log))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self.restarts += 1

    def _abort_in_flight(self) -> None:
        for w in list(self._workers):
            if w.task is not None:
                self._replace(w)

    # -- scoring -----------------------------------------------------------------------------------

    def score(
        self, completions: list[str], rows: list[dict[str, Any]], only: Sequence[str] | None = None
    ) -> ScoreResult:
        """Score one batch: ``completions[i]`` was generated for ``rows[i]`` (which must hold ``gold``).

        ``only``: run just the terms with these labels (e.g. the correctness term for an evaluation);
        the result then holds those terms, and the combined reward sums their weighted values.
        Raises ValueError on mismatched lengths or an unknown label, RewardError / RewardFailure as above.
        """
        if len(completions) != len(rows):
            raise ValueError(
                f"score() got {len(completions)} completions but {len(rows)} rows; pass one row per completion"
            )
        labels = [t.label for t in self._terms]
        unknown = sorted(set(only or ()) - set(labels))
        if unknown:
            raise ValueError(f"score(only=...) names no configured term: {unknown}; terms are {labels}")
        selected = [k for k, label in enumerate(labels) if only is None or label in only]
        with self._lock:
            if self._closed:
                raise RewardError("this RewardScorer is closed; create a new one")
            n = len(completions)
            states = [_TermState(n) for _ in self._terms]
            tasks = deque(_Task(k, chunk) for k in selected for chunk in _chunks(n, len(self._workers)))
            restarts_before, printed_before = self.restarts, self.log.printed_bytes
            start = time.monotonic()
            try:
                while tasks or any(w.task is not None for w in self._workers):
                    self._dispatch(tasks, completions, rows)
                    self._wait_and_handle((tasks, states, completions, rows))
            except BaseException:
                self._abort_in_flight()  # no stale reply may reach the next call
                raise
            result = self._result(
                [(self._terms[k], states[k]) for k in selected],
                n,
                time.monotonic() - start,
                self.restarts - restarts_before,
            )
            result.metrics["reward/printed_bytes"] = float(self.log.printed_bytes - printed_before)
            return result

    def _dispatch(self, tasks: deque[_Task], completions: list[str], rows: list[dict[str, Any]]) -> None:
        for w in list(self._workers):
            if not tasks:
                return
            if not w.ready or w.task is not None:
                continue
            if not w.alive:  # died while idle (e.g. the OOM killer)
                self._replace(w)
                continue
            task = tasks.popleft()
            term = self._terms[task.term]
            message = (
                term.function,
                term.kwargs,
                [completions[i] for i in task.indices],
                [rows[i] for i in task.indices],
            )
            try:
                w.conn.send(message)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                tasks.appendleft(task)
                self._replace(w)
                continue
            except Exception as e:
                tasks.appendleft(task)
                raise RewardError(
                    f"could not send the batch to a reward worker ({type(e).__name__}: {e}); "
                    f"rows must hold plain picklable values"
                ) from e
            w.task, w.sent_at = task, time.monotonic()
            # One hanging sample would otherwise cost timeout_s × chunk size before the per-sample retry.
            batch_limit = min(self.config.timeout_s * len(task.indices), self.config.batch_timeout_s)
            w.deadline = w.sent_at + max(self.config.timeout_s, batch_limit)

    def _wait_and_handle(
        self, job: tuple[deque[_Task], list[_TermState], list[str], list[dict[str, Any]]] | None
    ) -> None:
        """Wait for the next reply, start-up report or deadline and act on it."""
        watched = [w for w in self._workers if w.task is not None or not w.ready]
        if not watched:
            return
        deadline = min(w.deadline if w.ready else w.start_deadline for w in watched)
        deadline = min(deadline, time.monotonic() + POLL_S)
        readable = wait([w.conn for w in watched], timeout=max(0.0, deadline - time.monotonic()))
        for w in watched:
            if w.conn in readable:
                if not w.ready:
                    self._on_start(w)
                else:
                    assert job is not None and w.task is not None
                    self._on_reply(w, job)
        now = time.monotonic()
        for w in watched:
            if w not in self._workers:  # already replaced above
                continue
            if not w.ready and now >= w.start_deadline:
                raise RewardError(
                    f"a reward worker did not finish importing {self._functions} within {self._start_timeout_s:g} s; "
                    f"a reward module doing slow work at import time (or in setup()) is the usual cause"
                )
            if w.ready and w.task is not None and now >= w.deadline:
                assert job is not None
                task, elapsed = w.task, now - w.sent_at
                self._replace(w)
                note = (
                    f"timed out: no result within {elapsed:.2f} s (limit rewards.timeout_s={self.config.timeout_s:g} s "
                    f"× {len(task.indices)} sample(s)); the worker was killed and replaced"
                )
                self._settle(task, ("timeout", note), elapsed, job)
            elif w.ready and w.task is not None:
                self._check_limits(w, job)

    def _check_limits(
        self, w: _Worker, job: tuple[deque[_Task], list[_TermState], list[str], list[dict[str, Any]]] | None
    ) -> None:
        """A busy worker above the memory limit is killed and its call masked ('memory'); output bounded."""
        w.output.poll()
        used, limit = resident_mib(w.process.pid), self.config.max_worker_memory_mb
        if used <= limit or w.task is None:
            return
        assert job is not None
        task, elapsed = w.task, time.monotonic() - w.sent_at
        self._replace(w)
        note = (
            f"used {used:.0f} MiB, above rewards.max_worker_memory_mb={limit}; the worker was killed and "
            f"replaced (a reward that leaks or builds large objects; raise the limit if it is expected)"
        )
        self._settle(task, ("memory", note), elapsed, job)

    def _on_start(self, w: _Worker) -> None:
        try:
            _, errors = w.conn.recv()
        except (EOFError, OSError):
            code = w.exit_code()
            said = w.output.flush("a reward worker that died while starting").decode(errors="replace")
            said = "\n".join(said.strip().splitlines()[-20:])
            raise RewardError(
                f"a reward worker died while starting (exit code {code}) before importing "
                f"{self._functions}; it printed:\n{said}"
            ) from None
        w.output.flush("a reward worker starting")
        if errors:
            raise RewardConfigError("\n".join(errors.values()))
        w.ready = True

    def _on_reply(
        self, w: _Worker, job: tuple[deque[_Task], list[_TermState], list[str], list[dict[str, Any]]]
    ) -> None:
        task = w.task
        assert task is not None
        try:
            reply: Reply = w.conn.recv()
        except (EOFError, OSError):
            code = w.exit_code()
            reply = (
                "exception",
                f"the worker process died (exit code {code}) while running this reward — os._exit/sys.exit in a "
                f"thread, a crash in native code, or the OOM killer; it was replaced",
            )
            self._replace(w)
        else:
            w.task, w.deadline = None, math.inf
            w.output.flush(_describe(self._terms[task.term]))
            if resident_mib(w.process.pid) > self.config.max_worker_memory_mb:
                self._replace(w)  # memory kept between calls (a leak): restart before the next call
        self._settle(task, reply, time.monotonic() - w.sent_at, job)

    def _settle(
        self,
        task: _Task,
        reply: Reply,
        elapsed: float,
        job: tuple[deque[_Task], list[_TermState], list[str], list[dict[str, Any]]],
    ) -> None:
        tasks, states, completions, rows = job
        state, term = states[task.term], self._terms[task.term]
        state.time_s += elapsed
        kind = reply[0]
        if kind == "ok":
            _, values, reasons, notes = reply
            for j, i in enumerate(task.indices):
                state.settle(i, values[j], reasons[j], notes[j])
        elif kind == "bad_return":
            raise RewardError(
                f"{_describe(term)} returned {reply[1]}; a reward function must "
                f"return a list with exactly one float or None per completion: {SIGNATURE}"
            )
        elif kind == "signature":
            raise RewardError(
                f"{_describe(term)} cannot be called with "
                f"(completions, rows, **{term.kwargs}): {reply[1]}; a reward function must look like {SIGNATURE}"
            )
        elif len(task.indices) > 1:  # the batch call raised or timed out: retry its samples one by one
            tasks.extend(_Task(task.term, [i]) for i in task.indices)
        else:
            state.settle(task.indices[0], None, kind, reply[1])
        if state.masked / max(1, state.n) > self.config.max_masked_fraction:
            raise RewardFailure(self._failure_message(task.term, state, completions, rows))

    def _failure_message(
        self, k: int, state: _TermState, completions: list[str], rows: list[dict[str, Any]]
    ) -> str:
        term, n = self._terms[k], state.n
        counts = Counter(r for r in state.reasons if r is not None)
        masked = sum(counts.values())
        rank = {"exception": 0, "timeout": 1}
        i = min(
            (j for j in range(n) if state.reasons[j] is not None),
            key=lambda j: (rank.get(str(state.reasons[j]), 2), j),
        )
        text = completions[i]
        shown = text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + f"... [{len(text)} chars]"
        gold = rows[i].get("gold", "<the row has no 'gold' field>")
        note = "\n".join("      " + line for line in str(state.notes[i]).rstrip().splitlines())
        early = f"; stopped early with {state.unsettled} sample(s) not yet scored" if state.unsettled else ""
        return "\n".join(
            [
                f"{_describe(term)} could not score {masked} of {n} samples in one "
                f"batch ({masked / n:.0%} > rewards.max_masked_fraction={self.config.max_masked_fraction:g}){early}.",
                f"  reasons: {', '.join(f'{r}={c}' for r, c in counts.most_common())}",
                f"  example (sample {i}, {state.reasons[i]}):",
                f"    completion: {shown!r}",
                f"    gold: {gold!r}",
                "    error:",
                note,
                "What to do: fix the reward function (the error above comes from it); if it is just slow, raise "
                f"rewards.timeout_s (now {self.config.timeout_s:g} s per sample); if some unscorable samples are "
                "expected, raise rewards.max_masked_fraction.",
            ]
        )

    def _result(
        self, scored: list[tuple[RewardTerm, _TermState]], n: int, wall_s: float, restarts: int
    ) -> ScoreResult:
        metrics: dict[str, float] = {}
        per_term: dict[str, list[float | None]] = {}
        mask_reasons: dict[str, list[str | None]] = {}
        combined: list[float | None] = [0.0] * n
        for term, state in scored:
            label = term.label
            per_term[label], mask_reasons[label] = state.values, state.reasons
            mean, std = _mean_std([v for v in state.values if v is not None])
            counts = Counter(r for r in state.reasons if r is not None)
            metrics[f"reward/{label}/mean"] = mean
            metrics[f"reward/{label}/std"] = std
            metrics[f"reward/{label}/time_s"] = state.time_s
            metrics[f"reward/{label}/masked"] = float(sum(counts.values()))
            for reason in MASK_REASONS:
                metrics[f"reward/{label}/masked_{reason}"] = float(counts.get(reason, 0))
            for i, value in enumerate(state.values):
                total = combined[i]
                if term.weight == 0 or total is None:  # a weight-0 term is logged only; it cannot mask
                    continue
                combined[i] = None if value is None else total + term.weight * value
        # The combined reward's mean/std are the driver's (cluster.telemetry.step_stats); not repeated here.
        masked = sum(r is None for r in combined)
        metrics["reward/masked"] = float(masked)
        metrics["reward/masked_fraction"] = masked / n if n else 0.0
        metrics["reward/time_s"] = wall_s
        metrics["reward/worker_restarts"] = float(restarts)
        return ScoreResult(rewards=combined, per_term=per_term, metrics=metrics, mask_reasons=mask_reasons)
