"""Multi-turn retry envs: the question is asked again after a wrong answer, up to max_attempts model turns."""

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.retry import RetryEnv


@pytest.mark.parametrize("env_id", envs.RETRY_ENV_IDS)
def test_registered_retry_envs_pass_check_env(env_id):
    check_env(gym.make(env_id, pool_size=8).unwrapped, skip_render_check=True)


def test_retry_asks_again_until_solved_or_out_of_attempts():
    env = RetryEnv("chain_sum", max_attempts=3, pool_size=16)
    prompt, _ = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("<answer>wrong</answer>")
    assert obs == "\n" + prompt and reward == 0.0 and not (terminated or truncated) and info["attempt"] == 1
    obs, reward, terminated, _, _ = env.step(f"<answer>{env.sample.entry['answer']}</answer>")
    assert terminated and reward == 1.0 and obs == ""
    env.reset(seed=0)
    env.step("no")
    env.step("no")
    assert env.step("no")[3] is True  # truncated after max_attempts
