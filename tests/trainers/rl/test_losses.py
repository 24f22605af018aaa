"""RL losses: advantage normalisation, clipping, aggregation, k3 KL and truncated IS, as properties."""

import pytest
import torch

from trainers.rl.losses import (
    GRPOConfig,
    ImportanceConfig,
    LossInputs,
    aggregate,
    group_advantages,
    grpo_loss,
    importance_weights,
)


def test_group_advantages_are_centered_and_scaled_per_group():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, group_size=4)
    assert torch.allclose(a.view(2, 4).mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(a[:4].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert torch.equal(a[4:], torch.zeros(4))  # a constant group carries no signal
    assert torch.allclose(group_advantages(r, 4, "none")[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 4, "nope")


def make_inputs(B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g)
    learner = (old + 0.3 * torch.randn(B, T, generator=g)).requires_grad_()
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    return LossInputs(learner, old, old.clone(), torch.tensor([1.0, -1.0, 0.5, -0.5]), mask)


def test_on_policy_gradient_is_the_policy_gradient():
    """At ratio 1 the clipped loss's gradient is -A * grad(logp) / n_tokens (token-mean)."""
    x = make_inputs()
    x = LossInputs(
        x.old_logprobs.clone().requires_grad_(), x.old_logprobs, x.old_logprobs, x.advantages, x.mask
    )
    loss, _ = grpo_loss(x, GRPOConfig())
    loss.backward()
    expected = -x.advantages[:, None] * x.mask / x.mask.sum()
    assert torch.allclose(x.learner_logprobs.grad, expected, atol=1e-6)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    x = make_inputs()
    big = LossInputs(
        (x.old_logprobs + 1.0).requires_grad_(), x.old_logprobs, x.old_logprobs, torch.ones(4), x.mask
    )
    loss, m = grpo_loss(big, GRPOConfig(eps_low=0.2, eps_high=0.2))
    loss.backward()
    assert torch.all(big.learner_logprobs.grad == 0)  # ratio e > 1.2 with A > 0: clipped
    assert m["train/clipfrac"] == 1.0


def test_aggregations_differ_as_defined():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean") == pytest.approx(6 / 5)
    assert aggregate(per_token, mask, "seq_mean") == pytest.approx((1 + 2) / 2)
    assert aggregate(per_token, mask, "dr_grpo") == pytest.approx(6 / 8)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    x = make_inputs()
    cfg = GRPOConfig(kl_coef=0.1)
    same = LossInputs(
        x.learner_logprobs, x.old_logprobs, x.old_logprobs, x.advantages, x.mask, x.learner_logprobs
    )
    assert grpo_loss(same, cfg)[1]["train/kl"] == pytest.approx(0.0, abs=1e-7)
    other = LossInputs(
        x.learner_logprobs, x.old_logprobs, x.old_logprobs, x.advantages, x.mask, x.old_logprobs - 1
    )
    assert grpo_loss(other, cfg)[1]["train/kl"] > 0


def test_truncated_is_weights_token_and_sequence():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    beh = torch.log(torch.tensor([[0.25, 0.5]]))
    mask = torch.ones(1, 2)
    assert torch.allclose(
        importance_weights(old, beh, mask, ImportanceConfig(cap=10.0, level="token")),
        torch.tensor([[2.0, 1.0]]),
    )
    assert torch.allclose(
        importance_weights(old, beh, mask, ImportanceConfig(cap=1.5, level="token")),
        torch.tensor([[1.5, 1.0]]),
    )
    assert torch.allclose(
        importance_weights(old, beh, mask, ImportanceConfig(cap=10.0, level="sequence")),
        torch.tensor([[2.0, 2.0]]),
    )
    assert torch.equal(
        importance_weights(old, beh, mask, ImportanceConfig(cap=10.0, level="off")), torch.ones(1, 2)
    )
