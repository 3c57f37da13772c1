"""The GRPO loop, readable top to bottom: sample prompts, generate, score, train, sync, log."""

from __future__ import annotations

import contextlib
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.checkpoint import (
    TrainerState,
    check_compatible,
    load_checkpoint,
    load_resume_point,
    restore_metrics,
    write_adapter,
)
from cluster.config import ConfigError, RunConfig, resolve_project_path
from cluster.data.encoding import CachedEncoder, default_cache_dir
from cluster.data.evaluate import evaluate
from cluster.data.prompts import Prompt, PromptSet, load_split
from cluster.handles import LearnerHandle
from cluster.launch import await_ready, launch, report_startup, while_ray_starts
from cluster.planning.batch_plan import derive_plan
from cluster.planning.model_limits import check_model_limits
from cluster.policy_sync import full_sync, sync
from cluster.recovery import LearnerLostError, PoolSizeRequests, checkpoint_advice, forget_metrics_after
from cluster.rollout_pool import RolloutPool
from cluster.run_dir import check_run_root_writable, set_aside_previous_run
from cluster.step_loop import StepLoop
from cluster.telemetry.console import quiet_console
from cluster.telemetry.metrics import MetricsSink
from cluster.telemetry.report import write_report
from cluster.telemetry.startup import StartupClock
from grpo_ray.records import SyncAck
from grpo_ray.seeds import eval_round_seed
from rewards import RewardScorer


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
    learner: LearnerHandle
    pool: RolloutPool
    scorer: RewardScorer
    sink: MetricsSink
    held_out: list[Prompt]
    echo: Any
    model: str = ""
    pad_id: int = 0
    stack: ExitStack | None = None
    pool_size: PoolSizeRequests | None = None
    clock: StartupClock | None = None  # start-up breakdown: the first step's time goes into it
    progress: Any = None  # the progress bar's update(step, values)
    config_yaml: str = ""  # the resolved config, written into every checkpoint
    step0_done: bool = False  # step 0's evaluation is logged (the step loop sets it)
    accuracy_before: float | None = None  # its held-out accuracy


def run(cfg: RunConfig, echo: Any = print) -> RunResult:
    """Train `cfg.steps` GRPO steps (from the newest checkpoint with `resume`) and write the run dir.

    RUN_DIR = cfg.run_root/cfg.name gets config.yaml, metrics.jsonl (one record per step), eval/,
    checkpoints/step_N/, the final adapter/ and report/. `echo` receives each progress line; the last
    is `held-out accuracy: BEFORE -> AFTER (wall time S s)` when there is held-out data. Returns the
    accuracies (fractions in [0, 1], None without eval), wall seconds, the final policy version and
    acks. Raises ConfigError (bad data, incompatible checkpoint), SyncError (a worker's weights differ
    from the learner's), RewardError / RewardFailure (a broken or mostly-masking reward).
    """
    start = time.perf_counter()
    clock = StartupClock()
    clock.add("python + imports + config", clock.origin, time.time(), cpu=time.process_time())
    echo(derive_plan(cfg).render(cfg))
    model = model_path(cfg)
    check_model_limits(cfg, required=True)  # an unreachable hub id fails here, before Ray starts
    check_run_root_writable(cfg)
    with clock.span("prompts + data (Ray starts meanwhile)"):
        (encoder, train, held_out), ray_started = while_ray_starts(
            cfg, lambda: _load_inputs(cfg, model, echo), clock
        )
    run_dir = cfg.run_dir
    try:
        checkpoint, state, learner_state = _resume_point(cfg, run_dir, echo)
        run_dir.mkdir(parents=True, exist_ok=True)
        check_device_memory(cfg, model, echo)
        (run_dir / "config.yaml").write_text(_dump_yaml(cfg))
    except BaseException:
        if ray_started:  # refused before any actor: the Ray started for this run goes with it
            import ray

            ray.shutdown()
        raise

    with ExitStack() as stack:
        stack.enter_context(quiet_console(run_dir / "console.log"))  # first in, last out
        session = _open_session(cfg, model, encoder, held_out, run_dir, stack, echo, clock, ray_started)
        if learner_state is not None:
            session.learner.restore(learner_state, state.version)
            echo(f"resumed from {checkpoint} at step {state.step} (policy v{state.version})")
        # The first sync is absolute (every 4-bit layer, dequantized, plus the adapter), so fresh
        # engines and resumed ones alike run exactly the learner's policy; nothing is applied twice.
        with clock.span("first sync"):
            version, _ = sync(cfg, session.learner, session.pool, include_base=True)
        # Step 0's evaluation is queued by the step loop, pinned to this policy: it runs on the
        # workers while the learner trains step 1.
        report_startup(clock, session.learner, session.pool.workers, run_dir, echo)
        state, version = _train_steps_surviving_learner(session, train, state, version, checkpoint)
        session.pool.admit()  # a worker restarted late joins now if its engine is up (no waiting)
        acks = [session.pool.last_acks[slot] for slot in sorted(session.pool.active)]
        nodes = session.pool.nodes
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
    return RunResult(acc_before, acc_after, seconds, version, acks, run_dir, nodes)


