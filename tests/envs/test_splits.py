"""Data splits (envs/splits.py): the evaluation split is disjoint from every training split (the pretraining /
conversion corpus, the RL prompt pool in tasks and in env mode), held-out evaluation and regress draw from it, and
the reasoning-gym property that forced index ranges (seed s, item i == seed s + i, item 0) still holds."""

import gymnasium as gym
import pytest

import envs  # noqa: F401 (registers the blockrl/... env ids)
from common.config import load_config
from envs import splits
from envs.tasks import CORPUS_TASKS, iter_samples
from trainers.lm.data import DataConfig, heldout_samples
from trainers.regress.config import RegressConfig
from trainers.regress.job import load_suite
from trainers.rl.rollouts import StepRollouts

TASKS = list(CORPUS_TASKS)


def prompts(samples) -> set[str]:
    return {s.prompt for s in samples}


def test_seeds_are_offsets_into_one_stream():
    """Why the splits are index ranges: reasoning-gym's item i at seed s is item 0 at seed s + i."""
    for task in TASKS:
        a = [s.prompt for s in iter_samples(task, 5, 100)]
        assert a[3] == next(iter_samples(task, 1, 103)).prompt


@pytest.mark.parametrize("task", TASKS)
def test_no_training_split_holds_an_evaluation_prompt(task):
    evaluation = prompts(splits.heldout([task], splits.HELDOUT_SIZE))
    assert len(evaluation) > 100
    corpus = splits.corpus([task], 3000, splits.corpus_heldout([task], 200))
    assert not prompts(corpus) & evaluation
    assert not prompts(splits.rl_prompt_pool([task], run_seed=0)[task]) & evaluation
    assert not prompts(splits.env_prompt_pool(task)) & evaluation
    assert not splits.rl_train_prompts([task], 0) & evaluation
    # the draws did overlap before the exclusion: the check is not vacuous
    assert prompts(iter_samples(task, 3000, splits.CORPUS_SEED)) & evaluation


def test_rl_heldout_in_env_mode_excludes_the_env_pool():
    """Env mode: the held-out set a run evaluates on never holds a prompt its env can hand out for training."""
    rollouts = StepRollouts(None, None, TASKS, "blockrl/chain_sum-v0", 0, 4, 2, None)
    train = rollouts.train_prompts
    assert train == prompts(splits.env_prompt_pool("chain_sum"))
    env = gym.make("blockrl/chain_sum-v0").unwrapped
    assert {env.reset(seed=s)[0] for s in range(50)} <= train
    held = splits.rl_heldout(["chain_sum"], 60, train)
    assert len(held) == 60 and not prompts(held) & train


def test_rl_heldout_in_tasks_mode_excludes_the_rl_pool():
    rollouts = StepRollouts(None, None, TASKS, None, 3, 4, 2, None)
    held = splits.rl_heldout(TASKS, 60, rollouts.train_prompts)
    assert len(held) == 3 * 60 and not prompts(held) & rollouts.train_prompts
    with pytest.raises(ValueError, match="per_task"):
        splits.rl_heldout(TASKS, splits.HELDOUT_SIZE + 1)


def test_corpus_heldout_and_regress_prompts_are_the_evaluation_split():
    data = load_config(DataConfig, None, [])
    assert prompts(heldout_samples(data)) <= prompts(splits.heldout(TASKS, splits.HELDOUT_SIZE))
    suite = load_suite(load_config(RegressConfig, "regress", []))
    assert {r.prompt for r in suite.rows} <= prompts(splits.heldout(TASKS, splits.HELDOUT_SIZE))
