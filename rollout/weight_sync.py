"""Weight sync by collective: the learner's full weights reach every rollout worker as flat byte buckets over a
process group of their own, separate from the learner group's, set up out of band through a TCPStore that the
driver hosts. The rollout engines never join the learner's group.

The sync group has 1 + W members: rank 0 sends (the learner, or learner rank 0 of a group), ranks 1..W are the
workers. Only the sender and the receivers are members: the other learner ranks take part in the gather on their own
group and would idle here. One sync is:

1. a header, int64 [version, metadata bytes], then the metadata (`SyncPlan`: every tensor's name, dtype, shape,
   bucket and byte offset) as UTF-8 JSON;
2. each bucket as one uint8 tensor of at most `bucket_mb` (a tensor larger than that gets a bucket of its own).

Receivers check the version, then copy each tensor out of its bucket into the parameter or buffer of that name, in
place, cast to their own dtype: nothing is pickled. Tied weights are sent once (`sync_names`). The sender has every
tensor gathered before its first send: FSDP's gathers are collectives of the learner group, and interleaving them
with the sends hangs (TRL #7131). Every operation has the group's timeout: a lost peer raises instead of hanging.

Backends: gloo for CPU tensors. On CUDA the same protocol runs over NCCL (the buckets on the device); on one GPU,
where NCCL cannot join two processes, the colocated mode moves weights in-process instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from common.config import Section


class WeightSyncConfig(Section):
    """How a new policy version reaches the rollout workers after each learner step."""

    transport: Literal["auto", "collective", "object_store"] = "auto"
    """collective: byte buckets over a sync group of the learner's rank 0 and the workers (gloo on CPU, NCCL on
    CUDA); object_store: a numpy state dict through Ray's object store (also the fallback when a collective fails,
    and how a restarted worker gets the current weights). auto: collective when every worker has a GPU of its own
    (NCCL), else the object store, which on one CPU host is shared memory: measured 5-7x faster there than gloo
    over loopback TCP (docs/benchmarks.md)."""
    bucket_mb: float = Field(256.0, gt=0.0)
    """the most bytes one broadcast carries (a tensor larger than this goes alone)."""
    timeout_s: float = Field(300.0, gt=0.0)
    """deadline of every operation of the sync group: a lost or hung peer fails the sync (then the object store
    carries that version) instead of hanging it."""


def pick_transport(cfg: WeightSyncConfig, gpus_per_worker: float, learner_cuda: bool) -> tuple[str, str]:
    """(transport, backend) for this layout, decided once in the driver so every member builds the same group.
    NCCL needs a GPU per process on both sides: `auto` is the collective only there, else the object store; a
    collective asked for anywhere else runs on gloo, staged through the host."""
    nccl = learner_cuda and gpus_per_worker >= 1
    transport = cfg.transport if cfg.transport != "auto" else ("collective" if nccl else "object_store")
    return transport, "nccl" if nccl else "gloo"


DTYPES = {
    str(t).removeprefix("torch."): t
    for t in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.bool,
    )
}


def sync_names(model: nn.Module) -> list[str]:
    """What a weight sync carries, in order: the parameters, each tied group once (under its first name), and the
    persistent buffers."""
    params = [n for n, _ in model.named_parameters()]  # named_parameters drops tied aliases
    seen = {id(p) for p in model.parameters()}
    non_persistent = {
        f"{prefix}.{b}" if prefix else b
        for prefix, m in model.named_modules()
        for b in getattr(m, "_non_persistent_buffers_set", ())
    }
    buffers = [n for n, b in model.named_buffers() if n not in non_persistent and id(b) not in seen]
    return params + buffers


def sync_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the tensor a sync writes into, for every name of `sync_names`."""
    everything = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: everything[n] for n in sync_names(model)}


