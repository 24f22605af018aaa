"""Multi-turn env: several attempts at one built-in task, the question asked again after each wrong answer.

The model answers the task prompt; a verified answer (reward 1) ends the episode, otherwise the env replies with the
question again (an env turn, `env_mask = 0`) and the model tries once more, up to `max_attempts` model turns. Only the
last attempt is rewarded (a rollout's reward sums its turns' rewards). This is the multi-attempt pattern of agent RL (retry after feedback), and its
later turns repeat earlier text: the question, and often much of the model's own earlier attempt, which is what
history drafts copy (docs/benchmarks.md, "Drafts from history").
"""

from __future__ import annotations

from envs.tasks import score
from envs.text_env import TaskEnv


class RetryEnv(TaskEnv):
    """Task prompt -> answer -> (wrong) the prompt again -> answer ...; at most `max_attempts` model turns."""

    turn_stops = ("</answer>",)  # an attempt ends with its answer; the env replies

    def __init__(self, task: str = "countdown", max_attempts: int = 3, **kw):
        super().__init__(task, **kw)
        if max_attempts < 1:
            raise ValueError(f"{self.name}: max_attempts must be >= 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.attempts = 0

    @property
    def name(self) -> str:
        return f"blockrl/retry-{self.task}-v0"

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        prompt, info = super().reset(seed=seed, options=options)
        self.attempts = 0
        return prompt, info

    def step(self, action: str):
        self.check_step(action)
        self.attempts += 1
        sample = self.sample
        reward, info = self.safe_reward(lambda: score(sample, action), repr(sample.prompt))
        info |= {"task": self.task, "attempt": self.attempts}
        self._last += action
        if reward >= 1.0:
            return "", reward, True, False, info
        if self.attempts >= self.max_attempts:
            return "", reward, False, True, info | {"reason": "max_attempts"}
        reply = "\n" + sample.prompt
        self._last += reply
        return (
            reply,
            0.0,
            False,
            False,
            info | {"env_text": reply},
        )  # an episode's reward sums its turns' rewards
