"""Cost model: acceptance estimation, the tokens-per-step projection, and auto's choice rule."""

import numpy as np
import pytest

from policy.masks import decode_step_layout
from rollout.cost_model import (
    AcceptanceStats,
    ChainStats,
    CostModel,
    Option,
    default_options,
    draft_chain,
    step_queries,
)
from rollout.types import split_levels


def tokens_per_step(survival, levels, stale=None):
    return draft_chain(survival, levels, stale).tokens_per_step


def test_tokens_per_step_dense_levels_is_one_plus_sum_of_survival():
    """With every level available, each step has K drafts: E[tokens] = 1 + sum_k P(na >= k)."""
    K = 8
    surv = np.r_[1.0, 0.8 ** np.arange(1, K + 1)]
    assert tokens_per_step(surv, list(range(K + 1))) == pytest.approx(1 + surv[1:].sum(), rel=1e-6)
    assert tokens_per_step(surv, []) == 1.0


def test_fewer_levels_never_project_more_tokens():
    K = 16
    surv = np.r_[1.0, 0.9 ** np.arange(1, K + 1)]
    dense = tokens_per_step(surv, list(range(K + 1)))
    sparse = tokens_per_step(surv, [0, 8])
    single = tokens_per_step(surv, [0])
    assert single <= sparse <= dense


@pytest.mark.parametrize("levels", [[0], [0, 4], [0, "end"], [0, 4, "end"], ["end"], [0, 2, 4, 6, 8]])
def test_tokens_per_step_is_the_mean_of_the_engines_draft_rule(levels):
    """The projection equals a simulation of the engine's rule: a step with n drafts accepts each with
    probability alpha (alpha_stale after a step that rejected), then drafts K - na + p from the largest
    evaluated level p <= na (none: no draft)."""
    rng = np.random.default_rng(1)
    K, alpha, alpha_stale = 8, 0.9, 0.6
    fixed, tail = [p for p in levels if p != "end"], "end" in levels
    n, stale, tokens, queries, steps = K, False, 0, 0, 40000
    for _ in range(steps):
        na = 0
        while na < n and rng.random() < (alpha_stale if stale else alpha):
            na += 1
        tokens += na + 1
        step = sorted({p for p in fixed if p <= n} | ({n} if tail else set()))
        queries += step_queries(
            K, levels, n
        )  # the engine's layout (`test_step_queries_are_the_engines_layout`)
        p = max((p for p in step if p <= na), default=None)
        n, stale = (0 if p is None else K - na + p), na < n
    fresh_c, stale_c = alpha ** np.arange(K + 1), alpha_stale ** np.arange(K + 1)
    chain = draft_chain(fresh_c, levels, stale=stale_c)
    assert chain.tokens_per_step == pytest.approx(tokens / steps, rel=0.02)
    assert (chain.full_queries, chain.base_queries) == (
        step_queries(K, levels, K),
        step_queries(K, levels, 0),
    )
    assert chain.queries == pytest.approx(queries / steps, rel=0.02)


def test_acceptance_splits_steps_after_a_rejection():
    """Steps after a rejection get their own curve; the pooled curve is what reports show."""
    acc = AcceptanceStats(4)
    acc.observe(
        [4, 1, 0, 4], [4, 4, 4, 4]
    )  # fresh: full; then a rejection at 2; stale: rejects at 1; stale: full
    np.testing.assert_allclose(acc.survival("fresh"), [1, 1, 1 / 2, 1 / 2, 1 / 2])
    np.testing.assert_allclose(acc.survival("stale"), [1, 1 / 2, 1 / 2, 1 / 2, 1 / 2])
    assert acc.steps == 4 and acc.survival()[1] == pytest.approx(3 / 4)


def test_the_drafts_end_as_a_level_projects_more_tokens():
    surv = 0.9 ** np.arange(17)
    assert tokens_per_step(surv, [0, 8, "end"]) > tokens_per_step(surv, [0, 8])


def test_kaplan_meier_recovers_survival_from_censored_steps():
    """Steps offered fewer than K drafts are censored, not counted as rejections."""
    rng = np.random.default_rng(0)
    K, alpha = 8, 0.7
    acc = AcceptanceStats(K)
    nas, ns = [], []
    for _ in range(20000):
        n = int(rng.integers(1, K + 1))
        na = 0
        while na < n and rng.random() < alpha:
            na += 1
        nas.append(na)
        ns.append(n)
    acc.observe(nas, ns)
    np.testing.assert_allclose(acc.survival(), alpha ** np.arange(K + 1), atol=0.02)
    np.testing.assert_allclose(acc.acceptance_by_position(), [alpha] * K, atol=0.03)


