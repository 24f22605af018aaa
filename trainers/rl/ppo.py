"""PPO pieces: a value head on the policy's last hidden state, and GAE over the model's tokens.

Multi-turn episodes interleave env tokens with model tokens. GAE runs over the model tokens only: an env turn is part
of the environment's transition, so the value after a model turn's last token is the value at the next model turn's
first token (env tokens are skipped, never scored, never trained on). Rewards sit on the last model token of the turn
that earned them (per-turn rewards); the terminal value is 0.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from common.config import Section


class PPOConfig(Section):
    """Value head and GAE settings (used when learner.algo = ppo)."""

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """discount per model token."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE lambda."""
    vf_coef: float = Field(0.5, ge=0.0)
    """weight of the value loss."""
    value_clip: float = Field(0.2, ge=0.0)
    """clip of the value update around the rollout-time value (0 = unclipped)."""
    whiten: bool = True
    """normalise advantages over the batch's model tokens."""
    value_lr: float = Field(1e-3, gt=0.0)
    """learning rate of the value head."""


class ValueHead(nn.Module):
    """V(s_t) from the last hidden state at token t: [B, S, H] -> [B, S]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns [B, S] over the positions where `mask` is 1 (0 elsewhere).

    rewards, values, mask: [B, S]. Masked-out positions (prompt, env tokens, padding) are skipped: the model tokens of
    each row are compacted in order, GAE runs on them with V = 0 after the last one, and results are scattered back.
    """
    B, S = mask.shape
    m = mask.bool()
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)  # model-token positions first, in order
    n = m.sum(1)  # [B]
    r = rewards.gather(1, order)
    v = values.gather(1, order)
    live = torch.arange(S, device=mask.device)[None] < n[:, None]  # [B, S] compacted validity
    adv = torch.zeros(B, S, device=values.device)
    last = torch.zeros(B, device=values.device)
    for t in range(int(n.max()) - 1, -1, -1):
        nxt = torch.where(live[:, t + 1], v[:, t + 1], 0.0) if t + 1 < S else torch.zeros_like(last)
        delta = r[:, t] + gamma * nxt - v[:, t]
        last = torch.where(live[:, t], delta + gamma * lam * last, 0.0)
        adv[:, t] = last
    out_adv = torch.zeros_like(adv).scatter(1, order, adv) * m
    return out_adv, (out_adv + values * m) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    sel = x[mask.bool()]
    if sel.numel() < 2:
        return x * mask
    return (x - sel.mean()) / (sel.std(unbiased=False) + eps) * mask


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """0.5 * max((V - R)^2, (clip(V) - R)^2), token-mean over `mask`."""
    err = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (clipped - returns) ** 2)
    m = mask.float()
    return 0.5 * (err * m).sum() / m.sum().clamp(min=1.0)
