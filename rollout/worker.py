"""`RolloutWorker`: a plain class hosting one `BlockEngine`; `RolloutPool` wraps it in Ray actors.

The worker is constructible and testable in-process; `ray.remote(num_cpus=...)(RolloutWorker)` is applied only when
the pool creates actors. Weights arrive as a numpy state dict (zero-copy through the object store) stamped with a
`policy_version`; a shard asks for the version it must be generated with, and a worker holding another version
refuses it, so stale weights are never used silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from policy.hybrid import HybridPolicy, load_tokenizer
from rollout.engine import BlockEngine
from rollout.multiturn import run_episodes
from rollout.types import Trajectory


@dataclass(frozen=True)
class Shard:
    """A unit of rollout work: prompts (already repeated per group) and their global indices."""

    shard_id: int
    prompt_ids: list[list[int]]
    indices: list[int]  # global sample indices: seeds and de-duplication
    policy_version: int
    sampling: dict = field(default_factory=dict)  # BlockEngine.generate keyword arguments
    env_id: str | None = None  # multi-turn: run `env_id` episodes (rollout/multiturn.py) instead of prompts
    env_seeds: list[int] | None = None  # one env.reset seed per sample when env_id is set


class StaleWeightsError(RuntimeError):
    pass


def state_dict_numpy(policy: HybridPolicy) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in policy.model.state_dict().items()}


class RolloutWorker:
    def __init__(self, checkpoint: str, engine_kwargs: dict, threads: int = 1):
        torch.set_num_threads(threads)
        self.policy = HybridPolicy.from_pretrained(checkpoint).eval()
        self.tokenizer = load_tokenizer(checkpoint)
        self.engine_kwargs = engine_kwargs
        self.engine: BlockEngine | None = (
            None  # built once: `auto` keeps its calibration and acceptance stats
        )
        self.version = 0

    def ping(self) -> int:
        return self.version

    def set_weights(self, version: int, weights: dict[str, np.ndarray]) -> int:
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
        self.policy.model.load_state_dict(state)
        self.version = version
        return version

    def generate(self, shard: Shard) -> tuple[int, list[int], list[Trajectory]]:
        if shard.policy_version != self.version:
            raise StaleWeightsError(f"shard {shard.shard_id} wants policy v{shard.policy_version}, worker has "
                                    f"v{self.version}")  # fmt: skip
        if shard.indices != list(range(shard.indices[0], shard.indices[0] + len(shard.indices))):
            raise ValueError(f"shard {shard.shard_id}: indices must be a contiguous range")
        if self.engine is None:
            self.engine = BlockEngine(self.policy, tokenizer=self.tokenizer, **self.engine_kwargs)
        engine = self.engine
        engine.policy_version = self.version  # weights load in place into the same policy module
        if shard.env_id is not None:
            trajs = run_episodes(engine, self.tokenizer, shard.env_id, shard.env_seeds, shard.sampling,
                                 index_offset=shard.indices[0])  # fmt: skip
            return shard.shard_id, shard.indices, trajs
        # index_offset = the global index: a sample's seed is the same whichever worker runs it, and on retries
        trajs = engine.generate(shard.prompt_ids, index_offset=shard.indices[0], **shard.sampling)
        return shard.shard_id, shard.indices, trajs
