"""Task corpus for pretraining and conversion: reasoning-gym samples -> token ids, plus right-padded batches.

Held-out prompts are generated first (their own seed) and removed from the training stream, so held-out
evaluation never sees a prompt the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from common.config import Section
from envs.tasks import TaskName, TaskSample, iter_samples


class DataConfig(Section):
    """Which tasks, how many samples, and which tokens are targets."""

    tasks: list[TaskName] = Field(
        default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"], min_length=1
    )
    """reasoning-gym tasks of the corpus (envs.tasks.TASKS)."""
    train_per_task: int = Field(20000, ge=1)
    """training samples per task."""
    heldout_per_task: int = Field(200, ge=1)
    """held-out evaluation prompts per task."""
    seed: int = 1234
    """corpus seed; held-out prompts use seed + 1."""
    exclude_prompt: bool = True
    """train only on completion tokens (the prompt is context, not target)."""


@dataclass(frozen=True)
class Example:
    """A tokenized sample: `[BOS] prompt completion [EOS]`."""

    ids: list[int]
    prompt_len: int  # BOS + prompt tokens
    task: str


def encode(tokenizer, sample: TaskSample) -> Example:
    p = tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(sample.completion, add_special_tokens=False)["input_ids"]
    return Example([tokenizer.bos_token_id, *p, *c, tokenizer.eos_token_id], 1 + len(p), sample.task)


def heldout_samples(cfg: DataConfig) -> list[TaskSample]:
    return [s for t in cfg.tasks for s in iter_samples(t, cfg.heldout_per_task, cfg.seed + 1)]


def train_examples(cfg: DataConfig, tokenizer, heldout: list[TaskSample]) -> list[Example]:
    banned = {s.prompt for s in heldout}
    out = []
    for t in cfg.tasks:
        out += [
            encode(tokenizer, s)
            for s in iter_samples(t, cfg.train_per_task, cfg.seed)
            if s.prompt not in banned
        ]
    return out


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, S] right-padded
    valid: torch.Tensor  # [B, S] 1 = real token
    loss_mask: torch.Tensor  # [B, S] 1 = training target

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


def collate(examples: list[Example], pad_id: int, exclude_prompt: bool) -> Batch:
    S = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), S), pad_id, dtype=torch.long)
    valid = torch.zeros(len(examples), S, dtype=torch.long)
    target = torch.zeros(len(examples), S, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        valid[i, :n] = 1
        target[i, e.prompt_len if exclude_prompt else 1 : n] = 1
    return Batch(ids, valid, target)


def sample_batch(examples: list[Example], batch_size: int, gen: torch.Generator) -> list[Example]:
    idx = torch.randint(len(examples), (batch_size,), generator=gen)
    return [examples[i] for i in idx.tolist()]
