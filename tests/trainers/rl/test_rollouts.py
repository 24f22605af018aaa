"""A step's rollout metrics (trainers/rl/rollouts.py): history drafts' share of the decode steps is reported when
the engine drafted from history, and only then."""

import pytest

from rollout import BlockEngine
from tests.conftest import PROMPTS, lively_policy
from tests.rollout.test_history import plain_policy
from trainers.rl.rollouts import StepBatch, rollout_metrics


def _metrics(engine, group=4):
    prompts = [p for p in PROMPTS for _ in range(group)]  # groups contiguous, as the trainer lays them out
    trajs = engine.generate(prompts, max_new_tokens=24, temperature=0, eos_token_id=None)
    batch = StepBatch(0, trajs, ["t"] * len(PROMPTS), [0.0] * len(trajs), rollout_s=1.0)
    return trajs, rollout_metrics(batch, group, engine.K)


def test_history_share_is_the_fraction_of_decode_steps_that_verified_a_history_draft():
    trajs, m = _metrics(BlockEngine(plain_policy(), "lossless", drafts="history", max_batch=4))
    steps = sum(len(t.accept_counts) for t in trajs)
    assert 0 < m["rollout/history_share"] <= 1  # siblings of a greedy group repeat each other
    assert m["rollout/history_share"] * steps == pytest.approx(sum(t.history_steps for t in trajs))
    assert m["rollout/history_accepted_per_step"] > 0


def test_no_history_metrics_without_history_drafts():
    _, m = _metrics(BlockEngine(lively_policy("moe"), "lossless", levels=[0], max_batch=4))
    assert "rollout/history_share" not in m and m["rollout/tokens_per_forward"] > 1
