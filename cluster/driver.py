"""The GRPO loop, readable top to bottom: sample prompts, generate, score, train, sync, log."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.checkpoint import (
    TrainerState,
    check_compatible,
    find_resume_point,
    load_checkpoint,
    restore_metrics,
    save_checkpoint,
    write_adapter,
)
from cluster.config import ConfigError, RunConfig, resolve_project_path
from cluster.data.evaluate import evaluate
from cluster.data.prompts import Prompt, PromptSet, PromptStream, load_split
from cluster.launch import await_ready, launch, report_startup, while_ray_starts
from cluster.planning.batch_plan import derive_plan
from cluster.rollout_pool import RolloutPool
from cluster.telemetry.metrics import MetricsSink
from cluster.telemetry.report import write_report
from cluster.telemetry.startup import StartupClock
from cluster.telemetry.step_stats import rollout_stats
from grpo_ray.records import Batch, SyncAck
from rewards import RewardScorer
from rewards.builtin import BUILTINS


@dataclass
class RunResult:
    accuracy_before: float | None
    accuracy_after: float | None
    seconds: float
    final_version: int
    final_acks: list[SyncAck]
    run_dir: Path
    worker_nodes: list[str]


@dataclass
class _Session:
    """The live pieces of a run: actors, the scorer, the metrics sink, held-out prompts."""

    cfg: RunConfig
    learner: Any
    pool: RolloutPool
    scorer: RewardScorer
    sink: MetricsSink
    held_out: list[Prompt]
    echo: Any


def run(cfg: RunConfig, echo: Any = print) -> RunResult:
    start = time.perf_counter()
    clock = StartupClock()
    clock.add("python + imports + config", clock.origin, time.time(), cpu=time.process_time())
    echo(derive_plan(cfg).render(cfg))
    model = _model_path(cfg)
    with clock.span("tokenizer + data (Ray starts meanwhile)"):
        (tokenizer, train, held_out), ray_started = while_ray_starts(
            cfg, lambda: _load_inputs(cfg, model, echo), clock
        )
    run_dir = cfg.run_dir
    checkpoint, state, learner_state = _resume_point(cfg, run_dir, echo)
    run_dir.mkdir(parents=True, exist_ok=True)
    _size_colocated_engine(cfg, model, echo)
    (run_dir / "config.yaml").write_text(_dump_yaml(cfg))

    with ExitStack() as stack:
        session = _open_session(cfg, model, tokenizer, held_out, run_dir, stack, echo, clock, ray_started)
        if learner_state is not None:
            session.learner.restore(learner_state, state.version)
            echo(f"resumed from {checkpoint} at step {state.step} (policy v{state.version})")
        # The first sync is absolute (every 4-bit layer, dequantized, plus the adapter), so fresh
        # engines and resumed ones alike run exactly the learner's policy; nothing is applied twice.
        with clock.span("first sync"):
            version, acks = _sync(cfg, session.learner, session.pool, include_base=True)
        if checkpoint is None:
            with clock.span("eval step 0"):
                before = _evaluate(session, run_dir, step=0)
            state.accuracy_before = before.get("eval/accuracy")

        stream = PromptStream(train.prompts, seed=cfg.seed, cursor=state.cursor)
        progress = _progress(cfg, first_step=state.step)
        report_startup(clock, session.learner, session.pool.workers, run_dir, echo)
        first_step = state.step + 1
        for step in range(first_step, cfg.steps + 1):
            with clock.span("first step" if step == first_step else "later steps"):
                values, version, acks = _train_step(session, stream, step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                values.update(_evaluate(session, run_dir, step, log=False))
            session.sink.log(step, values)
            progress(step, values)
            state = TrainerState(step, version, stream.cursor, state.accuracy_before)
            if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                learner_checkpoint = session.learner.checkpoint_state()
                save_checkpoint(run_dir, state, learner_checkpoint, _dump_yaml(cfg), cfg.keep_checkpoints)

        with clock.span("final eval + adapter"):
            after = _evaluate(session, run_dir, step=cfg.steps)
            write_adapter(run_dir / "adapter", session.learner.checkpoint_state())
        shutdown = time.time()
    clock.add("shutdown", shutdown, time.time())
    with clock.span("report"):
        echo(f"report: {write_report(run_dir)}")
    clock.mark("end")
    clock.write(run_dir)
    seconds = time.perf_counter() - start
    acc_before, acc_after = state.accuracy_before, after.get("eval/accuracy")
    if acc_before is not None and acc_after is not None:
        echo(f"held-out accuracy: {acc_before:.3f} -> {acc_after:.3f} (wall time {seconds:.0f} s)")
    return RunResult(acc_before, acc_after, seconds, version, acks, run_dir, session.pool.nodes)


def evaluate_adapter(cfg: RunConfig, adapter_dir: Path, echo: Any = print) -> float:
    """Held-out greedy accuracy of a saved adapter, on the rollout workers (`grpo-ray eval`)."""
    from safetensors.torch import load_file

    model = _model_path(cfg)
    tokenizer = _load_tokenizer(model)
    _, held_out = _load_data(cfg, tokenizer, echo)
    if not held_out:
        raise ConfigError(
            "no held-out prompts: set data.eval_files (or data.eval_split with data.hub_dataset) to evaluate on"
        )
    out_dir = adapter_dir.parent / "eval"
    with ExitStack() as stack:
        learner, pool = _start(cfg, model, tokenizer, stack, echo)
        learner.load_adapter(load_file(str(adapter_dir / "adapter_model.safetensors")))
        _sync(cfg, learner, pool, include_base=True)
        tag = f"adapter_{adapter_dir.parent.name}"
        values = evaluate(
            pool, held_out, cfg.data.correctness, out_dir, tag, samples=cfg.data.eval_samples, seed=cfg.seed
        )
    return values["eval/accuracy"]


def _train_step(
    session: _Session, stream: PromptStream, step: int
) -> tuple[dict[str, float], int, list[SyncAck]]:
    """One GRPO step: sample prompts, generate, score, train, sync. Returns its metrics."""
    cfg = session.cfg
    timer = _Timer()
    prompts = stream.take(cfg.prompts_per_step)
    with timer("generate"):
        groups = session.pool.generate(prompts, cfg.group_size, seeds=_prompt_seeds(cfg, step))
    with timer("reward"):
        rows = {p.index: p.row for p in prompts}
        flat_rows = [rows[g.prompt_index] for g in groups for _ in g.completions]
        texts = [c.text for g in groups for c in g.completions]
        scored = session.scorer.score(texts, flat_rows)
        correct = BUILTINS[cfg.data.correctness](texts, flat_rows)
    rewards_P_G = _regroup(scored.rewards, cfg.group_size)
    batch = Batch(groups=groups, rewards_P_G=rewards_P_G, max_new_tokens=cfg.rollout.sampling.max_new_tokens)
    colocated = cfg.placement == "colocate"
    with timer("train"):
        if colocated:  # the engine gives the GPU to the learner (no-op on CPU)
            session.pool.sleep()
        train_metrics = session.learner.train_step(batch)
    with timer("sync"):
        if colocated:  # weights come back from CPU; the new ones arrive from the object store, not disk
            session.pool.wake_up()
        version, acks = _sync(cfg, session.learner, session.pool, include_base=False)
    stats = rollout_stats(groups, rewards_P_G, _regroup([v == 1.0 for v in correct], cfg.group_size))
    values = {
        **stats,
        **scored.metrics,
        **train_metrics,
        **timer.values,
        "policy_version": float(version),
        "sync/workers_acked": float(len(acks)),
    }
    return values, version, acks


def _evaluate(session: _Session, run_dir: Path, step: int, log: bool = True) -> dict[str, float]:
    if not session.held_out:
        return {}
    cfg = session.cfg
    values = evaluate(
        session.pool,
        session.held_out,
        cfg.data.correctness,
        run_dir / "eval",
        f"step_{step:04d}",
        samples=cfg.data.eval_samples,
        seed=cfg.seed + step,
    )
    if log:
        session.sink.log(step, values)
    return values


def _resume_point(cfg: RunConfig, run_dir: Path, echo: Any) -> tuple[Path | None, TrainerState, Any]:
    """Where this run starts: a checkpoint (checked against the config), or step 0 in a clean run dir."""
    checkpoint = find_resume_point(run_dir, cfg.resume, echo)
    if checkpoint is None:
        _set_aside_previous_run(run_dir, echo)
        return None, TrainerState(step=0, version=0, cursor=0, accuracy_before=None), None
    state, learner_state, saved = load_checkpoint(checkpoint)
    check_compatible(saved, cfg)
    if state.step >= cfg.steps:
        raise ConfigError(
            f"checkpoint {checkpoint} is at step {state.step}; raise steps above it to train further"
        )
    restore_metrics(checkpoint, run_dir)
    return checkpoint, state, learner_state


def _set_aside_previous_run(run_dir: Path, echo: Any) -> None:
    # A fresh run never overwrites an earlier one's checkpoints or metrics: they are moved aside.
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        echo(f"an earlier run in {run_dir} was moved to {aside} (use --resume to continue a run instead)")


def _open_session(
    cfg: RunConfig,
    model: str,
    tokenizer: Any,
    held_out: list[Prompt],
    run_dir: Path,
    stack: ExitStack,
    echo: Any,
    clock: StartupClock,
    ray_started: bool = False,
) -> _Session:
    launched = launch(cfg, model, _pad_id(tokenizer), stack, echo, clock, ray_started)
    # The reward scorer's processes start while the actors load their models.
    with clock.span("reward scorer"):
        scorer = stack.enter_context(RewardScorer(cfg.rewards))
    learner, pool = await_ready(launched, echo, clock)
    sink = MetricsSink(cfg, run_dir)
    stack.callback(sink.close)
    return _Session(cfg, learner, pool, scorer, sink, held_out, echo)


def _size_colocated_engine(cfg: RunConfig, model: str, echo: Any) -> None:
    """Colocate on a GPU: vLLM's memory fraction comes from the memory plan, not a guess.

    Refuses to start a run the plan says will not fit, with the knobs to turn.
    """
    import torch

    if cfg.placement != "colocate" or not torch.cuda.is_available():
        return
    from cluster.planning.memory import ModelShape, inputs_from_config, plan_memory

    device_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = plan_memory(inputs_from_config(cfg, ModelShape.from_pretrained(model), device_gib))
    echo(plan.render())
    if not plan.fits:
        raise ConfigError(f"the run does not fit in {device_gib:.1f} GiB:\n  " + "\n  ".join(plan.advice))
    cfg.rollout.gpu_memory_utilization = plan.gpu_memory_utilization


def _model_path(cfg: RunConfig) -> str:
    local = resolve_project_path(cfg.model)
    return str(local) if local.exists() else cfg.model


def _load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _load_inputs(cfg: RunConfig, model: str, echo: Any) -> tuple[Any, PromptSet, list[Prompt]]:
    tokenizer = _load_tokenizer(model)
    return (tokenizer, *_load_data(cfg, tokenizer, echo))


def _load_data(cfg: RunConfig, tokenizer: Any, echo: Any) -> tuple[PromptSet, list[Prompt]]:
    train = load_split(cfg.data, "train", cfg.seed, tokenizer)
    assert train is not None, "config validation guarantees a training source"
    echo(
        f"train prompts: {len(train.prompts)} from {train.source} "
        f"({train.dropped_too_long} longer than {cfg.data.max_prompt_tokens} tokens dropped, "
        f"{train.skipped_bad_rows} bad rows skipped)"
    )
    evaluation = load_split(cfg.data, "eval", cfg.seed, tokenizer)
    if evaluation is None:
        return train, []
    held_out = sorted(evaluation.prompts, key=lambda p: p.index)[: cfg.data.eval_max_prompts]
    echo(
        f"held-out prompts: {len(held_out)} from {evaluation.source} ({evaluation.dropped_too_long} too long dropped)"
    )
    return train, held_out


def _start(
    cfg: RunConfig, model: str, tokenizer: Any, stack: ExitStack, echo: Any
) -> tuple[Any, RolloutPool]:
    clock = StartupClock()
    return await_ready(launch(cfg, model, _pad_id(tokenizer), stack, echo, clock), echo, clock)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sync(cfg: RunConfig, learner: Any, pool: RolloutPool, include_base: bool) -> tuple[int, list[SyncAck]]:
    """Export once into the object store; every worker loads that copy; acks are checked against it.

    The first sync of a run also carries the dequantized 4-bit layers, so from step 0 the engines
    run exactly the learner's policy, never the checkpoint's full-precision weights.
    """
    kinds: list[tuple[str, bool]] = [("merged", include_base)]
    if cfg.sync == "adapter":
        kinds = [("base", True)] if include_base and cfg.learner.quantization == "nf4" else []
        kinds.append(("adapter", False))
    version, acks = -1, []
    for kind, with_base in kinds:
        update_ref, summary_ref = learner.export_for_sync(kind, with_base)
        version, checksum = _get(summary_ref)
        acks = pool.sync(update_ref, version, checksum)
    return version, acks


def _prompt_seeds(cfg: RunConfig, step: int) -> list[int]:
    # A seed per prompt slot, not per worker: the same step samples the same groups whatever the
    # number of workers (vLLM gives the n samples of one request seeds seed..seed+n-1).
    return [
        ((cfg.seed * 1_000_003 + step) * 4099 + slot) * cfg.group_size % 2**31
        for slot in range(cfg.prompts_per_step)
    ]


def _regroup(flat: list, group_size: int) -> list[list]:
    return [flat[i : i + group_size] for i in range(0, len(flat), group_size)]


def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


def _dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class _Timer:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def __call__(self, name: str) -> Any:
        timer = self

        class _Span:
            def __enter__(self) -> None:
                self.start = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                timer.values[f"time/{name}"] = time.perf_counter() - self.start

        return _Span()


def _progress(cfg: RunConfig, first_step: int = 0) -> Any:
    if not cfg.logging.progress_bar:
        return lambda step, values: None
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=first_step, desc="grpo", unit="step")

    def update(step: int, values: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(
            reward=f"{values.get('reward/mean', 0):.3f}",
            acc=f"{values.get('rollout/accuracy', 0):.2f}",
            kl=f"{values.get('train/kl_mean', 0):.4f}",
        )
        if step == cfg.steps:
            bar.close()

    return update
