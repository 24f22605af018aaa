"""Config sections shared by every job that runs rollouts on Ray workers (`blockrl train`, `blockrl rollout`):
which engine the workers host, and how many workers with what resources. Jobs inherit them, so the YAML keys are
the same everywhere (`sampler`, `levels`, `workers`, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import Section


class EngineSettings(Section):
    """The BlockEngine each worker hosts."""

    sampler: Literal["ar", "lossless", "logit_mix", "auto"] = "lossless"
    """rollout sampler (auto: exact samples, chosen per call by the cost model)."""
    levels: list[int] = Field(default_factory=lambda: [0, 4, 8])
    """proposal levels per pass."""
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)
    """w of logit_mix."""
    max_batch: int = Field(16, ge=1)
    """engine batch per worker (continuous batching)."""

    def engine_kwargs(self) -> dict:
        return {"sampler": self.sampler, "levels": list(self.levels), "max_batch": self.max_batch,
                "mix_weight": self.mix_weight}  # fmt: skip


class WorkerSettings(Section):
    """Ray rollout actors."""

    workers: int = Field(2, ge=1)
    """Ray rollout actors."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved per actor."""
    threads: int = Field(1, ge=1)
    """torch threads per actor."""
    address: str | None = None
    """Ray cluster address ("auto" or host:port); None = local Ray with its temp dir in the run directory."""
