"""Held-out evaluation: batches bounded by a logit budget, and figures that do not depend on the batching."""

import random

import pytest

from tests.conftest import make_policy
from trainers.lm import evaluate
from trainers.lm.data import Example
from trainers.lm.evaluate import diffusion_slot_accuracy, eval_batches, heldout_loss


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(5, 30)
        ids = [2] + [rng.randint(3, 36) for _ in range(L - 1)]
        out.append(Example(ids=ids, target=[0] * 3 + [1] * (L - 3), task="t"))
    return out


def test_eval_batches_cover_everything_within_the_budget(monkeypatch):
    monkeypatch.setattr(evaluate, "LOGIT_BUDGET", 2_000)
    exs = examples(40)
    chunks = list(eval_batches(exs, vocab_size=37, batch_size=8, halves=2))
    assert [e for c in chunks for e in c] == exs
    for c in chunks:
        assert 1 <= len(c) <= 8
        assert len(c) == 1 or len(c) * 2 * max(len(e.ids) for e in c) * 37 <= 2_000
    assert max(map(len, chunks)) > 1 and min(map(len, chunks)) < 8  # the budget binds, and not always


@pytest.mark.parametrize("budget", [2**28, 3_000])
def test_heldout_figures_do_not_depend_on_the_batching(monkeypatch, tokenizer, budget):
    policy = make_policy("moe", block_size=4)
    exs = examples(12, seed=1)
    ref_loss, ref_acc = heldout_loss(policy, tokenizer, exs), diffusion_slot_accuracy(policy, tokenizer, exs)
    monkeypatch.setattr(evaluate, "LOGIT_BUDGET", budget)
    assert heldout_loss(policy, tokenizer, exs, batch_size=5) == pytest.approx(ref_loss, rel=1e-5)
    assert diffusion_slot_accuracy(policy, tokenizer, exs, batch_size=5) == pytest.approx(ref_acc, abs=1e-6)
