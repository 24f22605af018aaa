"""What `blockrl rollout` (rollout/batch/job.py) reads and writes: prompt sources, Parquet shards and the resume manifest.

Prompt sources, one `PromptRecord` per distinct prompt:
- built-in tasks (`envs/tasks.py`, reasoning-gym's first samples at the job seed);
- a registered gymnasium text env (`blockrl/chain_sum-v0`, multi-turn `blockrl/calc-chain_sum-v0`): prompt j is
  `env.reset(seed=env_seed(seed, j))`, a hash of (job seed, j);
- a prompts file, the same rows `blockrl train` reads (`envs.prompt_file`, through `common.records`; errors name the
  file and the 1-based line / record / row): `.jsonl` (one JSON object a line), `.json` (one JSON array of
  objects), `.parquet` (one row each) or a `datasets` save_to_disk directory, fields

    prompt    string or messages  the text the completion continues (in the prompt format), or a conversation
    messages  messages            a conversation ending on the turn the model answers (instead of `prompt`)
    task      string, optional    a label; a built-in task (envs/tasks.py) is scored by its reasoning-gym verifier
    answer    string or number    the gold answer; required when `task` is built-in
    metadata  object or JSON      the reasoning-gym entry metadata some verifiers read (e.g. countdown's numbers)
    ...       anything            every other column reaches the reward functions as a keyword argument

Rewards: the config's functions (TRL's signature, `envs.rewards`), else the built-in verifier; `reward` is their
weighted sum (null where none scored the row), `reward_terms` each function's value.

Shards are written to a dot-prefixed temp file, fsynced and renamed, so a `part-NNNNN.parquet` that exists is
complete. `_manifest.json` pins a hash of what determines the rows, keyed on content, not paths: the config fields
that change rows, a hash of the loaded prompts and a fingerprint of the checkpoint files (small files hashed whole;
`.safetensors` by size + header + a strided sample of the tensor bytes, so a 10 GB checkpoint costs ~1 MiB of reads).
Moving the checkpoint or the prompts file therefore does not break a resume; changing their content does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import pyarrow as pa
import pyarrow.parquet as pq

import envs  # noqa: F401 (registers the blockrl/... env ids)
from common.config import ConfigError
from common.records import BadRows, RecordError
from envs.prompt_file import PromptRow, read_prompt_rows
from envs.rewards import RewardFunctions, RewardSpec
from envs.tasks import BUILTIN_REWARD, iter_samples
from rollout.batch.config import RolloutJobConfig
from rollout.types import Trajectory

log = logging.getLogger(__name__)

# Config fields that change how fast the rows are produced, not what they contain: free to change on resume.
OPERATIONAL = (
    "out_dir",
    "workers",
    "cpus_per_worker",
    "gpus_per_worker",
    "threads",
    "address",
    "shard_timeout_s",
    "placement",
    "placement_timeout_s",
)
# Config fields that say where the inputs are: the manifest pins their content instead.
LOCATIONS = ("checkpoint", "prompts_file")

ROW_SCHEMA = pa.schema(
    [
        ("sample_index", pa.int64()),
        ("group_index", pa.int64()),
        ("task", pa.string()),
        ("prompt", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("tokens", pa.list_(pa.int32())),
        ("text", pa.string()),
        ("behavior_logprobs", pa.list_(pa.float32())),
        ("ar_logprobs", pa.list_(pa.float32())),
        ("reward", pa.float64()),
        ("reward_terms", pa.map_(pa.string(), pa.float64())),
        ("accept_counts", pa.list_(pa.int16())),
        ("draft_counts", pa.list_(pa.int16())),
        ("num_forwards", pa.int32()),
        ("tokens_per_forward", pa.float32()),
        ("finish_reason", pa.string()),
        ("policy_version", pa.int64()),
        ("sampler", pa.string()),
        ("env_seed", pa.int64()),
        ("env_mask", pa.list_(pa.int8())),
        ("turn_ends", pa.list_(pa.int32())),
        ("turn_rewards", pa.list_(pa.float64())),
    ]
)


@dataclass(frozen=True)
class ExtraColumns:
    """A prompt file's own columns, carried into every row it gave (so rollouts join back on them): every key but
    `task` (a column already). Scalars keep the type Arrow infers; objects, lists and mixed types go as JSON text. A
    name the row schema has already gets a `column_` prefix."""

    names: dict[str, str] = field(default_factory=dict)  # key -> field name
    types: dict[str, pa.DataType] = field(
        default_factory=dict
    )  # key -> Arrow type (string = JSON unless str)

    @staticmethod
    def of(records: list[PromptRecord]) -> ExtraColumns:
        keys = [k for k in dict.fromkeys(k for r in records for k in r.columns) if k != "task"]
        names, types = {}, {}
        for k in keys:
            values = [r.columns.get(k) for r in records]
            names[k] = f"column_{k}" if k in ROW_SCHEMA.names else k
            types[k] = pa.string()
            if not any(isinstance(v, dict | list) for v in values):
                try:
                    t = pa.array(values).type
                    types[k] = t if t != pa.null() else pa.string()
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    pass  # mixed types: JSON text
        return ExtraColumns(names, types)

    def schema(self) -> pa.Schema:
        return pa.schema([*ROW_SCHEMA, *(pa.field(self.names[k], t) for k, t in self.types.items())])

    def values(self, columns: dict) -> dict:
        out = {}
        for k, name in self.names.items():
            v = columns.get(k)
            if self.types[k] == pa.string() and v is not None and not isinstance(v, str):
                v = json.dumps(v, sort_keys=True, default=str)
            out[name] = v
        return out


class PromptFileError(ConfigError):
    """A malformed prompts file: the message names the file and the 1-based line/record/row."""


class ManifestMismatchError(ConfigError):
    """out_dir holds shards written with another config."""


@dataclass(frozen=True)
class PromptRecord:
    """One distinct prompt of the job, whatever its source."""

    prompt: str | list[dict]  # text, or a conversation (rendered with the chat template)
    task: str | None = None  # a label; an env prompt carries the env id
    columns: dict = field(
        default_factory=dict
    )  # what the reward functions receive (task, answer, metadata, ...)
    env_seed: int | None = None  # env prompts: the env.reset seed; the env scores the episode
    where: str = ""  # "<file>: line N", or the source and index

    @classmethod
    def from_row(cls, row: PromptRow) -> PromptRecord:
        return cls(row.prompt, row.columns.get("task"), row.columns, None, row.where)

    def as_row(self) -> PromptRow:
        """The record as the shared prompt row (its encoding and the completion form its rewards receive)."""
        return PromptRow(self.prompt, self.columns, self.where, self.task or "prompts")

    @property
    def text(self) -> str:
        """The `prompt` column: the text, or the conversation as JSON."""
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- prompt sources


def task_prompts(tasks: list[str], n: int, seed: int) -> list[PromptRecord]:
    """n prompts cycling over `tasks`; each task's prompts are reasoning-gym's first samples at `seed`."""
    names = [tasks[j % len(tasks)] for j in range(n)]
    draws = {t: iter(iter_samples(t, names.count(t), seed)) for t in dict.fromkeys(names)}
    return [
        PromptRecord.from_row(PromptRow.from_task(next(draws[t]), f"tasks: prompt {j}"))
        for j, t in enumerate(names)
    ]


def env_seed(seed: int, j: int) -> int:
    """The env.reset seed of prompt j: 32 bits of sha256(job seed, j), so prompts are independent, reproducible."""
    return int.from_bytes(hashlib.sha256(f"blockrl-rollout:{seed}:{j}".encode()).digest()[:4], "little")


def env_prompts(env_id: str, n: int, seed: int) -> list[PromptRecord]:
    """n prompts of a registered text env: prompt j is the observation of env.reset(seed=env_seed(seed, j)); the
    workers reset their own env instances with the same seeds (rollout/multiturn.py)."""
    env = gym.make(env_id).unwrapped
    out = []
    for j in range(n):
        s = env_seed(seed, j)
        prompt, _ = env.reset(seed=s)
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(
                f"env: {env_id} is not a text env (reset returned {type(prompt).__name__} {prompt!r:.40})"
            )
        out.append(PromptRecord(prompt, env_id, {}, s, f"env {env_id}: prompt {j}"))
    env.close()
    return out


def read_prompts_file(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """Records of a prompts file (the first `limit`): rows parsed by `envs.prompt_file` (`prompt` text or messages,
    or `messages`; every other column kept for the rewards), errors naming the file and the row."""
    if not Path(path).exists():
        raise PromptFileError(f"prompts_file: {path} not found")
    try:
        rows = read_prompt_rows([str(path)], BadRows("error"), limit)
    except RecordError as e:
        raise PromptFileError(f"num_prompts: {e}" if e.kind == "short" else str(e)) from None
    return [PromptRecord.from_row(r) for r in rows]


def load_prompts(cfg: RolloutJobConfig) -> list[PromptRecord]:
    if cfg.prompts_file is not None:
        return read_prompts_file(cfg.prompts_file, cfg.num_prompts)
    if cfg.env is not None:
        return env_prompts(cfg.env, cfg.num_prompts, cfg.seed)
    return task_prompts(cfg.tasks, cfg.num_prompts, cfg.seed)


def reward_functions(cfg: RolloutJobConfig) -> RewardFunctions:
    """The config's reward functions, or the built-in verifier (which scores rows of built-in tasks only)."""
    return RewardFunctions(cfg.rewards or [RewardSpec(function=BUILTIN_REWARD)], cfg.on_reward_error)