def evaluate_adapter(cfg: RunConfig, adapter_dir: Path, echo: Any = print) -> float:
    """Held-out greedy accuracy (a fraction in [0, 1]) of the PEFT adapter in `adapter_dir`, on the
    rollout workers (`grpo-ray eval`); per-question results go to adapter_dir/../eval/.

    Raises ConfigError when the config has no held-out data, SyncError as in `run`.
    """
    from safetensors.torch import load_file

    model = model_path(cfg)
    check_model_limits(cfg, required=True)
    encoder = prompt_encoder(cfg, model)
    _, held_out = _load_data(cfg, encoder, echo)
    if not held_out:
        raise ConfigError(
            "no held-out prompts: set data.eval_files (or data.eval_split with data.hub_dataset) to evaluate on"
        )
    out_dir = adapter_dir.parent / "eval"
    with ExitStack() as stack:
        scorer = stack.enter_context(RewardScorer(cfg.scored_rewards()))
        learner, pool = _start(cfg, model, encoder, stack, echo)
        learner.load_adapter(load_file(str(adapter_dir / "adapter_model.safetensors")))
        sync(cfg, learner, pool, include_base=True)
        tag = f"adapter_{adapter_dir.parent.name}"
        values = evaluate(
            pool,
            held_out,
            scorer,
            out_dir,
            tag,
            samples=cfg.data.eval_samples,
            seed=eval_round_seed(cfg.seed, 0),
        )
    return values["eval/accuracy"]


def _train_steps_surviving_learner(
    session: _Session, train: PromptSet, state: TrainerState, version: int, started_from: Path | None
) -> tuple[TrainerState, int]:
    """The step loop; when the learner dies, it is restarted from the newest complete checkpoint
    (or from step 0 without one) and the lost steps are redone exactly, as `--resume` would."""
    import ray

    first, restarts = state, 0
    lost: BaseException | None = None
    while True:
        try:
            if lost is not None:  # inside the try: a learner that dies while restarting counts too
                state, version = _restart_learner(session, lost, restarts, first, started_from)
            return _train_steps(session, train, state, version)
        except ray.exceptions.RayActorError as err:  # the pool handles its own workers: this is the learner
            if restarts == session.cfg.max_learner_restarts:
                raise LearnerLostError.after(session.cfg, session.pool.step, err, restarts) from None
            lost, restarts = err, restarts + 1


def _train_steps(
    session: _Session, train: PromptSet, state: TrainerState, version: int
) -> tuple[TrainerState, int]:
    session.progress = _progress(session.cfg, first_step=state.step)
    # Step 0's evaluation: in a fresh run, once (not again after a learner restart from step 0).
    eval_first = state.step == 0 and not session.step0_done
    return StepLoop(session, train, state, version).run(eval_first=eval_first)


