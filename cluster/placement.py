"""Where actors run and what they reserve. The only place resources are set (never on actor classes).

`split`: the learner on its own resources, N rollout workers in a placement group of one bundle
each (SPREAD over nodes). `colocate`: the learner and one engine on the same GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cluster.config import RunConfig
from cluster.handles import LearnerHandle, RolloutWorkerHandle
from grpo_ray.cpu_cores import cores_env


@dataclass(frozen=True)
class Bundle:
    role: str
    cpus: float
    gpus: float
    label: str | None = None  # a custom node resource ("learner" / "rollout") the bundle must land on


def plan_bundles(cfg: RunConfig) -> list[Bundle]:
    """What each actor reserves, learner first. In colocate mode the engine shares the learner's GPU."""
    learner_gpus = float(cfg.learner.num_gpus)
    rollout_gpus = cfg.rollout.num_gpus_per_worker * cfg.rollout.tensor_parallel_size
    if cfg.placement == "colocate":
        # One physical GPU shared by two actors: each asks Ray for half, so both land on it. Memory is
        # shared by time instead (vLLM sleeps while the learner trains), not by these fractions.
        learner_gpus = 0.5 if learner_gpus else 0.0
        rollout_gpus = 0.5 if rollout_gpus else 0.0
    labelled = cfg.node_labels and cfg.placement == "split"
    learner = Bundle("learner", cfg.learner.num_cpus, learner_gpus, "learner" if labelled else None)
    workers = [
        Bundle(f"rollout-{i}", cfg.rollout.num_cpus_per_worker, rollout_gpus, "rollout" if labelled else None)
        for i in range(cfg.rollout.num_workers)
    ]
    return [learner, *workers]


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """Environment every rollout actor starts with (set before vLLM is imported)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine inside the actor: tensors reach it without a copy
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # several engines share a CPU machine; don't pin them all
        "OMP_NUM_THREADS": str(cfg.rollout.threads_per_worker),
        "VLLM_LOGGING_LEVEL": "ERROR",  # its start-up warnings are about CPU tuning, not our run
        "TOKENIZERS_PARALLELISM": "false",
        **cores_env(cfg.rollout.cpu_cores),
    }


def learner_env(cfg: RunConfig) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": str(cfg.learner.threads),
        "TOKENIZERS_PARALLELISM": "false",
        **cores_env(cfg.learner.cpu_cores),
    }


def learner_world_size(cfg: RunConfig) -> int:
    """Data-parallel learner ranks a run uses: one per learner GPU (one learner on CPU)."""
    return max(1, cfg.learner.num_gpus)


def start_learner_group(
    cfg: RunConfig, model: str, pad_id: int, world_size: int | None = None
) -> LearnerHandle:
    """The learner as a `learner.data_parallel.LearnerGroup`; returns while the ranks load the model.

    `world_size` defaults to `learner_world_size(cfg)`; each rank reserves one GPU (none when
    learner.num_gpus is 0, which is how CPU ranks are asked for, e.g. in tests). One rank is exactly
    the plain single learner. Several are placed PACKed (one node if they fit) and join a DeepSpeed group.
    """
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from learner.data_parallel import LearnerGroup

    world = world_size or learner_world_size(cfg)
    if world == 1:
        return LearnerGroup([_learner_actor(cfg, model, pad_id, plan_bundles(cfg)[0])], cfg.learner)
    if cfg.learner.num_gpus not in (0, world):
        raise ValueError(
            f"{world} learner ranks need one GPU each, but learner.num_gpus = {cfg.learner.num_gpus}"
        )
    if cfg.placement == "colocate":
        raise ValueError(
            "placement 'colocate' shares ONE GPU with the engine; data-parallel ranks need 'split'"
        )
    bundle = Bundle("learner", cfg.learner.num_cpus, 1.0 if cfg.learner.num_gpus else 0.0)
    group = placement_group([_resources(bundle)] * world, strategy="PACK")
    ranks = [
        _learner_actor(
            cfg,
            model,
            pad_id,
            bundle,
            PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        )
        for i in range(world)
    ]
    return LearnerGroup(ranks, cfg.learner, group)


@dataclass(frozen=True)
class ActorSpec:
    """One actor as the run would create it: its class, constructor arguments and Ray options.

    The warm pool (cluster/warm_pool) creates spares from the same spec, so a spare it hands a run
    is the actor the run would have started itself, only started earlier.
    """

    cls: type
    args: tuple[Any, ...]
    options: dict[str, Any]
    arg_names: tuple[str, ...] = ()  # where each argument comes from in the run config, for messages

    def create(self, **placement: Any) -> Any:
        """The actor, with `placement` (name, scheduling_strategy, lifetime, ...) added to its options."""
        import ray

        return ray.remote(self.cls).options(**self.options, **placement).remote(*self.args)


def learner_spec(cfg: RunConfig, model: str, pad_id: int) -> ActorSpec:
    """The single learner's actor (placed on its own resources; a data-parallel rank adds its group)."""
    from learner.learner import Learner

    bundle = plan_bundles(cfg)[0]
    options: dict[str, Any] = {
        "num_cpus": bundle.cpus,
        "num_gpus": bundle.gpus,
        "runtime_env": {"env_vars": learner_env(cfg)},
    }
    if bundle.label:
        options["resources"] = {bundle.label: 0.001}
    args = (model, cfg.learner, cfg.seed, cfg.rollout.sampling.temperature, cfg.rollout.dtype, pad_id)
    names = ("model", "learner", "seed", "rollout.sampling.temperature", "rollout.dtype", "pad_id")
    return ActorSpec(Learner, args, options, names)


