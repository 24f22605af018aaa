"""Training corpora for pretraining and conversion: the built-in task corpus, or the user's own files.

- **Built-in** (the default, `data.files` empty): reasoning-gym samples of `data.tasks`; held-out prompts come from
  their own seed and are removed from the training stream (`envs/splits.py`).
- **User files** (`data.files`): JSONL, JSON, Parquet or `datasets` directories (`common.records`), rows of one of
  three shapes, told apart per row (or fixed by `data.format`):
  - `text`: a document; every token is a target; documents longer than `max_seq_len` are cut into windows;
  - `prompt` + `completion`: strings, or message lists (TRL's conversational form); targets are the completion;
  - `messages`: a chat, rendered with the tokenizer's chat template; targets are the assistant turns only.
  A held-out split is `heldout_rows` rows drawn by seed (or `heldout_files`). A row that cannot be used (missing
  field, empty, over `max_seq_len`, a chat the template cannot render) raises an error naming the file and the row,
  or is skipped and counted (`on_bad_row`).

Every sequence is encoded the way the checkpoint's tokenizer encodes at inference (`encode_prompt`,
`encode_chat_prompt`), so `tokenizer(text)` and `apply_chat_template` give in-distribution ids after conversion.
Batches are drawn as a pure function of (seed, step) (exact resume), either uniformly or from a window of
similar-length sequences (`batching: length_bucket`, less padding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm import tqdm

from common.config import ConfigError, Section
from common.records import BadRows, Record, RecordError, read_records
from envs import splits
from envs.splits import CORPUS_SEED, corpus, corpus_heldout
from envs.tasks import TaskName, TaskSample
from policy.tokenizer import ChatFormatError, encode_chat, encode_chat_prompt, encode_prompt

log = logging.getLogger(__name__)

RowFormat = Literal["text", "prompt_completion", "messages"]


class DataConfig(Section):
    """Where training sequences come from, how they are cut and batched, and which tokens are targets."""

    files: list[str] = Field(default_factory=list)
    """the user's data files (.jsonl, .json, .parquet, or datasets save_to_disk directories); empty = the built-in
    task corpus."""
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    """row shape of data.files; auto tells each row's shape from its fields."""
    heldout_files: list[str] = Field(default_factory=list)
    """held-out files for evaluation; empty = hold out data.heldout_rows rows of data.files."""
    heldout_rows: int = Field(200, ge=1)
    """rows of data.files held out (a seeded draw) when no data.heldout_files are given. Left at its default it is
    capped at a fifth of the usable rows (a small file keeps most of its rows for training); set, it is taken as
    given. The split is logged in one line."""
    max_seq_len: int | None = Field(None, ge=8)
    """longest training sequence in tokens (text rows are cut into windows this long); None = the model's
    max_position_embeddings (at most 4096)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """a row that cannot be used: stop with an error naming the file and row, or skip it and count it."""
    batching: Literal["random", "length_bucket"] = "length_bucket"
    """batches drawn uniformly, or from a window of similar-length sequences (less padding)."""
    tasks: list[TaskName] = Field(
        default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"], min_length=1
    )
    """built-in corpus: reasoning-gym tasks (envs.tasks.TASKS)."""
    train_per_task: int = Field(20000, ge=1)
    """built-in corpus: training samples per task."""
    heldout_per_task: int = Field(200, ge=1)
    """built-in corpus: held-out evaluation prompts per task."""
    seed: int = CORPUS_SEED
    """corpus seed: the built-in corpus's draw (held-out prompts use seed + 1), or the held-out draw of data.files."""
    exclude_prompt: bool = True
    """train only on completions / assistant turns (prompts and user turns are context, not targets)."""


@dataclass(frozen=True)
class Example:
    """A tokenized training sequence and its target tokens (1 = the token is a loss target)."""

    ids: list[int]
    target: list[int]
    task: str  # built-in task name, or the source file

    def __post_init__(self):
        if len(self.ids) != len(self.target):
            raise ValueError("ids and target differ in length")


@dataclass
class Corpus:
    train: list[Example]
    heldout: list[Example]
    heldout_tasks: list[TaskSample] | None = None  # built-in corpus only: held-out prompts with verifiers
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def has_chat(self) -> bool:
        """Some rows went through the chat template (messages, or TRL's conversational prompt + completion)."""
        return bool(self.stats.get("chat_rows"))


