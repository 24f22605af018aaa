"""The researcher's own RL task: prompts from a file, rewards from their functions.

Reward functions follow TRL's signature, so one written for `GRPOTrainer` runs here unchanged:

    def reward(prompts, completions, completion_ids, **columns) -> list[float | None]

`prompts` are the rows' prompts (strings, or message lists for conversational rows), `completions` the sampled
texts (for conversational rows `[{"role": "assistant", "content": text}]`, as in TRL), `completion_ids` the token
ids, and every other column of the prompt file arrives as a keyword argument, one entry per completion. `None` means
"this function does not score this sample" (TRL's convention); several functions are summed with their weights over
those that do. Functions are named by import path, `package.module:function`, or by file, `path/to/file.py:function`.

Failures follow the environments' policy (`envs.text_env`): a function that raises, returns the wrong number of
rewards, or a non-finite one either stops the run with `RewardError` naming the function and the row (`raise`, the
default) or is recorded (`record`: that sample's term counts 0, and the failure is counted in the step's metrics).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from common.config import ConfigError, Section
from envs.text_env import RewardError

OnRewardError = Literal["raise", "record"]
# the call's own arguments, and the columns TRL does not forward: never passed as columns
RESERVED = ("prompt", "prompts", "completion", "completions", "completion_ids")


class RewardSpec(Section):
    """One reward function and its weight."""

    function: str
    """`package.module:function` or `path/to/file.py:function` (TRL's reward-function signature)."""
    weight: float = Field(1.0)
    """its weight in the sum."""


def load_function(ref: str, field_name: str = "rewards") -> Callable:
    """The callable named by `module:function` or `file.py:function`; a ConfigError naming the field otherwise."""
    mod_name, sep, attr = ref.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"{field_name}: {ref!r} is not 'module:function' or 'path/to/file.py:function'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).resolve()
            if not path.is_file():
                raise ConfigError(f"{field_name}: {ref!r}: no such file {path}")
            name = (
                "blockrl_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            )  # stable across processes
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # so that pickling (Ray) and dataclasses inside it work
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{field_name}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field_name}: {mod_name!r} has no function {attr!r}")
    return fn


@dataclass
class Scored:
    """A batch's rewards: the weighted sums, each function's raw values (NaN = not scored or failed), and per sample
    whether any function scored it and whether a term failed (`record` policy; the failed term counts 0)."""

    rewards: list[float]
    per_function: dict[str, list[float]] = field(default_factory=dict)
    scored: list[bool] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)

    @property
    def failures(self) -> int:
        """samples with at least one failed term."""
        return sum(self.failed)

    @property
    def unscored(self) -> int:
        """samples no function scored, none failed on (reward 0)."""
        return sum(1 for s, f in zip(self.scored, self.failed, strict=True) if not s and not f)


class RewardFunctions:
    """Weighted reward functions over a batch of (prompt, completion, columns)."""

    def __init__(self, specs: Sequence[RewardSpec], on_error: OnRewardError = "raise"):
        if not specs:
            raise ConfigError("rewards: a prompt file needs at least one reward function ('module:function')")
        self.specs = list(specs)
        self.fns = [load_function(s.function, f"rewards[{i}].function") for i, s in enumerate(self.specs)]
        short = [s.function.rpartition(":")[2] for s in self.specs]
        # metric names: the function's name, or its whole reference where two share a name
        self.names = [
            f if short.count(f) == 1 else s.function for f, s in zip(short, self.specs, strict=True)
        ]
        self.on_error = on_error

    def check_columns(self, columns: Iterable[str], source: str) -> None:
        """Before any work starts: every parameter a function requires (no default, not one of the call's own) must
        be a column of `source`. A ConfigError names the function, the parameter and the columns there are."""
        have = set(columns)
        for i, (spec, fn) in enumerate(zip(self.specs, self.fns, strict=True)):
            try:
                params = inspect.signature(fn).parameters.values()
            except (TypeError, ValueError):  # no introspectable signature: checked when it is called
                continue
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            need = [
                p.name for p in params if p.kind in kinds and p.default is p.empty and p.name not in RESERVED
            ]
            missing = [n for n in need if n not in have]
            if missing:
                raise ConfigError(
                    f"rewards[{i}].function: {spec.function} needs the column{'s' * (len(missing) > 1)} "
                    f"{', '.join(map(repr, missing))}, which {source} lacks (its columns: "
                    f"{', '.join(sorted(have)) or 'none besides the prompt'})"
                )

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: list[dict[str, Any]],
        where: list[str],
    ) -> Scored:
        """Score n samples; `columns[i]` are sample i's extra columns, `where[i]` names its row."""
        n = len(completions)
        keys = [k for k in dict.fromkeys(k for c in columns for k in c) if k not in RESERVED]
        kwargs = {k: [c.get(k) for c in columns] for k in keys}
        totals, scored = [0.0] * n, [False] * n
        failed = [False] * n
        per: dict[str, list[float]] = {}
        for spec, fn, name in zip(self.specs, self.fns, self.names, strict=True):
            try:
                out = list(
                    fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
                )
                if len(out) != n:
                    raise ValueError(f"returned {len(out)} rewards for {n} completions")
            except Exception as e:  # deliberate: user reward code may fail in any way
                if self.on_error == "raise":
                    raise RewardError(
                        f"reward {spec.function}: failed on a batch from {where[0]}: {e}"
                    ) from e
                per[name] = [math.nan] * n
                failed = [True] * n
                continue
            vals = []
            for i, r in enumerate(out):
                if r is None:
                    vals.append(math.nan)
                    continue
                try:
                    v = float(r)
                except (TypeError, ValueError):
                    v = math.nan
                if not math.isfinite(v):
                    if self.on_error == "raise":
                        raise RewardError(f"reward {spec.function}: returned {r!r} for {where[i]}")
                    failed[i] = True
                    vals.append(math.nan)
                    continue
                totals[i] += spec.weight * v
                scored[i] = True
                vals.append(v)
            per[name] = vals
        return Scored(totals, per, scored, failed)
