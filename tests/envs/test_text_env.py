"""Gymnasium envs: registered ids pass check_env, rewards come from the verifier, reward failures are explicit."""

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.text_env import RewardError, TaskEnv


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_registered_envs_pass_check_env(env_id):
    env = gym.make(env_id, pool_size=64)
    check_env(env.unwrapped, skip_render_check=True)


def test_gold_completion_scores_one_and_garbage_zero():
    env = TaskEnv("chain_sum", pool_size=32)
    prompt, info = env.reset(seed=3)
    assert prompt.startswith("sum: ") and info["task"] == "chain_sum"
    _, reward, terminated, truncated, info = env.step(env.sample.completion)
    assert reward == 1.0 and terminated and not truncated
    env.reset(seed=3)
    assert env.step("<answer>nope</answer>")[1] == 0.0


def test_reset_is_deterministic_in_the_seed():
    env = TaskEnv("spell_backward", pool_size=256)
    assert env.reset(seed=7)[0] == env.reset(seed=7)[0]
    assert len({env.reset(seed=s)[0] for s in range(20)}) > 10


@pytest.mark.parametrize("bad", [lambda s, c: 1 / 0, lambda s, c: float("nan")])
def test_reward_failure_raises_or_is_recorded(bad):
    env = TaskEnv("chain_sum", pool_size=8, reward_fn=bad)
    env.reset(seed=0)
    with pytest.raises(RewardError, match="chain_sum"):
        env.step("x")
    rec = TaskEnv("chain_sum", pool_size=8, reward_fn=bad, on_reward_error="record")
    rec.reset(seed=0)
    _, reward, _, _, info = rec.step("x")
    assert reward == 0.0 and "reward_error" in info


def test_bad_usage_is_explicit():
    env = TaskEnv("chain_sum", pool_size=8)
    with pytest.raises(RuntimeError, match="reset"):
        env.step("x")
    with pytest.raises(ValueError, match="on_reward_error"):
        TaskEnv("chain_sum", pool_size=8, on_reward_error="ignore")
