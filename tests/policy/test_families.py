"""Every decoder-only causal-LM family of the installed transformers, from a tiny random config: works exactly or is
refused at load (docs/families.md is this module's table).

The families come from transformers' own auto mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), not a hand-picked list.
`EXCLUDED` names the entries that are not decoder-only text causal LMs or cannot be built offline from a config,
each with its reason; everything else is built tiny (2 layers, width 64, vocab 61, sliding windows shrunk to 4 so
they matter at these lengths), wrapped in `HybridPolicy`, and either

- refused at construction with `UnsupportedModelError` naming the family (the families of `REFUSED`), or
- exact, fp32: (a) engine greedy == HF greedy `generate` on a ragged batch with slot refills; (b) the engine's AR
  log-probs at T=1 == log_softmax of `model(ids).logits`; (c) the clean half of `tidar_forward` == the plain causal
  forward; (d) the learner's log-probs (`token_logprobs` over `ar_forward`, right-padded) == the model's own;
  (e) the TiDAR forward under the FlexAttention BlockMask == under the dense mask, in float64 (uncompiled
  FlexAttention, the CPU's forward), or flex is refused for the family (`FLEX_REFUSED`) and its training stays on the dense mask.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from policy.factory import build_model
from policy.families import UnsupportedModelError
from policy.hybrid import HybridPolicy
from rollout import BlockEngine
from trainers.rl.learner import token_logprobs

VOCAB = 61
WINDOW = 4
PROMPTS = [[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8], [2, 11, 12]]
NEW_TOKENS = 8

_MM = "multimodal / composite model (vision, audio or speech inputs); its text decoder is swept on its own"
_ENC = "bidirectional encoder (BERT-style) with an optional causal-LM head, not a decoder-only LM"
_ED = "decoder half of an encoder-decoder model (cross-attention to an encoder), not a decoder-only LM"

# family -> why it is not swept (not a decoder-only text causal LM, or not buildable offline from a config).
EXCLUDED: dict[str, str] = {
    # multimodal or composite
    "blt": "byte latent transformer: patcher + local/global models, not a plain decoder (its tiny build hangs)",
    "dots3_note": _MM,
    "emu3": _MM,
    "fuyu": _MM,
    "gemma3": _MM,
    "gemma3n": _MM + " (needs timm)",
    "gemma4": _MM,
    "gemma4_unified": _MM,
    "git": _MM,
    "got_ocr2": _MM,
    "llama4": _MM,
    "mllama": _MM,
    "moss_transcribe_diarize": _MM,
    "musicgen": "text-to-audio decoder over codebooks (multi-stream inputs), not a text causal LM",
    "musicgen_melody": "text-to-audio decoder over codebooks (multi-stream inputs), not a text causal LM",
    "moshi": "speech-text model: its causal LM is tied to audio codebook streams",
    "phi4_multimodal": _MM,
    "qwen3_5": _MM,
    "qwen3_5_moe": _MM,
    "qwen4_exp": _MM,
    # encoders with a causal-LM head
    "bert": _ENC,
    "bert-generation": _ENC,
    "big_bird": _ENC,
    "camembert": _ENC,
    "data2vec-text": _ENC,
    "electra": _ENC,
    "ernie": _ENC,
    "megatron-bert": _ENC,
    "rembert": _ENC,
    "roberta": _ENC,
    "roberta-prelayernorm": _ENC,
    "roc_bert": _ENC,
    "roformer": _ENC,
    "xlm-roberta": _ENC,
    "xlm-roberta-xl": _ENC,
    "xmod": _ENC + " (needs a language adapter)",
    "xlm": "cross-lingual masked/causal LM with language embeddings, not a plain decoder-only LM",
    "xlnet": "permutation LM with two-stream attention, not a causal decoder",
    "reformer": "LSH / chunked attention with its own cache layout, not a standard decoder",
    # decoder halves of encoder-decoder models
    "bart": _ED,
    "bigbird_pegasus": _ED,
    "blenderbot": _ED,
    "blenderbot-small": _ED,
    "marian": _ED,
    "mbart": _ED,
    "mvp": _ED,
    "pegasus": _ED,
    "plbart": _ED,
    "prophetnet": _ED,
    "trocr": _ED,
    "whisper": _ED,
}

# family -> substring of the refusal reason (HybridPolicy raises UnsupportedModelError naming the family).
REFUSED: dict[str, str] = {
    "axk1": "the policy's forward path fails",
    "axk2": "layer type 'indexed_attention'",
    "bailing_hybrid": "layer type 'linear_attention'",
    "bamba": "recurrent / state-space / linear-attention",
    "bloom": "ALiBi biases are built from the 2D paddi",
    "cpmant": "CPM-Ant offsets input ids by its own pro",
    "deepseek_v32": "layer type 'indexed_attention'",
    "deepseek_v4": "layer type 'heavily_compressed_attention'",
    "falcon_h1": "recurrent / state-space / linear-attention",
    "falcon_mamba": "recurrent / state-space / linear-attention",
    "glm_moe_dsa": "layer type 'indexed_attention'",
    "gpt_neo": "attention adds its own built-in causal /",
    "granitemoehybrid": "recurrent / state-space / linear-attention",
    "hy_v4": "layer type 'indexed_attention'",
    "inkling2_text": "layer type 'hybrid_sliding'",
    "inkling_text": "layer type 'hybrid_sliding'",
    "jamba": "recurrent / state-space / linear-attention",
    "kimi_linear": "layer type 'linear_attention'",
    "lfm2": "short-convolution layers keep a running ",
    "lfm2_moe": "short-convolution layers keep a running ",
    "lfm3": "layer type 'conv'",
    "llama4_text": "layer type 'chunked_attention'",
    "mamba": "recurrent / state-space / linear-attention",
    "mamba2": "recurrent / state-space / linear-attention",
    "minimax": "layer type 'linear_attention'",
    "nemotron_h": "recurrent / state-space / linear-attention",
    "olmo_hybrid": "layer type 'linear_attention'",
    "openai-gpt": "the policy's forward path fails",
    "opt": "differ from model(ids).logits",
    "qwen3_5_moe_text": "layer type 'linear_attention'",
    "qwen3_5_text": "layer type 'linear_attention'",
    "qwen3_next": "layer type 'linear_attention'",
    "qwen4_exp_text": "layer type 'linear_attention'",
    "recurrent_gemma": "recurrent / state-space / linear-attention",
    "rwkv": "recurrent / state-space / linear-attention",
    "xlstm": "recurrent / state-space / linear-attention",
    "zamba": "recurrent / state-space / linear-attention",
    "zamba2": "recurrent / state-space / linear-attention",
    "zaya": "layer type 'hybrid'",
}

_EAGER = "FlexAttention training masks need a model that runs sdpa"
# family -> substring of the reason `set_training_attention("flex")` refuses it (training then uses the dense mask)
FLEX_REFUSED: dict[str, str] = {
    **{
        f: _EAGER
        for f in (
            "codegen",
            "flint",
            "gemma2",
            "gpt_neox_japanese",
            "gpt_oss",
            "gptj",
            "granite_swa",
            "granitemoe_swa",
            "mimo_v2_flash",
            "mpt",
            "vaultgemma",
            "xglm",
        )
    },
    "doge": "differs from the dense mask",  # its dynamic mask is added to the 4D tensor mask only
    "falcon": "argument 'attn_mask' must be Tensor, not BlockMask",  # own attention code, no AttentionInterface
    "gpt-sw3": "'BlockMask' object has no attribute 'ndim'",
    "gpt2": "'BlockMask' object has no attribute 'ndim'",
}

# family -> why the sweep has no tiny config for it yet (skipped, listed in docs/families.md as not yet swept)
NO_TINY_CONFIG: dict[str, str] = {
    "dots3_note_text": "per-layer attention configs (per_layer_config); the generic tiny overrides do not apply",
    "gemma3n_text": "KV-sharing layers: a 2-layer config breaks its cache-producing / cache-using layer split",
    "gemma4_text": "per-layer attention configs (per_layer_config); the generic tiny overrides do not apply",
    "gemma4_unified_text": "per-layer attention configs (per_layer_config); the generic tiny overrides do not apply",
    "gemma4_assistant": "draft-assistant head tied to a gemma4 target's per-layer inputs; no standalone tiny config",
    "gemma4_unified_assistant": "draft-assistant head tied to a gemma4 target; no standalone tiny config",
}

# family-specific config fields on top of the common tiny overrides
_MLA = dict(
    num_key_value_heads=4,
    head_dim=8,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=8,
)
FIELDS: dict[str, dict] = {
    "codegen": dict(rotary_dim=8),
    "dbrx": dict(
        d_model=64,
        n_heads=4,
        n_layers=2,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2),
    ),
    "cohere_compass_text": dict(
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    ),
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW, num_layers=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=4, head_dim=32, n_groups=1),
    "zamba": dict(num_hidden_layers=3, layer_types=["hybrid", "mamba", "hybrid"]),
    "zamba2": dict(layer_types=["mamba", "hybrid"]),
    "zaya": dict(num_experts_per_tok=1),
    "gptj": dict(rotary_dim=8),
    **{
        f: _MLA
        for f in ("axk1", "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "longcat_flash", "minicpm3", "youtu")
    },
}

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    moe_intermediate_size=64,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    sliding_window=WINDOW,
    initializer_range=0.2,
)

FAMILIES = [f for f in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if f not in EXCLUDED]


def tiny_config(family: str):
    """The family's config class with the common tiny overrides (those it has) and its own FIELDS."""
    cls = CONFIG_MAPPING[family]
    default = cls()
    kw = {
        k: v
        for k, v in COMMON.items()
        if hasattr(default, k) and not isinstance(getattr(cls, k, None), property)
    }
    if getattr(default, "sliding_window", None) is None:
        kw.pop("sliding_window", None)  # keep families without a window as they are
    kw.update(FIELDS.get(family, {}))
    return cls(**kw)