def test_choose_prefers_ar_unless_speculation_projects_faster():
    cm = CostModel(4)
    opts = [Option("ar"), Option("lossless", (0,))]
    cm.step_seconds = {("ar", 1): 1.0, ("lossless[0]", 1): 2.0}
    cm.acceptance.observe([0] * 100, [4] * 100)  # nothing ever accepted: 1 token per step
    assert cm.choose(opts, 1).sampler == "ar"
    cm.acceptance = AcceptanceStats(4)
    cm.acceptance.observe([4] * 100, [4] * 100)  # everything accepted: 5 tokens per 2 s
    assert cm.choose(opts, 1).sampler == "lossless"


@pytest.mark.parametrize("K", [1, 4, 16])
def test_default_options_are_valid_level_sets(K):
    opts = default_options(K)
    assert opts[0].sampler == "ar" and len({o.name for o in opts}) == len(opts)
    for opt in opts[1:]:
        fixed, _ = split_levels(opt.levels)
        decode_step_layout(K, list(fixed))  # raises on an invalid set
    assert any(split_levels(o.levels)[1] for o in opts)  # the draft's end is a candidate


def test_the_replay_refills_the_slots_a_step_frees_in_one_prefill():
    """Four prompts of equal length on two slots: both slots free after the same step, so the second pair is
    prefilled together, as `EngineCore.admit` does, not once per row."""
    cm = CostModel(4)
    cm.step_seconds = {("ar", 1): 1.0, ("ar", 2): 1.5}
    cm.prefill_seconds = {("ar", 1): 3.0, ("ar", 2): 4.0}
    lengths = [11] * 4  # the prefill emits one token, then 10 one-token steps each
    seconds = 2 * (cm.prefill_cost(Option("ar"), 2) + 10 * cm.step_cost(Option("ar"), 2))
    assert cm.project_run(Option("ar"), 2, lengths) == pytest.approx(sum(lengths) / seconds)
    # staggered lengths free one slot at a time: that refill is a one-row prefill
    lengths = [11, 21, 11]
    seconds = 4.0 + 10 * 1.5 + 3.0 + 10 * 1.5
    assert cm.project_run(Option("ar"), 2, lengths) == pytest.approx(sum(lengths) / seconds)


@pytest.mark.parametrize("levels", [[0, 2], ["end"], [0, "end"], [2, "end"], [0, 2, 4, "end"]])
def test_step_queries_are_the_engines_layout(levels):
    """The chain counts a step's queries as `BlockEngine.step_layout` lays them out, at every draft count; with
    level K and `end` both present, the end block is a block of its own."""
    from rollout import BlockEngine
    from tests.conftest import lively_policy

    eng = BlockEngine(lively_policy("moe", block_size=4), sampler="lossless", levels=levels)
    for n in range(eng.K + 1):
        assert step_queries(eng.K, levels, n) == len(eng.step_layout(n).offsets) - 1


def test_one_row_step_cost_lies_between_the_draftless_and_the_full_step():
    """At one row a step costs the timed draft-less step at the chain's least queries and the full step at its
    most, affine between; without a draft-less timing the AR step anchors the line at zero queries."""
    cm, opt = CostModel(16), Option("lossless", ("end",))
    cm.step_seconds = {("ar", 1): 1.0, (opt.name, 1): 3.0}
    base, full = step_queries(16, opt.levels, 0), step_queries(16, opt.levels, 16)

    def chain(q):
        return ChainStats(5.0, q, full, base)

    assert cm.step_cost(opt, 1, chain(full)) == pytest.approx(3.0)
    assert cm.step_cost(opt, 1, chain(base)) == pytest.approx(1.0 + 2.0 * base / full)
    cm.draftless_seconds = {opt.name: 2.0}
    assert cm.step_cost(opt, 1, chain(base)) == pytest.approx(2.0)
    assert cm.step_cost(opt, 1, chain((base + full) / 2)) == pytest.approx(2.5)
    assert cm.step_cost(opt, 1, chain(full)) == pytest.approx(3.0)
