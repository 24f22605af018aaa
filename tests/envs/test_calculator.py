"""Multi-turn calculator env: tool turns interleave with model turns; only arithmetic is evaluated."""

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.calculator import CalculatorEnv, calculate


def test_calculate_is_arithmetic_only():
    assert calculate("3 + 4*(2 - 5)") == "-9"
    assert calculate("7/2") == "3.5"
    for bad in ["__import__('os')", "2**10", "x + 1", "1/0"]:
        with pytest.raises(ValueError):
            calculate(bad)


def test_registered_multi_turn_env_passes_check_env():
    env = gym.make(envs.MULTI_TURN_ENV_IDS[0], pool_size=32)
    check_env(env.unwrapped, skip_render_check=True)


def test_tool_turn_then_answer():
    env = CalculatorEnv("chain_sum", pool_size=16)
    prompt, _ = env.reset(seed=1)
    expr = env.sample.entry["metadata"]["expression"]
    obs, _, terminated, truncated, info = env.step(f"<calc>{expr}</calc>")
    assert (
        obs == f"={env.sample.entry['answer']}\n"
        and not (terminated or truncated)
        and info["env_text"] == obs
    )
    obs, reward, terminated, _, _ = env.step(f"<answer>{env.sample.entry['answer']}</answer>")
    assert terminated and reward == 1.0
    assert env.transcript.startswith(prompt) and "=" in env.transcript


def test_turn_without_call_or_answer_ends_the_episode_unrewarded():
    env = CalculatorEnv("chain_sum", pool_size=16, max_turns=2)
    env.reset(seed=0)
    _, reward, terminated, truncated, _ = env.step("thinking...")
    assert terminated and not truncated and reward == 0.0
    env.reset(seed=0)
    env.step("<calc>1+1</calc>")
    assert env.step("<calc>2+2</calc>")[3] is True  # max_turns reached
