"""HF `generate` on prompts in the training format: the baseline every benchmark and evaluation compares with.

Prompts are encoded like every other path (`encode_prompt`, in the checkpoint's prompt format), left-padded, and
sampled at pure temperature (HF's default top_k=50 switched off) or greedily at T=0. Completions are cut after
their first EOS (any of the model's EOS ids).
"""

from __future__ import annotations

import torch

from policy.tokenizer import PromptFormat, encode_prompt, eos_ids, pad_id


def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask [B, S] for decoder-only generation; S = the longest row, or `width`."""
    S = max(max(len(r) for r in rows), width or 0)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r) :] = torch.tensor(r)
        attn[i, S - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": attn}


@torch.inference_mode()
def hf_generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int = 0,
    prompt_format: PromptFormat = "text",
) -> list[list[int]]:
    """Completion ids (EOS included, nothing after) of `model.generate` for every prompt, `batch_size` at a time."""
    ids = [encode_prompt(tok, p, prompt_format) for p in prompts]
    return hf_generate_ids(model, tok, ids, max_new_tokens, temperature, batch_size, seed)


def static_compiled(model) -> dict:
    """`generate` kwargs for HF's documented fast path: a static KV cache, and the decoding forward compiled by
    `generate` itself (`compile_config`: CUDA graphs on a GPU; on a CPU HF compiles only when told to, which this
    does). The model's own forward is untouched, so engines on the same model stay eager."""
    from transformers import CompileConfig

    cuda = next(model.parameters()).device.type == "cuda"
    cc = CompileConfig(mode="reduce-overhead" if cuda else "default")
    cc._compile_all_devices = True  # HF's switch for compiling on a CPU (its own tests use it)
    return dict(cache_implementation="static", compile_config=cc)


@torch.inference_mode()
def hf_generate_ids(
    model,
    tok,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int = 0,
    compiled: bool = False,
) -> list[list[int]]:
    """`hf_generate` on prompts already encoded (a prompt file's rows, chats through the chat template).
    `compiled`: HF's static cache and compiled decoding (`static_compiled`), every batch left-padded to the longest
    prompt of the call, so that every batch of a call has one shape and one static cache length."""
    model.eval()
    torch.manual_seed(seed)
    pad = pad_id(tok)
    sampling = dict(temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else {}
    device = next(model.parameters()).device
    eos = list(eos_ids(tok, model.generation_config)) or None
    static = static_compiled(model) if compiled else {}
    width = max(len(r) for r in prompt_ids) if compiled else None  # one shape for every batch of the call
    outs: list[list[int]] = []
    for i in range(0, len(prompt_ids), batch_size):
        enc = left_pad(prompt_ids[i : i + batch_size], pad, width)
        enc = {k: v.to(device) for k, v in enc.items()}
        gen = model.generate(
            **enc,
            **sampling,
            **static,
            do_sample=temperature > 0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            ends = [j for j, t in enumerate(row) if eos and t in eos]
            outs.append(row[: ends[0] + 1] if ends else row)
    return outs