def load_in_place(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `targets` by name (cast to each target's dtype and device). Every target must be given:
    a sync that misses a weight would leave the worker on a mix of two versions."""
    missing = sorted(set(targets) - set(tensors))
    unknown = sorted(set(tensors) - set(targets))
    if missing or unknown:
        raise ValueError(f"weight sync: missing {missing[:5]}, unknown {unknown[:5]}")
    for name, src in tensors.items():
        _copy(targets[name], src, name)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"weight sync: {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int  # bytes into its bucket
    nbytes: int


@dataclass(frozen=True)
class SyncPlan:
    """The metadata list of one sync: which bytes of which bucket hold which tensor."""

    version: int
    buckets: tuple[int, ...]  # bytes per bucket
    tensors: tuple[TensorMeta, ...]

    @property
    def nbytes(self) -> int:
        return sum(self.buckets)

    @staticmethod
    def build(tensors: dict[str, torch.Tensor], version: int, bucket_bytes: int) -> SyncPlan:
        """Tensors in order into buckets of at most `bucket_bytes` (each tensor whole, 8-byte aligned)."""
        metas, sizes, used = [], [], bucket_bytes  # start "full": the first tensor opens bucket 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            if used and used + n > bucket_bytes:
                sizes.append(0)
                used = 0
            metas.append(
                TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), len(sizes) - 1, used, n)
            )
            used += -(-n // 8) * 8
            sizes[-1] = used
        return SyncPlan(version, tuple(sizes), tuple(metas))

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @staticmethod
    def from_bytes(raw: bytes) -> SyncPlan:
        d = json.loads(raw.decode())
        metas = tuple(TensorMeta(**{**m, "shape": tuple(m["shape"])}) for m in d["tensors"])
        return SyncPlan(d["version"], tuple(d["buckets"]), metas)

    def pack(
        self, i: int, tensors: dict[str, torch.Tensor], device: torch.device, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bucket i as one flat uint8 tensor (written into `out` when it is one of the right size and device)."""
        buf = out if _fits(out, self.buckets[i], device) else None
        if buf is None:
            buf = torch.empty(self.buckets[i], dtype=torch.uint8, device=device)
        for m in self.tensors:
            if m.bucket == i:
                src = tensors[m.name].detach().contiguous().reshape(-1).view(torch.uint8)
                buf[m.offset : m.offset + m.nbytes].copy_(src)
        return buf

    def unpack(self, i: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of bucket i as views into `buf` (no copy)."""
        return {
            m.name: buf[m.offset : m.offset + m.nbytes].view(DTYPES[m.dtype]).view(m.shape)
            for m in self.tensors
            if m.bucket == i
        }


def _fits(buf: torch.Tensor | None, size: int, device: torch.device) -> bool:
    return buf is not None and buf.numel() == size and buf.device == device


@dataclass(frozen=True)
class SyncAddress:
    """Where a sync group meets: the driver's TCPStore, and a prefix naming this group (a new prefix after a failure
    or a membership change, so a fresh group never sees a broken one's keys)."""

    host: str
    port: int
    prefix: str
    size: int  # 1 sender + W workers
    timeout_s: float
    backend: str = "gloo"  # or "nccl": every member on its own GPU (the buckets stay on the devices)


class SyncGroup:
    """One member's handle on the sync group (rank 0 sends, the others receive)."""

    def __init__(self, address: SyncAddress, rank: int, device: torch.device | None = None):
        """`device`: this member's GPU, where the buckets live under NCCL (ignored under gloo: host buckets)."""
        timeout = timedelta(seconds=address.timeout_s)
        store = dist.TCPStore(address.host, address.port, is_master=False, timeout=timeout)
        self.address, self.rank = address, rank
        nccl = address.backend == "nccl"
        if nccl and (device is None or device.type != "cuda"):
            raise ValueError(f"weight sync: an NCCL sync group needs this member on a GPU, got {device}")
        self.device = device if nccl else torch.device("cpu")
        # a receiver's bucket buffers, kept from one sync to the next: fresh ones would cost their page faults again
        self.buffers: list[torch.Tensor] = []
        prefixed = dist.PrefixStore(address.prefix, store)
        if nccl:
            # NOTE: with blocking wait a lost peer raises in wait() after the timeout (then the object store carries
            # the version); without it NCCL's watchdog would tear the whole process down. Read when a group is made,
            # so it leaves the learner's own group as it was.
            os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "1"
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, address.size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, address.size, timeout)

    def close(self) -> None:
        """Leave the group (its connections and threads go; a failed group is aborted rather than flushed)."""
        # deliberate: an already broken group has nothing left to close
        with contextlib.suppress(RuntimeError, AttributeError):
            self.pg.abort()

    def broadcast(self, t: torch.Tensor) -> None:
        self.broadcast_async(t).wait()

    def broadcast_async(self, t: torch.Tensor):
        """Start broadcasting `t` from rank 0; every member must start the same broadcasts in the same order."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = timedelta(seconds=self.address.timeout_s)
        return self.pg.broadcast([t], opts)


@dataclass(frozen=True)
class SentWeights:
    """What one sync sent, kept by the sender on the host: the object-store copy of that version (the fallback, and
    a restarted worker's weights), as views into the buckets themselves (no second copy)."""

    plan: SyncPlan
    buckets: tuple[torch.Tensor, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, buf in enumerate(self.buckets):
            out |= self.plan.unpack(i, buf)
        return out


@dataclass(frozen=True)
class SyncStats:
    version: int
    nbytes: int
    buckets: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {
            "sync/bytes": float(self.nbytes),
            "sync/buckets": float(self.buckets),
            "sync/gb_per_s": self.nbytes / max(self.seconds, 1e-9) / 1e9,
        }


def send(
    group: SyncGroup,
    tensors: dict[str, torch.Tensor],
    version: int,
    bucket_mb: float,
    reuse: SentWeights | None = None,
) -> tuple[SyncStats, SentWeights]:
    """Rank 0: `tensors` (already gathered, in `sync_names` order) to every receiver as `version`. Two buckets are
    in flight at a time: the next is packed while the last is on the wire. `reuse`: an earlier sync's copy whose
    buckets may be overwritten (the sender's two copies alternate)."""
    t0 = time.perf_counter()
    plan = SyncPlan.build(tensors, version, int(bucket_mb * 2**20))
    raw = plan.to_bytes()
    group.broadcast(torch.tensor([version, len(raw)], dtype=torch.int64, device=group.device))
    group.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(group.device))
    kept: list[torch.Tensor] = []
    in_flight: list = []
    spare = list(reuse.buckets) if reuse is not None and group.device.type == "cpu" else []
    for i in range(len(plan.buckets)):
        buf = plan.pack(i, tensors, group.device, spare[i] if i < len(spare) else None)
        in_flight.append((group.broadcast_async(buf), buf))
        if len(in_flight) == 2:
            kept.append(_finish(*in_flight.pop(0)))
    kept += [_finish(*w) for w in in_flight]
    stats = SyncStats(version, plan.nbytes, len(plan.buckets), time.perf_counter() - t0)
    return stats, SentWeights(plan, tuple(kept))


def _finish(work, buf: torch.Tensor) -> torch.Tensor:
    work.wait()
    return buf if buf.device.type == "cpu" else buf.cpu()


def receive(group: SyncGroup, targets: dict[str, torch.Tensor], version: int) -> SyncStats:
    """Ranks 1..W: the sender's weights into `targets` (name -> parameter or buffer), in place; bucket i + 1 arrives
    while bucket i is copied out. A header of another version is an error (the worker would otherwise run on weights
    it was not told about)."""
    t0 = time.perf_counter()
    head = torch.zeros(2, dtype=torch.int64, device=group.device)
    group.broadcast(head)
    got, n = (int(x) for x in head.tolist())
    raw = torch.empty(n, dtype=torch.uint8, device=group.device)
    group.broadcast(raw)
    plan = SyncPlan.from_bytes(raw.cpu().numpy().tobytes())
    names = {m.name for m in plan.tensors}
    error = None
    if got != version or plan.version != version:
        error = RuntimeError(f"weight sync: expected policy v{version}, the sender sent v{got}")
    elif names != set(targets):
        error = ValueError(
            f"weight sync v{version}: missing {sorted(set(targets) - names)[:5]}, "
            f"unknown {sorted(names - set(targets))[:5]}"
        )
    else:  # every check before the first bucket: a receiver that stops midway would stall the others
        bad = [m for m in plan.tensors if m.dtype not in DTYPES or tuple(targets[m.name].shape) != m.shape]
        if bad:
            m = bad[0]
            error = ValueError(
                f"weight sync v{version}: {m.name} comes as {m.dtype} {m.shape}, this worker holds "
                f"{tuple(targets[m.name].shape)} ({len(bad)} such tensors)"
            )

    kept = group.buffers

    def post(i: int):
        buf = kept[i] if i < len(kept) and _fits(kept[i], plan.buckets[i], group.device) else None
        if buf is None:
            buf = torch.empty(plan.buckets[i], dtype=torch.uint8, device=group.device)
        return group.broadcast_async(buf), buf

    nxt, used = (post(0) if plan.buckets else None), []
    for i in range(len(plan.buckets)):
        work, buf = nxt
        nxt = post(i + 1) if i + 1 < len(plan.buckets) else None
        work.wait()  # refused or not, take every bucket: the sender and the other receivers go on
        used.append(buf)
        if error is None:
            for name, src in plan.unpack(i, buf).items():
                _copy(targets[name], src, name)
    group.buffers = used
    if error is not None:
        raise error
    return SyncStats(version, plan.nbytes, len(plan.buckets), time.perf_counter() - t0)