def _restart_learner(
    session: _Session, err: BaseException, attempt: int, first: TrainerState, started_from: Path | None
) -> tuple[TrainerState, int]:
    """A new learner, restored through the same code path as `--resume`; every worker gets a full sync."""
    from cluster.placement import start_learner_group

    cfg, run_dir, echo = session.cfg, session.cfg.run_dir, session.echo
    died_at = session.pool.step
    # The same loader as --resume: a corrupt newest checkpoint is set aside and the next one used.
    loaded = load_resume_point(run_dir, "auto", echo)
    if loaded is None and started_from is not None:
        loaded = (started_from, *load_checkpoint(started_from))
    checkpoint = loaded[0] if loaded is not None else None
    where = f"checkpoint {checkpoint.name}" if checkpoint is not None else "step 0 (no checkpoint yet)"
    echo(
        f"learner died at step {died_at} ({type(err).__name__}); restarting it from {where} "
        f"({attempt}/{cfg.max_learner_restarts}). {checkpoint_advice(cfg)}"
    )
    with contextlib.suppress(Exception):  # its actors are already dead: nothing left to free
        session.learner.stop()
    learner = start_learner_group(cfg, session.model, session.pad_id)
    assert session.stack is not None
    session.stack.callback(learner.stop)
    learner.weight_names(session.pool.packed_modules)  # the learner remembers the engine's fusion map
    session.learner = learner
    session.pool.full_sync = full_sync(cfg, learner, session.pool)
    if loaded is None:
        before = first.accuracy_before if first.accuracy_before is not None else session.accuracy_before
        state = TrainerState(step=0, version=0, cursor=0, accuracy_before=before)
        forget_metrics_after(run_dir, 0)
    else:
        checkpoint, state, learner_state, saved = loaded
        check_compatible(saved, cfg)
        restore_metrics(checkpoint, run_dir)
        learner.restore(learner_state, state.version)
    version, _ = sync(cfg, learner, session.pool, include_base=True)
    echo(
        f"learner restarted at step {state.step} (policy v{version}); redoing steps {state.step + 1}..{died_at}"
    )
    return state, version


def _evaluate(session: _Session, run_dir: Path, step: int, log: bool = True) -> dict[str, float]:
    if not session.held_out:
        return {}
    cfg = session.cfg
    values = evaluate(
        session.pool,
        session.held_out,
        session.scorer,
        run_dir / "eval",
        f"step_{step:04d}",
        samples=cfg.data.eval_samples,
        seed=eval_round_seed(cfg.seed, step),
    )
    if log:
        session.sink.log(step, values)
    return values


def _resume_point(cfg: RunConfig, run_dir: Path, echo: Any) -> tuple[Path | None, TrainerState, Any]:
    """Where this run starts: a checkpoint (checked against the config), or step 0 in a clean run dir."""
    loaded = load_resume_point(run_dir, cfg.resume, echo)
    if loaded is None:
        set_aside_previous_run(run_dir, Path(cfg.run_root), echo)
        return None, TrainerState(step=0, version=0, cursor=0, accuracy_before=None), None
    checkpoint, state, learner_state, saved = loaded
    check_compatible(saved, cfg)
    if state.step >= cfg.steps:
        raise ConfigError(
            f"checkpoint {checkpoint} is at step {state.step}; raise steps above it to train further"
        )
    restore_metrics(checkpoint, run_dir)
    return checkpoint, state, learner_state


def _open_session(
    cfg: RunConfig,
    model: str,
    encoder: CachedEncoder,
    held_out: list[Prompt],
    run_dir: Path,
    stack: ExitStack,
    echo: Any,
    clock: StartupClock,
    ray_started: bool = False,
) -> _Session:
    launched = launch(cfg, model, encoder.pad_id, stack, echo, clock, ray_started)
    # The reward scorer's processes start while the actors load their models.
    with clock.span("reward scorer"):
        scorer = stack.enter_context(
            RewardScorer(cfg.scored_rewards(), output_log=run_dir / "reward_output.log")
        )
    learner, pool = await_ready(launched, echo, clock, stack)
    pool.full_sync = full_sync(cfg, learner, pool)
    sink = MetricsSink(cfg, run_dir)
    stack.callback(sink.close)
    pool_size = PoolSizeRequests(cfg, echo)
    return _Session(
        cfg,
        learner,
        pool,
        scorer,
        sink,
        held_out,
        echo,
        model,
        encoder.pad_id,
        stack,
        pool_size,
        clock,
        config_yaml=_dump_yaml(cfg),
    )


