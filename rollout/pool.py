"""`RolloutPool`: Ray actors hosting `RolloutWorker`s, sharding prompts x group over them and gathering
trajectories. Only this module (and the driver) import Ray.

- Ray is local by default (`address=None`, temp dir and logs inside the run directory) or joins a cluster.
- Weights go out once per version: one `ray.put` of the numpy state dict, every worker loads it.
- Fault tolerance: actors restart (`max_restarts`); a shard whose actor died is re-sent after the restarted actor
  has been given the current weights again. Results are keyed by global sample index, so nothing is lost or
  duplicated.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import ray
from ray.exceptions import ObjectLostError, RayActorError

from rollout.types import Trajectory
from rollout.worker import RolloutWorker, Shard, StaleWeightsError

log = logging.getLogger(__name__)


def ray_temp_dir(run_dir: str | Path) -> Path:
    """`<run_dir>/ray`, or a short private dir linked from it when that path is too long for Ray's sockets."""
    tmp = Path(run_dir).resolve() / "ray"
    if len(str(tmp)) > 40:
        # NOTE: Ray puts AF_UNIX sockets under its temp dir and they are limited to 107 bytes; a deep run dir gets a
        # short private dir instead, linked from <run_dir>/ray so the logs are still found there.
        short = Path(tempfile.gettempdir()) / f"brl-{hashlib.sha1(str(tmp).encode()).hexdigest()[:10]}"
        short.mkdir(parents=True, exist_ok=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if not tmp.exists():
            tmp.symlink_to(short, target_is_directory=True)
        tmp = short
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def init_ray(run_dir: str | Path, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start local Ray with its temp dir under the run directory, or join `address`."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(
        num_cpus=num_cpus, _temp_dir=str(ray_temp_dir(run_dir)), include_dashboard=False, log_to_driver=False
    )


class RolloutPool:
    def __init__(self, checkpoint: str, num_workers: int, engine_kwargs: dict, num_cpus_per_worker: float = 1.0,
                 num_gpus_per_worker: float = 0.0, threads: int = 1, max_restarts: int = 3):  # fmt: skip
        # SPREAD: on a cluster the workers land on different nodes, so one node's loss costs a fraction of the pool
        actor_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=max_restarts,
                               scheduling_strategy="SPREAD")(RolloutWorker)  # fmt: skip
        self.workers = [actor_cls.remote(checkpoint, engine_kwargs, threads) for _ in range(num_workers)]
        self.version = 0
        self._weights_ref = None

    def sync_weights(self, weights: dict, version: int) -> None:
        """Publish a numpy state dict as `version` to every worker (blocks until loaded)."""
        self._weights_ref = ray.put(weights)
        self.version = version
        for w, ref in enumerate([w.set_weights.remote(version, self._weights_ref) for w in self.workers]):
            try:
                ray.get(ref)
            except RayActorError:  # died before loading: wait for the restart and load into the new one
                self._reload(w)

    def worker_nodes(self) -> list[str]:
        """The Ray node id each worker runs on."""
        where = lambda _self: ray.get_runtime_context().get_node_id()  # noqa: E731 (runs inside the actor)
        return ray.get([w.__ray_call__.remote(where) for w in self.workers])

    def submit_shard(self, worker, shard: Shard):
        return worker.generate.remote(shard)

    def collect(self, prompt_ids: list[list[int]], group_size: int, sampling: dict,
                shard_size: int | None = None) -> list[Trajectory]:  # fmt: skip
        """Every prompt repeated `group_size` times (groups contiguous); one Trajectory per sample, in order."""
        samples = [p for p in prompt_ids for _ in range(group_size)]
        n = len(samples)
        size = shard_size or max(1, -(-n // len(self.workers)))
        shards = [Shard(i, samples[s : s + size], list(range(s, min(n, s + size))), self.version, sampling)
                  for i, s in enumerate(range(0, n, size))]  # fmt: skip
        return self._run(shards, n)

    def collect_episodes(self, env_id: str, env_seeds: list[int], group_size: int, sampling: dict,
                         shard_size: int | None = None) -> list[Trajectory]:  # fmt: skip
        """Multi-turn: one episode of `env_id` per (seed, group member), groups contiguous, in order."""
        seeds = [s for s in env_seeds for _ in range(group_size)]
        n = len(seeds)
        size = shard_size or max(1, -(-n // len(self.workers)))
        shards = [Shard(i, [], list(range(s, min(n, s + size))), self.version, sampling, env_id, seeds[s : s + size])
                  for i, s in enumerate(range(0, n, size))]  # fmt: skip
        return self._run(shards, n)

    def _run(self, shards: list[Shard], n: int) -> list[Trajectory]:
        results: dict[int, Trajectory] = {}
        pending = {}  # ref -> (worker index, shard)
        queue = list(shards)
        idle = list(range(len(self.workers)))
        t0 = time.time()
        while queue or pending:
            while queue and idle:
                w = idle.pop()
                shard = queue.pop(0)
                pending[self.submit_shard(self.workers[w], shard)] = (w, shard)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=60)
            if not done:
                log.info("rollout: waiting on %d shards (%.0fs)", len(pending), time.time() - t0)
                continue
            ref = done[0]
            w, shard = pending.pop(ref)
            try:
                _, indices, trajs = ray.get(ref)
            except (RayActorError, ObjectLostError, StaleWeightsError) as e:
                # died mid-shard, lost its node (and the result with it), or restarted while idle and came back on
                # the checkpoint's weights: give it the current weights and re-run the shard
                log.warning("rollout worker %d failed shard %d (%s): reloading it and resubmitting", w,
                            shard.shard_id, type(e).__name__)  # fmt: skip
                self._reload(w)
                queue.insert(0, shard)
                idle.append(w)
                continue
            for i, t in zip(indices, trajs, strict=True):
                if i in results:
                    raise RuntimeError(f"sample {i} returned twice")
                results[i] = t
            idle.append(w)
        missing = [i for i in range(n) if i not in results]
        if missing:
            raise RuntimeError(f"samples {missing[:10]} missing after collection")
        return [results[i] for i in range(n)]

    def _reload(self, w: int, attempts: int = 60) -> None:
        """Wait for a restarted actor and give it the current weights."""
        for _ in range(attempts):
            try:
                if self._weights_ref is not None:
                    ray.get(self.workers[w].set_weights.remote(self.version, self._weights_ref))
                else:  # still on the checkpoint's weights (version 0): just wait until it is up
                    ray.get(self.workers[w].ping.remote())
                return
            except RayActorError:
                time.sleep(0.5)
        raise RuntimeError(f"rollout worker {w} did not come back after a crash")

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
