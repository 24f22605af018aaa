"""Fused speculative verify: ratio test, first rejection, residual/bonus draw, behaviour log-probs.

Math (speculative sampling; docs/architecture.md, "The engine"), per row, with p_i = softmax(target_logits[i] / T) the target for position b+i+1 and
q_i the draft distribution of d_{i+1} (a point mass when `draft_probs` is None):

    for i in 0..n-1 (n = num_drafts <= K):       # p: target prob, q: draft prob
        accept d_{i+1} iff u_i * q_i(d_{i+1}) < p_i(d_{i+1})      (Dirac q: u_i < p_i(d_{i+1}))
    na = number of leading accepts
    if na < n: r = max(0, p_na - q_na)   (Dirac: p_na with d_{na+1} zeroed)    # residual at the first rejection
    else:      r = p_na                                                         # bonus (or after a short draft)
    token = inverse-CDF draw from r / sum(r) with u_K

Emits na + 1 tokens: d_1..d_na, then `token`. Per position, P(emit v) = min(p, q)(v) + max(0, p - q)(v) = p(v).
T = 0 is greedy: accept while d_{i+1} == argmax p_i, then emit argmax p_na; token-identical to AR greedy.

The randomness is supplied (`uniforms [R, K+1]`), so the torch reference and the Triton kernel give identical tokens
from identical uniforms. Layout: target_logits [R, K+1, V] (already processed: banned tokens, top-k/top-p as -inf),
draft_tokens [R, K], draft_probs [R, K, V] or None, num_drafts [R]. Outputs: accept_len [R], tokens [R, K+1] (slot
j < na is d_{j+1}, slot na is the drawn token, the rest -1), logprobs [R, K+1] = log p_j(token_j) (0 past na).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VerifyOutput:
    accept_len: torch.Tensor  # [R] na
    tokens: torch.Tensor  # [R, K+1] emitted tokens, -1 past slot na
    logprobs: torch.Tensor  # [R, K+1] log target prob of each emitted token, 0 past slot na


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative weight exceeds u * total. weights [R, V] >= 0, u [R] in [0, 1)."""
    cdf = weights.cumsum(-1)
    thresh = (u * cdf[:, -1]).unsqueeze(-1)
    idx = (cdf <= thresh).sum(-1)
    return idx.clamp(max=weights.shape[-1] - 1)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / T, without a full-vocabulary copy at T = 1 (the RL default)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def _sample_reference(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> VerifyOutput:
    """K = 0 case of `verify_reference`: one inverse-CDF (or greedy) draw per row. logits [R, V], u [R]."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return VerifyOutput(
            torch.zeros_like(tok), tok[:, None], torch.zeros(len(tok), 1, device=logits.device)
        )
    logp = torch.log_softmax(_scaled(logits, temperature), dim=-1)
    tok = inverse_cdf(logp.exp(), u)
    return VerifyOutput(torch.zeros_like(tok), tok[:, None], logp.gather(-1, tok[:, None]))


def verify_reference(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_drafts: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
) -> VerifyOutput:
    """Torch reference of the fused verify (the executable spec; runs on any device)."""
    R, K1, _ = target_logits.shape
    K = K1 - 1
    if K == 0:  # no drafts (the `ar` sampler): plain sampling, the hot path of our AR baseline
        return _sample_reference(target_logits[:, 0], uniforms[:, 0], temperature)
    rows = torch.arange(R, device=target_logits.device)
    slot = torch.arange(K, device=target_logits.device)
    valid = slot[None, :] < num_drafts[:, None]  # [R, K]
    if temperature == 0:
        greedy = target_logits.argmax(-1)  # [R, K+1]
        ok = (draft_tokens == greedy[:, :K]) & valid
    else:
        # the one full-vocabulary tensor of the verify: probabilities are read from it where needed (the draft
        # tokens, the row at the first rejection), never materialised for every slot
        logp = torch.log_softmax(_scaled(target_logits, temperature), dim=-1)  # [R, K+1, V]
        p_d = logp[:, :K].gather(-1, draft_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()  # [R, K]
        if draft_probs is None:
            q_d = torch.ones_like(p_d)
        else:
            q_d = draft_probs.float().gather(-1, draft_tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ok = (uniforms[:, :K] * q_d < p_d) & valid
    accept_len = torch.cumprod(ok.int(), dim=1).sum(1)  # [R]
    if temperature == 0:
        final = greedy[rows, accept_len]
    else:
        p_na = logp[rows, accept_len].exp()  # [R, V]
        weights = p_na
        if K > 0:
            rejected = accept_len < num_drafts
            d_na = draft_tokens[rows, accept_len.clamp(max=K - 1)]
            if draft_probs is None:
                resid = p_na.scatter(-1, d_na.unsqueeze(-1), 0.0)
            else:
                resid = (p_na - draft_probs[rows, accept_len.clamp(max=K - 1)].float()).clamp(min=0.0)
            resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_na)  # guard p == q numerically
            weights = torch.where(rejected[:, None], resid, p_na)
        final = inverse_cdf(weights, uniforms[:, K])
    tokens = torch.full((R, K1), -1, dtype=torch.long, device=target_logits.device)
    kslot = torch.arange(K1, device=target_logits.device)[None]
    padded_drafts = torch.cat([draft_tokens, draft_tokens.new_full((R, 1), -1)], 1)
    tokens = torch.where(kslot < accept_len[:, None], padded_drafts, tokens)
    tokens[rows, accept_len] = final
    emitted = kslot <= accept_len[:, None]
    if temperature == 0:
        logprobs = torch.zeros(R, K1, device=target_logits.device)
    else:
        gathered = logp.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logprobs = torch.where(emitted, gathered, 0.0)  # 0 past na (a -inf * 0 would be NaN)
    return VerifyOutput(accept_len, tokens, logprobs)


def verify_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_drafts: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
) -> VerifyOutput:
    """Fused Triton verify; same contract and same tokens as `verify_reference` for the same uniforms."""
    import triton

    R, K1, V = target_logits.shape
    K = K1 - 1
    if draft_tokens.shape != (R, K) or num_drafts.shape != (R,) or uniforms.shape != (R, K1):
        raise ValueError(
            f"shape mismatch: logits {tuple(target_logits.shape)}, drafts {tuple(draft_tokens.shape)}, "
            f"num_drafts {tuple(num_drafts.shape)}, uniforms {tuple(uniforms.shape)}"
        )
    if draft_probs is not None and draft_probs.shape != (R, K, V):
        raise ValueError(f"draft_probs must be {(R, K, V)}, got {tuple(draft_probs.shape)}")
    interpret = bool(triton.knobs.runtime.interpret)
    from kernels.verify_triton import verify_kernel

    if target_logits.device.type != "cuda" and not interpret:
        raise RuntimeError("verify_triton needs CUDA tensors (or TRITON_INTERPRET=1 for testing on CPU)")
    dev = target_logits.device
    logits = target_logits.float().contiguous()
    drafts = draft_tokens.to(torch.int64).contiguous()
    # dummy pointer when HAS_Q=False
    q = draft_probs.float().contiguous() if draft_probs is not None else logits
    accept = torch.zeros(R, dtype=torch.int64, device=dev)
    tokens = torch.full((R, K1), -1, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(R, K1, dtype=torch.float32, device=dev)
    greedy = temperature == 0
    # Triton launches on the current CUDA device: make it the tensors' (an engine on cuda:1 while cuda:0 is current)
    on_dev = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with on_dev:
        verify_kernel[(R,)](
            logits,
            drafts,
            q,
            num_drafts.to(torch.int64).contiguous(),
            uniforms.float().contiguous(),
            accept,
            tokens,
            logprobs,
            K,
            V,
            1.0 if greedy else 1.0 / temperature,
            HAS_Q=draft_probs is not None and not greedy,
            GREEDY=greedy,
            BLOCK_V=min(1024, triton.next_power_of_2(V)),
        )
    return VerifyOutput(accept, tokens, logprobs)


def default_verify(device: torch.device):
    """Triton on CUDA, the torch reference elsewhere."""
    return verify_triton if torch.device(device).type == "cuda" else verify_reference
