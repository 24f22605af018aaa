"""The learner group (Ray actor ranks, gloo on the CPU) against the single learner, on the same rollouts:

- 2 ranks under DDP and under FSDP2 give the 1-rank per-step metrics (loss, every term, grad norm, diagnostics)
  over 3 GRPO steps with the diffusion term (stale steps included: the batch is reused) and 2 PPO steps;
- a checkpoint written by 2 FSDP ranks resumes under 1 rank, and one written by 1 rank under 2, and both continue
  the uninterrupted run;
- after a weight sync (collective and object store) every worker holds the learner's gathered weights bit for bit;
- a rank killed mid-step ends the step with an error naming it and the resume command, within the deadline.

Tolerance: dense fp32, so only the order of float reductions differs (gradients summed over ranks, sums in another
order). Measured worst relative drift over 3 steps: 9e-6 (GRPO, DDP and FSDP2), 2e-6 (PPO); 1e-4 is asserted, and a
real error (a term not normalised by the global count, a rank training on the wrong rows) is off by percents.
"""

import threading
import time

import pytest
import ray
import torch

from common.checkpoint import read_trainer_state
from policy import HybridPolicy
from policy.tokenizer import build_char_tokenizer
from rollout.pool import RolloutPool, init_ray
from rollout.settings import EngineSettings
from rollout.types import SamplingParams
from rollout.weight_sync import SyncPlan
from rollout.worker import state_dict_numpy, weights_digest
from trainers.rl.group import LearnerGroup, LearnerGroupError
from trainers.rl.learner import Learner, LearnerConfig
from trainers.rl.run import WeightSyncConfig, _publish

from .conftest import batch_of

RTOL = 1e-4
# metrics that are exactly zero up to float noise (on-policy lossless: no mismatch) compare absolutely
ATOL = 1e-5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    init_ray(tmp_path_factory.mktemp("ray"), num_cpus=6)
    yield
    ray.shutdown()


def config(**kw) -> LearnerConfig:
    base = dict(
        lr=1e-3, minibatches=2, epochs=1, lambda_diff=0.5, diff_blocks=2, timeout_s=60.0, cpus_per_rank=1.0
    )
    return LearnerConfig(**(base | kw))


def one_rank(checkpoint, cfg, batch, steps):
    learner = Learner(HybridPolicy.from_pretrained(checkpoint), cfg)
    return [learner.step(batch) for _ in range(steps)], learner


def assert_same(got: list[dict], want: list[dict]):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        g = {k: v for k, v in g.items() if not k.startswith("memory/")}  # a rank's resources, not training
        assert g.keys() == w.keys(), (step, sorted(set(g) ^ set(w)))
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=RTOL, abs=ATOL), (step, k, g[k], w[k])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_one_rank_grpo_with_the_diffusion_term(cluster, checkpoint, strategy):
    batch = batch_of(checkpoint)
    cfg = config()
    want, _ = one_rank(checkpoint, cfg, batch, 3)
    group = LearnerGroup(checkpoint, config(world_size=2, strategy=strategy))
    try:
        got = [group.step(batch) for _ in range(3)]
    finally:
        group.close()
    assert_same(got, want)
    assert (
        want[0]["train/diff_loss"] > 0 and want[1]["rollout/staleness"] == 1
    )  # the term and a stale step ran
    assert want[2]["train/loss"] != want[0]["train/loss"]  # it trained


@pytest.mark.parametrize(
    ("strategy", "kw"),
    [
        ("ddp", {"grpo": {"aggregation": "seq_mean"}}),
        ("fsdp", {"grpo": {"aggregation": "dr_grpo"}, "diffusion": "full", "diff_target": "ar"}),
    ],
    ids=["seq_mean", "dr_grpo-full-ar"],
)
def test_uneven_shares_and_other_aggregations_follow_one_rank(cluster, checkpoint, strategy, kw):
    """16 rows in 3 minibatches (6, 5, 5 rows: the ranks' shares are 3 and 3, then 3 and 2): per-row aggregations
    and the full TiDAR diffusion layout with distillation targets are normalised by global counts too."""
    batch = batch_of(checkpoint, seed=6)
    want, _ = one_rank(checkpoint, config(minibatches=3, **kw), batch, 2)
    group = LearnerGroup(checkpoint, config(minibatches=3, world_size=2, strategy=strategy, **kw))
    try:
        got = [group.step(batch) for _ in range(2)]
    finally:
        group.close()
    assert_same(got, want)
    assert want[0]["train/optimizer_steps"] == 3 and want[0]["train/diff_loss"] > 0


