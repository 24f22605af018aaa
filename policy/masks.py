"""Attention masks of the hybrid policy, as small pure functions. True = may attend.

Three layouts (pictured in docs/architecture.md):
- `tidar_training_mask`: the TiDAR training layout over `[clean S | mask S]`; `tidar_mask_mod` is its rule, which
  `policy.flex` turns into a FlexAttention `BlockMask` (the dense mask is that rule evaluated by broadcasting).
- `draft_blocks_mask`: the short training layout over `[clean S | a few mask blocks]`, each block one decode
  proposal (L masks at a chosen start, seeing the clean prefix before it), for a cheap diffusion term.
- `decode_step_mask`: one decode step's queries: the verify segment plus one proposal block per level.

`to_additive` turns a bool mask into the additive float form that eager attention needs
(transformers' eager path silently misreads bool 4D masks; sdpa takes either).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A mask rule in FlexAttention's `mask_mod` form: (batch, head, query index, key index) -> may attend. Written with
# tensor arithmetic only, so the same rule gives a `BlockMask` (policy.flex) and, by broadcasting, a dense mask.
MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dense_mask(mod: MaskMod, q_len: int, kv_len: int) -> torch.Tensor:
    """The bool `[q_len, kv_len]` mask of a rule, evaluated by broadcasting."""
    zero = torch.zeros((), dtype=torch.long)
    return mod(zero, zero, torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :])


def _check_blocks(block_size: int, shift: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not 0 <= shift < block_size:
        raise ValueError(f"shift must be in [0, block_size), got {shift}")


def block_ids(seq_len: int, block_size: int, shift: int = 0) -> torch.Tensor:
    """Block index of each position when block boundaries sit at `c*block_size - shift` (first block may be short)."""
    _check_blocks(block_size, shift)
    return (torch.arange(seq_len) + shift) // block_size


def tidar_training_mask(seq_len: int, block_size: int, shift: int = 0) -> torch.Tensor:
    """TiDAR training mask `[2S, 2S]` over `[x_0..x_{S-1} | m_0..m_{S-1}]` (both halves at positions 0..S-1).

    - clean x_i sees clean x_j for j <= i (causal);
    - mask m_i, in block b = (i + shift) // block_size starting at s_b = max(0, b*block_size - shift), sees clean x_j
      for j < s_b and every mask m_j of its own block (bidirectional); nothing else.

    S=6, block_size=3, shift=0 (x = clean, m = mask; rows are queries):

              x0 x1 x2 x3 x4 x5 | m0 m1 m2 m3 m4 m5
        x0     1  .  .  .  .  . |  .  .  .  .  .  .
        x1     1  1  .  .  .  . |  .  .  .  .  .  .
        x2     1  1  1  .  .  . |  .  .  .  .  .  .
        x3     1  1  1  1  .  . |  .  .  .  .  .  .
        x4     1  1  1  1  1  . |  .  .  .  .  .  .
        x5     1  1  1  1  1  1 |  .  .  .  .  .  .
        m0     .  .  .  .  .  . |  1  1  1  .  .  .
        m1     .  .  .  .  .  . |  1  1  1  .  .  .
        m2     .  .  .  .  .  . |  1  1  1  .  .  .
        m3     1  1  1  .  .  . |  .  .  .  1  1  1
        m4     1  1  1  .  .  . |  .  .  .  1  1  1
        m5     1  1  1  .  .  . |  .  .  .  1  1  1

    Labels: x_i predicts x_{i+1} (AR); m_i predicts x_i (diffusion), so slot j of a block predicts the j-th token
    after the clean prefix it sees.
    """
    return dense_mask(tidar_mask_mod(seq_len, block_size, shift), 2 * seq_len, 2 * seq_len)


def tidar_mask_mod(seq_len: int, block_size: int, shift: int = 0) -> MaskMod:
    """The rule of `tidar_training_mask`, for a `BlockMask`: indices < S are clean, >= S are masks; both halves sit
    at positions 0..S-1."""
    _check_blocks(block_size, shift)
    S, K = seq_len, block_size

    def mod(b, h, q, kv):
        q_clean, k_clean = q < S, kv < S
        q_pos, k_pos = q % S, kv % S
        q_blk, k_blk = (q_pos + shift) // K, (k_pos + shift) // K
        start = (q_blk * K - shift).clamp(min=0)  # first position of the query mask's block
        causal = q_clean & k_clean & (k_pos <= q_pos)
        prefix = ~q_clean & k_clean & (k_pos < start)
        own_block = ~q_clean & ~k_clean & (q_blk == k_blk)
        return causal | prefix | own_block

    return mod


def appended_block_columns(batch: int, seq_len: int, n: int, block_len: int, device) -> torch.Tensor:
    """[B, n] layout columns of n blocks laid after x: block i at S + i*L."""
    return (seq_len + block_len * torch.arange(n, device=device)).expand(batch, n)


def slot_columns(cols: torch.Tensor, block_len: int, absent: int) -> torch.Tensor:
    """[B, n] block columns -> [B, n*L] column of each mask slot (block i's slot j at i*L + j); `absent` for the
    slots of blocks with cols < 0."""
    slot = (cols[:, :, None] + torch.arange(block_len, device=cols.device)).flatten(1)
    return torch.where((cols >= 0).repeat_interleave(block_len, dim=1), slot, absent)


def draft_blocks_mask(
    seq_len: int,
    starts: torch.Tensor,
    block_len: int,
    cols: torch.Tensor | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Bool `[B, W, W]` mask over `[x_0..x_{S-1} | block_1 | .. | block_n]`, `starts` [B, n].

    - clean x_i sees clean x_j for j <= i (causal);
    - block i of row b is L masks at positions `starts[b, i] + 0..L-1`: each sees clean x_j for j < starts[b, i] and
      every mask of its own block (bidirectional); nothing else.

    Slot j of a block predicts x_{start + j}: the block is the decode step's proposal whose prefix ends at start - 1
    (`decode_step_mask`), so training on it trains exactly what the engine drafts. S=4, one block at 2, L=2:

              x0 x1 x2 x3 | m2 m3
        x0     1  .  .  . |  .  .
        x1     1  1  .  . |  .  .
        x2     1  1  1  . |  .  .
        x3     1  1  1  1 |  .  .
        m2     1  1  .  . |  1  1
        m3     1  1  .  . |  1  1

    By default the blocks follow x (block i at column S + i*L, W = S + n*L). `cols` [B, n] places them anywhere in
    a layout of `width` columns: block i of row b at columns cols[b, i] + 0..L-1 (packed into the row's own padding
    past its length, say), absent where cols < 0. Columns no block covers keep the clean rule (x, or padding no real
    query sees)."""
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    B, n = starts.shape
    S, L, dev = seq_len, block_len, starts.device
    if cols is None:
        cols, width = appended_block_columns(B, S, n, L, dev), S + n * L
    W = width if width is not None else S
    slot_col = slot_columns(cols, L, W)  # absent slots -> a spare column W
    block = torch.full((B, W + 1), -1, dtype=torch.long, device=dev)  # block of each column, -1: clean
    block.scatter_(1, slot_col, (torch.arange(n * L, device=dev) // L).expand(B, -1))
    start = torch.zeros(B, W + 1, dtype=torch.long, device=dev)
    start.scatter_(1, slot_col, starts.repeat_interleave(L, dim=1))
    block, start = block[:, :W], start[:, :W]
    col = torch.arange(W, device=dev)
    slot_q, slot_k = (block >= 0)[:, :, None], (block >= 0)[:, None, :]
    clean = ~slot_q & ~slot_k & (col[None, :, None] >= col[None, None, :])
    sees_prefix = slot_q & ~slot_k & (col[None, None, :] < start[:, :, None])
    own_block = slot_q & slot_k & (block[:, :, None] == block[:, None, :])
    return clean | sees_prefix | own_block


def draft_block_positions(starts: torch.Tensor, block_len: int) -> torch.Tensor:
    """[B, n] block starts -> [B, n*L] positions of the blocks' mask slots (block i's slot j at i*L + j)."""
    return (starts[:, :, None] + torch.arange(block_len, device=starts.device)).flatten(1)


def pack_block_columns(lengths: torch.Tensor, width: int, n: int, block_len: int) -> torch.Tensor:
    """Columns [B, n] for `draft_blocks_forward`: row b's blocks laid end to end from its length (its padding
    first) within `width` columns; -1 for the blocks that do not fit (so a row of length l gets
    min(n, (width - l) // block_len) blocks)."""
    k = torch.arange(n, device=lengths.device)
    cols = lengths.long()[:, None] + block_len * k
    return torch.where(cols + block_len <= width, cols, -1)


def draft_block_targets(
    input_ids: torch.Tensor, weight: torch.Tensor, starts: torch.Tensor, block_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and loss weights [B, n*L] of `draft_blocks_forward`'s slots: the token at each slot's position and
    `weight` there (0 past the sequence's end)."""
    S = input_ids.shape[1]
    slot_pos = draft_block_positions(starts, block_len)
    at = slot_pos.clamp(max=S - 1)
    return input_ids.gather(1, at), weight.gather(1, at) * (slot_pos < S)


def decode_step_layout(
    block_size: int, levels: Sequence[int], verify_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position offsets (relative to the anchor position b) and segment ids of one decode step's queries.

    Segment 0 is the verify segment `[a, d_1..d_n]` at offsets 0..n, n = verify_len - 1 (default K: the full
    draft; a step whose rows carry fewer drafts verifies only those); segment 1+l is the proposal block of level
    `levels[l]` = p <= n, K+1 masks at offsets p+1..p+K+1. Returns `(offsets [Q], segment [Q])`,
    Q = verify_len + (K+1) len(levels).
    """
    K = block_size
    V = K + 1 if verify_len is None else verify_len
    levels = list(levels)
    if sorted(set(levels)) != levels or any(p < 0 or p > K for p in levels):
        raise ValueError(f"levels must be strictly increasing within 0..{K}, got {levels}")
    if not 1 <= V <= K + 1 or max(levels, default=0) > V - 1:
        raise ValueError(f"verify_len must be in 1..{K + 1} and cover every level {levels}, got {V}")
    offsets = [torch.arange(V)] + [torch.arange(p + 1, p + K + 2) for p in levels]
    segment = [torch.zeros(V, dtype=torch.long)] + [
        torch.full((K + 1,), s) for s in range(1, 1 + len(levels))
    ]
    return torch.cat(offsets), torch.cat(segment)


def decode_step_mask(block_size: int, levels: Sequence[int], verify_len: int | None = None) -> torch.Tensor:
    """Query-vs-query mask `[Q, Q]` of one decode step (every query also sees the whole committed cache).

    - verify slots are causal among themselves;
    - the proposal of level p sees verify slots 0..p and its own K+1 masks, bidirectionally; nothing else.

    K=2, levels=[0, 2] (v = verify slot, P0/P2 = proposal masks; rows are queries):

                 v0 v1 v2 | P0 P0 P0 | P2 P2 P2
        v0        1  .  . |  .  .  . |  .  .  .
        v1        1  1  . |  .  .  . |  .  .  .
        v2        1  1  1 |  .  .  . |  .  .  .
        P0 (x3)   1  .  . |  1  1  1 |  .  .  .
        P2 (x3)   1  1  1 |  .  .  . |  1  1  1

    Proposal p's slot j sits at position b+p+1+j and predicts that position's token given the prefix through b+p.
    A shorter verify segment (`verify_len`) is this mask with the unused verify slots' rows and columns removed:
    nothing kept ever saw them.
    """
    levels = list(levels)
    offsets, segment = decode_step_layout(block_size, levels, verify_len)
    is_verify = segment == 0
    level_of = torch.tensor([-1, *levels])[segment]  # level of each proposal query, -1 for verify
    q_verify, k_verify = is_verify[:, None], is_verify[None, :]
    causal = q_verify & k_verify & (offsets[None, :] <= offsets[:, None])
    sees_verify = ~q_verify & k_verify & (offsets[None, :] <= level_of[:, None])
    own_block = ~q_verify & (segment[:, None] == segment[None, :])
    return causal | sees_verify | own_block


def prefill_mask(prompt_len: int, block_size: int) -> torch.Tensor:
    """Prefill mask `[P+K+1, P+K+1]`: the prompt causal, then one proposal block of K+1 masks seeing the whole prompt.

    P=3, K=1:
              t0 t1 t2 | m m
        t0     1  .  . | . .
        t1     1  1  . | . .
        t2     1  1  1 | . .
        m      1  1  1 | 1 1
        m      1  1  1 | 1 1
    """
    P, n = prompt_len, block_size + 1
    mask = torch.zeros(P + n, P + n, dtype=torch.bool)
    mask[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()
    mask[P:, :P] = True
    mask[P:, P:] = True
    return mask


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> additive float mask (0 where attend, finfo.min elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
