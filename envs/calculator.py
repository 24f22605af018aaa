"""Multi-turn env: a calculator tool interleaved with the model's turns.

The model answers a task prompt; whenever its turn ends with `<calc>EXPR</calc>`, the env replies with an env turn
`=VALUE\\n` (or `=error\\n`) and the episode continues; a turn containing `<answer>...</answer>` ends it with the
task verifier's reward. Env turns are observations, not actions: a rollout records them with `env_mask = 0` so the
learner never trains on tokens the model did not produce. Expressions are evaluated by walking the Python AST
(numbers, + - * / and parentheses only), never with eval().
"""

from __future__ import annotations

import ast
import operator
import re

from envs.tasks import ANSWER_RE, score
from envs.text_env import TaskEnv

CALL_RE = re.compile(r"<calc>(.*?)</calc>\s*$", re.DOTALL)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expr: str) -> str:
    """Value of an arithmetic expression as text; raises ValueError on anything else."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    if len(expr) > 200:
        raise ValueError("expression too long")
    try:
        value = ev(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ZeroDivisionError) as e:
        raise ValueError(str(e)) from e
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


class CalculatorEnv(TaskEnv):
    """Task prompt -> model turns with optional `<calc>` calls -> final `<answer>`; at most `max_turns` model turns."""

    turn_stops = ("</calc>",)  # a model turn that calls the tool ends here; the env replies

    def __init__(self, task: str = "chain_sum", max_turns: int = 4, **kw):
        super().__init__(task, **kw)
        self.max_turns = max_turns
        self.turns = 0
        self.transcript = ""

    @property
    def name(self) -> str:
        return f"blockrl/calc-{self.task}-v0"

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        prompt, info = super().reset(seed=seed, options=options)
        self.turns = 0
        self.transcript = prompt
        return prompt, info

    def step(self, action: str):
        self.check_step(action)
        self.turns += 1
        self.transcript += action
        info = {"task": self.task, "turn": self.turns}
        if ANSWER_RE.search(action):
            sample, completion = self.sample, self.transcript[len(self.sample.prompt) :]
            reward, extra = self.safe_reward(lambda: score(sample, completion), repr(sample.prompt))
            self._last = self.transcript
            return "", reward, True, False, info | extra
        call = CALL_RE.search(action)
        if call is None:  # the model ended its turn without answering or calling the tool: episode over
            self._last = self.transcript
            return "", 0.0, True, False, info | {"reason": "no answer"}
        if self.turns >= self.max_turns:
            self._last = self.transcript
            return "", 0.0, False, True, info | {"reason": "max_turns"}
        try:
            reply = f"={calculate(call.group(1))}\n"
        except ValueError:
            reply = "=error\n"
        self.transcript += reply
        self._last = self.transcript
        return reply, 0.0, False, False, info | {"env_text": reply}
