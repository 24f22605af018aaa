"""Data parallelism for `blockrl pretrain` / `convert` under `torchrun`: process group, DDP or FSDP2, the global token
count, and which rank writes.

Every rank draws the same global batch (a pure function of (seed, step)) and takes its own slice, split further
into `optim.grad_accum` micro-batches. Each micro-batch's loss is a token mean, so it is re-weighted by its share of
the global target tokens (times the world size, which DDP's gradient average divides out again): N processes x
batch b then follow the loss curve of 1 process x batch N*b, and a checkpoint (full weights and optimizer state,
written by rank 0) resumes under any world size and either strategy.

- `ddp`: every rank holds the whole model; gradients are all-reduced.
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard` on each decoder layer, then on the whole): parameters,
  gradients and optimizer state are sharded across ranks, for models that do not fit one device. Checkpoints and
  evaluations gather the full weights (a collective every rank joins) into an unsharded CPU copy on rank 0.

Optimizer state is saved in the full, name-keyed form of `torch.distributed.checkpoint.state_dict`, which is the
same for every world size and strategy; an index-keyed state (older checkpoints) is renamed on load.

    torchrun --nproc-per-node 2 -m trainers.cli convert --config convert_tiny_moe [--set parallel=fsdp]
"""

from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from common.device import resolve_device


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process (before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> DistContext:
        """The torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK), or one process. gloo on CPU, nccl on CUDA."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            # rank 0 evaluates and writes checkpoints while the others wait: a long timeout, not NCCL's 10 min
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=2))
        return cls(rank, world, dev)

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of the global batch (sizes differ by at most one)."""
        n = len(items)
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return items[lo:hi]

    def sum(self, x: float) -> float:
        if not self.active:
            return x
        t = torch.tensor(
            [x], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu"
        )
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


class LossModule(nn.Module):
    """The policy with its loss as `forward`, so DDP sees the forward and syncs the policy's gradients."""

    def __init__(self, policy: nn.Module, loss_fn):
        super().__init__()
        self.policy = policy
        self.loss_fn = loss_fn

    def forward(self, batch, gen):
        return self.loss_fn(batch, gen)


class Parallel:
    """The policy as this process trains it (`module`: its LossModule, bare, under DDP or sharded by FSDP2), and the
    collective views a checkpoint or an evaluation needs. Build the optimizer on `parameters()` after this."""

    def __init__(self, ctx: DistContext, policy, loss_fn, strategy: str = "ddp"):
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {strategy!r}")
        self.ctx, self.policy = ctx, policy
        self.fsdp = strategy == "fsdp" and ctx.active
        # FSDP: rank 0 keeps an unsharded CPU copy to evaluate and save (the sharded model cannot run alone)
        self.shadow = copy.deepcopy(policy).cpu() if self.fsdp and ctx.is_main else None
        self.loss_module = LossModule(policy, loss_fn)
        self.module: nn.Module = self.loss_module

    def place(self) -> None:
        """Shard or replicate: call once the policy is on its device and configured."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            layers = set(getattr(self.policy.model, "_no_split_modules", None) or ())
            for m in self.policy.model.modules():
                if type(m).__name__ in layers:
                    fully_shard(m)
            # the rest (embeddings, head, norms) as the root unit. The model was sharded on the CPU: fully_shard
            # moves each rank's parameter shards, and the buffers, to the mesh's device (a full copy never lands there)
            fully_shard(self.loss_module)
        elif self.ctx.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # MoE: experts a rank's batch skips get no gradient
            self.module = DDP(self.loss_module, device_ids=ids, find_unused_parameters=bool(self.policy.moe))

    def parameters(self):
        return self.loss_module.parameters()

    def no_sync(self, last: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-batch (FSDP2 reduce-scatters each one)."""
        if self.ctx.active and not self.fsdp and not last:
            return self.module.no_sync()
        return nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(list(self.parameters()), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def full_policy(self):
        """The policy with its full weights on rank 0 (FSDP: gathered into the CPU copy; a collective every rank
        must join), None on the other ranks."""
        if not self.fsdp:
            return self.policy if self.ctx.is_main else None
        full = get_model_state_dict(
            self.loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.shadow is None:
            return None
        self.shadow.load_state_dict({k.removeprefix("policy."): v for k, v in full.items()})
        return self.shadow

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """The full, name-keyed optimizer state (a collective under FSDP; complete on rank 0)."""
        return get_optimizer_state_dict(
            self.loss_module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """Load a saved optimizer state on every rank (full and name-keyed; index-keyed states are renamed)."""
        names = [n for n, _ in self.loss_module.named_parameters()]
        if any(isinstance(k, int) for k in state.get("state", {})) or any(
            isinstance(p, int) for g in state.get("param_groups", []) for p in g["params"]
        ):
            state = _index_to_names(state, names)
        set_optimizer_state_dict(
            self.loss_module, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )


def _index_to_names(state: dict, names: list[str]) -> dict:
    """`optimizer.state_dict()` (parameters by index, in `parameters()` order) -> the name-keyed form."""
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
