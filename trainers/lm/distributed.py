"""Data parallelism for `blockrl pretrain` / `convert` under `torchrun`: process group, DDP wrapping, the global token
count, and which rank writes.

Every rank draws the same global batch (a pure function of (seed, step)) and takes its own slice, split further
into `optim.grad_accum` micro-batches. Each micro-batch's loss is a token mean, so it is re-weighted by its share of
the global target tokens (times the world size, which DDP's gradient average divides out again): N processes x
batch b then follow the loss curve of 1 process x batch N*b, and a checkpoint (full weights and optimizer state,
written by rank 0) resumes under any world size.

    torchrun --nproc-per-node 2 -m trainers.cli convert --config convert_tiny_moe
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


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
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda":
            device = f"cuda:{local}"
        dev = torch.device(device)
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

    def wrap(self, module: nn.Module, find_unused: bool) -> nn.Module:
        """DDP around `module` when there are several processes (MoE: experts a rank's batch skips get no grad)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused)

    def no_sync(self, module: nn.Module, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return module.no_sync() if self.active and not last else nullcontext()

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
