"""`RolloutWorker`: a plain class hosting one `BlockEngine`; `RolloutPool` wraps it in Ray actors.

The worker is constructible and testable in-process; `ray.remote(num_cpus=...)(RolloutWorker)` is applied only when
the pool creates actors. Everything crossing the actor boundary is typed: the engine's `EngineSettings` and each
shard's `SamplingParams` are validated in the driver, and a shard comes back as a `ShardResult`. Weights arrive as a
numpy state dict (zero-copy through the object store) or as byte buckets over the sync group
(rollout/weight_sync.py), stamped with a `policy_version`; a shard asks for the version
it must be generated with, and a worker holding another version refuses it, so stale weights are never used
silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from common.device import resolve_device
from policy.compiled import compile_enabled
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from rollout.auto import AutoSampler, build_engine
from rollout.engine import BlockEngine
from rollout.settings import EngineSettings
from rollout.types import SamplingParams, Trajectory, with_eos
from rollout.weight_sync import SyncAddress, SyncGroup, load_in_place, receive, sync_targets


@dataclass(frozen=True)
class Shard:
    """A unit of rollout work: prompts (already repeated per group) and their global indices."""

    shard_id: int
    prompt_ids: list[list[int]]
    indices: list[int]  # global sample indices: seeds and de-duplication
    policy_version: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    env_id: str | None = None  # multi-turn: run `env_id` episodes (rollout/multiturn.py) instead of prompts
    env_seeds: list[int] | None = None  # one env.reset seed per sample when env_id is set


@dataclass(frozen=True)
class ShardResult:
    """A finished shard: one trajectory per sample index, in order (each names the sampler option it used)."""

    shard: Shard
    trajectories: list[Trajectory]

    @property
    def indices(self) -> list[int]:
        return self.shard.indices


class StaleWeightsError(RuntimeError):
    pass


def to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors as numpy on the host, for the object store (numpy has no bfloat16: bf16 tensors travel as fp32; each
    worker casts to its own dtype on load)."""
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        out[k] = (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy()
    return out


def state_dict_numpy(policy: HybridPolicy) -> dict[str, np.ndarray]:
    """What a sync carries (`sync_names`: tied weights once) as numpy on the host."""
    return to_numpy(sync_targets(policy.model))


def weights_digest(policy: HybridPolicy, dtype: torch.dtype | None = None) -> str:
    """SHA-1 of every synced tensor's bytes (cast to `dtype` first when given): equal digests, bit-equal weights."""
    h = hashlib.sha1()
    for name, t in sync_targets(policy.model).items():
        t = t.detach().to("cpu", dtype or t.dtype).contiguous()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RolloutWorker:
    def __init__(self, checkpoint: str, engine: EngineSettings, threads: int = 1):
        if not isinstance(engine, EngineSettings):
            raise TypeError(f"engine: expected EngineSettings, got {type(engine).__name__}")
        torch.set_num_threads(threads)
        self.device = resolve_device(engine.device, "rollout.device")
        self.policy = (
            HybridPolicy.from_pretrained(checkpoint, dtype=engine.torch_dtype).to(self.device).eval()
        )
        self.tokenizer = load_tokenizer(checkpoint)
        self.settings = engine
        # built once, on the first shard: `auto` keeps its calibration and acceptance stats
        self.engine: BlockEngine | AutoSampler | None = None
        self.version = 0
        self._sync: SyncGroup | None = None

    @property
    def compiled(self) -> bool:
        """Whether this worker's engine compiles its decode step (`EngineSettings.compile` on its device)."""
        return compile_enabled(self.settings.compile, self.device)

    def ping(self) -> int:
        return self.version

    def set_weights(self, version: int, weights: dict[str, np.ndarray]) -> int:
        """The object-store path (and a restarted worker's): a numpy state dict, copied in place onto this worker's
        device, cast to its dtype. Returns the bytes it carried."""
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
        load_in_place(sync_targets(self.policy.model), state)
        self.version = version
        return sum(int(np.asarray(v).nbytes) for v in weights.values())

    def weights_digest(self) -> str:
        return weights_digest(self.policy)

    def receive_weights(self, version: int, address: SyncAddress, rank: int) -> dict[str, float]:
        """The collective path: join the sync group at `address` as `rank` (once per group), then load `version`'s
        buckets in place. Returns the sync's metrics."""
        if self._sync is None or self._sync.address != address:
            self._sync = (
                None  # a new group (first sync, or re-formed after a failure): the old one is abandoned
            )
            self._sync = SyncGroup(address, rank, self.device if self.device.type == "cuda" else None)
        stats = receive(self._sync, sync_targets(self.policy.model), version)
        self.version = version
        return stats.metrics()

    def generate(self, shard: Shard) -> ShardResult:
        if shard.policy_version != self.version:
            raise StaleWeightsError(
                f"shard {shard.shard_id} wants policy v{shard.policy_version}, worker has v{self.version}"
            )
        if shard.indices != list(range(shard.indices[0], shard.indices[0] + len(shard.indices))):
            raise ValueError(f"shard {shard.shard_id}: indices must be a contiguous range")
        if self.engine is None:
            self.engine = build_engine(self.policy, self.settings, self.tokenizer)
        engine = self.engine
        engine.policy_version = self.version  # weights load in place into the same policy module
        sampling = with_eos(shard.sampling, engine.eos_ids)
        if shard.env_id is not None:
            # NOTE: imported here: multi-turn envs need gymnasium (and the task verifiers), which a machine that only
            # decodes prompts (the lent GPU's colocated check) does not have
            from rollout.multiturn import run_episodes

            trajs = run_episodes(
                engine,
                self.tokenizer,
                shard.env_id,
                shard.env_seeds,
                shard.sampling,
                index_offset=shard.indices[0],
            )
        else:
            # index_offset = the global index: a sample's seed is the same whichever worker runs it, and on retries
            trajs = engine.run(shard.prompt_ids, sampling, index_offset=shard.indices[0])
        return ShardResult(shard, trajs)