# ------------------------------------------------------------------------------------------- built-in task corpus
def task_turns(sample: TaskSample) -> list[dict]:
    """A task sample as a chat: the prompt as the user turn, the worked completion as the assistant turn."""
    return [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.completion}]


def encode(tokenizer, sample: TaskSample, prompt_format: str = "text") -> Example:
    """`prompt completion [EOS]`, the prompt encoded exactly as every rollout encodes it (`encode_prompt`); in the
    chat format, the task as one user turn and one assistant turn of the chat template."""
    if prompt_format == "chat":
        ids, target = encode_chat(tokenizer, task_turns(sample))
        return Example(ids, target, sample.task)
    p = encode_prompt(tokenizer, sample.prompt, prompt_format)
    c = [*_raw(tokenizer, sample.completion), *_eos(tokenizer)]
    return Example([*p, *c], [0] * len(p) + [1] * len(c), sample.task)


def heldout_samples(cfg: DataConfig) -> list[TaskSample]:
    return corpus_heldout(cfg.tasks, cfg.heldout_per_task, cfg.seed)


def train_samples(cfg: DataConfig) -> list[TaskSample]:
    """The built-in training draw: `train_per_task` samples per task minus the held-out prompts."""
    return corpus(cfg.tasks, cfg.train_per_task, heldout_samples(cfg), cfg.seed)


