"""Gymnasium text environments and verifiable rewards; importing registers `blockrl/<task>-v0` ids."""

import gymnasium as gym

from envs.tasks import TASKS
from envs.text_env import RewardError, TaskEnv, TextEnv

ENV_IDS = [f"blockrl/{task}-v0" for task in TASKS]

for _task, _id in zip(TASKS, ENV_IDS, strict=True):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="envs.text_env:TaskEnv", kwargs={"task": _task})

__all__ = ["ENV_IDS", "RewardError", "TaskEnv", "TextEnv"]
