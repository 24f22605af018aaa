"""`blockrl regress`'s settings: the samplers it compares (`SamplerSpec`) and the job (`RegressConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.config import Section, ShippedPath
from common.device import DeviceSettings
from envs import splits
from envs.rewards import OnRewardError, RewardSpec
from envs.tasks import CORPUS_TASKS, TaskName
from rollout.settings import EngineSettings
from rollout.types import Levels
from trainers.regress.stats import (
    ToleranceConfig,
)

FORMAT = "blockrl.regress/1"


class SamplerSpec(Section):
    """One sampler of the suite."""

    name: str
    """label in the report and the baseline (unique)."""
    sampler: Literal["ar", "lossless", "logit_mix", "auto"]
    """engine sampler."""
    levels: Levels = Field(default_factory=lambda: [0, 4, 8])
    """proposal levels per pass (ignored by ar and auto)."""
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)
    """w of logit_mix."""
    drafts: Literal["auto", "diffusion", "history", "both"] = "auto"
    """draft source (`EngineSettings.drafts`): auto = diffusion on a converted checkpoint, history on a plain one."""
    prompt_format: Literal["auto", "text", "raw", "chat"] = "auto"
    """prompt encoding: auto = the checkpoint's training format; a `raw` row (no special tokens) measures, and gates,
    the drafter's sensitivity to the prompt format."""
    gate_speedup: bool = True
    """hold this row's tok/s to `tolerance.min_speedup` x the engine AR path's (off for a diagnostic row, such as
    raw prompts, that measures a known slowdown; it stays gated against its baseline)."""

    def engine_settings(self, max_batch: int) -> EngineSettings:
        return EngineSettings(
            sampler=self.sampler,
            levels=self.levels,
            mix_weight=self.mix_weight,
            drafts=self.drafts,
            max_batch=max_batch,
        )


class RegressConfig(DeviceSettings):
    """`blockrl regress`: seeded eval suite, samplers, baseline and tolerances (`device`, `dtype`: where it runs;
    recorded in the report's meta)."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """converted checkpoint under test."""
    run_dir: str = "runs/regress"
    """output: config.yaml, results.json, completions.jsonl, report.md, PNGs."""
    baseline: ShippedPath = "configs/regress_baseline.json"
    """baseline JSON compared against (rewritten by --update-baseline)."""
    tasks: list[TaskName] = Field(default_factory=lambda: list(CORPUS_TASKS), min_length=1)
    """reasoning-gym tasks of the suite (envs.tasks.TASKS); ignored with prompts_file."""
    prompts_file: str | None = None
    """the researcher's eval prompts instead of `tasks`: JSONL / JSON / Parquet / `datasets` rows with `prompt`
    (text or messages) or `messages`, other columns passed to `rewards` (`envs.prompt_file`, as in `blockrl train`);
    the `task` column labels the per-task rates."""
    num_prompts: int | None = Field(None, ge=1)
    """with prompts_file: its first num_prompts rows (None = every row)."""
    rewards: list[RewardSpec] = Field(default_factory=list)
    """reward functions (`module:function` or `file.py:function`, TRL's signature) and weights; empty = the
    built-in verifier (`envs.tasks:task_reward`). Every sample must be scored by at least one."""
    on_reward_error: OnRewardError = "raise"
    """a reward function that raises or returns a non-finite value: stop naming it and the row, or record it
    (the term counts 0; `reward_failures` per sampler in results.json)."""
    solve_threshold: float = 1.0
    """a sample counts as solved (solve rate, pass@k, the paired tests) when its reward is at least this."""
    prompts_per_task: int = Field(20, ge=1)
    """prompts per task."""
    samples_per_prompt: int = Field(4, ge=1)
    """samples per prompt (n of pass@k)."""
    pass_k: list[int] = Field(default_factory=lambda: [2, 4])
    """k values of pass@k (each <= samples_per_prompt; pass@1 is the solve rate)."""
    prompt_seed: int = splits.HELDOUT_SEED
    """reasoning-gym seed of the prompts (default: the corpus held-out split, never trained on; envs/splits.py)."""
    seed: int = 0
    """sampling seed."""
    temperature: float = Field(1.0, ge=0.0)
    """sampling temperature (0 = greedy)."""
    max_new_tokens: int = Field(160, ge=1)
    """completion budget."""
    max_batch: int = Field(16, ge=1)
    """engine batch (rows decoded together, continuous batching)."""
    repeats: int = Field(2, ge=1)
    """timed passes over the suite per sampler, samplers alternating (quality from the first)."""
    threads: int = Field(1, ge=1)
    """torch threads. NOTE: 2 threads on a busy 2-core machine can be 50x slower (spin-waits); 1 is safe."""
    samplers: list[SamplerSpec] = Field(
        default_factory=lambda: [
            SamplerSpec(name="ar", sampler="ar"),
            SamplerSpec(name="lossless", sampler="lossless"),
            SamplerSpec(name="logit_mix", sampler="logit_mix"),
        ]
    )
    """samplers to measure; one must be sampler "ar" (the throughput reference)."""
    tolerance: ToleranceConfig = ToleranceConfig()
    wandb: Literal["offline", "online", "disabled"] = "disabled"
    """wandb mode (dirs inside run_dir)."""
    wandb_project: str = "blockrl-regress"
    """wandb project."""

    @model_validator(mode="after")
    def _check(self) -> RegressConfig:
        names = [s.name for s in self.samplers]
        if len(set(names)) != len(names):
            raise ValueError(f"samplers: names must be unique, got {names}")
        if not any(s.sampler == "ar" for s in self.samplers):
            raise ValueError("samplers: needs an entry with sampler 'ar' (the throughput reference)")
        bad = [k for k in self.pass_k if not 1 <= k <= self.samples_per_prompt]
        if bad:
            raise ValueError(f"pass_k: {bad} not in 1..samples_per_prompt={self.samples_per_prompt}")
        return self

    @property
    def ar_name(self) -> str:
        return next(s.name for s in self.samplers if s.sampler == "ar")

    def suite(self, prompts_sha256: str | None = None) -> dict:
        """What makes two runs comparable (the checkpoint, threads and tolerances are not part of it); a prompts
        file enters by the hash of its rows (`prompts_sha256`), not its path. Fields at their defaults are left out,
        so baselines written before a field existed still compare."""
        keys = ["samples_per_prompt", "seed", "temperature", "max_new_tokens", "max_batch"]
        keys += ["num_prompts"] if self.prompts_file else ["tasks", "prompts_per_task", "prompt_seed"]
        d = {k: v for k, v in self.model_dump(mode="json").items() if k in keys}
        if self.prompts_file:
            d["prompts_sha256"] = prompts_sha256
        if self.rewards:
            d["rewards"] = [r.model_dump(mode="json") for r in self.rewards]
        if self.solve_threshold != 1.0:
            d["solve_threshold"] = self.solve_threshold
        # gate_speedup is a gating choice, like the tolerances: not part of what makes runs comparable
        samplers = {
            s.name: s.model_dump(
                mode="json",
                exclude={"name", "gate_speedup"} | ({"drafts"} if s.drafts == "auto" else set()),
            )
            for s in self.samplers
        }
        return d | {"samplers": samplers}


# ------------------------------------------------------------------------------------------------ records
