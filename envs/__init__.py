"""Gymnasium text environments and verifiable rewards; importing registers `blockrl/<task>-v0` ids."""

import gymnasium as gym

from envs.calculator import CalculatorEnv
from envs.retry import RetryEnv
from envs.tasks import TASKS
from envs.text_env import RewardError, TaskEnv, TextEnv

ENV_IDS = [f"blockrl/{task}-v0" for task in TASKS]
RETRY_ENV_IDS = [f"blockrl/retry-{task}-v0" for task in TASKS]  # several attempts, the question asked again
MULTI_TURN_ENV_IDS = ["blockrl/calc-chain_sum-v0", *RETRY_ENV_IDS]

for _task, _id in zip(TASKS, ENV_IDS, strict=True):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="envs.text_env:TaskEnv", kwargs={"task": _task})
if MULTI_TURN_ENV_IDS[0] not in gym.registry:
    gym.register(
        id=MULTI_TURN_ENV_IDS[0], entry_point="envs.calculator:CalculatorEnv", kwargs={"task": "chain_sum"}
    )

for _task, _id in zip(TASKS, RETRY_ENV_IDS, strict=True):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="envs.retry:RetryEnv", kwargs={"task": _task})

__all__ = [
    "ENV_IDS",
    "MULTI_TURN_ENV_IDS",
    "RETRY_ENV_IDS",
    "CalculatorEnv",
    "RetryEnv",
    "RewardError",
    "TaskEnv",
    "TextEnv",
]
