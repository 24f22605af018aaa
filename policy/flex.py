"""FlexAttention for the hybrid policy's training forward: the TiDAR mask as a `BlockMask` built from its index rule
(`policy.masks.tidar_mask_mod`), so no dense `[2S, 2S]` mask is ever made.

`FLEX` is an attention implementation registered with transformers (`AttentionInterface`). It runs FlexAttention
when the 4D mask it is handed is a `BlockMask`, and transformers' own sdpa otherwise, so the engine's cached
decode steps and the plain causal forwards of a policy in flex mode are the sdpa paths they always were. It is
offered only to models loaded with sdpa (`HybridPolicy.set_attention`). On CUDA the FlexAttention kernel is
compiled; on CPU the uncompiled FlexAttention runs, forward only (torch has no CPU backward for it). That is what
the equality tests use: the CPU inductor kernel is itself wrong at some short lengths in torch 2.13 (measured: an
error of 2.0 at length 24 with 4 heads and no GQA), while uncompiled FlexAttention matches sdpa to 1e-6.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from policy.masks import MaskMod

FLEX = "blockrl_flex"


class FlexUnsupportedError(RuntimeError):
    """This attention layer needs something FlexAttention is not given here (the message says what)."""


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, Q, D]
    key: torch.Tensor,  # [B, H_kv, KV, D]
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: FlexAttention under a `BlockMask`, sdpa under anything else."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    unsupported = [k for k in ("s_aux", "position_bias", "softcap") if kwargs.get(k) is not None]
    if dropout:
        unsupported.append("attention dropout")
    if unsupported:
        raise FlexUnsupportedError(f"this family's attention passes {', '.join(unsupported)}")
    run = _compiled_flex() if query.is_cuda else flex_attention
    with warnings.catch_warnings():  # uncompiled on CPU on purpose (module docstring)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = run(
            query,
            key,
            value,
            block_mask=attention_mask,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


def register_flex() -> None:
    """Make `FLEX` a valid `attn_implementation` (idempotent). Its 2D-mask path builds sdpa's masks."""
    AttentionInterface.register(FLEX, attention)
    AttentionMaskInterface.register(FLEX, sdpa_mask)


def block_mask(mod: MaskMod, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    """The `BlockMask` of a batch- and head-independent mask rule. On CUDA it is built by a compiled kernel that never
    materialises the dense mask; on CPU (tests) torch evaluates the rule densely, which is cheap at test sizes."""
    device = torch.device(device)
    return create_block_mask(mod, None, None, q_len, kv_len, device=device, _compile=device.type == "cuda")