# ------------------------------------------------------------------------------------------------- user files
def _raw(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def row_format(rec: Record, fixed: str) -> RowFormat:
    if fixed != "auto":
        return fixed  # type: ignore[return-value]
    f = rec.fields
    if "messages" in f:
        return "messages"
    if "prompt" in f and "completion" in f:
        return "prompt_completion"
    if "text" in f:
        return "text"
    raise rec.error(
        f"no 'text', 'prompt' + 'completion' or 'messages' field (fields: {sorted(f)}); "
        "see docs/convert.md for the row shapes",
        "unknown_shape",
    )


def _field(rec: Record, name: str, kinds: tuple[type, ...]) -> Any:
    if name not in rec.fields:
        raise rec.error(f"missing field {name!r} (fields: {sorted(rec.fields)})", "missing_field")
    v = rec.fields[name]
    if not isinstance(v, kinds) or (isinstance(v, str | list) and not v):
        want = " or ".join("a non-empty string" if k is str else "a message list" for k in kinds)
        raise rec.error(f"field {name!r} must be {want}, got {type(v).__name__} {str(v)[:40]!r}", "bad_field")
    return v


def encode_record(rec: Record, fmt: RowFormat, tokenizer, cfg: DataConfig) -> list[Example]:
    """One row -> its training sequences (several for a long text). Raises RecordError naming the row."""
    src = rec.source
    try:
        if fmt == "text":
            ids = encode_prompt(tokenizer, _field(rec, "text", (str,))) + _eos(tokenizer)
            n = cfg.max_seq_len
            chunks = [ids[i : i + n] for i in range(0, len(ids), n)]
            return [Example(c, [0] + [1] * (len(c) - 1), src) for c in chunks if len(c) > 1]
        if fmt == "prompt_completion":
            prompt = _field(rec, "prompt", (str, list))
            completion = _field(rec, "completion", (str, list))
            if isinstance(prompt, str):
                if not isinstance(completion, str):
                    raise rec.error("a string 'prompt' needs a string 'completion'", "bad_field")
                p = encode_prompt(tokenizer, prompt)
                c = _raw(tokenizer, completion) + _eos(tokenizer)
                ids, target = p + c, [0] * len(p) + [1] * len(c)
            else:
                comp = (
                    completion
                    if isinstance(completion, list)
                    else [{"role": "assistant", "content": completion}]
                )
                ids, target = encode_chat(tokenizer, prompt + comp)
                p = encode_chat_prompt(tokenizer, prompt)
                if ids[: len(p)] != p:
                    raise rec.error(
                        "the chat template renders the prompt differently inside the conversation",
                        "chat_template",
                    )
                target = [0] * len(p) + target[len(p) :]
        else:
            ids, target = encode_chat(tokenizer, _field(rec, "messages", (list,)))
    except ChatFormatError as e:
        raise rec.error(str(e), "chat_template") from e
    if not cfg.exclude_prompt:
        target = [0, *[1] * (len(ids) - 1)]
    if len(ids) > cfg.max_seq_len:
        raise rec.error(f"{len(ids)} tokens, over data.max_seq_len={cfg.max_seq_len}", "too_long")
    if sum(target) == 0:
        raise rec.error("no target tokens (nothing to train on)", "no_targets")
    return [Example(ids, target, src)]


def encode_files(
    files: list[str], tokenizer, cfg: DataConfig, bad: BadRows, desc: str = "data"
) -> tuple[list[list[Example]], dict[str, int]]:
    """Per usable row, its sequences (so held-out rows stay whole); plus rows per format."""
    rows: list[list[Example]] = []
    by_format: dict[str, int] = {}
    for path in files:
        for rec in tqdm(read_records(path, bad), desc=f"{desc}: {path}", unit=" rows", leave=False):
            try:
                fmt = row_format(rec, cfg.format)
                rows.append(encode_record(rec, fmt, tokenizer, cfg))
            except RecordError as e:
                bad.reject(rec, str(e).removeprefix(f"{rec.where}: "), e.kind)
                continue
            by_format[fmt] = by_format.get(fmt, 0) + 1
            if fmt == "messages" or isinstance(rec.fields.get("prompt"), list):
                by_format["chat"] = by_format.get("chat", 0) + 1
    return rows, by_format


def check_files(cfg: DataConfig) -> None:
    """Every data file exists: checked before the model loads, so a typo costs seconds, not a model load."""
    for name in ("files", "heldout_files"):
        for i, path in enumerate(getattr(cfg, name)):
            if not Path(path).exists():
                raise ConfigError(f"data.{name}[{i}]: {path} not found")


def load_corpus(cfg: DataConfig, tokenizer) -> Corpus:
    """The training and held-out sequences of `cfg`: the built-in task corpus, or the user's files."""
    if cfg.max_seq_len is None:  # the training jobs resolve it against the model (train.data_config)
        cfg = cfg.model_copy(update={"max_seq_len": 4096})
    if not cfg.files:
        heldout = heldout_samples(cfg)
        return Corpus(
            [encode(tokenizer, s) for s in train_samples(cfg)],
            [encode(tokenizer, s) for s in heldout],
            heldout,
            {"source": "builtin", "tasks": list(cfg.tasks)},
        )
    bad = BadRows(cfg.on_bad_row)
    rows, by_format = encode_files(cfg.files, tokenizer, cfg, bad)
    if cfg.heldout_files:
        held, _ = encode_files(cfg.heldout_files, tokenizer, cfg, bad, "held-out")
        train = rows
    else:
        n_held, why = cfg.heldout_rows, "data.heldout_rows"
        if "heldout_rows" not in cfg.model_fields_set and n_held > len(rows) // 5:
            n_held, why = (
                max(1, len(rows) // 5),
                f"a fifth of the file (data.heldout_rows={cfg.heldout_rows} is the cap)",
            )
        if len(rows) <= n_held:
            raise RecordError(
                f"data.files: {len(rows)} usable rows, not more than data.heldout_rows={n_held}; "
                "lower data.heldout_rows or give data.heldout_files"
            )
        log.info(
            "data: %d of %d rows held out for evaluation (%s), %d to train on",
            n_held,
            len(rows),
            why,
            len(rows) - n_held,
        )
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held_idx = set(order[:n_held])
        held = [r for i, r in enumerate(rows) if i in held_idx]
        train = [r for i, r in enumerate(rows) if i not in held_idx]
    stats = {
        "source": "files",
        "files": list(cfg.files),
        "rows_by_format": {k: v for k, v in by_format.items() if k != "chat"},
        "chat_rows": by_format.get("chat", 0),
        "train_rows": len(train),
        "heldout_rows": len(held),
        "bad_rows": bad.summary(),
    }
    if bad.skipped:
        log.warning("data: skipped %d bad rows %s; first: %s", bad.skipped, dict(bad.counts), bad.examples[0])
    corpus_ = Corpus([e for r in train for e in r], [e for r in held for e in r], None, stats)
    if not corpus_.train or not corpus_.heldout:
        raise RecordError("data.files: no usable training or held-out rows (see the skipped-row summary)")
    return corpus_


def corpus_texts(cfg: DataConfig) -> list[str]:
    """The raw strings of the training data (a tokenizer is trained on them): task prompts and completions, or the
    text / prompt / completion / message contents of the user's rows."""
    if not cfg.files:
        return [s.prompt + s.completion for s in train_samples(cfg)]
    out: list[str] = []

    def add(v):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, list):
            out.extend(m["content"] for m in v if isinstance(m, dict) and isinstance(m.get("content"), str))

    for path in cfg.files:
        for rec in read_records(path, BadRows("skip")):
            for key in ("text", "prompt", "completion", "messages"):
                add(rec.fields.get(key))
    return out


# ---------------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, S] right-padded
    valid: torch.Tensor  # [B, S] 1 = real token
    loss_mask: torch.Tensor  # [B, S] 1 = training target

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.valid.to(device), self.loss_mask.to(device))


