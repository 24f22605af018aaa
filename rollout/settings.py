"""Config sections shared by every job that runs rollouts on Ray workers (`blockrl train`, `blockrl rollout`):
which engine the workers host, and how many workers with what resources. Jobs inherit them, so the YAML keys are
the same everywhere (`sampler`, `levels`, `workers`, ...).

`EngineSettings` is also what crosses the Ray boundary: the driver validates it (a bad value fails there, naming the
field) and sends the frozen object; the worker builds its engine from it (`rollout.auto.build_engine`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.config import ConfigError, Section
from common.device import DeviceSettings
from rollout.engine import check_levels
from rollout.history import HistorySettings
from rollout.types import Levels, check_level_list


class EngineSettings(DeviceSettings):
    """The BlockEngine each worker hosts, on `device` with weights in `dtype`."""

    sampler: Literal["ar", "lossless", "logit_mix", "auto"] = "lossless"
    """rollout sampler (auto: exact samples, chosen per call by the cost model)."""
    levels: Levels = Field(default_factory=lambda: ["end"])
    """proposal levels per pass; `end` = the end of each step's draft (rollout.types.split_levels). Default [end]: the
    fastest set measured at B = 1 and within 3% of [0] at 16 rows (docs/benchmarks.md, "The lean decode step")."""
    drafts: Literal["auto", "diffusion", "history", "both"] = "auto"
    """where drafts come from: the diffusion drafter (a converted model), history (rollout/history.py: the row's
    own text, its group's siblings and recent rollouts of its prompt; any causal LM, no conversion), or both, chosen
    per row and step. auto = diffusion on a converted model, history on a plain one."""
    history: HistorySettings = Field(default_factory=HistorySettings)
    """the history draft source: memory bound, eviction, matching (`drafts: history | both`)."""
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)
    """w of logit_mix."""
    max_batch: int = Field(16, ge=1)
    """engine batch per worker (continuous batching)."""
    compile: Literal["off", "on", "auto"] = "auto"
    """the decode step's model body under torch.compile (policy/compiled.py): on CUDA also captured as CUDA graphs.
    auto = on CUDA only (on the CPU it saves little and compiles for tens of seconds per process); prefill stays
    eager; a family that does not compile runs eager, with one logged reason."""

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: Levels) -> Levels:
        check_level_list(v)
        return v

    def resolved_drafts(self, converted: bool) -> str:
        """`drafts` with `auto` resolved for a policy that is (or is not) converted."""
        if self.drafts == "auto":
            return "diffusion" if converted else "history"
        return self.drafts

    def check_checkpoint(self, converted: bool, block_size: int, prefix: str = "") -> None:
        """Raise ConfigError, naming the field (after `prefix`, e.g. "rollout."), where these settings cannot run
        on a checkpoint that is (or is not) converted, with block size K = `block_size`: before any work starts."""
        if self.sampler == "ar":
            return
        drafts = self.resolved_drafts(converted)
        if drafts != "history" and not converted:
            raise ConfigError(
                f"{prefix}drafts: {self.drafts!r} needs a converted checkpoint (the diffusion drafter); a plain "
                "one drafts from history: drafts: history (or auto), or run blockrl convert"
            )
        if self.sampler == "logit_mix" and drafts == "history":
            raise ConfigError(
                f"{prefix}sampler: logit_mix mixes the diffusion drafter's logits, and history drafts have none; "
                "use lossless (a plain checkpoint drafts from history only)"
            )
        if drafts != "history" and self.sampler != "auto":
            try:
                check_levels(block_size, self.levels)
            except ValueError as e:
                raise ConfigError(f"{prefix}levels: {e}") from None

    def engine_settings(self) -> EngineSettings:
        """Just the engine fields (jobs inherit this class): the typed object the workers get."""
        return EngineSettings(**{k: getattr(self, k) for k in EngineSettings.model_fields})


class WorkerSettings(Section):
    """Ray rollout actors."""

    workers: int = Field(2, ge=1)
    """Ray rollout actors."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved per actor."""
    gpus_per_worker: float = Field(0.0, ge=0.0)
    """Ray GPUs reserved per actor; fractions share a GPU (0.25 = four workers per GPU). 0 = CPU workers."""
    threads: int = Field(1, ge=1)
    """torch threads per actor."""
    address: str | None = None
    """Ray cluster address ("auto" or host:port); None = local Ray with its temp dir in the run directory."""
    shard_timeout_s: float = Field(600.0, gt=0.0)
    """a shard not back after this long counts as a hung worker: it is restarted and the shard resubmitted."""
    placement: Literal["none", "pack", "spread", "strict_pack", "strict_spread"] = "none"
    """Ray placement group for the workers (and, in `blockrl train`, the learner's bundle): reserved all at once
    before any worker starts, so a job never runs on half its workers. pack / spread: Ray's best-effort strategies;
    strict_*: all bundles on one node / each on its own node. none = no reservation (workers spread best-effort)."""
    placement_timeout_s: float = Field(120.0, gt=0.0)
    """how long to wait for the placement group's resources before failing (naming what was asked for)."""

    def worker_settings(self) -> WorkerSettings:
        """Just the worker fields (jobs inherit this class)."""
        return WorkerSettings(**{k: getattr(self, k) for k in WorkerSettings.model_fields})
