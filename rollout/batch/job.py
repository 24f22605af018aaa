"""`blockrl rollout`: N trajectories on Ray rollout workers with any sampler, written as sharded Parquet, resumable.

Prompts come from the built-in tasks, a registered gymnasium text env (single- or multi-turn) or a JSONL / JSON /
Parquet file (sources, file schema and the manifest: rollout/batch/io.py). Every prompt is repeated `group_size` times
(groups contiguous); sample i belongs to group i // group_size and draws its randomness from (seed, i), whichever
worker and shard run it. An env episode's randomness is fixed by its shard (rollout/multiturn.py), and shards are
fixed by `shard_size`, so env rows are reproducible too.

Decisions:
- The unit of work and of resume is a shard of `shard_size` consecutive samples, one Parquet file each, written to a
  dot-prefixed temp file and renamed into place: a file that exists is complete, and a crash loses at most the shards
  in flight. A re-run skips the shards already on disk.
- `_manifest.json` pins a hash of everything that changes the rows (config minus operational and path fields, plus
  content fingerprints of the prompts and the checkpoint); a re-run with a different one errors and lists the fields
  that differ, rather than mixing two datasets in one directory. Moving the checkpoint or prompts file is fine.
- Resume is bit-identical for `ar`, `lossless` and `logit_mix`: a row depends only on (config, inputs, sample index).
  `auto` picks the sampler per engine call from timing calibration and the worker's acceptance history, so a resumed
  (or re-sharded, or differently-scheduled) auto job can pick differently and write other tokens. Every auto row is
  still an exact AR sample (auto only chooses among exact samplers), so the dataset has the same distribution; the
  `sampler` column records the concrete option each row used ("auto" where a shard mixed them unobservably: env
  episodes, one engine call per turn).
- Book-keeping files start with `_` or `.` so `pyarrow.parquet.read_table(out_dir)` reads exactly the shards.
- Generation is pluggable: `RayBackend` (the CLI path; one shard per worker in flight, restart-and-resubmit on a dead
  worker) or `LocalBackend` (an in-process `RolloutWorker`, for tests and debugging).

    blockrl rollout                                   # configs/rollout.yaml: shipped checkpoint, task mix
    blockrl rollout --set prompts_file=prompts.jsonl --set num_prompts=null --set sampler=logit_mix
    blockrl rollout --set env=blockrl/calc-chain_sum-v0 --set out_dir=runs/calc
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from common.checkpoint import missing_checkpoint
from common.config import ConfigError, dump_config
from policy.metadata import (
    checkpoint_block_size,
    checkpoint_is_converted,
    checkpoint_prompt_format,
    load_tokenizer,
)
from rollout.batch import io as job_io  # the job's inputs (prompts) and outputs (shards, manifest)
from rollout.batch.config import RolloutJobConfig
from rollout.settings import EngineSettings, WorkerSettings
from rollout.types import SamplingParams
from rollout.worker import RolloutWorker, Shard, ShardResult, state_dict_numpy

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- backends


class LocalBackend:
    """Shards run one after another on an in-process `RolloutWorker` (tests, debugging); torch threads untouched."""

    def __init__(self, checkpoint: str, engine: EngineSettings, policy_version: int = 0):
        import torch

        self.worker = RolloutWorker(checkpoint, engine, threads=torch.get_num_threads())
        if policy_version:
            self.worker.set_weights(policy_version, state_dict_numpy(self.worker.policy))

    def run(self, shards: Iterable[Shard]) -> Iterator[ShardResult]:
        for shard in shards:
            yield self.worker.generate(shard)

    def close(self) -> None:
        pass


class RayBackend:
    """The `RolloutPool`'s scheduling and fault loop (one shard per worker in flight, shards yielded as they finish;
    a dead, lost or hung worker is restarted with the current weights and its shard resubmitted)."""

    def __init__(self, checkpoint: str, engine: EngineSettings, policy_version: int, workers: WorkerSettings):
        from rollout.pool import RolloutPool

        self.pool = RolloutPool.from_settings(checkpoint, engine, workers)
        log.info("rollout: starting %d Ray workers (each loads %s)", workers.workers, checkpoint)
        self.pool.wait_ready()  # so that tokens/s measures generation only
        if policy_version:
            from policy.hybrid import HybridPolicy

            self.pool.sync_weights(state_dict_numpy(HybridPolicy.from_pretrained(checkpoint)), policy_version)

    def run(self, shards: Iterable[Shard]) -> Iterator[ShardResult]:
        return self.pool.run(shards)

    def close(self) -> None:
        self.pool.shutdown()


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class JobSummary:
    out_dir: str
    num_samples: int
    num_shards: int
    generated_shards: int  # this run; the rest were already on disk
    tokens: int  # model tokens generated this run (env observation tokens excluded)
    seconds: float
    tokens_per_forward: float  # model tokens per forward over the whole dataset
    reward_mean: float | None  # over scored rows of the whole dataset
    reward_failures: int = 0  # this run's samples with a failed reward term (on_reward_error: record)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def check_checkpoint(cfg: RolloutJobConfig) -> None:
    """Fail before any work (and before Ray starts) on a checkpoint or level set the engine would refuse."""
    path = Path(cfg.checkpoint) / "config.json"
    if not path.is_file():
        raise ConfigError(missing_checkpoint(cfg.checkpoint, "checkpoint"))
    cfg.check_checkpoint(checkpoint_is_converted(cfg.checkpoint), checkpoint_block_size(cfg.checkpoint))


def make_backend(cfg: RolloutJobConfig, kind: Literal["ray", "local"] = "ray") -> RayBackend | LocalBackend:
    """Ray workers (local Ray with its temp dir in <out_dir>/_run, or cfg.address), or one in-process worker."""
    if kind == "local":
        return LocalBackend(cfg.checkpoint, cfg.engine_settings(), cfg.policy_version)
    from rollout.pool import init_ray

    init_ray(Path(cfg.out_dir) / "_run", cfg.address, num_cpus=None)
    return RayBackend(cfg.checkpoint, cfg.engine_settings(), cfg.policy_version, cfg.worker_settings())


def plan_shards(cfg: RolloutJobConfig, records, tok, out_dir: Path) -> tuple[int, int, list[Shard]]:
    """(samples, shards, the shards not yet on disk): shard k holds samples [k * shard_size, (k+1) * shard_size)."""
    n = len(records) * cfg.group_size
    fmt = checkpoint_prompt_format(cfg.checkpoint) if cfg.prompt_format == "auto" else cfg.prompt_format
    if cfg.env is not None and fmt == "chat":
        raise ConfigError(
            f"prompt_format: env {cfg.env} feeds text turns; chat-format prompts need tasks or a file"
        )
    encoded = [r.as_row().encode(tok, fmt) for r in records]
    sampling = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=cfg.seed,
        eos_token_id=None,  # the workers stop at the model's EOS ids (GenerateAPI.eos_ids)
        stop_strings=tuple(cfg.stop_strings),
    )
    num_shards, todo = -(-n // cfg.shard_size), []
    for k in range(num_shards):
        idx = list(range(k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size)))  # global sample indices
        if job_io.is_complete(out_dir, k, len(idx)):
            continue
        if cfg.env is not None:  # the worker resets its own env instances with these seeds
            seeds = [records[i // cfg.group_size].env_seed for i in idx]
            todo.append(Shard(k, [], idx, cfg.policy_version, sampling, env_id=cfg.env, env_seeds=seeds))
        else:
            todo.append(
                Shard(k, [encoded[i // cfg.group_size] for i in idx], idx, cfg.policy_version, sampling)
            )
    return n, num_shards, todo


def run_job(cfg: RolloutJobConfig, backend=None, progress: bool = True) -> JobSummary:
    """Generate the shards missing from cfg.out_dir; `backend` defaults to Ray workers (RayBackend)."""
    out_dir = Path(cfg.out_dir)
    check_checkpoint(cfg)
    records = job_io.load_prompts(cfg)
    rewards = job_io.reward_functions(cfg)  # imported now: a bad reference fails before any work
    extra = None
    if cfg.prompts_file is not None:  # a column a function needs and the file lacks: also before any work
        rewards.check_columns({k for r in records for k in r.columns}, str(cfg.prompts_file))
        extra = job_io.ExtraColumns.of(records)  # the file's columns travel into its rows
    tok = load_tokenizer(cfg.checkpoint)
    job_io.check_manifest(out_dir, job_io.content_spec(cfg, records), len(records) * cfg.group_size)
    dump_config(cfg, out_dir / "_config.yaml")
    for stale in out_dir.glob(".part-*.tmp"):  # shards that were in flight when a previous run died
        stale.unlink()
    n, num_shards, shards = plan_shards(cfg, records, tok, out_dir)
    log.info("rollout: %d samples in %d shards, %d to generate -> %s", n, num_shards, len(shards), out_dir)
    t0, tokens, generated, failures = time.time(), 0, 0, 0
    if shards:
        own = backend is None  # a backend we create we also close; a caller's stays open
        backend = backend or make_backend(cfg)
        t0 = time.time()  # tokens/s from here: Ray and worker start-up (model load) excluded
        bar = tqdm(
            total=n,
            initial=n - sum(len(s.indices) for s in shards),
            unit="sample",
            disable=not progress,
            desc="rollout",
        )
        try:
            for res in backend.run(shards):
                rows, failed = job_io.trajectory_rows(
                    res.trajectories, res.indices, records, cfg.group_size, tok, rewards, extra
                )
                schema = extra.schema() if extra is not None else job_io.ROW_SCHEMA
                job_io.write_shard(out_dir, res.shard.shard_id, rows, schema)
                failures += failed
                tokens += sum(t.num_model_tokens for t in res.trajectories)
                generated += 1
                bar.update(len(res.trajectories))
                bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s")
        finally:
            bar.close()
            if own:
                backend.close()
    if failures:
        log.warning(
            "rollout: %d samples had a failed reward term (null in reward_terms, counted 0)", failures
        )
    return _summarize(out_dir, n, num_shards, generated, tokens, time.time() - t0, failures)


def _summarize(
    out_dir: Path, n: int, num_shards: int, generated: int, tokens: int, seconds: float, failures: int
) -> JobSummary:
    table = pq.read_table(out_dir, columns=["num_forwards", "tokens", "env_mask", "reward"])
    mask = table["env_mask"]  # null = every token is the model's
    plain = pc.sum(pc.if_else(pc.is_null(mask), pc.list_value_length(table["tokens"]), 0)).as_py() or 0
    model = plain + (pc.sum(pc.list_flatten(mask)).as_py() or 0)
    rewards = table["reward"].drop_null()
    summary = JobSummary(
        str(out_dir),
        n,
        num_shards,
        generated,
        tokens,
        seconds,
        model / max(1, pc.sum(table["num_forwards"]).as_py()),
        pc.mean(rewards).as_py() if len(rewards) else None,
        failures,
    )
    if table.num_rows != n:
        raise RuntimeError(f"{out_dir}: {table.num_rows} rows on disk, expected {n}")
    (out_dir / "_summary.json").write_text(
        json.dumps({**summary.__dict__, "tokens_per_s": summary.tokens_per_s})
    )
    return summary
