"""Mask builders: exact small pictures and structural invariants (docs/architecture.md)."""

import pytest
import torch

from policy import decode_step_mask, prefill_mask, tidar_training_mask
from policy.masks import decode_step_layout, draft_blocks_mask, to_additive


def grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


def test_tidar_mask_exact_picture():
    """S=4, K=2: clean causal; mask block b sees clean < 2b and its own block."""
    expected = grid(
        [
            "1000 0000",
            "1100 0000",
            "1110 0000",
            "1111 0000",
            "0000 1100",
            "0000 1100",
            "1100 0011",
            "1100 0011",
        ]
    )
    assert torch.equal(tidar_training_mask(4, 2), expected)


def test_tidar_mask_shifted_blocks_partition_positions():
    """With a shift the first block is short; every block sees exactly the clean prefix before its first slot."""
    S, K = 11, 4
    for shift in range(K):
        m = tidar_training_mask(S, K, shift)
        for i in range(S):
            own = m[S + i, S:].nonzero().flatten()
            start = int(own.min())
            assert own.tolist() == list(range(start, int(own.max()) + 1))  # contiguous block
            assert len(own) <= K
            assert m[S + i, :S].nonzero().flatten().tolist() == list(range(start))
            assert (start + shift) % K == 0 or start == 0


def test_tidar_mask_clean_half_never_sees_masks():
    m = tidar_training_mask(9, 3, 1)
    assert not m[:9, 9:].any()


def test_decode_step_mask_exact_picture():
    expected = grid(
        [
            "100 000 000",
            "110 000 000",
            "111 000 000",
            "100 111 000",
            "100 111 000",
            "100 111 000",
            "111 000 111",
            "111 000 111",
            "111 000 111",
        ]
    )
    assert torch.equal(decode_step_mask(2, [0, 2]), expected)


def test_decode_step_layout_positions():
    off, seg = decode_step_layout(3, [0, 1, 3])
    assert off[:4].tolist() == [0, 1, 2, 3]
    assert off[4:8].tolist() == [1, 2, 3, 4]  # level 0 proposal: b+1..b+K+1
    assert off[12:16].tolist() == [4, 5, 6, 7]  # level 3 proposal
    assert seg.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_decode_step_proposal_matches_training_block():
    """A level-p proposal sees the same prefix a training mask block starting at b+p+1 sees (up to the cache)."""
    K = 4
    levels = [0, 2, 4]
    m = decode_step_mask(K, levels)
    off, seg = decode_step_layout(K, levels)
    for s, p in enumerate(levels, start=1):
        rows = (seg == s).nonzero().flatten()
        seen_verify = off[m[rows[0]] & (seg == 0)]
        assert seen_verify.tolist() == list(range(p + 1))
        assert m[rows][:, rows].all()  # bidirectional inside the block


@pytest.mark.parametrize("verify_len", [1, 2, 4, 5])
@pytest.mark.parametrize("levels", [[0], [0, 1], [0, 3], [0, 1, 2, 3, 4]])
def test_a_short_verify_segment_is_the_full_steps_submatrix(verify_len, levels):
    """A step whose rows carry fewer drafts verifies only `verify_len` slots and keeps only the levels those reach:
    its queries, positions and mask are exactly the full step's, with the unused slots and blocks removed."""
    K = 4
    kept = [p for p in levels if p <= verify_len - 1]
    full, (off, seg) = decode_step_mask(K, levels), decode_step_layout(K, levels)
    keep = (seg == 0) & (off < verify_len)
    for s, p in enumerate(levels, start=1):
        keep |= (seg == s) & (p in kept)
    short_off, short_seg = decode_step_layout(K, kept, verify_len)
    assert torch.equal(short_off, off[keep])
    assert torch.equal(decode_step_mask(K, kept, verify_len), full[keep][:, keep])
    assert (short_seg == 0).sum() == verify_len


def test_decode_step_rejects_a_level_past_the_verify_segment():
    with pytest.raises(ValueError, match="verify_len"):
        decode_step_layout(4, [0, 3], verify_len=3)  # level 3 needs drafts d_1..d_3


@pytest.mark.parametrize("levels", [[0, 0], [0, 5], [2, 1], [-1]])
def test_decode_step_rejects_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        decode_step_mask(4, levels)


def test_prefill_mask():
    m = prefill_mask(3, 1)
    assert torch.equal(m, grid(["100 00", "110 00", "111 00", "111 11", "111 11"]))


def test_additive_mask_values():
    m = torch.tensor([[True, False]])
    a = to_additive(m, torch.float32)
    assert a[0, 0] == 0 and a[0, 1] == torch.finfo(torch.float32).min


def test_draft_blocks_mask_packed_picture():
    """docs/architecture.md: a row of 3 tokens padded to 4, its block (start 2, L = 2) packed at columns 3-4 of a
    layout one block wider; the padding column 5 keeps the clean rule (and no real query sees it)."""
    m = draft_blocks_mask(4, torch.tensor([[2]]), 2, cols=torch.tensor([[3]]), width=6)[0]
    x = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 1, 0],  # m2: x0, x1 and its own block
            [1, 1, 0, 1, 1, 0],  # m3
            [1, 1, 1, 0, 0, 1],  # padding column: the clean rule over non-block columns
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, x)
    appended = draft_blocks_mask(4, torch.tensor([[2]]), 2)[0]
    assert torch.equal(m[3:5, :3], appended[4:6, :3]) and torch.equal(m[3:5, 3:5], appended[4:6, 4:6])
