"""Gymnasium text environments over the built-in verifiable tasks.

`TextEnv` is the base: observations and actions are strings (`gymnasium.spaces.Text` over the tokenizer's
alphabet). `reset(seed=...)` draws a task instance deterministically from the seed and returns its prompt; `step`
takes the model's completion text and returns the verifier's reward. `TaskEnv` is the single-turn env of one
reasoning-gym task; each is registered as `blockrl/<task>-v0` (see `envs/__init__.py`).

Reward failures never turn into a silent zero or a lost batch: a reward function that raises or returns NaN either
raises `RewardError` naming the env and prompt (`on_reward_error="raise"`, the default) or is recorded as a failure
(`"record"`: reward 0.0 and `info["reward_error"]` set, so the learner can drop or count it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from envs.splits import ENV_POOL_SEED, ENV_POOL_SIZE, env_prompt_pool
from envs.tasks import TaskSample, score
from policy.tokenizer import ALPHABET

MAX_CHARS = 4096


class RewardError(RuntimeError):
    """A reward function raised or returned a non-finite value."""


class TextEnv(gym.Env):
    """Base text env: string observations and actions, verifier rewards, configurable reward-failure policy."""

    metadata = {"render_modes": ["ansi"]}  # noqa: RUF012 (gymnasium convention)

    def __init__(self, on_reward_error: str = "raise", render_mode: str | None = None):
        if on_reward_error not in ("raise", "record"):
            raise ValueError(f"on_reward_error must be 'raise' or 'record', got {on_reward_error!r}")
        self.on_reward_error = on_reward_error
        self.render_mode = render_mode
        self.observation_space = spaces.Text(MAX_CHARS, min_length=0, charset=ALPHABET)
        self.action_space = spaces.Text(MAX_CHARS, min_length=0, charset=ALPHABET)
        self._last = ""

    def safe_reward(self, fn: Callable[[], float], what: str) -> tuple[float, dict[str, Any]]:
        """Run a reward function under the failure policy; returns (reward, info additions)."""
        try:
            r = float(fn())
            if not math.isfinite(r):
                raise ValueError(f"reward is {r}")
        except Exception as e:  # deliberate: user reward code may fail in any way
            if self.on_reward_error == "raise":
                raise RewardError(f"{self.name}: reward failed for {what}: {e}") from e
            return 0.0, {"reward_error": f"{type(e).__name__}: {e}"}
        return r, {}

    @property
    def name(self) -> str:
        return type(self).__name__

    def render(self) -> str | None:
        return self._last if self.render_mode == "ansi" else None


class TaskEnv(TextEnv):
    """Single-turn env of one built-in task: prompt -> completion -> verifier reward, episode ends."""

    def __init__(
        self,
        task: str,
        pool_size: int = ENV_POOL_SIZE,
        data_seed: int = ENV_POOL_SEED,
        reward_fn: Callable[[TaskSample, str], float] = score,
        **kw,
    ):
        super().__init__(**kw)
        self.task = task
        self.pool = env_prompt_pool(task, pool_size, data_seed)  # fixed pool; reset(seed) picks from it
        self.reward_fn = reward_fn
        self.sample: TaskSample | None = None

    @property
    def name(self) -> str:
        return f"blockrl/{self.task}-v0"

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.sample = self.pool[int(self.np_random.integers(len(self.pool)))]
        self._last = self.sample.prompt
        return self.sample.prompt, {"task": self.task}

    def check_step(self, action) -> None:
        """A step needs a reset first, and the turn's text as its action."""
        if self.sample is None:
            raise RuntimeError(f"{self.name}: call reset() before step()")
        if not isinstance(action, str):
            raise TypeError(f"{self.name}: action must be the turn's text (str), got {type(action).__name__}")

    def step(self, action: str):
        self.check_step(action)
        sample = self.sample
        reward, info = self.safe_reward(lambda: self.reward_fn(sample, action), repr(sample.prompt))
        self._last = sample.prompt + action
        info |= {"task": self.task, "answer": sample.entry["answer"]}
        return "", reward, True, False, info
