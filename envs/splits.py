"""Every data split of the built-in tasks, and its seed: the one module that decides which prompts train and which
evaluate.

NOTE: reasoning-gym draws item i of a dataset made with seed s from `random.Random(s + i)`. A "seed" is an offset into
one stream per task, so datasets at two seeds overlap unless their index ranges are disjoint (seed 4242's items are
items 3008.. of seed 1234's). The splits are therefore index ranges of that stream, and every training split removes
the prompts of the evaluation split by text (small tasks also repeat prompts at different indices).

    split                        stream indices             used by
    held-out (evaluation)        [1235, 1235 + 300)         convert's evaluation, `blockrl regress`, RL held-out
                                                            (train's eval, demo, heldout_compare): never trained on
    corpus (pretrain / convert)  [1234, 1234 + N)           trainers/lm, minus the held-out prompts
    RL prompt pool (tasks mode)  [run seed + 17, .. + 2000) `blockrl train` draws each step's prompts from it,
                                                            minus the held-out prompts
    RL prompt pool (env mode)    [2024, 2024 + 10000)       `blockrl/<task>-v0` envs' reset(seed), minus the held-out
    bench prompts                [bench seed + 1, ...)      `blockrl bench` (speed, and a solve rate beside it)

The held-out split is the shipped checkpoint's conversion held-out set (`configs/convert_tiny_moe.yaml`: 300 per
task at seed 1235), so it is the one range of the stream that checkpoint never saw. tests/envs/test_splits.py checks
that every training split and the held-out split are disjoint.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from envs.tasks import TaskSample, iter_samples

CORPUS_SEED = 1234
CORPUS_HELDOUT_OFFSET = 1  # a corpus's own held-out split is drawn at its seed + 1
HELDOUT_SEED = CORPUS_SEED + CORPUS_HELDOUT_OFFSET  # 1235: the evaluation split
HELDOUT_SIZE = 300  # per task: the evaluation split's extent (the shipped conversion held out exactly these)
RL_POOL_OFFSET = 17  # the RL prompt pool is drawn at run seed + 17
RL_POOL_SIZE = 2000  # draws per task in the RL pool
ENV_POOL_SEED = 2024
ENV_POOL_SIZE = 10_000
HELDOUT_SAMPLING_SEED = 99  # the sampling seed of RL held-out evaluations (one sample per prompt)


@functools.lru_cache(maxsize=32)
def reserved_prompts(task: str) -> frozenset[str]:
    """The prompts of the evaluation split of `task`: no training split may hold one."""
    return frozenset(s.prompt for s in iter_samples(task, HELDOUT_SIZE, HELDOUT_SEED))


def _train_only(samples: Iterable[TaskSample]) -> list[TaskSample]:
    return [s for s in samples if s.prompt not in reserved_prompts(s.task)]


def heldout(tasks: Iterable[str], per_task: int, exclude: set[str] = frozenset()) -> list[TaskSample]:
    """The first `per_task` prompts per task of the evaluation split, minus any in `exclude`."""
    if per_task > HELDOUT_SIZE:
        raise ValueError(
            f"per_task: the held-out split has {HELDOUT_SIZE} prompts per task, asked for {per_task}"
        )
    return [
        s
        for t in dict.fromkeys(tasks)
        for s in iter_samples(t, per_task, HELDOUT_SEED)
        if s.prompt not in exclude
    ]


def task_prompts(tasks: Iterable[str], per_task: int, seed: int) -> list[TaskSample]:
    """The first `per_task` samples of each task at `seed` (the draw every split below is made of)."""
    return [s for t in tasks for s in iter_samples(t, per_task, seed)]


def corpus_heldout(tasks: Iterable[str], per_task: int, seed: int = CORPUS_SEED) -> list[TaskSample]:
    """The held-out prompts of the corpus drawn at `seed` (never trained on by pretrain / convert)."""
    return task_prompts(tasks, per_task, seed + CORPUS_HELDOUT_OFFSET)


def corpus(tasks: Iterable[str], per_task: int, heldout: list[TaskSample], seed: int = CORPUS_SEED):
    """Training samples of the corpus, per task, with every prompt of its `heldout` and of the evaluation split
    removed."""
    banned = {s.prompt for s in heldout}
    return _train_only(s for t in tasks for s in iter_samples(t, per_task, seed) if s.prompt not in banned)


def rl_prompt_pool(tasks: Iterable[str], run_seed: int) -> dict[str, list[TaskSample]]:
    """{task: the prompts `blockrl train` draws its steps from}."""
    return {
        t: _train_only(iter_samples(t, RL_POOL_SIZE, run_seed + RL_POOL_OFFSET)) for t in dict.fromkeys(tasks)
    }


@functools.lru_cache(maxsize=16)
def env_prompt_pool(
    task: str, size: int = ENV_POOL_SIZE, seed: int = ENV_POOL_SEED
) -> tuple[TaskSample, ...]:
    """The fixed pool a `blockrl/<task>-v0` env's `reset(seed)` picks its prompt from (shared by every env of the
    task: a multi-turn batch builds one env per episode)."""
    return tuple(_train_only(iter_samples(task, size, seed)))


def rl_train_prompts(tasks: Iterable[str], run_seed: int, env_task: str | None = None) -> set[str]:
    """Every prompt an RL run can train on: its tasks-mode pool, or in env mode the env's pool."""
    if env_task is not None:
        return {s.prompt for s in env_prompt_pool(env_task)}
    return {s.prompt for pool in rl_prompt_pool(tasks, run_seed).values() for s in pool}


def rl_heldout(tasks: Iterable[str], per_task: int, exclude: set[str] = frozenset()) -> list[TaskSample]:
    """RL held-out evaluation prompts: the evaluation split, minus `exclude` (the run's training prompts, which
    already leave the split out: the exclusion only guards a user-made pool)."""
    return heldout(tasks, per_task, exclude)


def bench_prompts(tasks: Iterable[str], per_task: int, seed: int) -> list[TaskSample]:
    """`blockrl bench`'s prompt pool (shuffled and cut by the bench itself)."""
    return task_prompts(tasks, per_task, seed + 1)