def test_two_ranks_follow_one_rank_ppo(cluster, checkpoint):
    batch = batch_of(checkpoint, seed=1)
    cfg = config(algo="ppo")
    want, _ = one_rank(checkpoint, cfg, batch, 2)
    group = LearnerGroup(checkpoint, config(algo="ppo", world_size=2, strategy="fsdp"))
    try:
        got = [group.step(batch) for _ in range(2)]
    finally:
        group.close()
    assert_same(got, want)
    assert "train/value_loss" in want[0]


def test_a_checkpoint_resumes_under_another_world_size(cluster, checkpoint, tmp_path):
    """2 FSDP ranks -> 1 rank, and 1 rank -> 2 FSDP ranks (the value head and AdamW state loaded into shards), each
    continuing the uninterrupted 1-rank run."""
    batch = batch_of(checkpoint, seed=2)
    cfg = config(algo="ppo")
    want, _ = one_rank(checkpoint, cfg, batch, 3)

    two = LearnerGroup(checkpoint, config(algo="ppo", world_size=2, strategy="fsdp"))
    try:
        first = two.step(batch)
        two.save(tmp_path / "from2", {"step": 1})
    finally:
        two.close()
    saved = read_trainer_state(tmp_path / "from2")
    assert saved["learner"]["version"] == 1
    assert len(saved["learner_rng"]) == 2 and all("torch" in r and "cuda" in r for r in saved["learner_rng"])
    one = Learner(HybridPolicy.from_pretrained(tmp_path / "from2"), cfg)
    one.load_state_dict(read_trainer_state(tmp_path / "from2")["learner"])
    assert_same([first, one.step(batch), one.step(batch)], want)

    single = Learner(HybridPolicy.from_pretrained(checkpoint), cfg)
    first = single.step(batch)
    single.save(tmp_path / "from1", build_char_tokenizer(), {"step": 1})
    group = LearnerGroup(
        tmp_path / "from1", config(algo="ppo", world_size=2, strategy="fsdp"), resume=tmp_path / "from1"
    )
    try:
        assert group.version == 1
        assert_same([first, group.step(batch), group.step(batch)], want)
    finally:
        group.close()


def test_workers_hold_the_learners_gathered_weights_bit_for_bit(cluster, checkpoint):
    """2 FSDP ranks, 2 workers: after a step and a sync, by collective and then through the object store, every
    worker holds rank 0's gathered weights bit for bit (the same dtype) and decodes as that version."""
    group = LearnerGroup(checkpoint, config(world_size=2, strategy="fsdp"))
    pool = RolloutPool(str(checkpoint), EngineSettings(max_batch=4), num_workers=2, num_cpus_per_worker=0.5)
    try:
        before = state_dict_numpy(HybridPolicy.from_pretrained(checkpoint))
        for version, transport in enumerate(["collective", "object_store"], start=1):
            group.step(batch_of(checkpoint, seed=3))  # the weights move
            sync = WeightSyncConfig(transport=transport, bucket_mb=0.1)
            metrics = _publish(pool, group, sync, torch.float32)
            assert pool.version == version and metrics["sync/fallback"] == 0
            assert metrics["sync/collective"] == (transport == "collective")
            assert metrics["sync/bytes"] > 0 and metrics["time/weight_sync_s"] > 0
            learner = ray.get(group.weights_numpy())
            assert any((learner[k] != before[k]).any() for k in learner)  # the step changed them
            before = learner
            for w in ray.get(
                [w.__ray_call__.remote(lambda s: state_dict_numpy(s.policy)) for w in pool.workers]
            ):
                assert w.keys() == learner.keys()
                assert all((w[k] == learner[k]).all() and w[k].dtype == learner[k].dtype for k in learner)
            trajs = pool.collect([[2, 5, 6]], group_size=2, sampling=SamplingParams(max_new_tokens=4))
            assert trajs[0].policy_version == version
    finally:
        pool.shutdown()
        group.close()


