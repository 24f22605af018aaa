"""Shared by the learner-group and colocated tests: a tiny dense converted checkpoint on disk (ranks and workers load
it by path) and lossless rollouts of it."""

import pytest

from policy import HybridPolicy
from policy.factory import build_model, tiny_dense_config
from policy.tokenizer import build_char_tokenizer
from rollout import BlockEngine
from trainers.rl.learner import RolloutBatch


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    tok = build_char_tokenizer()
    cfg = tiny_dense_config(len(tok))
    cfg.initializer_range = 0.3
    policy = HybridPolicy(build_model(cfg, seed=3))
    policy.convert(tok, block_size=4)
    path = tmp_path_factory.mktemp("ckpt") / "policy"
    policy.save_pretrained(path, tok)
    return path


def batch_of(checkpoint, seed=0) -> RolloutBatch:
    """16 lossless rollouts (4 prompts x 4) of the checkpoint, with rewards that differ within every group."""
    policy = HybridPolicy.from_pretrained(checkpoint).eval()
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=16)
    prompts = [[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8], [2, 11, 12]]
    trajs = eng.generate(
        [p for p in prompts for _ in range(4)], max_new_tokens=12, temperature=1.0, seed=seed
    )
    rewards = [float(len(t.tokens) % 3) + 0.1 * i for i, t in enumerate(trajs)]
    return RolloutBatch.from_trajectories(trajs, rewards, group_size=4, pad_id=0)
