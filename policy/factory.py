"""Tiny-model factory: random-init Hugging Face causal LMs sized for CPU training and tests.

`tiny_moe_config` is a Qwen3-MoE-style model (8 experts, top-2), the architecture of the shipped checkpoint.
`tiny_dense_config` is a Llama or Qwen3 model for tests of the "any causal LM" claim.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen3Config, Qwen3MoeConfig

from policy.families import load_causal_lm


class ModelSpec(BaseModel):
    """Shape of a tiny model; `arch` picks the HF family."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)

    arch: Literal["qwen3_moe", "qwen3", "llama"] = "qwen3_moe"
    """HF model family."""
    hidden_size: int = Field(128, ge=8)
    """model width."""
    num_layers: int = Field(4, ge=1)
    """decoder layers."""
    num_heads: int = Field(4, ge=1)
    """attention heads (hidden_size must divide by it)."""
    num_kv_heads: int = Field(2, ge=1)
    """key/value heads (GQA)."""
    intermediate_size: int = Field(384, ge=1)
    """dense MLP width (dense archs)."""
    moe_intermediate_size: int = Field(192, ge=1)
    """per-expert MLP width (MoE archs)."""
    num_experts: int = Field(8, ge=1)
    """experts per MoE layer."""
    experts_per_token: int = Field(2, ge=1)
    """top-k routing."""
    max_positions: int = Field(1024, ge=16)
    """maximum sequence length (RoPE table)."""
    router_aux_loss_coef: float = Field(0.01, ge=0.0)
    """weight of the MoE load-balancing loss."""


def make_config(spec: ModelSpec, vocab_size: int, *, pad_token_id: int, eos_token_id: int, bos_token_id: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
    )
    if spec.arch == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            intermediate_size=spec.intermediate_size,
            moe_intermediate_size=spec.moe_intermediate_size,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            norm_topk_prob=True,
            router_aux_loss_coef=spec.router_aux_loss_coef,
        )
    if spec.arch == "qwen3":
        return Qwen3Config(**common, intermediate_size=spec.intermediate_size)
    if spec.arch == "llama":
        return LlamaConfig(**common, intermediate_size=spec.intermediate_size)
    raise ValueError(f"model.arch: unknown architecture {spec.arch!r}")


def build_model(config: PretrainedConfig, seed: int = 0, attn_implementation: str = "sdpa"):
    """Random-init causal LM from a config, deterministic in `seed`. A family without an sdpa path falls back to
    eager attention."""

    def load(attn: str):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)

    return load_causal_lm(load, attn_implementation)


def tiny_moe_config(vocab_size: int = 37, **overrides) -> PretrainedConfig:
    """Test-sized Qwen3-MoE: 2 layers, width 64, 8 experts top-2."""
    spec = ModelSpec(arch="qwen3_moe", hidden_size=64, num_layers=2, moe_intermediate_size=64, **overrides)
    return make_config(spec, vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def tiny_dense_config(vocab_size: int = 37, arch: Literal["llama", "qwen3"] = "llama", **overrides):
    """Test-sized dense Llama/Qwen3: 2 layers, width 64."""
    spec = ModelSpec(arch=arch, hidden_size=64, num_layers=2, intermediate_size=128, **overrides)
    return make_config(spec, vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
