"""policy.flex: the TiDAR training mask as a FlexAttention BlockMask. The family sweep (test_families.py, check (e))
holds the forward equality per family; here: the BlockMask's block sparsity is the dense mask's, a policy in flex
mode keeps every other forward on sdpa, and the switch refuses what it cannot serve."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from policy.families import UnsupportedModelError
from policy.masks import tidar_mask_mod, tidar_training_mask
from rollout import BlockEngine
from tests.conftest import make_policy


@pytest.mark.parametrize("S,K,shift", [(16, 4, 0), (16, 4, 3), (24, 8, 5), (20, 4, 1)])
def test_block_mask_skips_exactly_the_empty_blocks(S, K, shift):
    """With 4x4 tiles, the BlockMask keeps a tile iff the dense mask has any True in it (so the mask half's far
    blocks, and everything above the clean diagonal, are skipped, not computed and masked)."""
    tile = 4
    bm = create_block_mask(
        tidar_mask_mod(S, K, shift), None, None, 2 * S, 2 * S, device="cpu", BLOCK_SIZE=tile
    )
    dense = tidar_training_mask(S, K, shift)
    n = 2 * S // tile
    occupied = dense.reshape(n, tile, n, tile).any(dim=(1, 3))
    assert torch.equal(bm.to_dense()[0, 0].bool(), occupied)
    assert occupied.float().mean() < 0.6  # the layout is sparse: most tiles skipped


@pytest.mark.parametrize("kind", ["moe", "llama"])
@torch.no_grad()
def test_flex_mode_keeps_the_other_forwards_on_sdpa(kind):
    """Only tidar_forward changes: engine greedy decoding (cached, tensor masks) is token-identical in flex mode."""
    policy = make_policy(kind, "sdpa", block_size=4)
    prompts = [[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8]]
    dense = BlockEngine(policy, levels=[0, 2], max_batch=2).generate(
        prompts, 10, temperature=0, eos_token_id=None
    )
    policy.set_training_attention("flex")
    assert policy.training_attention == "flex"
    flex = BlockEngine(policy, levels=[0, 2], max_batch=2).generate(
        prompts, 10, temperature=0, eos_token_id=None
    )
    assert [t.tokens for t in flex] == [t.tokens for t in dense]
    x = torch.randint(3, 36, (2, 9))
    torch.testing.assert_close(
        policy.tidar_forward(x).ar_logits, policy(input_ids=x).logits, atol=1e-5, rtol=1e-5
    )
    policy.set_training_attention("dense")
    assert policy.model.config._attn_implementation == "sdpa"


def test_set_training_attention_refuses_what_it_cannot_serve():
    policy = make_policy("llama", "eager")
    with pytest.raises(UnsupportedModelError, match="need a model that runs sdpa; this one runs 'eager'"):
        policy.set_training_attention("flex")
    assert policy.training_attention == "dense"
    with pytest.raises(ValueError, match="'dense' or 'flex'"):
        policy.set_training_attention("sparse")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["moe", "llama"])
def test_flex_training_on_cuda_matches_dense(kind):
    """On CUDA (compiled FlexAttention, BlockMask built without a dense mask): the TiDAR loss and its gradients
    equal the dense-mask path's, fp32, to summation-order noise."""
    dense = make_policy(kind, "sdpa", block_size=4).cuda()
    flex = make_policy(kind, "sdpa", block_size=4).cuda()
    flex.set_training_attention("flex")
    x = torch.randint(3, 36, (4, 40), device="cuda")
    mask = torch.ones_like(x)
    losses = []
    for p in (dense, flex):
        out = p.tidar_loss(x, mask, shift=2)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(dense.named_parameters(), flex.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)
