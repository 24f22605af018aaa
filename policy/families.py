"""Which Hugging Face causal-LM families the hybrid policy serves exactly, and the family-specific paths it needs.

- `refusal_reason(config)`: why a family cannot be served (None if it can). Recurrent, state-space and
  linear-attention layers keep a state that the ragged KV cache cannot roll back per row; a few other families are
  refused by name, each with its reason.
- `load_causal_lm`: load with the requested attention implementation, falling back to eager (which the additive 4D
  masks of `HybridPolicy.attention_mask_4d` drive correctly) for families without an sdpa path.
- `own_logits`: final hidden states -> logits through the CausalLM's own forward, so whatever the family does after
  its LM head (soft-capping, scaling, ...) is applied exactly as in `model(ids).logits`.
- `window_masks` / `window_mask_mods`: the per-layer-type masks (full / sliding window) of a family with
  sliding-window layers, as dense masks or as FlexAttention mask rules.

The table of families and their status is docs/families.md (produced by tests/policy/test_families.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from policy.masks import MaskMod


class UnsupportedModelError(ValueError):
    """The model's family cannot be served exactly by the hybrid policy (the message names the family and why)."""


_STATEFUL = (
    "recurrent / state-space / linear-attention layers keep a running state that the ragged KV cache cannot "
    "hold per row nor roll back to the accepted prefix"
)

# model_type -> reason, for families the generic checks below would not catch.
REFUSED: dict[str, str] = {
    "mamba": _STATEFUL,
    "mamba2": _STATEFUL,
    "falcon_mamba": _STATEFUL,
    "rwkv": _STATEFUL,
    "xlstm": _STATEFUL,
    "recurrent_gemma": _STATEFUL,
    "bamba": _STATEFUL,
    "jamba": _STATEFUL,
    "zamba": _STATEFUL,
    "zamba2": _STATEFUL,
    "falcon_h1": _STATEFUL,
    "granitemoehybrid": _STATEFUL,
    "nemotron_h": _STATEFUL,
    "lfm2": "short-convolution layers keep a running state that the ragged KV cache cannot roll back per row",
    "lfm2_moe": "short-convolution layers keep a running state that the ragged KV cache cannot roll back per row",
    "gpt_neo": "attention adds its own built-in causal / local-window bias aligned to the end of the key range, "
    "which contradicts the ragged cache's layout (queries sit at each row's own length, not at the end)",
    "cpmant": "CPM-Ant offsets input ids by its own prompt/segment layout and computes its own relative-position "
    "buckets; it takes no position_ids, so packed draft blocks cannot be placed",
    "bloom": "ALiBi biases are built from the 2D padding mask inside the model; a custom 4D mask is not honoured",
}

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
_LAYER_TYPE_REASONS = {
    "indexed_attention": "indexed sparse attention (DSA): a lightning indexer picks the keys per query from its own "
    "key cache, which the ragged KV cache does not hold",
    "chunked_attention": "chunked local attention: its chunk masks are not encoded in the policy's 4D masks yet",
    "heavily_compressed_attention": "compressed attention layers keep a compressed KV state the ragged cache does "
    "not hold",
    "linear_attention": _STATEFUL,
    "conv": _STATEFUL,
    "mamba": _STATEFUL,
    "hybrid": _STATEFUL,
}
_UNKNOWN_LAYER = (
    "not plain full or sliding-window attention; the ragged KV cache and the 4D masks serve only those"
)


def refusal_reason(config) -> str | None:
    """Why this config's family cannot be served exactly, or None."""
    mt = getattr(config, "model_type", "?")
    if mt in REFUSED:
        return REFUSED[mt]
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model: the hybrid policy needs a decoder-only causal LM"
    types = set(getattr(config, "layer_types", None) or [])
    other = sorted(t for t in types - _ATTENTION_LAYER_TYPES if isinstance(t, str))
    if other:
        return "; ".join(f"layer type {t!r}: {_LAYER_TYPE_REASONS.get(t, _UNKNOWN_LAYER)}" for t in other)
    return None