def _learner_actor(cfg: RunConfig, model: str, pad_id: int, bundle: Bundle, strategy: Any = None) -> Any:
    import uuid

    spec = learner_spec(cfg, model, pad_id)
    options = dict(spec.options, num_cpus=bundle.cpus, num_gpus=bundle.gpus)
    # named like the rollout workers (WorkerSlots), so tools find it with list_named_actors()
    placement: dict[str, Any] = {"name": f"{cfg.name}.{uuid.uuid4().hex[:8]}.learner"}
    if strategy is not None:
        options.pop("resources", None)
        placement["scheduling_strategy"] = strategy
    return replace(spec, options=options).create(**placement)


def start_workers(cfg: RunConfig, model: str, echo: Any = None) -> tuple[list[RolloutWorkerHandle], Any]:
    """(rollout workers, their placement group): one bundle each, SPREAD in split mode."""
    group = _worker_group(cfg, cfg.rollout.num_workers, echo)
    workers = [_worker_actor(cfg, model, i, group, i) for i in range(cfg.rollout.num_workers)]
    return workers, group


class WorkerSlots:
    """Starts, restarts and removes rollout workers by slot (the rollout pool's worker index).

    Slots 0..num_workers-1 are the bundles of the run's placement group (SPREAD over nodes in split
    mode). A restart is a new actor in the same bundle: when its node is gone, Ray re-places that
    bundle on another node with room, and the new actor waits for it. Slots added later (the pool
    grows) get a one-bundle placement group each, removed with the worker. A removed slot of the
    first group keeps its bundle reserved (a placement group cannot shrink) and is reused first
    when the pool grows again. Actors are named `<run>.<token>.rollout-<slot>.<restart>` so tools
    (and tests) find them with `ray.util.list_named_actors()`.

    `adopted`: workers a warm pool already started (cluster/warm_pool), one per first slot, each on
    its own reserved resources. Then there is no first group: the first `start(slot)` hands out the
    adopted worker, and a restart gets a one-bundle group like a slot added later.
    """

    def __init__(
        self, cfg: RunConfig, model: str, echo: Any = None, adopted: list[Any] | None = None
    ) -> None:
        import uuid

        self.cfg = cfg
        self.model = model
        self.prefix = f"{cfg.name}.{uuid.uuid4().hex[:8]}"
        self.adopted_workers = list(adopted or [])  # all of them: detached, `stop` must kill them
        self.adopted = dict(enumerate(self.adopted_workers))  # slot -> one not yet handed out
        self.running_adopted: set[int] = set()  # slots whose current worker came from the warm pool
        self.first = 0 if adopted else cfg.rollout.num_workers
        self.group = _worker_group(cfg, self.first, echo) if self.first else None
        self.own_groups: dict[int, Any] = {}  # slot -> the one-bundle group of a slot added later
        self.generation: dict[int, int] = {}  # slot -> actors started for it so far

    def start(self, slot: int) -> Any:
        """A new RolloutWorker for `slot`; returns at once (the engine loads in the actor)."""
        generation = self.generation.get(slot, 0)
        self.generation[slot] = generation + 1
        if slot in self.adopted:
            self.running_adopted.add(slot)
            return self.adopted.pop(slot)
        self.running_adopted.discard(slot)
        if slot < self.first:
            group, index = self.group, slot
        else:
            if slot not in self.own_groups:
                self.own_groups[slot] = _worker_group(self.cfg, 1, None, wait=False)
            group, index = self.own_groups[slot], 0
        name = f"{self.prefix}.rollout-{slot}.{generation}"
        return _worker_actor(self.cfg, self.model, slot, group, index, name)

    def release(self, slot: int, actor: Any) -> None:
        """Kill `actor` (if still alive) and free what only `slot` used."""
        import ray
        from ray.util.placement_group import remove_placement_group

        ray.kill(actor)
        if slot in self.own_groups:
            remove_placement_group(self.own_groups.pop(slot))

    def node(self, slot: int) -> str:
        """The Ray node id `slot`'s bundle is placed on ('?' while it is being re-placed)."""
        if slot in self.running_adopted:
            return _local_node()  # an adopted worker: a warm pool is one machine, this driver's
        group, index = (self.group, slot) if slot < self.first else (self.own_groups.get(slot), 0)
        if group is None:
            return "?"
        try:
            return str(bundle_nodes(group)[index] or "?")
        except Exception:  # the table is best-effort information for log lines
            return "?"

    def nodes(self, count: int) -> list[str]:
        """`node(slot)` of slots 0..count-1."""
        return [self.node(slot) for slot in range(count)]

    def stop(self) -> None:
        """Remove every placement group (their actors go with them) and kill the adopted workers (a
        warm pool's actors are detached: nothing else would); a second call does nothing."""
        import ray
        from ray.util.placement_group import remove_placement_group

        groups = [self.group] if self.group is not None else []
        for group in [*groups, *self.own_groups.values()]:
            remove_placement_group(group)
        for worker in self.adopted_workers:
            ray.kill(worker)
        self.group = None
        self.own_groups.clear()
        self.adopted.clear()
        self.adopted_workers.clear()