# ---------------------------------------------------------------------------------------------- the manifest

FULL_HASH_BYTES = 16 << 20  # files up to this size are hashed whole
SAMPLES, CHUNK = 256, 4096  # larger ones: this many evenly spaced chunks of their data


def fingerprint_file(path: Path) -> str:
    """sha256 of a file's size and content: whole for small files; for `.safetensors` its JSON header (names, dtypes,
    shapes, offsets) plus a strided sample of the tensor bytes; for other large files a strided sample."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n <= size:  # else not a valid safetensors file: sample it like any other
                h.update(f.read(n))
                start = 8 + n
        span = size - start
        if span <= (SAMPLES * CHUNK if start else FULL_HASH_BYTES):  # small: hash it all
            f.seek(start)
            h.update(f.read())
        else:
            for k in range(SAMPLES):
                f.seek(start + (span - CHUNK) * k // (SAMPLES - 1))
                h.update(f.read(CHUNK))
    return h.hexdigest()[:16]


CHECKPOINT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".json",
    ".model",
    ".tiktoken",
    ".txt",
)  # weights, config, tokenizer


def checkpoint_fingerprint(checkpoint: str | Path) -> dict[str, str]:
    """{file name: fingerprint} of the files of a checkpoint directory that can change the rows."""
    files = sorted(p for p in Path(checkpoint).iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    return {p.name: fingerprint_file(p) for p in files}


def prompts_fingerprint(records: list[PromptRecord]) -> str:
    """sha256 of the prompts as loaded (text, label, answer and metadata, env seed), whatever their source."""
    data = [[r.prompt, r.task, r.columns, r.env_seed] for r in records]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_spec(cfg: RolloutJobConfig, records: list[PromptRecord]) -> dict:
    """Everything that determines the rows: the config minus operational and location fields, plus content
    fingerprints of the prompts and the checkpoint."""
    spec = cfg.model_dump(mode="json", exclude={*OPERATIONAL, *LOCATIONS})
    if cfg.prompts_file is not None or cfg.env is not None:
        spec.pop("tasks")  # not read
    spec["checkpoint_files"] = checkpoint_fingerprint(cfg.checkpoint)
    spec["prompts_sha256"] = prompts_fingerprint(records)
    return spec


def check_manifest(out_dir: Path, spec: dict, num_samples: int) -> None:
    """Create `_manifest.json`, or check that the one there was written for the same content spec."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = out_dir / "_manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old["config_hash"] != digest:
            diff = sorted(k for k in spec.keys() | old["spec"].keys() if spec.get(k) != old["spec"].get(k))
            details = "; ".join(f"{k}: {old['spec'].get(k)!r} -> {spec.get(k)!r}" for k in diff)
            raise ManifestMismatchError(
                f"{out_dir} holds a rollout made with another config ({details}); use another out_dir, or delete "
                f"{out_dir} to start over"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "._manifest.json.tmp"
    tmp.write_text(json.dumps({"config_hash": digest, "num_samples": num_samples, "spec": spec}, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- shards on disk


def shard_path(out_dir: Path, shard_id: int) -> Path:
    return out_dir / f"part-{shard_id:05d}.parquet"


def write_shard(out_dir: Path, shard_id: int, rows: list[dict], schema: pa.Schema = ROW_SCHEMA) -> Path:
    """Atomic: write a dot-prefixed temp file, fsync, rename into place."""
    final = shard_path(out_dir, shard_id)
    tmp = out_dir / f".{final.name}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def is_complete(out_dir: Path, shard_id: int, rows: int) -> bool:
    path = shard_path(out_dir, shard_id)
    if not path.exists():
        return False
    try:
        return pq.read_metadata(path).num_rows == rows
    except (pa.ArrowException, OSError):
        log.warning("rollout: %s is unreadable; regenerating it", path)
        return False


def trajectory_rows(
    trajs: list[Trajectory],
    indices: list[int],
    records: list[PromptRecord],
    group_size: int,
    tok,
    rewards: RewardFunctions,
    extra: ExtraColumns | None = None,
) -> tuple[list[dict], int]:
    """(one ROW_SCHEMA row per sample, reward failures). A prompt row's reward is the weighted sum of the reward
    functions that scored it (null where none did; each term in `reward_terms`, null where it did not score or
    failed); an env episode's reward is the sum of its turn rewards."""
    recs = [records[i // group_size] for i in indices]
    texts = [tok.decode(t.tokens, skip_special_tokens=True) for t in trajs]
    plain = [k for k, r in enumerate(recs) if r.env_seed is None]  # env episodes are scored by their env
    reward: list[float | None] = [None] * len(trajs)
    terms: list[list | None] = [None] * len(trajs)
    scored = None
    if plain:
        rows = [recs[k].as_row() for k in plain]
        scored = rewards(
            [r.prompt for r in rows],
            [r.completion(texts[k]) for r, k in zip(rows, plain, strict=True)],
            [trajs[k].tokens for k in plain],
            [r.columns for r in rows],
            [r.where for r in rows],
        )
        for j, k in enumerate(plain):
            terms[k] = [(name, None if math.isnan(v[j]) else v[j]) for name, v in scored.per_function.items()]
            if scored.scored[j] or scored.failed[j]:
                reward[k] = scored.rewards[j]
    rows = []
    for k, (i, t) in enumerate(zip(indices, trajs, strict=True)):
        rec = recs[k]
        rows.append(
            {
                "sample_index": i,
                "group_index": i // group_size,
                "task": rec.task,
                "prompt": rec.text,
                "prompt_ids": t.prompt_ids,
                "tokens": t.tokens,
                "text": texts[k],
                "behavior_logprobs": t.behavior_logprobs,
                "ar_logprobs": t.ar_logprobs,
                "reward": float(sum(t.turn_rewards)) if rec.env_seed is not None else reward[k],
                "reward_terms": terms[k],
                "accept_counts": t.accept_counts,
                "draft_counts": t.draft_counts,
                "num_forwards": t.num_forwards,
                "tokens_per_forward": t.tokens_per_forward,
                "finish_reason": t.finish_reason,
                "policy_version": t.policy_version,
                "sampler": t.sampler,
                "env_seed": rec.env_seed,
                "env_mask": t.env_mask,
                "turn_ends": t.turn_ends,
                "turn_rewards": t.turn_rewards,
            }
            | (extra.values(rec.columns) if extra is not None else {})
        )
    return rows, scored.failures if scored is not None else 0
