"""Fused verify: the Triton kernel (under TRITON_INTERPRET=1 on CPU) equals the torch reference, token for token."""

import pytest
import torch
import triton

from kernels.verify import inverse_cdf, verify_reference, verify_triton

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton.knobs.runtime.interpret),
    reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)",
)


def case(R=5, K=4, V=37, sampled=False, seed=0, peaked=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, K + 1, V, generator=g) * peaked
    logits[0, :, 5] = float("-inf")  # a banned token
    drafts = torch.randint(V, (R, K), generator=g)
    drafts[1] = logits[1, :K].argmax(-1)  # a row whose drafts are likely accepted
    q = torch.softmax(torch.randn(R, K, V, generator=g), -1) if sampled else None
    n = torch.tensor([K, K, K - 1, 0, 2])[:R]
    u = torch.rand(R, K + 1, generator=g)
    return logits, drafts, q, n, u


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@needs_triton
def test_triton_equals_reference(sampled, temperature, seed):
    args = case(sampled=sampled, seed=seed)
    ref = verify_reference(*args, temperature)
    tri = verify_triton(*args, temperature)
    assert torch.equal(ref.accept_len, tri.accept_len)
    assert torch.equal(ref.tokens, tri.tokens)
    torch.testing.assert_close(ref.logprobs, tri.logprobs, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_vocab_larger_than_block():
    """V not a power of two and spread over several chunks of the vocabulary loop."""
    args = case(R=3, K=2, V=1500, seed=4, peaked=1.0)
    args = (args[0], args[1], None, torch.tensor([2, 2, 1]), args[4])
    ref, tri = verify_reference(*args, 1.0), verify_triton(*args, 1.0)
    assert torch.equal(ref.tokens, tri.tokens) and torch.equal(ref.accept_len, tri.accept_len)


def test_reference_accepts_point_mass_drafts_and_never_emits_banned():
    logits, drafts, _, n, u = case()
    out = verify_reference(logits, drafts, None, n, u, 1.0)
    assert (out.tokens[0] != 5).all()
    assert out.accept_len[3] == 0  # no drafts: only the bonus draw
    emitted = torch.arange(5)[None] <= out.accept_len[:, None]
    assert ((out.tokens >= 0) == emitted).all()


def test_inverse_cdf_picks_the_bucket():
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    assert inverse_cdf(w, torch.tensor([0.1])).item() == 1
    assert inverse_cdf(w, torch.tensor([0.3])).item() == 3


@needs_triton
def test_triton_first_vocab_chunk_all_banned():
    """A fully -inf leading chunk (banned ids, top-k) must not turn the online softmax into NaN."""
    args = case(R=3, K=2, V=2048, seed=5, peaked=1.0)
    logits = args[0]
    logits[:, :, :1024] = float("-inf")
    args = (logits, args[1] % 1024 + 1024, None, torch.tensor([2, 1, 0]), args[4])
    ref, tri = verify_reference(*args, 1.0), verify_triton(*args, 1.0)
    assert torch.equal(ref.tokens, tri.tokens) and not tri.logprobs.isnan().any()
    assert (tri.tokens[tri.tokens >= 0] >= 1024).all()


def test_reference_logprobs_are_zero_past_the_last_emitted_slot():
    logits, drafts, _, n, u = case()
    logits[:, :, 0] = float("-inf")
    out = verify_reference(logits, drafts, None, n, u, 1.0)
    emitted = torch.arange(5)[None] <= out.accept_len[:, None]
    assert not out.logprobs.isnan().any() and (out.logprobs[~emitted] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("sampled", [False, True])
def test_triton_on_cuda_equals_reference(sampled):
    """The compiled kernel on CUDA tensors (TRITON_INTERPRET=0) against the torch reference on the CPU."""
    logits, drafts, q, n, u = case(R=64, K=16, V=32768, sampled=sampled, seed=3)
    ref = verify_reference(logits, drafts, q, n, u, 1.0)
    cuda = [None if t is None else t.cuda() for t in (logits, drafts, q, n, u)]
    tri = verify_triton(*cuda, 1.0)
    assert torch.equal(tri.accept_len.cpu(), ref.accept_len)
    assert torch.equal(tri.tokens.cpu(), ref.tokens)