def _local_node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _worker_group(cfg: RunConfig, count: int, echo: Any, wait: bool = True) -> Any:
    import ray
    from ray.util.placement_group import placement_group

    bundle = plan_bundles(cfg)[1]
    bundles = [Bundle(f"rollout-{i}", bundle.cpus, bundle.gpus, bundle.label) for i in range(count)]
    group = placement_group(
        [_resources(b) for b in bundles], strategy="SPREAD" if cfg.placement == "split" else "PACK"
    )
    if wait:
        ray.get(group.ready())
        if echo is not None:
            echo(describe_placement(group, bundles))
    return group


def worker_spec(cfg: RunConfig, model: str, slot: int) -> ActorSpec:
    """Rollout worker `slot`'s actor, before placement (the run adds its bundle, the warm pool none)."""
    from rollout.worker import RolloutWorker

    bundle = plan_bundles(cfg)[1]
    lora_rank = cfg.learner.lora.rank if cfg.sync == "adapter" else None
    options: dict[str, Any] = {
        "num_cpus": bundle.cpus,
        "num_gpus": bundle.gpus,
        "runtime_env": {"env_vars": worker_env(cfg)},
        "max_restarts": 0,  # the rollout pool restarts workers itself: it must re-sync them first
    }
    args = (slot, model, cfg.rollout, cfg.seed, lora_rank, cfg.placement == "colocate")
    names = ("slot", "model", "rollout", "seed", "learner.lora.rank", "placement colocate")
    return ActorSpec(RolloutWorker, args, options, names)


def _worker_actor(
    cfg: RunConfig, model: str, slot: int, group: Any, bundle_index: int, name: str | None = None
) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return worker_spec(cfg, model, slot).create(
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=bundle_index
        ),
        name=name,
    )


def bundle_nodes(group: Any) -> list[str]:
    """The node id each rollout bundle was placed on, in worker order."""
    from ray.util import placement_group_table

    table = placement_group_table(group)
    return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]


def describe_placement(group: Any, bundles: list[Bundle]) -> str:
    lines = ["placement:"]
    for bundle, node in zip(bundles, bundle_nodes(group), strict=True):
        lines.append(f"  {bundle.role:<10} -> node {node[:12]}  (CPU {bundle.cpus:g}, GPU {bundle.gpus:g})")
    return "\n".join(lines)


def _resources(bundle: Bundle) -> dict[str, float]:
    resources = {"CPU": bundle.cpus}
    if bundle.gpus:
        resources["GPU"] = bundle.gpus
    if bundle.label:
        resources[bundle.label] = 0.001  # any amount pins the bundle to a node that has the label
    return resources
