"""Ray rollout pool: versioned weight sync, and a worker killed mid-collection loses and duplicates nothing."""

import pytest
import ray

from policy import HybridPolicy
from policy.factory import build_model, tiny_moe_config
from rollout.pool import RolloutPool, init_ray, ray_temp_dir
from rollout.settings import EngineSettings
from rollout.types import SamplingParams
from rollout.worker import RolloutWorker, Shard, StaleWeightsError, state_dict_numpy

PROMPTS = [[2, 5, 6], [2, 9], [2, 7, 7, 8], [2, 11]]
SAMPLING = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
ENGINE = EngineSettings(sampler="lossless", levels=[0, 2], max_batch=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    policy = HybridPolicy(build_model(tiny_moe_config(37)))
    policy.convert(block_size=4)
    policy.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    init_ray(tmp_path_factory.mktemp("run"), num_cpus=2)
    yield
    ray.shutdown()


def test_worker_in_process_refuses_stale_versions(ckpt):
    w = RolloutWorker(ckpt, ENGINE)
    shard = Shard(0, [[2, 5]], [0], policy_version=1, sampling=SAMPLING)
    with pytest.raises(StaleWeightsError, match="v1"):
        w.generate(shard)
    w.set_weights(1, state_dict_numpy(w.policy))
    res = w.generate(shard)
    assert res.indices == [0] and res.trajectories[0].policy_version == 1


def fault_on_submit(pool: RolloutPool, at: int, fault) -> list[int]:
    """Fault injection: right after `pool` submits its `at`-th shard, run `fault(worker)`. Returns the live count of
    submitted shards (a resubmission makes it exceed the number of shards)."""
    count, submit = [0], pool.submit_shard

    def submit_with_fault(worker, shard):
        ref = submit(worker, shard)
        count[0] += 1
        if count[0] == at:
            fault(worker)
        return ref

    pool.submit_shard = submit_with_fault
    return count


def test_pool_survives_a_killed_worker_without_loss_or_duplication(ckpt, local_ray):
    pool = RolloutPool(ckpt, num_workers=2, engine=ENGINE, num_cpus_per_worker=0.5)
    weights = state_dict_numpy(HybridPolicy.from_pretrained(ckpt))
    pool.sync_weights(weights, version=1)
    clean = pool.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
    pool.shutdown()

    killing = RolloutPool(ckpt, num_workers=2, engine=ENGINE, num_cpus_per_worker=0.5)
    # Ray restarts it
    submitted = fault_on_submit(killing, 3, lambda worker: ray.kill(worker, no_restart=False))
    killing.sync_weights(weights, version=1)
    got = killing.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
    killing.shutdown()
    assert submitted[0] > 4  # the killed shard was resubmitted
    assert len(got) == len(clean) == 8
    assert [t.tokens for t in got] == [t.tokens for t in clean]  # same samples, each exactly once
    assert all(t.policy_version == 1 for t in got)
    assert [t.prompt_ids for t in got] == [p for p in PROMPTS for _ in range(2)]


def test_a_hung_worker_is_restarted_after_the_shard_deadline(ckpt, local_ray):
    """A worker that stops answering (a call that sleeps holds the actor, so the shard queued behind it never runs) is
    killed after `shard_timeout_s`, restarted with the current weights, and its shard resubmitted: the batch
    completes with every sample exactly once, identical to a clean collection."""
    import time

    weights = state_dict_numpy(HybridPolicy.from_pretrained(ckpt))
    pool = RolloutPool(ckpt, ENGINE, num_workers=2, num_cpus_per_worker=0.5)
    pool.sync_weights(weights, version=1)
    clean = pool.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
    pool.shutdown()

    hanging = RolloutPool(ckpt, ENGINE, num_workers=2, num_cpus_per_worker=0.5, shard_timeout_s=4.0)
    hang = lambda _self: time.sleep(3600)  # noqa: E731 (runs inside the actor)
    held = []  # keep the ref: the hanging call must not be dropped
    submitted = fault_on_submit(hanging, 1, lambda worker: held.append(worker.__ray_call__.remote(hang)))
    hanging.sync_weights(weights, version=1)
    t0 = time.time()
    got = hanging.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
    hanging.shutdown()
    assert submitted[0] > 4  # the shard behind the hang was resubmitted
    assert time.time() - t0 < 120
    assert [t.tokens for t in got] == [t.tokens for t in clean]
    assert all(t.policy_version == 1 for t in got)


def test_pool_recovers_a_worker_that_restarted_while_idle(ckpt, local_ray):
    """A worker that dies between collections comes back on the checkpoint's weights (version 0): its next shard is
    refused as stale, and the pool reloads it with the current version and re-runs the shard."""
    import time

    from ray.exceptions import RayActorError

    pool = RolloutPool(ckpt, num_workers=2, engine=ENGINE, num_cpus_per_worker=0.5)
    pool.sync_weights(state_dict_numpy(HybridPolicy.from_pretrained(ckpt)), version=1)
    clean = pool.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
    ray.kill(pool.workers[0], no_restart=False)
    for _ in range(200):  # until the restarted actor answers (on version 0)
        try:
            if ray.get(pool.workers[0].ping.remote()) == 0:
                break
        except RayActorError:
            time.sleep(0.1)
    assert ray.get(pool.workers[0].ping.remote()) == 0
    again = pool.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
    assert [t.tokens for t in again] == [t.tokens for t in clean]
    assert all(t.policy_version == 1 for t in again)
    pool.shutdown()


def test_two_node_cluster_spreads_workers_and_survives_losing_a_node(ckpt, tmp_path_factory, monkeypatch):
    """Two Ray nodes on this machine: the workers land on both; removing one node mid-collection still completes the
    batch on the other, with every sample exactly once and identical to a clean collection."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    tmp = tmp_path_factory.mktemp("c")
    ray_tmp = ray_temp_dir(tmp)
    (ray_tmp / "ray").mkdir(exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # Cluster writes its address file under $RAY_TMPDIR/ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "temp_dir": str(ray_tmp)})
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        init_ray(tmp, address=cluster.address)
        weights = state_dict_numpy(HybridPolicy.from_pretrained(ckpt))
        pool = RolloutPool(ckpt, num_workers=2, engine=ENGINE, num_cpus_per_worker=1)
        assert len(set(pool.worker_nodes())) == 2
        pool.sync_weights(weights, version=1)
        clean = pool.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)

        submitted = fault_on_submit(pool, 1, lambda worker: cluster.remove_node(node))
        lossy = pool.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
        assert submitted[0] > len(PROMPTS)  # at least one shard was re-sent
        assert len(set(pool.worker_nodes())) == 1  # the lost node's worker restarted on the surviving node
        assert [t.tokens for t in lossy] == [t.tokens for t in clean]
        pool.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_placement_group_reserves_learner_and_workers_up_front(ckpt, local_ray):
    """placement: the learner's bundle (0) and one bundle per worker are reserved at once; each worker runs in its
    own bundle, the learner's bundle is on this node, collection works; a request the cluster cannot hold fails
    fast naming what was asked for, and leaves nothing reserved; shutdown releases the group."""
    from ray.util import placement_group_table

    from common.config import ConfigError

    pool = RolloutPool(
        ckpt,
        ENGINE,
        num_workers=2,
        num_cpus_per_worker=0.5,
        placement="strict_pack",
        placement_timeout_s=30,
        learner=[{"CPU": 1.0}],
    )
    pg = pool.placement_group
    assert pg.bundle_specs == [{"CPU": 1.0}, {"CPU": 0.5}, {"CPU": 0.5}]
    pool.wait_ready()
    group_of = lambda _self: ray.get_runtime_context().get_placement_group_id()  # noqa: E731 (runs in the actor)
    assert ray.get([w.__ray_call__.remote(group_of) for w in pool.workers]) == [pg.id.hex()] * 2
    free = (
        ray.available_resources()
    )  # bundles 1 and 2 are taken by the workers, the learner's bundle 0 is not
    assert free.get(f"CPU_group_0_{pg.id.hex()}") == 1.0
    assert not free.get(f"CPU_group_1_{pg.id.hex()}") and not free.get(f"CPU_group_2_{pg.id.hex()}")
    assert pool.learner_placement() == (True, [])  # on this node, no GPU asked for (ids would be strings)
    trajs = pool.collect(PROMPTS, group_size=2, sampling=SAMPLING, shard_size=2)
    assert len(trajs) == 2 * len(PROMPTS)
    pool.shutdown()
    assert placement_group_table(pg)["state"] == "REMOVED"

    with pytest.raises(ConfigError, match=r"placement: could not reserve 3 bundles .*'CPU': 8.*within 2 s"):
        RolloutPool(
            ckpt, ENGINE, num_workers=3, num_cpus_per_worker=8, placement="spread", placement_timeout_s=2
        )
    assert all(t["state"] == "REMOVED" for t in placement_group_table().values())