def test_a_failed_collective_falls_back_and_the_group_re_forms(cluster, checkpoint, monkeypatch):
    """A sender that fails before it joins, then one lost after two buckets: each time every worker ends on the
    whole new version, freshly gathered, through the object store; the next sync goes by collective again over a
    re-formed group."""
    learner = Learner(HybridPolicy.from_pretrained(checkpoint), config())
    pool = RolloutPool(str(checkpoint), EngineSettings(max_batch=4), num_workers=2, num_cpus_per_worker=0.5)
    sync = WeightSyncConfig(transport="collective", bucket_mb=0.05, timeout_s=5.0)  # 8 buckets of the ~0.4 MB

    try:
        learner.step(batch_of(checkpoint, seed=7))

        def broken(address):
            raise ConnectionError("sender lost")

        def never(version):
            raise AssertionError("the fallback sends fresh weights, not a kept copy")

        metrics = pool.broadcast_weights(1, broken, learner.weights_numpy, never, timeout_s=5.0)
        assert metrics["sync/fallback"] == 1 and metrics["sync/bytes"] > 0 and pool.version == 1
        assert pool.weight_digests() == [weights_digest(learner.trained.policy)] * 2

        learner.step(batch_of(checkpoint, seed=8))
        plan = SyncPlan.build(learner.full_weights(), 2, int(sync.bucket_mb * 2**20))
        assert len(plan.buckets) > 3  # the break below falls after two buckets went out: mid-stream
        pack = SyncPlan.pack

        def breaks(self, i, *args, **kw):
            if i == 2:
                raise ConnectionError("sender lost mid-stream")
            return pack(self, i, *args, **kw)

        monkeypatch.setattr(SyncPlan, "pack", breaks)
        metrics = _publish(pool, learner, sync, torch.float32)
        assert metrics["sync/fallback"] == 1 and pool.version == 2 and metrics["sync/bytes"] > 0
        assert pool.weight_digests() == [weights_digest(learner.trained.policy)] * 2

        monkeypatch.setattr(SyncPlan, "pack", pack)
        learner.step(batch_of(checkpoint, seed=9))
        metrics = _publish(pool, learner, sync, torch.float32)
        assert metrics["sync/fallback"] == 0 and metrics["sync/collective"] == 1 and pool.version == 3
        assert pool.weight_digests() == [weights_digest(learner.trained.policy)] * 2
    finally:
        pool.shutdown()


def test_a_rank_killed_mid_step_ends_the_step_naming_it(cluster, checkpoint):
    batch = batch_of(checkpoint, seed=4)
    # 400 epochs x 2 minibatches: a step of several seconds even on a quiet machine, so the kill lands inside it
    cfg = config(world_size=2, strategy="ddp", timeout_s=10.0, epochs=400)
    group = LearnerGroup(checkpoint, cfg, resume_hint="blockrl train --resume")
    killer = threading.Timer(1.5, lambda: ray.kill(group.ranks[1]))
    t0 = time.time()
    killer.start()
    try:
        with pytest.raises(
            LearnerGroupError, match=r"learner rank 1 died during step .*resume with: blockrl train"
        ):
            group.step(batch)
    finally:
        killer.join()
        group.close()
    assert time.time() - t0 < 10.0 + 30.0  # the collective deadline, plus the time to notice


def test_colocated_rollouts_equal_separate_worker_rollouts(cluster, checkpoint):
    """Engines inside the 2 FSDP ranks (weights all-gathered and copied in process) against 2 separate workers given
    the same version through the object store: the same weights bit for bit, token-identical rollouts for the same
    seeds; the next step reports each phase's memory."""
    batch = batch_of(checkpoint, seed=5)
    engine = EngineSettings(max_batch=4)
    group = LearnerGroup(checkpoint, config(world_size=2, strategy="fsdp"))
    separate = RolloutPool(str(checkpoint), engine, num_workers=2, num_cpus_per_worker=0.5)
    try:
        group.start_rollouts(checkpoint, engine)
        colocated = RolloutPool.over(group.ranks)
        group.step(batch)
        metrics = _publish(colocated, group, WeightSyncConfig(), torch.float32)
        assert colocated.version == 1 and metrics["sync/bytes"] > 0 and metrics["sync/collective"] == 0
        separate.sync_weights(group.weights_numpy(), version=1)
        assert colocated.weight_digests() == separate.weight_digests()
        sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
        prompts = [[2, 5, 6, 7], [2, 9], [2, 3, 4]]
        a = colocated.collect(prompts, group_size=3, sampling=sampling)
        b = separate.collect(prompts, group_size=3, sampling=sampling)
        assert [t.tokens for t in a] == [t.tokens for t in b]
        assert len({tuple(t.tokens) for t in a}) > 1  # sampled, not one repeated answer
        assert {t.policy_version for t in a} == {1}
        after = group.step(batch)
        assert {"memory/sync_gb", "memory/rollout_gb", "memory/train_gb"} <= set(after)
        assert all(after[k] > 0 for k in ("memory/sync_gb", "memory/rollout_gb", "memory/train_gb"))
        colocated.shutdown()  # leaves the ranks to the group: they still learn
        assert group.step(batch)["train/optimizer_steps"] == 2
    finally:
        separate.shutdown()
        group.close()
