"""Logit processors shared by targets and drafts: banned/allowed sets, top-k and top-p (on logits / T).

They return logits with excluded tokens at -inf, never temperature-scaled, so the verify step can apply T itself.
"""

from __future__ import annotations

import torch

from rollout.types import SamplingParams


def constraint_mask(params: SamplingParams, vocab_size: int, device) -> torch.Tensor | None:
    """Bool [V] of forbidden tokens, or None when nothing is forbidden."""
    if not params.banned_token_ids and params.allowed_token_ids is None:
        return None
    banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if params.allowed_token_ids is not None:
        banned[:] = True
        banned[list(params.allowed_token_ids)] = False
    if params.banned_token_ids:
        banned[list(params.banned_token_ids)] = True
    return banned


def process_logits(logits: torch.Tensor, params: SamplingParams, banned: torch.Tensor | None) -> torch.Tensor:
    """logits [..., V] -> logits with forbidden, non-top-k and non-top-p tokens at -inf."""
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if params.temperature == 0:
        return logits
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # HF semantics: drop the tail whose cumulative (ascending) probability is <= 1 - top_p; keep at least one
        sorted_logits, idx = torch.sort(logits, dim=-1)
        cum = torch.softmax(sorted_logits / params.temperature, dim=-1).cumsum(-1)
        drop = cum <= 1 - params.top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits
