"""The learner group: `learner.world_size` ranks of `Learner` as Ray actors, one torch.distributed group (gloo on
CPU, nccl on CUDA), presenting the Learner's interface to the driver. `learner.step(batch)` is the same call whether
the learner is local or a group; the group is not a second learner, only its ranks.

- The ranks sit in the job's placement group, one bundle each (bundles 0..N-1; a GPU each on CUDA), ahead of the
  rollout workers' bundles, so Ray never lands a worker on a learner's share.
- Rank 0 listens for the group's rendezvous on its node (a free port it picks); every rank then joins with
  `DistContext.join`, loads the checkpoint, and shards it (FSDP2) or replicates it (DDP).
- A step sends the batch once (`ray.put`); every rank takes its share of each minibatch (trainers/rl/learner.py).
- Colocated mode (`colocate: true`, one node): each rank also hosts a rollout engine on its own device; the pool
  shards prompts over the ranks (`RolloutPool.over`), weights move in process, and the phases take turns with the
  device (trainers/rl/colocate.py). Each step reports the peak memory of its sync, rollout and train phases.
- Faults: every collective has `learner.timeout_s`, so a rank that dies ends the step: the others' collectives fail
  within that deadline, and the step raises `LearnerGroupError` naming the rank and the resume command. The job
  stops; nothing hangs, and no step is half-logged (the driver logs and checkpoints after a step returns).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.checkpoint import read_trainer_state, rng_state, set_rng_state
from common.distributed import DistContext
from common.memory import PhaseMemory
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from rollout.settings import EngineSettings
from rollout.weight_sync import SyncAddress
from rollout.worker import Shard, ShardResult
from trainers.rl.colocate import ColocatedRollouts
from trainers.rl.learner import Learner, LearnerConfig, RolloutBatch

log = logging.getLogger(__name__)


class LearnerGroupError(RuntimeError):
    pass


def ranks_use_gpu(cfg: LearnerConfig) -> bool:
    """Whether each rank takes a GPU: `cuda`, or `auto` on a cluster that has GPUs (the driver itself may have
    none: a CPU head node)."""
    if cfg.device.startswith("cuda"):
        return True
    return cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


class LearnerRank:
    """One rank: a plain class holding a `Learner` (`ray.remote` is applied when the group creates the actors)."""

    def __init__(self, cfg: LearnerConfig, rank: int, world: int):
        torch.set_num_threads(cfg.threads)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.learner: Learner | None = None
        self.tokenizer = None
        self.colocated: ColocatedRollouts | None = None  # colocated mode: this rank's rollout engine
        self.memory: PhaseMemory | None = None

    def address(self) -> str:
        """host:port on this node for the group's rendezvous (rank 0)."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return f"{host}:{s.getsockname()[1]}"

    def start(self, address: str, checkpoint: str, resume: str | None) -> tuple[int, float]:
        """Join the group, load the policy (and, resuming, the learner state): (policy version, lambda_diff)."""
        ctx = DistContext.join(self.rank, self.world, address, self.cfg.device, self.cfg.timeout_s)
        self.learner = Learner(HybridPolicy.from_pretrained(checkpoint), self.cfg, ctx=ctx)
        self.tokenizer = load_tokenizer(checkpoint)
        self.memory = PhaseMemory(ctx.device)
        if resume is not None:
            state = read_trainer_state(resume)
            self.learner.load_state_dict(state["learner"])
            ranks_rng = state.get("learner_rng") or []
            # this rank's own streams (resumed under more ranks, the new ones start fresh)
            if self.rank < len(ranks_rng):
                set_rng_state(ranks_rng[self.rank])
        return self.learner.version, self.learner.lambda_diff

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        """The step's metrics and this rank's peak memory per phase (train; colocated also sync and rollout)."""
        if self.colocated is not None:  # the rollouts give the device back first
            return self.colocated.step(batch)
        with self.memory.phase("train"):
            metrics = self.learner.step(batch)
        return metrics | self.memory.take()

    # colocated mode: a rollout engine in this actor (trainers/rl/colocate.py) ----------------------------------
    def start_rollouts(self, checkpoint: str, engine: EngineSettings) -> None:
        self.colocated = ColocatedRollouts(self.learner, checkpoint, engine, threads=self.cfg.threads)

    def load_rollout_weights(self, version: int) -> dict[str, float]:
        return self.colocated.load(version)

    def generate(self, shard: Shard) -> ShardResult:
        return self.colocated.generate(shard)

    def ping(self) -> int:
        return self.colocated.worker.version if self.colocated is not None else -1

    def set_weights(self, version: int, weights) -> int:
        return self.colocated.worker.set_weights(version, weights)

    def weights_digest(self) -> str:
        return self.colocated.worker.weights_digest()

    def set_lambda_diff(self, value: float) -> None:
        self.learner.lambda_diff = value

    def rng(self) -> dict:
        """This rank's RNG states (CPU and every GPU it sees: the learner draws its diffusion block starts there)."""
        return rng_state()

    def save(self, dest: str, extra: dict) -> None:
        self.learner.save(Path(dest), self.tokenizer, extra)

    def weights_numpy(self):
        return self.learner.weights_numpy()

    def send_weights(self, address: SyncAddress, version: int, dtype: torch.dtype, bucket_mb: float) -> dict:
        return self.learner.send_weights(address, version, dtype, bucket_mb)

    def published(self, version: int):
        return self.learner.published(version)