def check_device_memory(cfg: RunConfig, model: str, echo: Any) -> None:
    """Before any actor starts: the memory plan `grpo-ray check` prints, for the devices whose size is
    known; a plan that does not fit is refused with the same advice.

    colocate with a visible GPU: that GPU's size, and vLLM's memory fraction comes from the plan, not
    a guess. Otherwise (split, whose GPUs are on other nodes): the config's gpu_memory_gib; unset, the
    run is not checked.
    """
    local_gpu = cfg.placement == "colocate" and _local_cuda()
    if local_gpu:
        import torch

        device_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    elif cfg.gpu_memory_gib is not None:
        device_gib = cfg.gpu_memory_gib
    else:
        return
    from cluster.planning.memory import ModelShape, ModelShapeError, inputs_from_config, plan_memory

    try:
        shape = ModelShape.from_pretrained(model)
    except ModelShapeError as err:
        raise ConfigError(f"memory check before start: {err}") from None
    plan = plan_memory(inputs_from_config(cfg, shape, device_gib))
    echo(plan.render())
    if not plan.fits:
        raise ConfigError(plan.refusal())
    if local_gpu:
        cfg.rollout.gpu_memory_utilization = plan.gpu_memory_utilization


def _local_cuda() -> bool:
    # Only colocate asks: importing torch costs the driver ~2 CPU s before the first step otherwise.
    import torch

    return bool(torch.cuda.is_available())


def model_path(cfg: RunConfig) -> str:
    """The config's model: a local directory when it is one (shipped paths too), else the hub id."""
    local = resolve_project_path(cfg.model)
    return str(local) if local.exists() else cfg.model


def prompt_encoder(cfg: RunConfig, model: str) -> CachedEncoder:
    """The prompts' encoder: the tokenizer loads only if the token cache misses (or is off)."""

    def load_tokenizer() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model)

    return CachedEncoder(model, default_cache_dir() if cfg.data.token_cache else None, load_tokenizer)


def _load_inputs(cfg: RunConfig, model: str, echo: Any) -> tuple[CachedEncoder, PromptSet, list[Prompt]]:
    encoder = prompt_encoder(cfg, model)
    return (encoder, *_load_data(cfg, encoder, echo))


def _load_data(cfg: RunConfig, encoder: CachedEncoder, echo: Any) -> tuple[PromptSet, list[Prompt]]:
    train = load_split(cfg.data, "train", cfg.seed, encoder)
    assert train is not None, "config validation guarantees a training source"
    echo(
        f"train prompts: {len(train.prompts)} from {train.source} "
        f"({train.dropped_too_long} longer than {cfg.data.max_prompt_tokens} tokens dropped, "
        f"{train.skipped_bad_rows} bad rows skipped)"
        + (f"; token ids reused from {encoder.cache_dir}" if encoder.hits else "")
    )
    evaluation = load_split(cfg.data, "eval", cfg.seed, encoder)
    if evaluation is None:
        return train, []
    held_out = sorted(evaluation.prompts, key=lambda p: p.index)[: cfg.data.eval_max_prompts]
    echo(
        f"held-out prompts: {len(held_out)} from {evaluation.source} ({evaluation.dropped_too_long} too long dropped)"
    )
    return train, held_out


def _start(
    cfg: RunConfig,
    model: str,
    encoder: CachedEncoder,
    stack: ExitStack,
    echo: Any,
    clock: StartupClock | None = None,
) -> tuple[LearnerHandle, RolloutPool]:
    """The learner and the rollout pool, ready (weight names checked); `grpo-ray eval` uses it."""
    clock = clock or StartupClock()
    learner, pool = await_ready(launch(cfg, model, encoder.pad_id, stack, echo, clock), echo, clock, stack)
    pool.full_sync = full_sync(cfg, learner, pool)
    return learner, pool


def _dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


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
