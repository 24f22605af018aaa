"""Colocated rollouts: a rollout engine beside a learner rank, in the same process and on the same device, as the
peers do on one node (veRL's hybrid engine, TRL's vLLM colocate mode, OpenRLHF `colocate_all`).

The engine keeps its own full copy of the policy in its dtype (the learner's may be sharded by FSDP2, and is fp32);
a sync copies the learner's full weights into it in place (under FSDP all-gathered onto every rank first): no
process boundary, no NCCL (which cannot join two processes on one GPU). On a GPU the phases take turns with memory:

    sync:     rollout copy back to the GPU, weights copied in; AdamW's moments to the host
    rollout:  the engine decodes this rank's share (its KV cache lives only inside the run)
    train:    rollout copy to the host, the cache's blocks returned; AdamW's moments back; the learner step

and each phase's peak is recorded (`common.memory.PhaseMemory`). It is used by the learner group's ranks
(trainers/rl/group.py) and, with no Ray, by the GPU check (scripts/gpu_check.py).
"""

from __future__ import annotations

import time

import torch
from torch._inductor.cudagraph_trees import reset_cudagraph_trees

from common.memory import PhaseMemory
from rollout.cache import kv_pool
from rollout.settings import EngineSettings
from rollout.weight_sync import load_in_place, sync_targets
from rollout.worker import RolloutWorker, Shard, ShardResult
from trainers.rl.learner import Learner, RolloutBatch


class ColocatedRollouts:
    """A `RolloutWorker` beside `learner`, taking turns with it on the device."""

    def __init__(self, learner: Learner, checkpoint: str, engine: EngineSettings, threads: int = 1):
        self.learner = learner
        self.worker = RolloutWorker(checkpoint, engine, threads=threads)
        self.memory = PhaseMemory(learner.device)
        self.on_gpu = self.worker.device.type == "cuda"

    def load(self, version: int) -> dict[str, float]:
        """The sync: the learner's full weights into the rollout copy, in place (a collective of the learner group
        under FSDP: every rank calls it)."""
        t0 = time.perf_counter()
        with self.memory.phase("sync"):
            tensors = self.learner.full_weights(every_rank=True)
            targets = sync_targets(self.worker.policy.to(self.worker.device).model)
            load_in_place(targets, tensors)
            del tensors
            if self.on_gpu:
                self.learner.move_optimizer_state(torch.device("cpu"))
                torch.cuda.empty_cache()
        self.worker.version = version
        nbytes = sum(t.numel() * t.element_size() for t in targets.values())
        return {"sync/bytes": float(nbytes), "sync/load_s": time.perf_counter() - t0}

    def generate(self, shard: Shard) -> ShardResult:
        with self.memory.phase("rollout"):
            return self.worker.generate(shard)

    def step(self, batch: RolloutBatch) -> dict[str, float]:
        """The learner's step after the rollouts gave the device back; its metrics plus this RL step's memory per
        phase (`memory/{sync,rollout,train}_gb`)."""
        if self.on_gpu:
            self.worker.policy.to("cpu")  # the rollout copy lives on the GPU only while rollouts run
            # a compiled engine's KV buffers and captured CUDA graphs hold GPU memory too, and the graphs captured
            # the weights' old addresses: both go, and the next rollout re-captures (policy/compiled.py)
            kv_pool(self.worker.policy).release()
            if self.worker.compiled:
                reset_cudagraph_trees()
            torch.cuda.empty_cache()  # the engine's KV cache went with its run: hand its blocks back
            self.learner.move_optimizer_state(self.learner.device)
        with self.memory.phase("train"):
            metrics = self.learner.step(batch)
        return metrics | self.memory.take()
