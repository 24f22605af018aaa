"""Task corpus for pretraining and conversion: reasoning-gym samples -> token ids, plus right-padded batches.

Held-out prompts are generated first (their own seed) and removed from the training stream, so held-out
evaluation never sees a prompt the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from common.config import Section
from envs.splits import CORPUS_SEED, corpus, corpus_heldout
from envs.tasks import TaskName, TaskSample
from policy.tokenizer import encode_prompt


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
    seed: int = CORPUS_SEED
    """corpus seed; held-out prompts use seed + 1 (envs/splits.py)."""
    exclude_prompt: bool = True
    """train only on completion tokens (the prompt is context, not target)."""


@dataclass(frozen=True)
class Example:
    """A tokenized sample: `[BOS] prompt completion [EOS]`."""

    ids: list[int]
    prompt_len: int  # BOS + prompt tokens
    task: str


def encode(tokenizer, sample: TaskSample) -> Example:
    """`[BOS] prompt completion [EOS]`, the prompt encoded exactly as every rollout encodes it (`encode_prompt`)."""
    p = encode_prompt(tokenizer, sample.prompt)
    c = tokenizer(sample.completion, add_special_tokens=False)["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return Example([*p, *c, *eos], len(p), sample.task)


def heldout_samples(cfg: DataConfig) -> list[TaskSample]:
    return corpus_heldout(cfg.tasks, cfg.heldout_per_task, cfg.seed)


def train_examples(cfg: DataConfig, tokenizer, heldout: list[TaskSample]) -> list[Example]:
    return [encode(tokenizer, s) for s in corpus(cfg.tasks, cfg.train_per_task, heldout, cfg.seed)]


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
