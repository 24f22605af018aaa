"""An RL task from the researcher's prompt file: rows with `prompt` (text, or a TRL conversational message list) or
`messages` (a conversation ending on the turn the model answers), any other columns passed to the reward functions
(`envs.rewards`). Files are JSONL, JSON, Parquet or a `datasets` directory (`common.records`); a bad row stops the
run naming the file and the row, or is skipped and counted."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from common.config import ConfigError, Section
from common.records import BadRows, Record, RecordError, read_records
from envs.rewards import RewardFunctions, Scored
from envs.tasks import TASKS, TaskSample
from policy.tokenizer import encode_chat_prompt, encode_prompt

ROLES = ("system", "user", "assistant", "tool")


class PromptFileConfig(Section):
    """Prompt files of an RL task (empty `files` = the built-in tasks)."""

    files: list[str] = Field(default_factory=list)
    """JSONL / JSON / Parquet files or `datasets` directories with a `prompt` or `messages` column."""
    heldout_rows: int = Field(0, ge=0)
    """rows held out (seeded) for the held-out mean reward (`eval_every`); 0 = none."""
    seed: int = 1234
    """the held-out split's seed."""
    on_bad_row: Literal["error", "skip"] = "error"
    """a row without a usable prompt: stop naming file and row, or skip and count it."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str | list[dict]  # text, or a conversation
    columns: dict[str, Any]  # the row's other fields, for the reward functions
    where: str  # "<file>: line N"
    task: str  # metrics label: the row's `task` column, else "prompts"

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def encode(self, tokenizer, prompt_format: str) -> list[int]:
        """Text through `encode_prompt` in the run's format; a conversation through the chat template."""
        if self.conversational:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    f"{self.where}: a conversational prompt, but the tokenizer has no chat template"
                )
            return encode_chat_prompt(tokenizer, self.prompt)
        return encode_prompt(tokenizer, self.prompt, prompt_format)

    @classmethod
    def from_task(cls, sample: TaskSample, where: str) -> PromptRow:
        """A built-in task sample as a row: the columns its verifier (`envs.tasks.task_reward`) reads."""
        cols = {"task": sample.task, "answer": sample.entry["answer"], "metadata": sample.entry["metadata"]}
        return cls(sample.prompt, cols, where, sample.task)

    def completion(self, text: str):
        """The completion as TRL hands it to reward functions."""
        return [{"role": "assistant", "content": text}] if self.conversational else text


def _messages(value, rec: Record, name: str, bad: BadRows) -> list[dict] | None:
    if not isinstance(value, list) or not value:
        bad.reject(rec, f"{name!r} must be a non-empty list of {{role, content}} messages", "bad_messages")
        return None
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            bad.reject(
                rec, f"{name}[{i}] is not a {{role, content}} message with a role in {ROLES}", "bad_messages"
            )
            return None
    if value[-1]["role"] == "assistant":
        bad.reject(
            rec,
            f"{name!r} ends with an assistant turn; an RL prompt ends on the turn the model answers",
            "bad_messages",
        )
        return None
    return value


def parse_row(rec: Record, bad: BadRows) -> PromptRow | None:
    f = rec.fields
    if "prompt" in f and f["prompt"] is not None:
        p = f["prompt"]
        if isinstance(p, list):
            prompt = _messages(p, rec, "prompt", bad)
        elif isinstance(p, str) and p:
            prompt = p
        else:
            bad.reject(rec, "field 'prompt' must be a non-empty string or a list of messages", "bad_prompt")
            prompt = None
        rest = {k: v for k, v in f.items() if k != "prompt"}
    elif "messages" in f:
        prompt = _messages(f["messages"], rec, "messages", bad)
        rest = {k: v for k, v in f.items() if k != "messages"}
    else:
        bad.reject(rec, "missing required field 'prompt' (or 'messages')", "missing_prompt")
        return None
    if prompt is None or (rest := _task_columns(rest, rec, bad)) is None:
        return None
    return PromptRow(prompt, rest, rec.where, str(f.get("task") or "prompts"))


def _task_columns(columns: dict, rec: Record, bad: BadRows) -> dict | None:
    """A row labelled with a built-in task is scored by its verifier (`envs.tasks.task_reward`): check, at load,
    the columns it reads (`answer` a string or number; `metadata` an object, or JSON text of one)."""
    task, answer, meta = columns.get("task"), columns.get("answer"), columns.get("metadata")
    if task is not None and not isinstance(task, str):
        bad.reject(rec, f"field 'task' must be a string, got {type(task).__name__}", "bad_task")
        return None
    if task not in TASKS:
        return columns
    if answer is None:
        bad.reject(rec, f"built-in task {task!r} is scored by its verifier, which needs 'answer'", "bad_task")
        return None
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        bad.reject(rec, f"field 'answer' must be a string or number, got {type(answer).__name__}", "bad_task")
        return None
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            bad.reject(rec, "field 'metadata' is a string but not JSON", "bad_task")
            return None
    if meta is not None and not isinstance(meta, dict):
        bad.reject(rec, f"field 'metadata' must be an object, got {type(meta).__name__}", "bad_task")
        return None
    return {**columns, "metadata": meta or {}}


def read_prompt_rows(files: list[str], bad: BadRows, limit: int | None = None) -> list[PromptRow]:
    """The usable rows of prompt files, in order (the first `limit`); a file without a prompt column, an empty
    one, or too few rows for `limit` raise `RecordError` naming the file."""
    rows: list[PromptRow] = []
    for path in map(Path, files):
        if path.is_file() and path.suffix.lower() in (".parquet", ".pq"):
            _check_parquet_columns(path)
        before = len(rows)
        for rec in read_records(path, bad):
            if limit is not None and len(rows) == limit:
                break
            if (row := parse_row(rec, bad)) is not None:
                rows.append(row)
        if len(rows) == before and (limit is None or len(rows) < limit):
            raise RecordError(f"{path} is empty (no usable prompt rows)", "empty")
    if limit is not None and len(rows) < limit:
        raise RecordError(f"{', '.join(files)}: {len(rows)} usable prompt rows, {limit} asked for", "short")
    return rows


def _check_parquet_columns(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise RecordError(f"{path}: not a readable Parquet file ({e})") from None
    if "prompt" not in names and "messages" not in names:
        raise RecordError(f"{path}: no 'prompt' or 'messages' column (columns: {names})")


class PromptFileTask:
    """The rows of the prompt files, split into training and held-out rows, scored by the reward functions."""

    def __init__(self, cfg: PromptFileConfig, rewards: RewardFunctions):
        self.bad = BadRows(cfg.on_bad_row)
        rows = read_prompt_rows(cfg.files, self.bad)
        rewards.check_columns({k for r in rows for k in r.columns}, ", ".join(cfg.files))
        if len(rows) <= cfg.heldout_rows:
            raise ConfigError(
                f"prompts.files: {len(rows)} usable rows, not enough for prompts.heldout_rows={cfg.heldout_rows}"
            )
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[: cfg.heldout_rows])
        self.train = [r for i, r in enumerate(rows) if i not in held]
        self.heldout = [r for i, r in enumerate(rows) if i in held]
        self.rewards = rewards

    def score(self, rows: list[PromptRow], texts: list[str], ids: list[list[int]]) -> Scored:
        return self.rewards(
            [r.prompt for r in rows],
            [r.completion(t) for r, t in zip(rows, texts, strict=True)],
            ids,
            [r.columns for r in rows],
            [r.where for r in rows],
        )