class LearnerGroup:
    """N learner ranks behind the Learner's interface: `step`, `version`, `lambda_diff`, `save`, and the weights'
    two ways to the workers (`weights_numpy` for the object store, `send_weights` for the sync group)."""

    def __init__(
        self,
        checkpoint: str | Path,
        cfg: LearnerConfig,
        resume: Path | None = None,
        placement: PlacementGroup | None = None,
        resume_hint: str = "",
    ):
        self.cfg, self.resume_hint = cfg, resume_hint
        self.cuda = ranks_use_gpu(cfg)
        actor = ray.remote(num_cpus=cfg.cpus_per_rank, num_gpus=float(self.cuda), max_restarts=0)(LearnerRank)
        self.ranks = []
        for r in range(cfg.world_size):
            opts = {}
            if placement is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement, placement_group_bundle_index=r
                )
            self.ranks.append(actor.options(**opts).remote(cfg, r, cfg.world_size))
        try:
            self._start(checkpoint, resume)
        except BaseException:
            self.close()  # no rank outlives a group that could not start
            raise
        log.info(
            "learner group: %d ranks (%s, %s)", cfg.world_size, cfg.strategy, "cuda" if self.cuda else "cpu"
        )

    def _start(self, checkpoint: str | Path, resume: Path | None) -> None:
        address = ray.get(self.ranks[0].address.remote())
        resume_path = str(resume) if resume is not None else None
        self.colocated = False
        started = self._all(
            [a.start.remote(address, str(checkpoint), resume_path) for a in self.ranks], "start"
        )
        self.version, self._lambda_diff = started[0]

    def _all(self, refs: list, what: str) -> list:
        """Every rank's result of one call. A rank that died, or a call that failed (a collective that timed out
        because a peer was lost), raises LearnerGroupError naming the ranks that died (else those that failed) and
        how to resume; the other ranks' calls are given the collective deadline to fail too, never more."""
        pending, t0 = dict(zip(refs, range(len(refs)), strict=True)), time.time()
        results: dict[int, object] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=60.0)
            if not done:
                log.info(
                    "learner %s: waiting on ranks %s (%.0fs)",
                    what,
                    sorted(pending.values()),
                    time.time() - t0,
                )
                continue
            rank = pending.pop(done[0])
            try:
                results[rank] = ray.get(done[0])
            except (RayActorError, RayTaskError) as e:
                raise self._failure(what, {rank: e}, pending) from e
        return [results[r] for r in range(len(refs))]

    def _failure(self, what: str, errors: dict, pending: dict) -> LearnerGroupError:
        # the survivors' collectives fail within timeout_s once a peer is gone: wait that long for them, no longer
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.cfg.timeout_s + 5.0)
        for ref in done:
            try:
                ray.get(ref)
            except (RayActorError, RayTaskError) as e:
                errors[pending[ref]] = e
        died = sorted(r for r, e in errors.items() if isinstance(e, RayActorError))
        first = errors[died[0]] if died else next(iter(errors.values()))
        detail = str(first).strip().splitlines()[-1][:300] if str(first).strip() else type(first).__name__
        who = (
            f"learner rank {', '.join(map(str, died))} died"
            if died
            else (f"learner rank {', '.join(map(str, sorted(errors)))} failed")
        )
        hint = f"; resume with: {self.resume_hint}" if self.resume_hint else ""
        return LearnerGroupError(f"{who} during {what} ({detail}); the group stops{hint}")

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        """One learner step on every rank: rank 0's metrics (every rank computes the same global ones), with each
        phase's memory the largest over the ranks."""
        ref = ray.put(batch)
        out = self._all([a.step.remote(ref) for a in self.ranks], f"step (policy v{self.version})")
        self.version += 1
        memory = {k: max(o[k] for o in out) for k in out[0] if k.startswith("memory/")}
        return out[0] | memory

    @property
    def lambda_diff(self) -> float:
        return self._lambda_diff

    @lambda_diff.setter
    def lambda_diff(self, value: float) -> None:
        self._all([a.set_lambda_diff.remote(value) for a in self.ranks], "set lambda_diff")
        self._lambda_diff = value

    def save(self, dest: Path, extra: dict) -> None:
        """The resumable checkpoint: full HF policy + name-keyed learner state, written by rank 0, with every rank's
        RNG states (`learner_rng`, restored rank by rank on resume: exact resume on a GPU too)."""
        ranks_rng = self._all([a.rng.remote() for a in self.ranks], "RNG states")
        self._all(
            [a.save.remote(str(dest), extra | {"learner_rng": ranks_rng}) for a in self.ranks], "checkpoint"
        )

    def weights_numpy(self):
        """The object-store path: a ref to rank 0's numpy state dict (all ranks join the gather; a failure names
        the rank)."""
        refs = [a.weights_numpy.remote() for a in self.ranks]
        self._all(refs, "weight gather")  # numpy out of the object store: zero-copy reads
        return refs[0]

    def send_weights(self, address: SyncAddress, version: int, dtype: torch.dtype, bucket_mb: float) -> list:
        """The collective path: refs to every rank's part (all gather, rank 0 sends); the pool waits on them."""
        return [a.send_weights.remote(address, version, dtype, bucket_mb) for a in self.ranks]

    def published(self, version: int):
        return self.ranks[0].published.remote(version)

    def start_rollouts(self, checkpoint: str | Path, engine: EngineSettings) -> None:
        """Colocated mode: a rollout engine in every rank (`RolloutPool.over(group.ranks)` then shards over them)."""
        self._all([a.start_rollouts.remote(str(checkpoint), engine) for a in self.ranks], "rollout start")
        self.colocated = True

    def load_rollout_weights(self, version: int) -> dict[str, float]:
        """The colocated sync: every rank copies the full weights into its rollout copy, in process."""
        out = self._all([a.load_rollout_weights.remote(version) for a in self.ranks], "colocated sync")
        return {k: max(o[k] for o in out) for k in out[0]}

    def close(self) -> None:
        for a in self.ranks:
            ray.kill(a)
        self.ranks = []
