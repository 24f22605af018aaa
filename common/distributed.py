"""Data parallelism shared by `blockrl pretrain` / `convert` (ranks under `torchrun`) and the RL learner group
(ranks as Ray actors, trainers/rl/group.py): the process group, DDP or FSDP2, the global reductions, and which rank
writes.

Every rank holds the same global batch and takes its own slice (`pretrain` / `convert` split it further into
`optim.grad_accum` micro-batches). Each micro-batch's loss is a token mean, so it is re-weighted by its share of
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
    blockrl train --config grpo_tiny --set learner.world_size=2 --set learner.strategy=fsdp
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


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


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
    def from_env(cls, device: str = "auto", timeout_s: float = 7200.0) -> DistContext:
        """The torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK), or one process. gloo on CPU, nccl on CUDA.
        The default timeout is long: rank 0 evaluates and writes checkpoints while the others wait."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(_backend(dev), timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, dev)

    @classmethod
    def join(
        cls, rank: int, world: int, address: str, device: str = "auto", timeout_s: float = 600.0
    ) -> DistContext:
        """Join a group of `world` ranks that rendezvous at `address` (host:port, rank 0 listens): the RL learner
        group's ranks, which Ray starts (no torchrun environment). Every collective fails after `timeout_s`."""
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1:
            dist.init_process_group(
                _backend(dev),
                init_method=f"tcp://{address}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=timeout_s),
            )
        return cls(rank, world, dev)

    def bounds(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most one)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of the global batch."""
        lo, hi = self.bounds(len(items))
        return items[lo:hi]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def sum(self, x: float) -> float:
        return float(self.sum_tensor(torch.tensor([x], dtype=torch.float64)))

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of `t` (a new tensor on t's device; t itself when alone)."""
        if not self.active:
            return t
        out = t.detach().to(self._comm_device, copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def weighted_means(self, values: dict[str, tuple[float, float]]) -> dict[str, float]:
        """{key: (local mean, local weight)} -> {key: the mean over every rank's items}, in one all-reduce. Every rank
        must pass the same keys; a key whose weights sum to 0 gets 0."""
        keys = sorted(values)
        local = torch.tensor(
            [x for k in keys for x in (values[k][0] * values[k][1], values[k][1])], dtype=torch.float64
        )
        tot = self.sum_tensor(local).view(-1, 2)
        return {k: float(s / w) if w else 0.0 for k, (s, w) in zip(keys, tot.tolist(), strict=True)}

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's share (`bounds(n)` rows of `local`, in rank order) concatenated: the [n, ...] tensor."""
        if not self.active:
            return local
        width = -(-n // self.world)  # gloo's all_gather wants equal sizes: pad every share to the largest
        pad = local.new_zeros((width, *local.shape[1:]))
        pad[: local.shape[0]] = local
        pad = pad.to(self._comm_device)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        sizes = [(r + 1) * n // self.world - r * n // self.world for r in range(self.world)]
        return torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)]).to(local.device)

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
    """The trained modules as this process trains them (`module`: the root, bare, under DDP or sharded by FSDP2), and
    the collective views a checkpoint, an evaluation or a weight sync needs. The root holds the policy as its
    `policy` attribute (and may hold more: the RL learner's value head). Build the optimizer on `parameters()` after
    `place()`."""

    def __init__(self, ctx: DistContext, policy, root: nn.Module, strategy: str = "ddp"):
        if strategy not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {strategy!r}")
        if getattr(root, "policy", None) is not policy:
            raise ValueError("Parallel: the root module must hold the policy as `root.policy`")
        self.ctx, self.policy, self.root = ctx, policy, root
        self.fsdp = strategy == "fsdp" and ctx.active
        # FSDP: rank 0 keeps an unsharded CPU copy to evaluate and save (the sharded model cannot run alone)
        self.shadow = copy.deepcopy(policy).cpu() if self.fsdp and ctx.is_main else None
        self.module: nn.Module = root

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
            fully_shard(self.root)
        elif self.ctx.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # MoE: experts a rank's batch skips get no gradient
            self.module = DDP(self.root, device_ids=ids, find_unused_parameters=bool(self.policy.moe))

    def parameters(self):
        return self.root.parameters()

    def no_sync(self, last: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-batch (FSDP2 reduce-scatters each one)."""
        if self.ctx.active and not self.fsdp and not last:
            return self.module.no_sync()
        return nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(list(self.parameters()), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def full_state(self, every_rank: bool = False) -> dict[str, torch.Tensor] | None:
        """The root's full state dict on rank 0 (None on the other ranks), or on every rank. FSDP: every shard
        gathered first (a collective every rank must join; to rank 0's CPU, or to each rank's device), so nothing
        may be sent before this returns (TRL #7131)."""
        if not self.fsdp:
            return self.root.state_dict() if self.ctx.is_main or every_rank else None
        full = get_model_state_dict(
            self.root, options=StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
        )
        return full if self.ctx.is_main or every_rank else None

    def full_policy(self, full: dict[str, torch.Tensor] | None = None):
        """The policy with its full weights on rank 0 (FSDP: gathered into the CPU copy; a collective every rank
        must join, unless `full` is a `full_state()` the caller has), None on the other ranks."""
        if not self.fsdp:
            return self.policy if self.ctx.is_main else None
        if full is None:
            full = self.full_state()
        if self.shadow is None:
            return None
        self.shadow.load_state_dict(
            {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
        )
        return self.shadow

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """The full, name-keyed optimizer state (a collective under FSDP; complete on rank 0)."""
        return get_optimizer_state_dict(
            self.root, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """Load a saved optimizer state on every rank (full and name-keyed; index-keyed states are renamed)."""
        names = [n for n, _ in self.root.named_parameters()]
        if any(isinstance(k, int) for k in state.get("state", {})) or any(
            isinstance(p, int) for g in state.get("param_groups", []) for p in g["params"]
        ):
            state = _index_to_names(state, names)
        set_optimizer_state_dict(
            self.root, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )


def _index_to_names(state: dict, names: list[str]) -> dict:
    """`optimizer.state_dict()` (parameters by index, in `parameters()` order) -> the name-keyed form."""
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
