"""Pure loss functions of the hybrid policy: TiDAR's AR + diffusion cross-entropy and the MoE load-balancing loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TidarLossOutput:
    loss: torch.Tensor  # (alpha * ar + diff) / (1 + alpha) [+ aux_coef * aux]
    ar_loss: torch.Tensor
    diff_loss: torch.Tensor
    aux_loss: torch.Tensor | None

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss.item(), "ar_loss": self.ar_loss.item(), "diff_loss": self.diff_loss.item()}
        if self.aux_loss is not None:
            out["aux_loss"] = self.aux_loss.item()
        return out


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions with weight > 0. logits [B,T,V], targets [B,T], weight [B,T]."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    w = weight.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1.0)


def masked_soft_ce(logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against a teacher's distribution (softmax of `teacher_logits`, no gradient) over positions
    with weight > 0: distillation. logits and teacher_logits [B,T,V], weight [B,T]."""
    teacher = F.softmax(teacher_logits.detach().float(), dim=-1)
    ce = -(teacher * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    w = weight.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1.0)


def ar_ce(ar_logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits at t predict input_ids[t+1], counted where loss_mask[t+1] is set."""
    return masked_ce(ar_logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def tidar_loss(
    ar_logits: torch.Tensor,  # [B, S, V] from the clean half
    diff_logits: torch.Tensor,  # [B, S, V] from the mask half
    input_ids: torch.Tensor,  # [B, S]
    loss_mask: torch.Tensor,  # [B, S]: 1 where a token is a training target (prompt optionally excluded, no pads)
    alpha: float = 1.0,
    aux_loss: torch.Tensor | None = None,
    aux_coef: float = 0.0,
) -> TidarLossOutput:
    """L = (alpha * CE_AR + CE_diff) / (1 + alpha): clean tokens predict the next token (shifted), mask tokens
    predict the token at their own position (aligned). Plus `aux_coef * aux_loss` for MoE load balancing."""
    ar = ar_ce(ar_logits, input_ids, loss_mask)
    diff = masked_ce(diff_logits, input_ids, loss_mask)
    loss = (alpha * ar + diff) / (1.0 + alpha)
    if aux_loss is not None:
        loss = loss + aux_coef * aux_loss
    return TidarLossOutput(loss, ar.detach(), diff.detach(), None if aux_loss is None else aux_loss.detach())


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],  # per layer [N, E], N = B*T rows in (batch, time) order
    num_experts: int,
    top_k: int,
    token_mask: torch.Tensor | None = None,  # [B, T] 1 = real token
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, E * sum_e f_e * P_e, averaged over real tokens of all layers.

    NOTE: HF computes this inside the CausalLM forward from `attention_mask`, which breaks with 4D masks (a size mismatch in `load_balancing_loss_func`);
    this takes a 2D token mask instead, so it stays correct under the TiDAR and decode layouts.
    """
    logits = torch.cat([r.float().reshape(-1, r.shape[-1]) for r in router_logits], dim=0)  # [L*N, E]
    probs = logits.softmax(-1)
    chosen = (
        F.one_hot(probs.topk(top_k, dim=-1).indices, max(num_experts, probs.shape[-1])).sum(1).float()
    )  # [L*N, E]
    if token_mask is None:
        w = torch.ones(logits.shape[0], device=logits.device)
    else:
        w = token_mask.reshape(-1).float().to(logits.device).repeat(len(router_logits))
    denom = w.sum().clamp(min=1.0)
    chosen = chosen[:, : probs.shape[-1]]  # routers with extra (e.g. zero-compute) experts score them too
    tokens_per_expert = (chosen * w[:, None]).sum(0) / denom
    prob_per_expert = (probs * w[:, None]).sum(0) / denom
    return num_experts * (tokens_per_expert * prob_per_expert).sum()
