"""Triton body of the fused verify kernel (contract, launcher and torch reference: `kernels/verify.py`).

NOTE: this lives in its own module, imported on first launch, because Triton reads TRITON_INTERPRET when a kernel
is decorated; a test that sets it before the first `verify_triton` call gets the interpreter on CPU tensors.
One program per row. Over the vocabulary (BLOCK_V-wide chunks): for each draft slot until the first rejection, an
online max/sum-exp pass gives p(d); for the final slot, one pass for max/sum-exp, one for the weight total, and one
for the inverse-CDF search.
"""

import triton
import triton.language as tl


@triton.jit
def _row_stats(row_ptr, V, inv_t, BLOCK_V: tl.constexpr):
    """max and sum of exp(l/T - max) over one vocabulary row."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, 0))
        # NOTE: a chunk (or prefix) that is all -inf (banned, top-k) keeps m_new = -inf: rescale by 0, not exp(nan)
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        s = s * alpha + tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new)), 0)
        m = m_new
    return m, s


@triton.jit
def _row_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    best = tl.full((), float("-inf"), tl.float32)
    arg = tl.zeros((), tl.int64)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        bm = tl.max(x, 0)
        ba = tl.min(tl.where(x == bm, v0 + offs, V), 0).to(tl.int64)  # first index of the block max
        take = bm > best
        arg = tl.where(take, ba, arg)
        best = tl.where(take, bm, best)
    return arg


@triton.jit
def _weights(row, q_row, idx, V, inv_t, m, s, resid, d, HAS_Q: tl.constexpr):
    """Draw weights on one vocabulary chunk: p, or the residual max(0, p - q) (Dirac q: p with d zeroed)."""
    p = tl.exp(tl.load(row + idx, mask=idx < V, other=float("-inf")).to(tl.float32) * inv_t - m) / s
    if HAS_Q:
        q = tl.load(q_row + idx, mask=idx < tl.where(resid, V, 0), other=0.0).to(tl.float32)
        w = tl.where(resid, tl.maximum(p - q, 0.0), p)
    else:
        w = tl.where(resid & (idx == d), 0.0, p)
    return tl.where(idx < V, w, 0.0)


@triton.jit
def verify_kernel(
    logits_ptr,
    drafts_ptr,
    q_ptr,
    ndrafts_ptr,
    u_ptr,
    accept_ptr,
    tokens_ptr,
    logprobs_ptr,
    K,
    V,
    inv_t,
    HAS_Q: tl.constexpr,
    GREEDY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    K1 = K + 1
    n = tl.load(ndrafts_ptr + r)
    offs = tl.arange(0, BLOCK_V)
    na = tl.zeros((), tl.int64)
    going = n > 0
    for i in range(0, K):
        if going & (i < n):
            row = logits_ptr + (r * K1 + i) * V
            d = tl.load(drafts_ptr + r * K + i)
            if GREEDY:
                ok = _row_argmax(row, V, BLOCK_V) == d
                lp = 0.0
            else:
                m, s = _row_stats(row, V, inv_t, BLOCK_V)
                ld = tl.load(row + d).to(tl.float32) * inv_t
                p_d = tl.exp(ld - m) / s
                q_d = 1.0
                if HAS_Q:
                    q_d = tl.load(q_ptr + (r * K + i) * V + d).to(tl.float32)
                ok = tl.load(u_ptr + r * K1 + i) * q_d < p_d
                lp = ld - m - tl.log(s)
            if ok:
                tl.store(tokens_ptr + r * K1 + i, d)
                tl.store(logprobs_ptr + r * K1 + i, lp)
                na += 1
            else:
                going = False
        else:
            going = False
    row = logits_ptr + (r * K1 + na) * V
    if GREEDY:
        tok = _row_argmax(row, V, BLOCK_V)
        tl.store(logprobs_ptr + r * K1 + na, 0.0)
    else:
        rejected = na < n
        d = tl.load(drafts_ptr + r * K + tl.minimum(na, K - 1), mask=K > 0, other=-1)
        d = tl.where(rejected, d, -1)
        m, s = _row_stats(row, V, inv_t, BLOCK_V)
        q_row = q_ptr + (r * K + tl.minimum(na, K - 1)) * V
        # pass 1: total residual weight, to fall back to p when it vanishes numerically
        total = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            w = _weights(row, q_row, v0 + offs, V, inv_t, m, s, rejected, d, HAS_Q)
            total += tl.sum(w, 0)
        use_resid = rejected & (total > 0)
        # pass 2: the weights' total, then pass 3: inverse CDF against u * total
        cum_total = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cum_total += tl.sum(_weights(row, q_row, v0 + offs, V, inv_t, m, s, use_resid, d, HAS_Q), 0)
        thresh = tl.load(u_ptr + r * K1 + K) * cum_total
        run = tl.zeros((), tl.float32)
        count = tl.zeros((), tl.int64)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            w = _weights(row, q_row, idx, V, inv_t, m, s, use_resid, d, HAS_Q)
            cdf = run + tl.cumsum(w, 0)
            count += tl.sum(tl.where((cdf <= thresh) & (idx < V), 1, 0), 0).to(tl.int64)
            run += tl.sum(w, 0)
        tok = tl.minimum(count, V - 1)
        lt = tl.load(row + tok).to(tl.float32) * inv_t
        tl.store(logprobs_ptr + r * K1 + na, lt - m - tl.log(s))
    tl.store(tokens_ptr + r * K1 + na, tok)
    tl.store(accept_ptr + r, na)