def family_name(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return f"{getattr(config, 'model_type', '?')} ({type(model_or_config).__name__})"


def load_causal_lm(load: Callable[[str], PreTrainedModel], attn_implementation: str) -> PreTrainedModel:
    """`load(attn)` with the requested attention implementation; a family without sdpa falls back to eager."""
    try:
        return load(attn_implementation)
    except ValueError as e:
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
    return load("eager")


class _Hidden:
    """What the stubbed base model returns: the given final hidden states; every other field is None."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, i):
        return (self.last_hidden_state,)[i]


def _stub_targets(model: PreTrainedModel) -> list[nn.Module]:
    """Modules the CausalLM's forward may call for its final hidden states: the base model, or its decoder
    (OPT-style `self.model.decoder(...)`)."""
    base = model.base_model
    return [base, base.decoder] if isinstance(getattr(base, "decoder", None), nn.Module) else [base]


def _with_stub(model: PreTrainedModel, target: nn.Module, h: torch.Tensor) -> torch.Tensor:
    saved = target.__dict__.get("forward")
    target.forward = lambda *args, **kwargs: _Hidden(h)
    try:
        ids = torch.zeros(h.shape[:2], dtype=torch.long, device=h.device)
        return model(input_ids=ids, use_cache=False).logits
    finally:
        if saved is None:
            del target.forward
        else:
            target.forward = saved


def _head_is_plain(model: PreTrainedModel, h: torch.Tensor) -> bool:
    """Whether the CausalLM's forward turns final hidden states into logits with its output embedding alone (no
    soft-capping, scaling, ...): probed once per model on large random states, bit for bit against the stubbed
    forward, and remembered. A plain head skips the stubbed forward's per-call overhead."""
    plain = model.__dict__.get("_blockrl_plain_head")
    if plain is None:
        head = model.get_output_embeddings()
        model.__dict__["_blockrl_plain_head"] = False  # the probe's own call below takes the stubbed forward
        plain = False
        if head is not None:
            gen = torch.Generator(device=h.device).manual_seed(0)
            probe = 8 * torch.randn(1, 3, h.shape[-1], generator=gen, device=h.device, dtype=h.dtype)
            # (a first call under autocast may see a mismatch: then the stub stays, only slower)
            with torch.no_grad():
                direct, own = head(probe), own_logits(model, probe)
            plain = direct.dtype == own.dtype and torch.equal(direct, own)  # an upcast to fp32 is not plain
        model.__dict__["_blockrl_plain_head"] = plain
    return plain


def own_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final hidden states [..., H] -> logits [..., V] through the CausalLM's own forward code.

    The base model's forward is swapped (on this instance, for this call) for a stub that returns `hidden`, so the
    CausalLM's forward runs its LM head and every transform after it (soft-capping, logit scaling, ...) exactly as
    in `model(ids).logits`. The stub point that works is found once and remembered on the model."""
    lead = hidden.shape[:-1]
    h = hidden.reshape(1, -1, hidden.shape[-1])
    if _head_is_plain(model, h):
        return model.get_output_embeddings()(hidden)
    targets = _stub_targets(model)
    known = model.__dict__.get("_blockrl_stub")
    if known is not None:
        logits = _with_stub(model, targets[known], h)
    else:
        for i, target in enumerate(targets):
            try:
                logits = _with_stub(model, target, h)
            except (AttributeError, TypeError):
                if i == len(targets) - 1:
                    raise
                continue
            model.__dict__["_blockrl_stub"] = i
            break
    return logits.reshape(*lead, logits.shape[-1])


def sliding_layer_window(config) -> int | None:
    """The window of the family's sliding-window layers, or None when every layer attends fully."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return None
    if types is not None:
        return int(window) if "sliding_attention" in types else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def window_masks(
    config, mask: torch.Tensor, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None
) -> dict[str, torch.Tensor] | torch.Tensor:
    """Bool 4D mask [B,1,Q,KV] -> what the family's attention layers read.

    A family with sliding-window layers gets `{"full_attention": mask, "sliding_attention": windowed}` (with
    `layer_types`) or the windowed mask itself (a window on every layer). The window is transformers' own:
    key position > query position - window. q_pos [B,Q] and k_pos [B,KV] are token positions."""
    window = sliding_layer_window(config)
    if window is None:
        return mask
    if q_pos is None or k_pos is None:
        raise ValueError(f"{family_name(config)}: sliding-window masks need query and key positions")
    windowed = mask & in_window(q_pos[:, None, :, None], k_pos[:, None, None, :], window)  # [B,1,Q,KV]
    return _per_layer_type(config, mask, windowed)


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """transformers' sliding window: a key is visible when its position > query position - window."""
    return k_pos > q_pos - window


def window_mask_mods(config, mod: MaskMod, pos_of: Callable[[torch.Tensor], torch.Tensor]):
    """`window_masks` for a mask rule (FlexAttention): the rule, or a dict of rules per layer type. `pos_of` maps a
    query / key index to its token position."""
    window = sliding_layer_window(config)
    if window is None:
        return mod

    def windowed(b, h, q, kv):
        return mod(b, h, q, kv) & in_window(pos_of(q), pos_of(kv), window)

    return _per_layer_type(config, mod, windowed)


def _per_layer_type(config, full, windowed):
    if getattr(config, "layer_types", None) is None:
        return windowed  # a window on every layer
    return {"full_attention": full, "sliding_attention": windowed}