def build_policy(family: str) -> HybridPolicy:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(tiny_config(family), seed=1, attn_implementation="sdpa")
    policy = HybridPolicy(model)
    policy.convert(block_size=4)
    return policy.eval()


def own_logprobs(policy: HybridPolicy, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 under `model(ids).logits`."""
    logits = policy.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def hf_greedy(policy: HybridPolicy, prompt: list[int], n: int) -> list[int]:
    out = policy.model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


def test_sweep_covers_the_auto_mapping():
    assert set(EXCLUDED) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert set(REFUSED) <= set(FAMILIES) and set(NO_TINY_CONFIG) <= set(FAMILIES)
    assert not set(REFUSED) & set(NO_TINY_CONFIG)
    assert set(FLEX_REFUSED) <= set(FAMILIES) - set(REFUSED) - set(NO_TINY_CONFIG)
    assert len(FAMILIES) > 80
    assert all(EXCLUDED.values())


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_family_is_exact_or_refused(family):
    if family in NO_TINY_CONFIG:
        pytest.skip(f"{family}: no tiny config yet ({NO_TINY_CONFIG[family]})")
    if family in REFUSED:
        with pytest.raises(UnsupportedModelError, match=family) as err:
            build_policy(family)
        assert REFUSED[family] in str(err.value)
        return
    policy = build_policy(family)

    # (a) engine greedy == HF greedy generate, ragged batch with a slot refill: diffusion and history drafts side by
    # side, and history drafts alone (the path of a plain, unconverted model: no proposal blocks)
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=3, drafts="both")
    greedy = eng.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=None)
    refs = [hf_greedy(policy, p, NEW_TOKENS) for p in PROMPTS]
    for t, ref in zip(greedy, refs, strict=True):
        assert t.tokens == ref, f"{family}: greedy differs from HF generate"
    history = BlockEngine(policy, sampler="lossless", max_batch=3, drafts="history")
    greedy = history.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=None)
    assert [t.tokens for t in greedy] == refs, (
        f"{family}: greedy with history drafts differs from HF generate"
    )

    # (b) the engine's AR log-probs at T=1 == log_softmax of the model's own logits
    sampled = eng.generate(PROMPTS[:3], max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0, eos_token_id=None)
    for p, t in zip(PROMPTS, sampled, strict=False):
        ref = own_logprobs(policy, p + t.tokens)[len(p) - 1 :]
        torch.testing.assert_close(torch.tensor(t.ar_logprobs), ref, atol=1e-4, rtol=1e-4)

    # (c) clean half of the TiDAR forward == plain causal forward
    seqs = [p + t.tokens for p, t in zip(PROMPTS[:3], sampled, strict=True)]
    ids = torch.tensor([s[: min(map(len, seqs))] for s in seqs])
    ref = policy.model(input_ids=ids).logits.float()
    torch.testing.assert_close(policy.tidar_forward(ids).ar_logits.float(), ref, atol=1e-4, rtol=1e-4)

    # (d) the learner's log-probs (ar_forward, right-padded batch) == the model's own
    S = max(map(len, seqs))
    batch = torch.tensor([s + [0] * (S - len(s)) for s in seqs])
    valid = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in seqs]).bool()
    lp = token_logprobs(policy.ar_forward(batch, valid).logits, batch, 1.0)
    for r, s in enumerate(seqs):
        torch.testing.assert_close(lp[r, 1 : len(s)], own_logprobs(policy, s), atol=1e-4, rtol=1e-4)

    # (e) the TiDAR forward under the FlexAttention BlockMask == under the dense mask, or flex refused by name
    if family in FLEX_REFUSED:
        with pytest.raises(UnsupportedModelError, match=policy.config.model_type) as err:
            policy.set_training_attention("flex")
        assert FLEX_REFUSED[family] in str(err.value)
        assert policy.training_attention == "dense"
        return
    # in float64, where the two summation orders (flex's online softmax vs sdpa) agree to rounding
    policy.double()
    if getattr(policy.config, "_experts_implementation", None) not in (None, "eager"):
        policy.model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    dense = policy.tidar_forward(batch, valid, shift=1)
    policy.set_training_attention("flex")
    got = policy.tidar_forward(batch, valid, shift=1)
    for r, s in enumerate(seqs):  # real positions (pads on the right are never seen by them)
        for a, b in ((got.ar_logits, dense.ar_logits), (got.diff_logits, dense.diff_logits)):
            torch.testing.assert_close(a[r, : len(s)], b[r, : len(s)], atol=1e-9, rtol=1e-9)
