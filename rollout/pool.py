"""`RolloutPool`: Ray actors hosting `RolloutWorker`s, sharding prompts x group over them and gathering
trajectories. Only this module (and the driver) import Ray.

- Ray is local by default (`address=None`, temp dir and logs inside the run directory) or joins a cluster.
- Weights go out once per version: by collective (`broadcast_weights`: byte buckets over the sync group,
  rollout/weight_sync.py), or through the object store (`sync_weights`: one `ray.put` of the numpy state dict,
  every worker loads it). The object store is the fallback when a collective fails, and the path a restarted
  worker gets its weights by.
- One scheduling and fault loop (`run`) serves every job: `collect` (RL steps) and the `blockrl rollout` job both
  iterate it. Actors restart (`max_restarts`); a shard whose actor died, lost its node (and the result with it),
  came back on stale weights or did not return within `shard_timeout_s` (a hung worker: it is killed and restarted)
  is re-sent after the restarted actor has been given the current weights again. Results are keyed by global sample
  index, so nothing is lost or duplicated.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path

import ray
import torch.distributed as dist
from ray.exceptions import ObjectLostError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.config import ConfigError
from rollout.settings import EngineSettings, WorkerSettings
from rollout.types import SamplingParams, Trajectory
from rollout.weight_sync import SyncAddress
from rollout.worker import RolloutWorker, Shard, ShardResult, StaleWeightsError

log = logging.getLogger(__name__)


class WorkerLostError(RuntimeError):
    """A worker the pool may not restart (a colocated learner rank) died or hung."""


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


def bundle(cpus: float, gpus: float) -> dict[str, float]:
    """A placement-group bundle (Ray refuses zero-valued resources in one)."""
    return {"CPU": cpus} | ({"GPU": gpus} if gpus else {})


def reserve(bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> PlacementGroup:
    """A placement group of `bundles`, ready; a ConfigError naming the request and the cluster if Ray cannot
    reserve it within `timeout_s` (nothing is left reserved)."""
    pg = placement_group(bundles, strategy=strategy.upper())
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ConfigError(
            f"placement: could not reserve {len(bundles)} bundles {bundles} ({strategy}) within {timeout_s:g} s; "
            f"the cluster has {ray.cluster_resources()} (lower workers, cpus_per_worker or gpus_per_worker, or "
            "use placement: none)"
        )
    return pg


@ray.remote(num_cpus=0)
def _where() -> tuple[str, list[str]]:
    """(node id, GPU ids Ray assigned) of the bundle this task runs in."""
    return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]  # ids, UUIDs or MIG


class RolloutPool:
    def __init__(
        self,
        checkpoint: str,
        engine: EngineSettings,
        num_workers: int = 2,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float = 0.0,
        threads: int = 1,
        max_restarts: int = 3,
        shard_timeout_s: float = 600.0,
        placement: str = "none",
        placement_timeout_s: float = 120.0,
        learner: list[dict[str, float]] | None = None,
    ):
        """`placement` != none reserves one bundle per worker (plus bundles 0..N-1 = the learner ranks' resources,
        e.g. {"CPU": 1, "GPU": 1} each, when given) in one placement group before any worker starts; workers then
        run in their bundles (a restarted worker comes back in its own)."""
        if not isinstance(engine, EngineSettings):
            raise TypeError(f"engine: expected EngineSettings, got {type(engine).__name__}")
        self.placement_group: PlacementGroup | None = None
        self.learner_bundles = 0
        options: list[dict] = [{"scheduling_strategy": "SPREAD"}] * num_workers
        if placement != "none":
            bundles = [bundle(num_cpus_per_worker, num_gpus_per_worker)] * num_workers
            if learner:
                bundles, self.learner_bundles = [*learner, *bundles], len(learner)
            pg = self.placement_group = reserve(bundles, placement, placement_timeout_s)
            first = self.learner_bundles
            options = [
                {
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=first + i
                    )
                }
                for i in range(num_workers)
            ]
        # SPREAD: on a cluster the workers land on different nodes, so one node's loss costs a fraction of the pool
        actor_cls = ray.remote(
            num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=max_restarts
        )(RolloutWorker)
        self.workers = [actor_cls.options(**o).remote(checkpoint, engine, threads) for o in options]
        self._setup(shard_timeout_s, owns_workers=True)

    @classmethod
    def over(
        cls, actors: list, shard_timeout_s: float = 600.0, placement_group: PlacementGroup | None = None
    ) -> RolloutPool:
        """A pool over actors made and owned elsewhere that serve `generate`, `ping`, `set_weights` and
        `weights_digest` as RolloutWorker does: the learner ranks in colocated mode. Shutdown leaves them be (and
        releases `placement_group`, which they were reserved in)."""
        pool = cls.__new__(cls)
        pool.placement_group, pool.learner_bundles = placement_group, 0
        pool.workers = list(actors)
        pool._setup(shard_timeout_s, owns_workers=False)
        return pool

    def loaded(self, version: int) -> None:
        """The workers loaded `version` by a path of the caller's (colocated: in process)."""
        self.version, self._weights_ref, self._weights_source = version, None, None

    def _setup(self, shard_timeout_s: float, owns_workers: bool) -> None:
        self.owns_workers = owns_workers
        self.shard_timeout_s = shard_timeout_s
        self.version = 0
        self._weights_ref = None
        # the collective path: the driver hosts the sync group's TCPStore; a new prefix (epoch) after a failure
        self._store: dist.TCPStore | None = None
        self._epoch = 0
        # where a restarted worker gets the current version's weights when the last sync was collective
        self._weights_source: Callable[[int], object] | None = None

    @classmethod
    def from_settings(
        cls,
        checkpoint: str,
        engine: EngineSettings,
        workers: WorkerSettings,
        learner: list[dict[str, float]] | None = None,
    ) -> RolloutPool:
        return cls(
            checkpoint,
            engine,
            workers.workers,
            workers.cpus_per_worker,
            num_gpus_per_worker=workers.gpus_per_worker,
            threads=workers.threads,
            shard_timeout_s=workers.shard_timeout_s,
            placement=workers.placement,
            placement_timeout_s=workers.placement_timeout_s,
            learner=learner,
        )

    def learner_placement(self) -> tuple[bool, list[str]] | None:
        """(whether the learner's bundle is on this process's node, the GPU ids Ray gave it), or None without
        one: the learner (this process) should run on that node and GPU, which Ray keeps from the workers."""
        if not self.learner_bundles:
            return None
        gpus = self.placement_group.bundle_specs[0].get("GPU", 0)
        strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=0)
        node, ids = ray.get(_where.options(scheduling_strategy=strategy, num_gpus=gpus).remote())
        return node == ray.get_runtime_context().get_node_id(), ids

    def wait_ready(self) -> None:
        """Block until every worker has loaded its checkpoint."""
        ray.get([w.ping.remote() for w in self.workers])

    def sync_weights(self, weights, version: int) -> int:
        """The object-store path: publish a numpy state dict (or an ObjectRef of one) as `version` to every worker
        (blocks until loaded). Returns the bytes each worker loaded."""
        self._weights_ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        self._weights_source = None
        self.version = version
        nbytes = 0
        for w, ref in enumerate([w.set_weights.remote(version, self._weights_ref) for w in self.workers]):
            try:
                nbytes = ray.get(ref)
            except RayActorError:  # died before loading: wait for the restart and load into the new one
                self.reload(w)
        return nbytes

    def sync_address(self, timeout_s: float, backend: str = "gloo") -> SyncAddress:
        """Where this pool's sync group meets: a TCPStore in this (the driver's) process, on loopback for a local
        Ray and on this node's address for a cluster."""
        if self._store is None:
            local = ray.util.get_node_ip_address() if self._on_cluster() else "127.0.0.1"
            self._store = dist.TCPStore(
                local, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
            )
            self._store_host = local
        prefix = f"sync{self._epoch}/"
        return SyncAddress(
            self._store_host, self._store.port, prefix, 1 + len(self.workers), timeout_s, backend
        )

    def _on_cluster(self) -> bool:
        return len(ray.nodes()) > 1

    def broadcast_weights(
        self,
        version: int,
        send: Callable[[SyncAddress], list],
        fallback: Callable[[], object],
        source: Callable[[int], object],
        timeout_s: float,
        backend: str = "gloo",
    ) -> dict[str, float]:
        """The collective path: every worker joins the sync group (rank 1..W) and loads `version` in place while
        `send(address)` sends it from rank 0 (in this process, returning its metrics, or in actors, returning refs).

        `fallback()` gives the same weights as a numpy state dict (or a ref to one) when the collective fails (a
        lost or hung peer): the object store carries them and the group is re-formed on the next sync.
        `source(version)` gives the copy the sender kept: how a worker restarted later gets them. Returns the
        receivers' `sync/*` metrics (mean) and the sender's, plus `sync/fallback` = 1 when the object store had to
        carry this version."""
        address = self.sync_address(timeout_s, backend)
        receives = [w.receive_weights.remote(version, address, i + 1) for i, w in enumerate(self.workers)]
        try:
            senders = send(address)
            refs = [*receives, *(x for x in senders if isinstance(x, ray.ObjectRef))]
            results = ray.get(refs, timeout=2 * timeout_s)
            sent = [x for x in [*results[len(receives) :], *senders] if isinstance(x, dict)]
        # deliberate fault tolerance: whatever broke the collective (a lost peer, a timeout, a refused version), the
        # object store carries this version and the next sync re-forms the group
        except Exception as e:
            who = self._failed(receives)
            log.warning(
                "weight sync v%d by collective failed (%s: %s; workers not done: %s); sending it through the "
                "object store instead, and re-forming the sync group on the next sync",
                version,
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
                who or "none",
            )
            self._epoch += 1
            nbytes = self.sync_weights(fallback(), version)
            return {"sync/bytes": float(nbytes), "sync/fallback": 1.0}
        self.version = version
        self._weights_ref = None
        self._weights_source = source
        got = results[: len(receives)]
        sender = {k: v for d in sent for k, v in d.items() if k in ("sync/gather_s", "sync/send_s")}
        loaded = {k: sum(r[k] for r in got) / len(got) for k in got[0]}  # every receiver got the same bytes
        return loaded | sender | {"sync/fallback": 0.0}

    def _failed(self, refs: list) -> list[int]:
        """Indices of the workers whose call in `refs` did not complete without an error."""
        bad = []
        for i, ref in enumerate(refs):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                bad.append(i)
                continue
            try:
                ray.get(ref)
            except Exception:
                bad.append(i)
        return bad

    def weight_digests(self) -> list[str]:
        """Each worker's `weights_digest`: equal to the learner's when it holds the learner's weights bit for bit."""
        return ray.get([w.weights_digest.remote() for w in self.workers])

    def worker_nodes(self) -> list[str]:
        """The Ray node id each worker runs on."""
        where = lambda _self: ray.get_runtime_context().get_node_id()  # noqa: E731 (runs inside the actor)
        return ray.get([w.__ray_call__.remote(where) for w in self.workers])

    def submit_shard(self, worker, shard: Shard):
        return worker.generate.remote(shard)

    def shards(self, n: int, shard_size: int | None) -> list[tuple[int, list[int]]]:
        """(shard id, global sample indices) covering samples 0..n-1, one shard per worker by default."""
        size = shard_size or max(1, -(-n // len(self.workers)))
        return [(i, list(range(s, min(n, s + size)))) for i, s in enumerate(range(0, n, size))]

    def collect(
        self,
        prompt_ids: list[list[int]],
        group_size: int,
        sampling: SamplingParams,
        shard_size: int | None = None,
    ) -> list[Trajectory]:
        """Every prompt repeated `group_size` times (groups contiguous); one Trajectory per sample, in order."""
        samples = [p for p in prompt_ids for _ in range(group_size)]
        shards = [
            Shard(k, [samples[i] for i in idx], idx, self.version, sampling)
            for k, idx in self.shards(len(samples), shard_size)
        ]
        return self.gather(shards, len(samples))

    def collect_episodes(
        self,
        env_id: str,
        env_seeds: list[int],
        group_size: int,
        sampling: SamplingParams,
        shard_size: int | None = None,
    ) -> list[Trajectory]:
        """Multi-turn: one episode of `env_id` per (seed, group member), groups contiguous, in order."""
        seeds = [s for s in env_seeds for _ in range(group_size)]
        shards = [
            Shard(k, [], idx, self.version, sampling, env_id, [seeds[i] for i in idx])
            for k, idx in self.shards(len(seeds), shard_size)
        ]
        return self.gather(shards, len(seeds))

    def gather(self, shards: list[Shard], n: int) -> list[Trajectory]:
        """Run `shards` and return samples 0..n-1 in order; each index exactly once."""
        results: dict[int, Trajectory] = {}
        for res in self.run(shards):
            for i, t in zip(res.indices, res.trajectories, strict=True):
                if i in results:
                    raise RuntimeError(f"sample {i} returned twice")
                results[i] = t
        missing = [i for i in range(n) if i not in results]
        if missing:
            raise RuntimeError(f"samples {missing[:10]} missing after collection")
        return [results[i] for i in range(n)]

    def run(self, shards: Iterable[Shard]) -> Iterator[ShardResult]:
        """Yield each shard's result as it finishes, one shard per worker in flight. A shard whose worker died, lost
        its node, restarted on stale weights or hung past `shard_timeout_s` is resubmitted to the reloaded worker."""
        queue, pending, idle = deque(shards), {}, list(range(len(self.workers)))
        t0 = time.time()

        def retry(w: int, shard: Shard, why: str, kill: bool = False) -> None:
            if not self.owns_workers:  # colocated: the workers are learner ranks, which are not restarted
                raise WorkerLostError(
                    f"rollout on learner rank {w}, shard {shard.shard_id}: {why}; the ranks host the learner's "
                    "state and are not restarted (raise rollout.shard_timeout_s if it was only slow)"
                )
            log.warning(
                "rollout worker %d, shard %d: %s; reloading the worker and resubmitting",
                w,
                shard.shard_id,
                why,
            )
            if kill:
                ray.kill(self.workers[w], no_restart=False)  # Ray restarts it (max_restarts)
            self.reload(w)
            queue.appendleft(shard)
            idle.append(w)

        while queue or pending:
            while queue and idle:
                w, shard = idle.pop(), queue.popleft()
                pending[self.submit_shard(self.workers[w], shard)] = (w, shard, time.time())
            now = time.time()
            # a hung worker is caught even while the others keep finishing shards
            for ref in [r for r, (_, _, t) in pending.items() if now - t > self.shard_timeout_s]:
                w, shard, _ = pending.pop(ref)
                retry(w, shard, f"not back after {self.shard_timeout_s:.0f}s (hung)", kill=True)
            if not pending:
                continue
            first_deadline = min(t for _, _, t in pending.values()) + self.shard_timeout_s
            done, _ = ray.wait(
                list(pending), num_returns=1, timeout=min(60.0, max(0.1, first_deadline - now))
            )
            if not done:
                if time.time() - t0 > 60:
                    log.info("rollout: waiting on %d shards (%.0fs)", len(pending), time.time() - t0)
                continue
            w, shard, _ = pending.pop(done[0])
            try:
                res = ray.get(done[0])
            except (RayActorError, ObjectLostError, StaleWeightsError) as e:
                # died mid-shard, lost its node (and the result with it), or restarted while idle and came back on
                # the checkpoint's weights: give it the current weights and re-run the shard
                retry(w, shard, type(e).__name__)
                continue
            idle.append(w)
            yield res

    def reload(self, w: int, attempts: int = 120) -> None:
        """Wait for a restarted actor and give it the current weights. The sync group is re-formed at the next
        collective sync: the restarted actor is a new member."""
        self._epoch += 1
        if self._weights_ref is None and self._weights_source is not None:
            # the last sync was collective: a restarted worker takes the object-store path
            weights = self._weights_source(self.version)
            self._weights_ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
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
        for w in self.workers if self.owns_workers else ():
            ray.kill(w)
        self._store = None  # the sync group's rendezvous closes with it
        self.workers = []
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
