"""Every data split of the built-in tasks, and its seed: the one module that decides which prompts train and which
evaluate.

    split                         seed                       used by
    corpus (pretrain / convert)   CORPUS_SEED = 1234         trainers/lm (minus the corpus held-out prompts)
    corpus held-out               CORPUS_HELDOUT_SEED = 1235 convert's evaluation, `blockrl regress`, trl-bench
    RL prompt pool (tasks mode)   run seed + RL_POOL_OFFSET  `blockrl train`: each step's prompts are drawn from it
    RL prompt pool (env mode)     ENV_POOL_SEED = 2024       the `blockrl/<task>-v0` envs: reset(seed) picks from it
    RL held-out                   HELDOUT_SEED = 4242        `blockrl train` eval, demo, heldout_compare
    bench prompts                 bench seed + 1             `blockrl bench`

Disjointness (tested in tests/envs/test_splits.py):
- the corpus never holds a corpus held-out prompt, so regress and convert's evaluation measure unseen prompts;
- the RL held-out never holds a prompt of the RL prompt pool it is compared against: the tasks-mode pool, or, in env
  mode, the env's own pool.
The built-in tasks have small prompt spaces (spell_backward reverses words of one word list), so the 50k-per-task
conversion corpus covers most RL prompts: "held-out" for RL means held out from RL training.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from envs.tasks import TaskSample, iter_samples

CORPUS_SEED = 1234
CORPUS_HELDOUT_OFFSET = 1  # the corpus held-out split is drawn at corpus seed + 1
CORPUS_HELDOUT_SEED = CORPUS_SEED + CORPUS_HELDOUT_OFFSET  # the shipped checkpoint's held-out prompts
RL_POOL_OFFSET = 17  # the RL prompt pool is drawn at run seed + 17
RL_POOL_SIZE = 2000  # prompts per task in the RL pool
ENV_POOL_SEED = 2024
ENV_POOL_SIZE = 10_000
HELDOUT_SEED = 4242
HELDOUT_SAMPLING_SEED = 99  # the sampling seed of RL held-out evaluations (one sample per prompt)


def task_prompts(tasks: Iterable[str], per_task: int, seed: int) -> list[TaskSample]:
    """The first `per_task` samples of each task at `seed` (the draw every split below is made of)."""
    return [s for t in tasks for s in iter_samples(t, per_task, seed)]


def corpus_heldout(tasks: Iterable[str], per_task: int, seed: int = CORPUS_SEED) -> list[TaskSample]:
    """The held-out prompts of the corpus drawn at `seed` (never trained on by pretrain / convert)."""
    return task_prompts(tasks, per_task, seed + CORPUS_HELDOUT_OFFSET)


def corpus(tasks: Iterable[str], per_task: int, heldout: list[TaskSample], seed: int = CORPUS_SEED):
    """Training samples of the corpus, per task, with every prompt of `heldout` removed."""
    banned = {s.prompt for s in heldout}
    return [s for t in tasks for s in iter_samples(t, per_task, seed) if s.prompt not in banned]


def rl_prompt_pool(tasks: Iterable[str], run_seed: int) -> dict[str, list[TaskSample]]:
    """{task: the prompts `blockrl train` draws its steps from}."""
    return {t: list(iter_samples(t, RL_POOL_SIZE, run_seed + RL_POOL_OFFSET)) for t in dict.fromkeys(tasks)}


@functools.lru_cache(maxsize=16)
def env_prompt_pool(task: str, size: int = ENV_POOL_SIZE, seed: int = ENV_POOL_SEED) -> tuple[TaskSample, ...]:
    """The fixed pool a `blockrl/<task>-v0` env's `reset(seed)` picks its prompt from (shared by every env of the
    task: a multi-turn batch builds one env per episode)."""
    return tuple(iter_samples(task, size, seed))


def rl_train_prompts(tasks: Iterable[str], run_seed: int, env_task: str | None = None) -> set[str]:
    """Every prompt an RL run can train on: its tasks-mode pool, or in env mode the env's pool."""
    if env_task is not None:
        return {s.prompt for s in env_prompt_pool(env_task)}
    return {s.prompt for pool in rl_prompt_pool(tasks, run_seed).values() for s in pool}


def rl_heldout(tasks: Iterable[str], per_task: int, exclude: set[str] = frozenset()) -> list[TaskSample]:
    """`per_task` RL held-out prompts per task, skipping any prompt in `exclude` (the RL run's training prompts:
    small tasks repeat prompts across seeds)."""
    out = []
    for task in dict.fromkeys(tasks):
        fresh = (s for s in iter_samples(task, 4 * per_task, HELDOUT_SEED) if s.prompt not in exclude)
        out += [s for _, s in zip(range(per_task), fresh, strict=False)]
    return out


def bench_prompts(tasks: Iterable[str], per_task: int, seed: int) -> list[TaskSample]:
    """`blockrl bench`'s prompt pool (shuffled and cut by the bench itself)."""
    return task_prompts(tasks, per_task, seed + 1)
