"""HF `generate`, the baseline: its compiled fast path (static cache, `torch.compile`) decodes what eager HF does."""

import torch

from policy.factory import build_model, tiny_moe_config
from policy.generate import hf_generate_ids


def test_compiled_static_cache_generate_is_token_identical_to_eager_at_t0(tmp_path, monkeypatch, tokenizer):
    """Greedy, fp32, ragged prompts in batches of 2 (the compiled path pads every batch to the call's longest
    prompt): the same completions as eager HF generate."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cfg = tiny_moe_config(len(tokenizer))
    cfg.initializer_range = 0.3  # a peaked random model: greedy ties are unlikely
    model = build_model(cfg, seed=3).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # earlier tests (FlexAttention) compile too; reset() keeps the counters
    eager = hf_generate_ids(model, tokenizer, prompts, 12, 0.0, 2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled = hf_generate_ids(model, tokenizer, prompts, 12, 0.0, 2, compiled=True)
    assert compiled == eager and all(len(c) > 0 for c in compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # decoding really was compiled
    assert hf_generate_ids(model, tokenizer, prompts, 12, 0.0, 2) == eager  # and the model itself stays eager
    torch._dynamo.reset()
