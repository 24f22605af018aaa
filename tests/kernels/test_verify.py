"""Fused verify: the Triton kernel (under TRITON_INTERPRET=1 on CPU) equals the torch reference, token for token."""

import pytest
import torch
import triton

from kernels.verify import inverse_cdf, verify_reference, verify_triton

# These tests pass CPU tensors to the Triton path, which only the interpreter runs: a CUDA box is not enough (the
# `gpu`-marked test below covers compiled kernels on CUDA tensors).
needs_interpreter = pytest.mark.skipif(
    not triton.knobs.runtime.interpret,
    reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it where there is no GPU)",
)


def case(R=5, K=4, V=37, sampled=False, seed=0, peaked=3.0):
    """Inputs of one verify: logits [R, K+1, V], drafts [R, K], q [R, K, V] or None, n [R], u [R, K+1]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, K + 1, V, generator=g) * peaked
    logits[0, :, 5] = float("-inf")  # a banned token
    drafts = torch.randint(V, (R, K), generator=g)
    drafts[1] = logits[1, :K].argmax(-1)  # a row whose drafts are likely accepted
    q = torch.softmax(torch.randn(R, K, V, generator=g), -1) if sampled else None
    pattern = torch.tensor([K, K, K - 1, 0, 2]).clamp(0, K)  # full, full, short, none, short
    n = pattern[torch.arange(R) % len(pattern)]  # cycled to any R
    u = torch.rand(R, K + 1, generator=g)
    return logits, drafts, q, n, u


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@needs_interpreter
def test_triton_equals_reference(sampled, temperature, seed):
    args = case(sampled=sampled, seed=seed)
    ref = verify_reference(*args, temperature)
    tri = verify_triton(*args, temperature)
    assert torch.equal(ref.accept_len, tri.accept_len)
    assert torch.equal(ref.tokens, tri.tokens)
    torch.testing.assert_close(ref.logprobs, tri.logprobs, atol=1e-5, rtol=1e-5)


@needs_interpreter
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


def test_case_builds_every_input_for_any_row_count():
    """The fixture of the CUDA test (R = 64 > the 5-entry draft-count pattern) and the reference run on it."""
    logits, drafts, q, n, u = case(R=64, K=16, V=32768, sampled=True, seed=3)
    assert [t.shape[0] for t in (logits, drafts, q, n, u)] == [64] * 5
    assert ((n >= 0) & (n <= 16)).all()
    out = verify_reference(logits, drafts, q, n, u, 1.0)
    assert out.accept_len.shape == (64,) and out.tokens.shape == (64, 17)
    assert (out.accept_len <= n).all()


def test_inverse_cdf_picks_the_bucket():
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0]])
    assert inverse_cdf(w, torch.tensor([0.1])).item() == 1
    assert inverse_cdf(w, torch.tensor([0.3])).item() == 3


@needs_interpreter
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


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_launches_on_the_tensors_device():
    """Tensors on the last GPU while cuda:0 is current: the kernel must run where its pointers live."""
    logits, drafts, q, n, u = case(R=8, K=4, V=4096, sampled=True, seed=6)
    ref = verify_reference(logits, drafts, q, n, u, 1.0)
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    with torch.cuda.device(0):
        tri = verify_triton(*(t.to(dev) for t in (logits, drafts, q, n, u)), 1.0)
    assert tri.tokens.device == dev and torch.equal(tri.tokens.cpu(), ref.tokens)
