"""`blockrl rollout`'s config: what the job generates (prompts x group, sampler, budget) and where it writes.

`rollout/batch/io.py` (prompt sources, shards, manifest) and `rollout/batch/job.py` (the job) both read it.
"""

from __future__ import annotations

from typing import Literal

import gymnasium as gym
from pydantic import Field, ValidationInfo, field_validator

import envs  # noqa: F401 (registers the blockrl/... env ids the `env` field is checked against)
from common.config import ShippedPath
from envs.rewards import OnRewardError, RewardSpec
from envs.tasks import TaskName
from rollout.settings import EngineSettings, WorkerSettings


class RolloutJobConfig(EngineSettings, WorkerSettings):
    """`blockrl rollout`: N = num_prompts * group_size trajectories on Ray workers, written as sharded Parquet."""

    out_dir: str = "runs/rollout"
    """output: part-NNNNN.parquet shards, _manifest.json, _config.yaml, _summary.json (Ray logs in _run/)."""
    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """converted policy (HF directory) the workers load."""
    tasks: list[TaskName] = Field(default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"])
    """built-in task mix cycled over the prompts (repeat a task to weight it); ignored with env or prompts_file."""
    prompts_file: str | None = None
    """JSONL, JSON (array), Parquet or `datasets` prompts: `prompt` (text or messages) or `messages`, any other
    columns passed to `rewards` (schema in rollout/batch/io.py and docs/rollout.md); overrides `tasks`."""
    rewards: list[RewardSpec] = Field(default_factory=list)
    """reward functions (`module:function` or `file.py:function`, TRL's signature) and weights; empty = the
    built-in verifier (`envs.tasks:task_reward`), which scores rows of built-in tasks and leaves others null."""
    on_reward_error: OnRewardError = "raise"
    """a reward function that raises or returns a non-finite value: stop the job naming it and the row, or
    record it (the term null in `reward_terms`, counted 0, the failures counted in `_summary.json`)."""
    env: str | None = None
    """registered gym text env (e.g. blockrl/chain_sum-v0, multi-turn blockrl/calc-chain_sum-v0); overrides tasks."""
    prompt_format: Literal["auto", "text", "raw", "chat"] = "auto"
    """prompt encoding: auto = the checkpoint's training format (chat for a model converted on chats)."""
    num_prompts: int | None = Field(None, ge=1)
    """distinct prompts; required with tasks/env; with prompts_file, None = every row, else the first num_prompts."""
    group_size: int = Field(1, ge=1)
    """samples per prompt (contiguous; group_index = sample_index // group_size)."""
    seed: int = 0
    """task-prompt draw, env.reset and sampling seed; sample i is seeded by (seed, i)."""
    shard_size: int = Field(64, ge=1)
    """samples per Parquet shard: the unit of work and of resume."""
    max_new_tokens: int = Field(160, ge=1)
    """completion budget (an env episode's budget over all its turns, env tokens included)."""
    temperature: float = Field(1.0, ge=0.0)
    """sampling temperature (0 = greedy)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """nucleus sampling mass."""
    top_k: int = Field(0, ge=0)
    """top-k filter (0 = off)."""
    stop_strings: list[str] = Field(default_factory=list)
    """extra stop strings (EOS always stops)."""
    policy_version: int = Field(0, ge=0)
    """stamped on every row (e.g. the RL step the checkpoint came from)."""

    @field_validator("env")
    @classmethod
    def _known_env(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if info.data.get("prompts_file") is not None:
            raise ValueError("set either env or prompts_file, not both")
        if v not in gym.registry:  # rollout.batch.io imported `envs`, which registers the blockrl ids
            ours = sorted(k for k in gym.registry if k.startswith("blockrl/"))
            raise ValueError(f"{v!r} is not a registered gym env id; blockrl envs: {ours}")
        return v

    @field_validator("num_prompts")
    @classmethod
    def _needed_with_tasks(cls, v: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("prompts_file") is None:
            source = "env" if info.data.get("env") is not None else "tasks"
            if v is None:
                raise ValueError(f"required when prompts come from `{source}` (or set prompts_file)")
            if source == "tasks" and info.data.get("tasks") == []:
                raise ValueError("prompts from `tasks` need at least one task (or set env / prompts_file)")
        return v
