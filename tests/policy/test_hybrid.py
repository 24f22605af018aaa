"""HybridPolicy: mask invariances under real forwards, TiDAR loss, MoE aux loss, checkpoint I/O, conversion."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from policy import HybridPolicy, decode_step_mask, tidar_training_mask
from policy.factory import build_model, tiny_dense_config, tiny_moe_config
from policy.losses import load_balancing_loss
from policy.masks import (
    decode_step_layout,
    draft_block_targets,
    draft_blocks_mask,
    pack_block_columns,
    prefill_mask,
)
from tests.conftest import make_policy

KINDS = ["moe", "llama", "qwen3"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tidar_ar_half_equals_plain_causal_forward(kind, attn):
    """The clean half of the TiDAR layout is exactly the model's default (causal AR) forward."""
    policy = make_policy(kind, attn)
    x = torch.randint(3, 36, (2, 13))
    with torch.no_grad():
        tidar = policy.tidar_forward(x)
        plain = policy(input_ids=x).logits
    torch.testing.assert_close(tidar.ar_logits, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_and_eager_agree_on_tidar_layout(kind):
    """Bool masks (sdpa) and additive masks (eager) must produce the same logits."""
    a, b = make_policy(kind, "sdpa"), make_policy(kind, "eager")
    x = torch.randint(3, 36, (2, 11))
    with torch.no_grad():
        oa, ob = a.tidar_forward(x, shift=1), b.tidar_forward(x, shift=1)
    torch.testing.assert_close(oa.diff_logits, ob.diff_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oa.ar_logits, ob.ar_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["moe", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hidden_token_change_leaves_logits_unchanged(kind, attn):
    """Changing clean token j changes nothing a mask block starting at or before j can see."""
    K, S = 4, 12
    policy = make_policy(kind, attn, block_size=K)
    x = torch.randint(3, 36, (1, S))
    y = x.clone()
    j = 6  # inside block [4, 8)
    y[0, j] = (x[0, j] + 1 - 3) % 33 + 3
    with torch.no_grad():
        ox, oy = policy.tidar_forward(x), policy.tidar_forward(y)
    # mask blocks [0,4) and [4,8) only see clean positions < 4: unchanged
    torch.testing.assert_close(ox.diff_logits[:, :8], oy.diff_logits[:, :8], atol=1e-5, rtol=1e-5)
    # the block [8,12) sees clean 0..7, including j: changed
    assert not torch.allclose(ox.diff_logits[:, 8:], oy.diff_logits[:, 8:], atol=1e-4)
    # causal AR logits before j unchanged, at j changed
    torch.testing.assert_close(ox.ar_logits[:, :j], oy.ar_logits[:, :j], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ox.ar_logits[:, j], oy.ar_logits[:, j], atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bidirectional_inside_block_only(attn):
    """Under the TiDAR mask, a slot sees later slots of its own block but nothing of other blocks."""
    K, S = 4, 8
    policy = make_policy("moe", attn, block_size=K)
    x = torch.randint(3, 36, (1, S))
    ids = torch.cat([x, torch.full_like(x, policy.mask_token_id)], 1)
    pos = torch.arange(S).repeat(2)[None]
    mask = tidar_training_mask(S, K)
    with torch.no_grad():
        base, _ = policy.masked_forward(ids, pos, mask)
        ids2 = ids.clone()
        ids2[0, S + 3] = 5  # last slot of block 0 replaced
        changed, _ = policy.masked_forward(ids2, pos, mask)
    assert not torch.allclose(base[0, S + 0], changed[0, S + 0], atol=1e-4)  # slot 0 sees slot 3 (same block)
    # other block blind
    torch.testing.assert_close(base[0, S + 4 :], changed[0, S + 4 :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_decode_step_proposal_equals_training_block(kind):
    """A level-p proposal in a packed decode step has exactly the logits of a TiDAR training block at b+p+1."""
    K = 3
    levels = [0, 1, 3]
    policy = make_policy(kind, block_size=K)
    b = 5  # anchor position: prefix x_0..x_4 is the "cache"
    x = torch.randint(3, 36, (1, b + K + 1))
    off, seg = decode_step_layout(K, levels)
    q_ids = torch.where(seg == 0, x[0, b + off.clamp(max=K)], torch.tensor(policy.mask_token_id))
    ids = torch.cat([x[0, :b], q_ids])[None]
    pos = torch.cat([torch.arange(b), b + off])[None]
    Q = len(off)
    mask = torch.zeros(b + Q, b + Q, dtype=torch.bool)
    mask[:b, :b] = torch.ones(b, b, dtype=torch.bool).tril()
    mask[b:, :b] = True
    mask[b:, b:] = decode_step_mask(K, levels)
    with torch.no_grad():
        step, _ = policy.masked_forward(ids, pos, mask)
        for s, p in enumerate(levels, start=1):
            start = b + p + 1
            seq = x[:, :start]
            n = K + 1
            shift = (-start) % n
            padded = torch.cat([seq, torch.full((1, n), 3)], 1)  # clean tokens after start are hidden anyway
            ref = policy.tidar_forward(padded, block_size=n, shift=shift).diff_logits[0, start : start + n]
            torch.testing.assert_close(step[0, b:][seg == s], ref, atol=1e-5, rtol=1e-5)
        verify_ref = policy(input_ids=x).logits[0, b:]
        torch.testing.assert_close(step[0, b:][seg == 0], verify_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["moe", "llama", "qwen3"])
def test_draft_block_is_the_engines_proposal_and_blind_to_other_blocks(kind):
    """The short training layout: its clean half is the AR forward; a draft block at start s has exactly the logits
    of the engine's prefill proposal after the prompt x[:s]; and a block's logits do not depend on the others."""
    K = 3
    policy = make_policy(kind, block_size=K)
    x = torch.randint(3, 36, (2, 12))
    starts = torch.tensor([[4, 9], [6, 2]])
    L = K + 1
    with torch.no_grad():
        out = policy.draft_blocks_forward(x, torch.ones_like(x), starts)
        torch.testing.assert_close(out.ar_logits, policy(input_ids=x).logits, atol=1e-5, rtol=1e-5)
        for row in range(2):
            for i, s in enumerate(starts[row].tolist()):
                ids = torch.cat([x[row, :s], torch.full((L,), policy.mask_token_id)])[None]
                pos = torch.arange(s + L)[None]
                ref, _ = policy.masked_forward(ids, pos, prefill_mask(s, K))
                got = out.diff_logits[row, i * L : (i + 1) * L]
                torch.testing.assert_close(got, ref[0, s:], atol=1e-5, rtol=1e-5)
        alone = policy.draft_blocks_forward(x[:1], torch.ones_like(x[:1]), starts[:1, 1:])
        torch.testing.assert_close(alone.diff_logits[0], out.diff_logits[0, L:], atol=1e-5, rtol=1e-5)


def test_draft_blocks_under_right_padding_and_the_aux_mask_of_inactive_blocks():
    """A row padded on the right gives its blocks the logits it gives alone (a block running into the padding
    included), and a block marked inactive leaves the MoE aux loss as if it were not there."""
    K = 3
    policy = make_policy("moe", block_size=K)
    x = torch.randint(3, 36, (2, 12))
    valid = torch.ones_like(x)
    valid[1, 8:] = 0  # row 1 is 8 tokens long
    starts = torch.tensor([[3, 9], [2, 6]])  # row 1's second block covers 6..9: two slots in the padding
    with torch.no_grad():
        both = policy.draft_blocks_forward(x, valid, starts)
        alone = policy.draft_blocks_forward(x[1:, :8], valid[1:, :8], starts[1:])
        torch.testing.assert_close(both.diff_logits[1], alone.diff_logits[0], atol=1e-5, rtol=1e-5)
        one = policy.draft_blocks_forward(x, valid, starts[:, :1])
        masked = policy.draft_blocks_forward(x, valid, starts, active=torch.tensor([[True, False]] * 2))
    torch.testing.assert_close(masked.aux_loss, one.aux_loss, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(both.aux_loss, one.aux_loss, atol=1e-6)


@pytest.mark.parametrize("kind", ["moe", "llama", "qwen3"])
def test_blocks_packed_into_the_padding_give_the_appended_layouts_logits(kind):
    """`pack_block_columns`: blocks laid into a row's own padding (and past it, within the width) give exactly the
    logits they give appended after x, the clean half stays the AR forward, and a block that does not fit is
    absent (its MoE aux share included)."""
    K = 3
    L = K + 1
    policy = make_policy(kind, block_size=K)
    x = torch.randint(3, 36, (3, 14))
    valid = torch.ones_like(x)
    valid[1, 6:] = 0  # row 1: 6 tokens, 8 columns of padding (two blocks fit inside x's width)
    valid[2, 11:] = 0  # row 2: 11 tokens
    starts = torch.tensor([[3, 10, 7], [2, 4, 1], [5, 8, 9]])
    cols = pack_block_columns(valid.sum(1), 14 + L, 3, L)  # one block's worth past x
    assert cols.tolist() == [[14, -1, -1], [6, 10, 14], [11, -1, -1]]
    with torch.no_grad():
        packed = policy.draft_blocks_forward(x, valid, starts, cols=cols)
        appended = policy.draft_blocks_forward(x, valid, starts, active=cols >= 0)
    real = valid.bool()
    torch.testing.assert_close(packed.ar_logits[real], appended.ar_logits[real], atol=1e-5, rtol=1e-5)
    present = (cols >= 0).repeat_interleave(L, dim=1)
    torch.testing.assert_close(
        packed.diff_logits[present], appended.diff_logits[present], atol=1e-5, rtol=1e-5
    )
    if kind == "moe":
        torch.testing.assert_close(packed.aux_loss, appended.aux_loss, atol=1e-6, rtol=1e-5)


def test_draft_blocks_mask_matches_the_full_layout_on_aligned_blocks():
    """A draft block at a block-aligned start sees what the full TiDAR layout's block there sees."""
    S, K = 12, 4
    full = tidar_training_mask(S, K)
    got = draft_blocks_mask(S, torch.tensor([[4, 8]]), K)[0]
    for i, s in enumerate((4, 8)):
        rows = slice(S + i * K, S + (i + 1) * K)
        assert torch.equal(got[rows, :S], full[S + s : S + s + K, :S])
        assert torch.equal(got[rows, S:][:, i * K : (i + 1) * K], full[S + s : S + s + K, S + s : S + s + K])
        assert not got[rows, S:].sum(1).ne(K).any()  # nothing of the other block
    assert torch.equal(got[:S, :S], full[:S, :S]) and not got[:S, S:].any()


def test_draft_block_targets_stop_at_the_sequence_end():
    x = torch.arange(10)[None]
    weight = torch.zeros(1, 10)
    weight[0, 3:] = 1
    targets, w = draft_block_targets(x, weight, torch.tensor([[2, 8]]), 4)
    assert targets.tolist() == [[2, 3, 4, 5, 8, 9, 9, 9]]
    assert w.tolist() == [[0, 1, 1, 1, 1, 1, 0, 0]]


@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_tidar_loss_falls(kind):
    """A few AdamW steps on one batch reduce both the AR and the diffusion loss."""
    policy = make_policy(kind)
    policy.train()
    x = torch.randint(3, 36, (4, 16))
    mask = torch.ones_like(x)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    first = policy.tidar_loss(x, mask)
    for _ in range(8):
        out = policy.tidar_loss(x, mask)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    last = policy.tidar_loss(x, mask)
    assert last.ar_loss < first.ar_loss - 0.1
    assert last.diff_loss < first.diff_loss - 0.1


def test_loss_excludes_prompt_and_pads():
    """Tokens outside loss_mask don't move the loss: changing their labels' targets has no effect on diff CE."""
    policy = make_policy("llama")
    x = torch.randint(3, 36, (1, 10))
    m = torch.zeros_like(x)
    m[:, 6:] = 1
    a = policy.tidar_loss(x, m)
    y = x.clone()
    y[:, 1] = (y[:, 1] + 1 - 3) % 33 + 3  # prompt token: visible context, but not a target
    b = policy.tidar_loss(y, m)
    assert a.diff_loss != b.diff_loss  # context changed the predictions...
    z = policy.tidar_forward(x)
    # ...and the loss equals the CE over exactly the selected positions
    ce = torch.nn.functional.cross_entropy(z.diff_logits[0, 6:], x[0, 6:])
    torch.testing.assert_close(a.diff_loss, ce)


def test_moe_aux_loss_matches_hf_with_2d_mask():
    """Our load-balancing loss equals transformers' Qwen3-MoE function given the same 2D token mask."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(1)
    logits = tuple(torch.randn(2 * 7, 8) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ours = load_balancing_loss(logits, 8, 2, mask)
    theirs = load_balancing_loss_func(logits, 8, 2, mask)
    torch.testing.assert_close(ours, theirs)


def test_moe_aux_loss_ignores_padding_under_4d_mask():
    """With right padding, the TiDAR aux loss depends only on real tokens."""
    policy = make_policy("moe")
    x = torch.randint(3, 36, (1, 9))
    valid = torch.ones_like(x)
    valid[:, 6:] = 0
    y = x.clone()
    y[:, 6:] = 4  # different pad content
    a = policy.tidar_forward(x, valid).aux_loss
    b = policy.tidar_forward(y, valid).aux_loss
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_save_load_roundtrip(kind, tmp_path, tokenizer):
    """save_pretrained -> from_pretrained keeps metadata and gives identical AR and diffusion logits."""
    cfg = tiny_moe_config(len(tokenizer)) if kind == "moe" else tiny_dense_config(len(tokenizer))
    policy = HybridPolicy(build_model(cfg))
    mask_id = policy.convert(tokenizer, block_size=8)
    policy.eval()
    policy.save_pretrained(tmp_path, tokenizer)
    loaded = HybridPolicy.from_pretrained(tmp_path)
    assert (loaded.mask_token_id, loaded.block_size) == (mask_id, 8)
    x = torch.randint(4, 90, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(policy(input_ids=x).logits, loaded(input_ids=x).logits, atol=0, rtol=0)
        torch.testing.assert_close(policy.tidar_forward(x).diff_logits, loaded.tidar_forward(x).diff_logits)


def test_converted_checkpoint_is_plain_hf(tmp_path, tokenizer):
    """A converted checkpoint loads with AutoModelForCausalLM and HF generate runs on it."""
    policy = HybridPolicy(build_model(tiny_moe_config(len(tokenizer))))
    policy.convert(tokenizer)
    policy.save_pretrained(tmp_path, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    out = model.generate(torch.tensor([[2, 10, 11]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_plain_hf_checkpoint_loads_for_conversion(kind, tmp_path, tokenizer):
    """A plain HF checkpoint (no blockrl metadata) loads unconverted; convert() adds the mask token."""
    cfg = tiny_moe_config(len(tokenizer)) if kind == "moe" else tiny_dense_config(len(tokenizer))
    build_model(cfg).save_pretrained(tmp_path)
    policy = HybridPolicy.from_pretrained(tmp_path)
    assert not policy.is_converted
    with pytest.raises(RuntimeError, match="convert"):
        policy.tidar_forward(torch.tensor([[4, 5]]))
    mask_id = policy.convert(tokenizer)
    assert mask_id == len(tokenizer) - 1 and tokenizer.mask_token_id == mask_id
    assert policy.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert policy.tidar_forward(torch.tensor([[4, 5, 6]])).diff_logits.shape[-1] == len(tokenizer)


def test_hf_kernels_package_not_shadowed():
    """Our top-level `kernels` package must not make transformers think HF's `kernels` hub loader is installed."""
    from transformers.utils import is_kernels_available

    assert not is_kernels_available()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_logits_from_hidden_states_match_the_models_own_forward(softcap):
    """`logits(hidden)` is the model's own head: a plain LM head is applied directly (probed once, bit for bit),
    and a family that transforms after it (here Gemma-2's final soft-capping) keeps the stubbed own forward."""
    from transformers import Gemma2Config

    cfg = Gemma2Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=softcap,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    policy = HybridPolicy(model)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        assert torch.equal(policy.logits(hidden), model(input_ids=ids).logits)
    assert model.__dict__["_blockrl_plain_head"] is (softcap is None)
