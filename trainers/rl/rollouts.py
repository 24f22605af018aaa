"""A training step's rollouts: which prompts (or env episodes) a step uses, collecting them on the Ray pool (inline
or in the background for async one-step-off-policy training), scoring them, and the per-step rollout metrics.

Prompts are a pure function of (seed, step), so a resumed run draws the same ones. Single-turn steps sample task
prompts and score completions with the reasoning-gym verifiers, or rows of the researcher's prompt file scored by
their reward functions (`envs.prompt_file`); multi-turn steps (`env`) run gymnasium episodes whose rewards come from
the env, turn by turn.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import gymnasium as gym
import torch

import envs  # noqa: F401 (registers blockrl/... env ids)
from envs import splits
from envs.prompt_file import PromptFileTask, PromptRow
from envs.rewards import Scored
from envs.tasks import TaskSample, score
from policy.tokenizer import encode_prompt
from rollout.cost_model import AcceptanceStats
from rollout.pool import RolloutPool
from rollout.types import SamplingParams, Trajectory


@dataclass(frozen=True)
class StepBatch:
    """One step's scored rollouts: `trajs` are prompts x group (groups contiguous)."""

    step: int
    trajs: list[Trajectory]
    tasks: list[str]  # per prompt
    rewards: list[float]  # per trajectory
    rollout_s: float
    extra: dict[str, float] = field(default_factory=dict)  # reward-function metrics (prompt files)


