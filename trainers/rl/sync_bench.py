"""`blockrl sync-bench`: how fast a new policy version reaches the rollout workers, by collective (byte buckets over
the sync group) and through the object store (a numpy state dict), side by side in one run.

For each model (the shipped checkpoint, and a random-init model of `random_params_m` million parameters written to
the run directory) a learner in this process and `workers` rollout workers are started, then the two transports
alternate round by round, each publishing the next policy version exactly as `blockrl train` does (`_publish`: the
learner's gather, the send, every worker's in-place load). The first round of each is a warm-up. Reported per model
and transport: bytes per sync, the median seconds, GB/s (bytes / seconds: what one worker receives per second;
every worker gets all of it), and the collective's speed-up. After the last round every worker's weights are checked
bit for bit against the learner's.

    blockrl sync-bench                                      # ~3 minutes on 2 CPU cores
    blockrl sync-bench --json docs/sync_bench.json
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from pydantic import Field
from tqdm import tqdm

from common.config import Section, ShippedPath
from common.device import DTypeName
from policy.factory import ModelSpec, build_model, count_parameters, make_config
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from rollout.bench.report import device_name
from rollout.pool import RolloutPool, init_ray
from rollout.settings import EngineSettings
from rollout.weight_sync import WeightSyncConfig
from rollout.worker import weights_digest
from trainers.rl.learner import Learner, LearnerConfig
from trainers.rl.run import _publish

log = logging.getLogger(__name__)

TRANSPORTS = ("collective", "object_store")


class SyncBenchConfig(Section):
    """`blockrl sync-bench` settings."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """the shipped (or your) checkpoint; its tokenizer also serves the random-init model."""
    run_dir: str = "runs/sync_bench"
    random_params_m: int = Field(300, ge=0)
    """a random-init dense Llama of about this many million parameters is benched too (0 = skip)."""
    workers: int = Field(2, ge=1)
    rounds: int = Field(4, ge=2)
    """syncs per transport and model, alternating; the first of each is a warm-up."""
    bucket_mb: float = Field(256.0, gt=0.0)
    dtype: DTypeName = "float32"
    """the workers' dtype (what the collective sends; the object store carries fp32 numpy)."""


def random_checkpoint(cfg: SyncBenchConfig) -> Path:
    """A dense Llama of ~`random_params_m` M parameters (width 1024, 2816-wide MLP, layers to the size), converted
    and saved with the checkpoint's tokenizer under the run directory (reused when there)."""
    path = Path(cfg.run_dir) / f"random-{cfg.random_params_m}m"
    if (path / "config.json").is_file():
        return path
    tok = load_tokenizer(cfg.checkpoint)
    per_layer = 4 * 1024 * 1024 + 3 * 1024 * 2816  # attention + MLP
    layers = max(1, math.ceil(cfg.random_params_m * 1e6 / per_layer))  # at least the size asked for
    spec = ModelSpec(
        arch="llama",
        hidden_size=1024,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=16,
        intermediate_size=2816,
    )
    model = build_model(make_config(spec, len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=2), seed=0)
    policy = HybridPolicy(model, check=False)
    policy.convert(tok, block_size=16)
    policy.save_pretrained(path, tok)
    log.info(
        "random-init model: %.0fM parameters, %d layers -> %s", count_parameters(model) / 1e6, layers, path
    )
    return path


def bench_model(name: str, checkpoint: Path, cfg: SyncBenchConfig, bar: tqdm) -> dict:
    policy = HybridPolicy.from_pretrained(checkpoint)
    learner = Learner(policy, LearnerConfig(device="cpu"))
    engine = EngineSettings(device="cpu", dtype=cfg.dtype, max_batch=1)
    pool = RolloutPool(str(checkpoint), engine, num_workers=cfg.workers, num_cpus_per_worker=0.5)
    seconds: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    nbytes: dict[str, float] = {}
    try:
        pool.wait_ready()
        for _ in range(cfg.rounds):
            for transport in TRANSPORTS:
                learner.version += 1
                bar.set_postfix_str(f"{name}: {transport} v{learner.version}")
                sync = WeightSyncConfig(transport=transport, bucket_mb=cfg.bucket_mb)
                m = _publish(pool, learner, sync, engine.torch_dtype)
                if m.get("sync/fallback"):
                    raise RuntimeError(f"{name}: the {transport} sync fell back to the object store")
                seconds[transport].append(m["time/weight_sync_s"])
                nbytes[transport] = m["sync/bytes"]
                bar.update(1)
        digests = pool.weight_digests()
        want = _digest(learner)
        if any(d != want for d in digests):
            raise RuntimeError(f"{name}: a worker's weights differ from the learner's after the last sync")
    finally:
        pool.shutdown()
    out = {"checkpoint": str(checkpoint), "parameters_m": count_parameters(policy.model) / 1e6}
    for t in TRANSPORTS:
        med = statistics.median(seconds[t][1:])
        out[t] = {
            "bytes": nbytes[t],
            "median_s": med,
            "gb_per_s": nbytes[t] / med / 1e9,
            "seconds": seconds[t],
        }
    out["collective_speedup"] = out["object_store"]["median_s"] / out["collective"]["median_s"]
    return out


def _digest(learner: Learner) -> str:
    return weights_digest(learner.trained.policy)


def run_sync_bench(cfg: SyncBenchConfig) -> dict:
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    init_ray(cfg.run_dir, num_cpus=None)
    models = [("shipped", Path(cfg.checkpoint))]
    if cfg.random_params_m:
        models.append((f"random {cfg.random_params_m}M", random_checkpoint(cfg)))
    result = {
        "device": device_name(),
        "workers": cfg.workers,
        "dtype": cfg.dtype,
        "models": {},
    }
    with tqdm(total=len(models) * cfg.rounds * len(TRANSPORTS), desc="sync-bench", unit="sync") as bar:
        for name, path in models:
            result["models"][name] = bench_model(name, path, cfg, bar)
    return result


def format_summary(result: dict) -> str:
    lines = [f"weight sync to {result['workers']} workers ({result['dtype']}), median of the timed rounds"]
    lines.append(f"{'model':<14} {'params':>8} {'transport':<13} {'MB':>9} {'s':>8} {'GB/s':>7}")
    for name, m in result["models"].items():
        for t in TRANSPORTS:
            r = m[t]
            lines.append(
                f"{name:<14} {m['parameters_m']:>7.1f}M {t:<13} {r['bytes'] / 2**20:>9.1f} "
                f"{r['median_s']:>8.3f} {r['gb_per_s']:>7.2f}"
            )
        lines.append(f"{'':<14} collective {m['collective_speedup']:.2f}x the object store")
    return "\n".join(lines)
