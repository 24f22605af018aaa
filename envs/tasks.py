"""Built-in verifiable tasks: reasoning-gym entries rendered as compact prompts with step-by-step worked traces.

Decision: the prompt is a compact rendering of the reasoning-gym entry (its metadata), not the verbose question text,
and the worked trace is structured and copy-heavy (restate the operands, then one small step per line). A model of a
few million parameters can learn these, and templated traces are what a one-step drafter predicts well. Scoring always
goes through reasoning-gym's own verifier (`score_answer`) on the text inside `<answer>...</answer>`.

    spell_backward   "reverse: planet"           -> "1p 2l 3a 4n 5e 6t\n6t 5e 4n 3a 2l 1p\n<answer>tenalp</answer>"
    letter_counting  "count e: the green sheep"  -> "the 1=1\ngreen 2=3\nsheep 2=5\n<answer>5</answer>"
    chain_sum        "sum: 4 - 1 + 7"            -> "4 - 1 = 3\n3 + 7 = 10\n<answer>10</answer>"
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any

from pydantic import AfterValidator

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class TaskSample:
    """One task instance: the rendered prompt, the gold worked completion, and the raw entry the verifier scores."""

    task: str
    prompt: str  # ends with "\n"; the completion follows directly
    completion: str  # worked trace + "<answer>...</answer>"
    entry: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # reasoning-gym dataset name
    rg_kwargs: dict[str, Any]  # difficulty settings passed to reasoning_gym.create_dataset
    render_prompt: Callable[[dict], str]
    render_trace: Callable[[dict], str]


def _spell_prompt(e: dict) -> str:
    return f"reverse: {e['metadata']['word']}\n"


def _spell_trace(e: dict) -> str:
    word = e["metadata"]["word"]
    fwd = " ".join(f"{i + 1}{c}" for i, c in enumerate(word))
    bwd = " ".join(f"{i + 1}{word[i]}" for i in reversed(range(len(word))))
    return f"{fwd}\n{bwd}\n"


def _count_prompt(e: dict) -> str:
    m = e["metadata"]
    return f"count {m['target_letter']}: {' '.join(m['span'])}\n"


def _count_trace(e: dict) -> str:
    m = e["metadata"]
    total, lines = 0, []
    for w in m["span"]:
        n = w.lower().count(m["target_letter"])  # reasoning-gym counts case-insensitively
        total += n
        lines.append(f"{w} {n}={total}")
    return "\n".join(lines) + "\n"


def _sum_prompt(e: dict) -> str:
    return f"sum: {e['metadata']['expression']}\n"


def _sum_trace(e: dict) -> str:
    toks = e["metadata"]["expression"].split()
    acc, lines = int(toks[0]), []
    for op, num in zip(toks[1::2], toks[2::2], strict=True):
        new = acc + int(num) if op == "+" else acc - int(num)
        lines.append(f"{acc} {op} {num} = {new}")
        acc = new
    return "\n".join(lines) + "\n"


def _countdown_prompt(e: dict) -> str:
    m = e["metadata"]
    return f"countdown: {' '.join(map(str, m['numbers']))} -> {m['target']}\n"


def _countdown_trace(e: dict) -> str:
    return ""  # RL-only task: no worked trace in the corpus; any expression the verifier accepts scores 1


TASKS: dict[str, TaskSpec] = {
    "spell_backward": TaskSpec(
        "spell_backward", {"min_word_len": 3, "max_word_len": 9}, _spell_prompt, _spell_trace
    ),
    "letter_counting": TaskSpec(
        "letter_counting", {"min_words": 3, "max_words": 7}, _count_prompt, _count_trace
    ),
    "chain_sum": TaskSpec(
        "chain_sum",
        {"min_terms": 3, "max_terms": 6, "min_digits": 1, "max_digits": 1},
        _sum_prompt,
        _sum_trace,
    ),
    "countdown": TaskSpec(
        "countdown",
        {"min_numbers": 3, "max_numbers": 4, "min_target": 10, "max_target": 100},
        _countdown_prompt,
        _countdown_trace,
    ),
}


def check_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in: {sorted(TASKS)}")
    return name


TaskName = Annotated[str, AfterValidator(check_task)]
"""A config field holding a built-in task name (pydantic validates it)."""

CORPUS_TASKS = (
    "spell_backward",
    "letter_counting",
    "chain_sum",
)  # tasks with worked traces (pretrain/convert)


def _rg():
    # reasoning-gym imports matplotlib
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.getcwd(), ".mplconfig"))
    import reasoning_gym

    return reasoning_gym


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name]


def iter_samples(name: str, size: int, seed: int) -> Iterator[TaskSample]:
    """`size` samples of task `name` from reasoning-gym with the given seed, with gold worked completions."""
    spec = get_task(name)
    ds = _rg().create_dataset(spec.name, size=size, seed=seed, **spec.rg_kwargs)
    for entry in ds:
        answer = entry["answer"]
        completion = spec.render_trace(entry) + f"<answer>{answer}</answer>"
        yield TaskSample(name, spec.render_prompt(entry), completion, entry)


def extract_answer(completion: str) -> str | None:
    m = ANSWER_RE.search(completion)
    return m.group(1).strip() if m else None


@cache
def _scorer(name: str):
    return _rg().get_score_answer_fn(get_task(name).name)


def score(sample: TaskSample, completion: str) -> float:
    """reasoning-gym's verifier score of `completion` (text after the prompt) for this sample; 0 if no answer tag."""
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    return float(_scorer(sample.task)(answer, sample.entry))


def task_reward(completions, task=None, answer=None, metadata=None, **_columns) -> list[float | None]:
    """The built-in verifier as a reward function with TRL's signature (`envs.rewards`): rows whose `task` column
    names a built-in task are scored against their `answer` (and `metadata`); other rows get None (not scored).

    Referenced as `envs.tasks:task_reward`; the default reward of `blockrl rollout` and `blockrl regress`."""
    n = len(completions)
    task, answer, metadata = task or [None] * n, answer or [None] * n, metadata or [None] * n
    out: list[float | None] = []
    for c, t, a, m in zip(completions, task, answer, metadata, strict=True):
        if t not in TASKS or a is None:
            out.append(None)
            continue
        text = c[0]["content"] if isinstance(c, list) else c  # a conversational completion is one message
        out.append(score(TaskSample(t, "", "", {"answer": str(a), "metadata": m or {}}), text))
    return out


BUILTIN_REWARD = "envs.tasks:task_reward"