class StepRollouts:
    """Produces each step's `StepBatch` from the pool; `launch(step)` runs it in a background thread."""

    def __init__(
        self,
        pool: RolloutPool,
        tok,
        tasks: list[str],
        env: str | None,
        seed: int,
        prompts_per_step: int,
        group_size: int,
        sampling: SamplingParams,
        prompt_format: str = "text",
        file_task: PromptFileTask | None = None,
    ):
        self.pool, self.tok, self.tasks, self.env = pool, tok, tasks, env
        self.file_task = file_task
        self.prompt_format = prompt_format
        self.seed, self.prompts_per_step, self.group_size = seed, prompts_per_step, group_size
        self.sampling = sampling
        self.env_task = gym.make(env).unwrapped.task if env else None
        self.prompt_pool = {} if env or file_task else splits.rl_prompt_pool(tasks, seed)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts")

    @property
    def train_prompts(self) -> set[str]:
        """Every prompt this run can train on (in env mode: the env's own prompt pool)."""
        return splits.rl_train_prompts(self.tasks, self.seed, self.env_task)

    def step_prompts(self, step: int) -> list[TaskSample] | list[PromptRow]:
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        if self.file_task is not None:
            rows = self.file_task.train
            return [
                rows[int(torch.randint(len(rows), (1,), generator=g))] for _ in range(self.prompts_per_step)
            ]
        out = []
        for i in range(self.prompts_per_step):
            pool = self.prompt_pool[self.tasks[i % len(self.tasks)]]
            out.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        return out

    def collect(self, step: int) -> StepBatch:
        t0 = time.time()
        sampling = dataclasses.replace(self.sampling, seed=self.seed * 100_003 + step)
        if self.env:
            seeds = [
                self.seed * 1_000_003 + step * self.prompts_per_step + i for i in range(self.prompts_per_step)
            ]
            trajs = self.pool.collect_episodes(self.env, seeds, self.group_size, sampling)
            return StepBatch(
                step,
                trajs,
                [self.env_task] * len(seeds),
                [sum(t.turn_rewards) for t in trajs],
                time.time() - t0,
            )
        samples = self.step_prompts(step)
        if self.file_task is not None:
            trajs, scored = rollout_rows(
                self.pool, self.tok, self.file_task, samples, self.group_size, sampling, self.prompt_format
            )
            return StepBatch(
                step,
                trajs,
                [s.task for s in samples],
                scored.rewards,
                time.time() - t0,
                reward_metrics(scored),
            )
        prompt_ids = [encode_prompt(self.tok, s.prompt, self.prompt_format) for s in samples]
        trajs = self.pool.collect(prompt_ids, self.group_size, sampling)
        texts = self.tok.batch_decode([t.tokens for t in trajs], skip_special_tokens=True)
        rewards = [score(samples[i // self.group_size], text) for i, text in enumerate(texts)]
        return StepBatch(step, trajs, [s.task for s in samples], rewards, time.time() - t0)

    def launch(self, step: int) -> Future[StepBatch]:
        return self._executor.submit(self.collect, step)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def rollout_rows(
    pool: RolloutPool,
    tok,
    task: PromptFileTask,
    rows: list[PromptRow],
    group: int,
    sampling,
    prompt_format: str,
) -> tuple[list[Trajectory], Scored]:
    """`group` samples of each prompt-file row, scored by the reward functions (groups contiguous)."""
    trajs = pool.collect([r.encode(tok, prompt_format) for r in rows], group, sampling)
    texts = tok.batch_decode([t.tokens for t in trajs], skip_special_tokens=True)
    expanded = [rows[i // group] for i in range(len(trajs))]
    return trajs, task.score(expanded, texts, [t.tokens for t in trajs])


def reward_metrics(scored: Scored, prefix: str = "reward") -> dict[str, float]:
    """Each function's mean over the samples it scored, and the failure / unscored counts."""
    m = {f"{prefix}/failures": float(scored.failures), f"{prefix}/unscored": float(scored.unscored)}
    for name, vals in scored.per_function.items():
        ok = [v for v in vals if v == v]  # not NaN
        if ok:
            m[f"{prefix}/fn/{name}/mean"] = sum(ok) / len(ok)
    return m


def heldout_reward(
    pool: RolloutPool, tok, task: PromptFileTask, sampling: SamplingParams, prompt_format: str
) -> dict[str, float]:
    """Mean reward on the prompt file's held-out rows, one sample each at the held-out sampling seed."""
    seeded = dataclasses.replace(sampling, seed=splits.HELDOUT_SAMPLING_SEED)
    _, scored = rollout_rows(pool, tok, task, task.heldout, 1, seeded, prompt_format)
    return {"eval/reward_mean": sum(scored.rewards) / len(scored.rewards)} | reward_metrics(
        scored, "eval/reward"
    )


def heldout_eval(
    pool: RolloutPool, tok, samples: list[TaskSample], sampling: SamplingParams, prompt_format: str = "text"
) -> dict[str, float]:
    """Held-out solve rate on `samples`, one sample per prompt with the workers' sampler: exact AR samples when it is
    lossless or ar."""
    tasks = list(dict.fromkeys(s.task for s in samples))
    prompt_ids = [encode_prompt(tok, s.prompt, prompt_format) for s in samples]
    trajs = pool.collect(prompt_ids, 1, dataclasses.replace(sampling, seed=splits.HELDOUT_SAMPLING_SEED))
    texts = tok.batch_decode([t.tokens for t in trajs], skip_special_tokens=True)
    solved = [score(s, text) >= 1.0 for s, text in zip(samples, texts, strict=True)]
    m = {"eval/solve_rate": sum(solved) / len(solved)}
    for task in tasks:
        own = [ok for s, ok in zip(samples, solved, strict=True) if s.task == task]
        m[f"eval/{task}/solve_rate"] = sum(own) / len(own)
    return m


def rollout_metrics(batch: StepBatch, group: int, K: int) -> dict[str, float]:
    """Acceptance (tokens per forward, accept rate, by draft position, history drafts' share), lengths, reward
    and pass@group per task."""
    trajs, rewards = batch.trajs, batch.rewards
    m = {
        "rollout/tokens_per_forward": sum(t.num_tokens for t in trajs)
        / max(1, sum(t.num_forwards for t in trajs)),
        "rollout/length_mean": sum(t.num_tokens for t in trajs) / len(trajs),
        "perf/tok_per_s": sum(t.num_tokens for t in trajs) / max(1e-9, batch.rollout_s),
        "time/rollout_s": batch.rollout_s,
    }
    steps = sum(len(t.accept_counts) for t in trajs)
    if any(t.history_steps for t in trajs):  # history drafts: the share of decode steps that verified one
        m["rollout/history_share"] = sum(t.history_steps for t in trajs) / max(1, steps)
        m["rollout/history_accepted_per_step"] = sum(t.history_accepted for t in trajs) / max(
            1, sum(t.history_steps for t in trajs)
        )
    if K and any(t.accept_counts for t in trajs):
        acc = AcceptanceStats(K)
        for t in trajs:
            if t.accept_counts:
                acc.observe(t.accept_counts, t.draft_counts)
        m["rollout/accept_rate"] = sum(sum(t.accept_counts) for t in trajs) / max(
            1, sum(sum(t.draft_counts) for t in trajs)
        )
        for i, a in enumerate(acc.acceptance_by_position(), start=1):
            m[f"rollout/accept_pos_{i}"] = a
    m |= batch.extra
    for task in sorted(set(batch.tasks)):
        idx = [i for i, t in enumerate(batch.tasks) if t == task]
        rs = [rewards[j * group + k] for j in idx for k in range(group)]
        m[f"reward/{task}/mean"] = sum(rs) / len(rs)
        m[f"reward/{task}/pass@{group}"] = sum(
            max(rewards[j * group : (j + 1) * group]) >= 1.0 for j in idx
        ) / len(idx)
    return m