def num_targets(e: Example, exclude_prompt: bool = True) -> int:
    """Target tokens `collate` gives this example (the token-mean denominators of the losses)."""
    return sum(e.target[1:]) if exclude_prompt else len(e.ids) - 1


def collate(examples: list[Example], pad_id: int, exclude_prompt: bool = True) -> Batch:
    """Right-padded batch; targets are the examples' own (`exclude_prompt=False`: every token after the first)."""
    S = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), S), pad_id, dtype=torch.long)
    valid = torch.zeros(len(examples), S, dtype=torch.long)
    target = torch.zeros(len(examples), S, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        valid[i, :n] = 1
        if exclude_prompt:
            target[i, :n] = torch.tensor(e.target)
        else:
            target[i, 1:n] = 1
    return Batch(ids, valid, target)


class Sampler:
    """Batches of `batch_size` examples as a pure function of the generator (so of (seed, step)).

    `length_bucket`: examples are ordered by length once; a batch is `batch_size` distinct examples of a window of
    `8 * batch_size` length-neighbours starting at a uniform position (windows wrap around, so the shortest and
    longest examples are drawn as often as any; the w of n starts whose window wraps mix both ends), so sequences in a
    batch have similar lengths."""

    def __init__(self, examples: list[Example], batching: str = "random", window_batches: int = 8):
        self.examples = examples
        self.batching = batching
        self.order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
        self.window_batches = window_batches

    def __call__(self, batch_size: int, gen: torch.Generator) -> list[Example]:
        n = len(self.examples)
        if self.batching == "random" or n <= batch_size * self.window_batches:
            idx = torch.randint(n, (batch_size,), generator=gen).tolist()
            return [self.examples[i] for i in idx]
        w = batch_size * self.window_batches
        lo = int(torch.randint(n, (1,), generator=gen))
        idx = ((lo + torch.randperm(w, generator=gen)[:batch_size]) % n).tolist()
        return [self.examples[self.order[i]] for i in idx]


# ------------------------------------------------------------------------------- built-in tasks as user files
def task_rows(
    tasks: list[str], per_task: int, shape: RowFormat, heldout: bool = False, seed: int = CORPUS_SEED
) -> list[dict]:
    """The built-in corpus (or its held-out prompts) as rows of a user file: `text`, `prompt` + `completion`, or
    `messages` (one user turn, one assistant turn). The training draw excludes the held-out prompts, as
    `load_corpus` does; `blockrl export-tasks` writes these to JSONL."""
    cfg = DataConfig(tasks=tasks, train_per_task=per_task, seed=seed)
    if heldout:
        samples = heldout_samples(cfg.model_copy(update={"heldout_per_task": per_task}))
    else:  # draw past the excluded prompts (seeds are offsets into one stream), keep per_task per task
        extra = cfg.heldout_per_task + splits.HELDOUT_SIZE
        drawn = train_samples(cfg.model_copy(update={"train_per_task": per_task + extra}))
        samples = [s for t in cfg.tasks for s in [x for x in drawn if x.task == t][:per_task]]

    def row(s: TaskSample) -> dict:
        if shape == "text":
            return {"text": s.prompt + s.completion, "task": s.task}
        if shape == "prompt_completion":
            return {"prompt": s.prompt, "completion": s.completion, "task": s.task}
        return {"messages": task_turns(s), "task": s.task}

    return [row(s) for s in samples]
