"""RL losses as pure functions: group advantages, clipped policy-gradient loss with three aggregations,
k3 KL to a reference, truncated importance weights for off-policy (logit_mix or stale) rollouts.

Shapes: B sequences (= prompts x group), G group size, T completion tokens; `mask` [B, T] marks model tokens (env
tokens of multi-turn episodes and padding are 0). Log-probs are named by their distribution: `learner_logprobs`
(current policy, with grad), `behavior_logprobs` (what sampled the rollout), `ref_logprobs` (KL reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from common.config import Section


class ImportanceConfig(Section):
    """Truncated importance correction of off-policy rollouts (logit_mix, async): w = min(pi_target / pi_behavior, C).
    One config for blockrl's learner and for `BlockGRPOTrainer` (TRL)."""

    level: Literal["token", "sequence", "off"] = "token"
    """per token, per sequence (product over its tokens, broadcast), or no correction."""
    cap: float = Field(2.0, gt=0.0)
    """C, the truncation of the weight."""
    mode: Literal["truncate", "mask"] = "truncate"
    """truncate: min(ratio, C); mask: the ratio where it is <= C, else 0 (the token or sequence is dropped)."""


class GRPOConfig(Section):
    """GRPO / PPO-clip objective settings."""

    scale: Literal["group", "batch", "none"] = "group"
    """divide advantages by the reward std of the group, of the batch, or not at all."""
    eps_low: float = Field(0.2, ge=0.0)
    """lower clip: ratio >= 1 - eps_low."""
    eps_high: float = Field(0.28, ge=0.0)
    """upper clip: ratio <= 1 + eps_high (clip-higher)."""
    aggregation: Literal["token_mean", "seq_mean", "dr_grpo"] = "token_mean"
    """token-mean over the batch, mean of per-sequence means, or Dr.GRPO (sum / (B * max_len))."""
    kl_coef: float = Field(0.0, ge=0.0)
    """weight of the k3 KL to the reference policy (0 = off)."""
    importance: ImportanceConfig = ImportanceConfig()
    """truncated importance weights min(pi_learner_old / pi_behavior, C) for off-policy rollouts."""


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """rewards [B] (B = P * G, groups contiguous) -> advantages [B]: reward minus its group mean, scaled."""
    r = rewards.view(-1, group_size).float()  # [P, G]
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    elif scale == "batch":
        centered = centered / (r.std(unbiased=False) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return centered.reshape(-1)


def importance_weights(
    target_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor, cfg: ImportanceConfig
) -> torch.Tensor:
    """[B, T] weights correcting behaviour -> target (no grad): min(pi_target / pi_behavior, C) per token, or per
    sequence (one value per row, broadcast); mode "mask" zeroes ratios above C instead. Masked positions get 1; NaN
    log-probs count as no correction (like TRL's vLLM path)."""
    with torch.no_grad():
        if cfg.level == "off":
            return torch.ones_like(target_logprobs)
        diff = torch.nan_to_num((target_logprobs - behavior_logprobs) * mask, nan=0.0)
        if cfg.level == "sequence":
            diff = diff.sum(dim=-1, keepdim=True).expand_as(diff)
        # NOTE: clamp before exp keeps fp32 finite; C is far below e^80
        ratio = torch.exp(diff.clamp(max=80.0))
        if cfg.mode == "truncate":
            w = ratio.clamp(max=cfg.cap)
        else:
            w = torch.where(ratio <= cfg.cap, ratio, torch.zeros_like(ratio))
        return torch.where(mask.bool(), w, torch.ones_like(w))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    if how == "token_mean":
        return (per_token * m).sum() / m.sum().clamp(min=1.0)
    if how == "seq_mean":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1.0)).mean()
    if how == "dr_grpo":
        return (per_token * m).sum() / (m.shape[0] * m.shape[1])
    raise ValueError(f"aggregation must be token_mean, seq_mean or dr_grpo, got {how!r}")


@dataclass(frozen=True)
class LossInputs:
    learner_logprobs: torch.Tensor  # [B, T] current policy, requires grad
    old_logprobs: torch.Tensor  # [B, T] policy that the ratio is taken against (learner at rollout time)
    behavior_logprobs: torch.Tensor  # [B, T] sampler's distribution (= old for exact lossless rollouts)
    advantages: torch.Tensor  # [B] or [B, T]
    mask: torch.Tensor  # [B, T]
    ref_logprobs: torch.Tensor | None = None  # [B, T]


def grpo_loss(x: LossInputs, cfg: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss (+ k3 KL) with truncated IS; returns (loss, metrics)."""
    adv = x.advantages if x.advantages.dim() == 2 else x.advantages[:, None].expand_as(x.learner_logprobs)
    ratio = torch.exp(x.learner_logprobs - x.old_logprobs)
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    w = importance_weights(x.old_logprobs, x.behavior_logprobs, x.mask, cfg.importance)
    per_token = -w * torch.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if cfg.kl_coef > 0 and x.ref_logprobs is not None:
        d = x.ref_logprobs - x.learner_logprobs
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(learner || ref), >= 0
        per_token = per_token + cfg.kl_coef * kl
        metrics["train/kl"] = float(aggregate(kl.detach(), x.mask, "token_mean"))
    loss = aggregate(per_token, x.mask, cfg.aggregation)
    with torch.no_grad():
        m = x.mask.bool()
        metrics["train/clipfrac"] = (
            float(((ratio - clipped).abs() > 1e-8)[m].float().mean()) if m.any() else 0.0
        )
        metrics["train/is_weight_mean"] = float(w[m].mean()) if m.any() else 1.0
    return loss, metrics
