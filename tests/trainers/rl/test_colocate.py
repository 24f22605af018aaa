"""A rollout engine beside the learner in one process (trainers/rl/colocate.py): after a learner step and the
in-process sync its copy holds the learner's weights bit for bit, it decodes token-identically to a separate worker
given the same weights, and the next step reports each phase's memory."""

import torch

from policy import HybridPolicy
from rollout.settings import EngineSettings
from rollout.types import SamplingParams
from rollout.worker import RolloutWorker, Shard, weights_digest
from trainers.rl.colocate import ColocatedRollouts
from trainers.rl.learner import Learner, LearnerConfig, RolloutBatch

from .conftest import batch_of


def test_colocated_engine_follows_the_learner_in_process(checkpoint):
    learner = Learner(HybridPolicy.from_pretrained(checkpoint), LearnerConfig(lr=1e-3, diff_blocks=2))
    engine = EngineSettings(max_batch=8)
    col = ColocatedRollouts(learner, str(checkpoint), engine)
    learner.step(batch_of(checkpoint))
    assert weights_digest(col.worker.policy) != weights_digest(learner.trained.policy)  # the step moved them
    metrics = col.load(1)
    assert col.worker.version == 1 and metrics["sync/bytes"] > 0
    assert weights_digest(col.worker.policy) == weights_digest(learner.trained.policy)

    separate = RolloutWorker(str(checkpoint), engine)
    separate.set_weights(1, learner.weights_numpy())
    shard = Shard(0, [[2, 5, 6], [2, 9]] * 2, [0, 1, 2, 3], 1, SamplingParams(max_new_tokens=10, seed=3))
    a, b = col.generate(shard).trajectories, separate.generate(shard).trajectories
    assert [t.tokens for t in a] == [t.tokens for t in b]

    batch = RolloutBatch.from_trajectories(a, [0.0, 1.0, 1.0, 0.0], group_size=2, pad_id=0)
    out = col.step(batch)
    assert {"memory/sync_gb", "memory/rollout_gb", "memory/train_gb"} <= set(out)
    assert out["rollout/logprob_mismatch"] < 1e-3  # fp32 copy: exact samples of the policy it trains
    assert torch.isfinite(torch.tensor(out["train/loss"]))
