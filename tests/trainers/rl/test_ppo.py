"""PPO pieces: GAE skips env tokens exactly as if they were not there; lam = gamma = 1 gives reward-to-go; a PPO
learner step fits the value head and moves the policy towards rewarded samples."""

import torch

from trainers.rl.learner import Learner, LearnerConfig
from trainers.rl.ppo import gae

from .test_learner import first_token_task, tiny_policy


def gae_reference(rewards, values, gamma, lam):
    """Textbook GAE over one list of model tokens, terminal value 0."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        nxt = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * nxt - values[t] + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_over_interleaved_env_tokens_equals_gae_on_model_tokens_alone():
    g = torch.Generator().manual_seed(0)
    B, S = 5, 23
    mask = (torch.rand(B, S, generator=g) > 0.35).float()
    mask[:, :3] = 0  # prompt
    mask[2, 15:] = 0  # right padding
    rewards = torch.randn(B, S, generator=g) * mask
    values = torch.randn(B, S, generator=g)
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    for b in range(B):
        idx = mask[b].nonzero().squeeze(1)
        ref = gae_reference(rewards[b, idx].tolist(), values[b, idx].tolist(), 0.97, 0.9)
        torch.testing.assert_close(adv[b, idx], torch.tensor(ref))
        torch.testing.assert_close(ret[b, idx], adv[b, idx] + values[b, idx])
    assert bool((adv[mask == 0] == 0).all()) and bool((ret[mask == 0] == 0).all())


def test_gae_with_unit_gamma_and_lambda_is_reward_to_go():
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.float)
    rewards = torch.tensor([[0, 0, 0.5, 0, 0, 0, 1.0, 0]])
    values = torch.randn(1, 8)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret[0, [1, 2, 5, 6]], torch.tensor([1.5, 1.5, 1.0, 1.0]))


def test_ppo_learner_fits_values_and_reinforces_rewarded_samples():
    policy = tiny_policy()
    batch, target_logprob = first_token_task(policy)
    learner = Learner(policy, LearnerConfig(lr=3e-3, lambda_diff=0.5, algo="ppo"))
    before = target_logprob()
    losses = [learner.step(batch)["train/value_loss"] for _ in range(6)]
    assert target_logprob() > before
    assert losses[-1] < losses[0]
    state = learner.state_dict()
    fresh = Learner(tiny_policy(), LearnerConfig(algo="ppo"))
    fresh.load_state_dict(state)
    assert fresh.version == 6
    torch.testing.assert_close(fresh.value_head.proj.weight, learner.value_head.proj.weight)
