"""One data-parallel rank's optimiser step through DeepSpeed: ZeRO stage 0-2 over the LoRA parameters.

The frozen 4-bit base is not trainable, so DeepSpeed neither reduces nor partitions it: every rank
holds the whole base and the same adapter, and ZeRO 1/2 split only the adapter's AdamW state (and,
at 2, its gradients).

Gradient scale: a rank's loss is its shard's per-sequence terms over the WHOLE batch's normaliser,
so the batch gradient is the SUM of the ranks' gradients, while DeepSpeed averages them (it divides
by the world size after the all-reduce). Each rank's loss is therefore multiplied by the world size
before backward: (1/W)·Σ_r W·g_r = Σ_r g_r. For a power-of-two W both scalings are exact.

Accumulation: gradient_accumulation_steps is 1 and the learner marks the boundary on each
micro-batch itself, so a step may have any number of micro-batches; ZeRO-2 reduces after every
backward, so all ranks must run the same number (the LearnerGroup sets it: Shard.micro_batches).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from learner.config import LearnerConfig
from learner.optim import warmup


def rendezvous_address() -> tuple[str, int]:
    """This node's address and a free port: rank 0's, where the other ranks join the process group."""
    import ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = int(sock.getsockname()[1])
    return ray.util.get_node_ip_address(), port


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,  # the learner marks the boundary (see the module docstring)
        "gradient_clipping": cfg.max_grad_norm,
        # torch's AdamW, as the single-process learner uses, on every device (no compiled fused Adam)
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 2**62,
    }


class ZeroUpdater:
    """The `learner.optim.Updater` of one rank; forwards must go through `engine` (its backward hooks)."""

    def __init__(
        self,
        model: Any,
        params: list[torch.nn.Parameter],
        cfg: LearnerConfig,
        rank: int,
        world_size: int,
        address: str,
        port: int,
    ) -> None:
        import deepspeed

        # Each Ray rank sees only its own GPU (CUDA_VISIBLE_DEVICES), so its local device index is 0.
        os.environ.update(
            MASTER_ADDR=address,
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        backend = "nccl" if params[0].is_cuda else "gloo"
        deepspeed.init_distributed(dist_backend=backend, rank=rank, world_size=world_size)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            config=deepspeed_config(cfg),
            lr_scheduler=lambda optimizer: warmup(optimizer, cfg.warmup_steps),
        )
        self.params = params
        self.world_size = world_size
        self.stage = cfg.zero_stage

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears gradients after every step (and ZeRO keeps its own buffers)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        own_norm = 0.0
        if self.stage == 0:  # reduced at the boundary backward; DeepSpeed clips without reporting the norm
            own_norm = float(
                torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            )
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else own_norm

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ---- state: always in the single-process format (a torch AdamW state dict over `params`) ---------

    def state_dict(self) -> dict[str, Any]:
        """Collective under ZeRO 1/2 (the partitioned AdamW state is gathered): call on every rank."""
        # at stage 0 DeepSpeed's optimizer is the torch AdamW itself, over `params`
        optimizer = self.engine.optimizer.state_dict() if self.stage == 0 else self._gathered_adam_state()
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stage == 0:
            self.engine.optimizer.load_state_dict(state["optimizer"])
        else:
            self._scatter_adam_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def weights_loaded(self) -> None:
        if self.stage == 0:
            return
        from deepspeed.utils import safe_set_full_fp32_param

        # ZeRO 1/2 step an fp32 copy of each rank's partition and copy it back over the model's
        # parameters; a loaded adapter must reach that copy too, or the next step undoes the load.
        for param in self.params:
            safe_set_full_fp32_param(param, param.detach())

    def _gathered_adam_state(self) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        zero = self.engine.optimizer
        base = zero.optimizer  # torch AdamW over this rank's flat fp32 partitions
        (group,) = base.param_groups
        hyper = {k: v for k, v in group.items() if k != "params"}
        state: dict[int, dict[str, torch.Tensor]] = {}
        partition = zero.single_partition_of_fp32_groups[0]
        if partition in base.state:  # AdamW creates its state on the first step
            step = base.state[partition]["step"]
            for i, param in enumerate(self.params):
                state[i] = {"step": step.detach().cpu().clone()}
                for key in ("exp_avg", "exp_avg_sq"):
                    state[i][key] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(self.params)))}]}

    def _scatter_adam_state(self, saved: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        zero = self.engine.optimizer
        base = zero.optimizer
        hyper = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
        for group in base.param_groups:
            group.update(hyper)
        if not saved["state"]:  # saved before any step: zero moments and step count = a fresh AdamW
            for entry in base.state.values():
                for value in entry.values():
                    value.zero_()
            return
        step = saved["state"][0]["step"]
        for partition in zero.single_partition_of_fp32_groups:
            entry = base.state.setdefault(partition, {})
            entry["step"] = step.detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                entry.setdefault(key, torch.zeros_like(partition))
        # DeepSpeed links each parameter to its slice of the partition's state after its first step;
        # before one (a resume), link now so the full per-parameter state can be written through it.
        zero._lazy_init_hp_params_optimizer_state()
        for i, param in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, saved["state"][i][key].to(param.device), key)
