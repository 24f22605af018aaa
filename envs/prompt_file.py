"""An RL task from the researcher's prompt file: rows with `prompt` (text, or a TRL conversational message list) or
`messages` (a conversation ending on the turn the model answers), any other columns passed to the reward functions
(`envs.rewards`). Files are JSONL, JSON, Parquet or a `datasets` directory (`common.records`); a bad row stops the
run naming the file and the row, or is skipped and counted."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from common.config import ConfigError, Section
from common.records import BadRows, Record, read_records
from envs.rewards import RewardFunctions, Scored
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
            bad.reject(rec, "'prompt' must be a non-empty string or a list of messages", "bad_prompt")
            prompt = None
        rest = {k: v for k, v in f.items() if k != "prompt"}
    elif "messages" in f:
        prompt = _messages(f["messages"], rec, "messages", bad)
        rest = {k: v for k, v in f.items() if k != "messages"}
    else:
        bad.reject(rec, "missing required field 'prompt' (or 'messages')", "missing_prompt")
        return None
    if prompt is None:
        return None
    return PromptRow(prompt, rest, rec.where, str(f.get("task") or "prompts"))


class PromptFileTask:
    """The rows of the prompt files, split into training and held-out rows, scored by the reward functions."""

    def __init__(self, cfg: PromptFileConfig, rewards: RewardFunctions):
        self.bad = BadRows(cfg.on_bad_row)
        rows = [
            r for path in cfg.files for rec in read_records(path, self.bad) if (r := parse_row(rec, self.bad))
        ]
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
