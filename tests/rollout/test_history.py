"""History drafts (rollout/history.py): the suffix index's sources, sharing and bounds, and the engine's exactness
with history drafts on a plain (unconverted) model and beside the diffusion drafter."""

import pytest
import torch

from policy.factory import build_model, tiny_moe_config
from policy.hybrid import HybridPolicy
from rollout import BlockEngine
from rollout.history import HistorySettings, HistoryStore
from tests.conftest import PROMPTS, lively_policy
from tests.rollout.test_engine import empirical_tv, exact_ar_distribution, hf_greedy, tv_threshold


def plain_policy(vocab=37, seed=1):
    """A random tiny causal LM that was never converted: no mask token, no drafter."""
    cfg = tiny_moe_config(vocab)
    cfg.initializer_range = 0.3
    return HybridPolicy(build_model(cfg, seed=seed)).eval()


# ----------------------------------------------------------------------------------------------- the index
def test_own_text_is_a_source():
    """Prompt lookup: a row that repeats an earlier span of its own prompt and output is offered its continuation."""
    seq = HistoryStore().begin("g", [5, 6, 7, 8, 9])
    seq.extend([1, 2, 5, 6])
    d = seq.propose(4)
    assert d.tokens == [7, 8, 9, 1] and d.expected == pytest.approx(4.0)
    assert seq.propose(2).tokens == [7, 8]  # never past the asked length


def test_siblings_share_a_group_and_only_their_group():
    store = HistoryStore()
    a, b = store.begin("g", [1, 2]), store.begin("g", [1, 2])
    other = store.begin("h", [1, 2])
    a.extend([3, 4, 5, 6, 7])
    b.extend([3, 4])
    assert b.propose(8).tokens == [5, 6, 7]  # a sibling, while both still decode
    other.extend([3, 4])
    assert other.propose(8) is None  # another group's rows are not its siblings


def test_finished_rollouts_are_kept_for_later_rows_of_the_prompt():
    store = HistoryStore()
    first = store.begin("g", [1, 2])
    first.extend([3, 4, 5, 6])
    first.finish()
    later = store.begin("g", [1, 2])
    later.extend([3])
    assert later.propose(8).tokens == [4, 5, 6]


def test_disagreeing_sources_vote_and_the_draft_stops_below_min_prob():
    store = HistoryStore(HistorySettings(min_prob=0.6))
    for tail in ([7, 8], [7, 8], [7, 9]):  # after "3 4": 7 three times, then 8 twice and 9 once
        s = store.begin("g", [1])
        s.extend([3, 4, *tail])
        s.finish()
    row = store.begin("g", [1])
    row.extend([3, 4])
    d = row.propose(8)
    assert d.tokens == [7, 8] and d.expected == pytest.approx(1 + 2 / 3)
    strict = HistoryStore(HistorySettings(min_prob=0.7))
    for tail in ([7, 8], [7, 8], [7, 9]):
        s = strict.begin("g", [1])
        s.extend([3, 4, *tail])
        s.finish()
    row = strict.begin("g", [1])
    row.extend([3, 4])
    assert row.propose(8).tokens == [7]  # 2/3 < 0.7: the draft stops before the disputed token


def test_a_group_keeps_its_last_max_per_group_rollouts():
    store = HistoryStore(HistorySettings(max_per_group=2))
    for tail in ([10], [11], [12]):
        s = store.begin("g", [1])
        s.extend([3, 4, *tail])
        s.finish()
    row = store.begin("g", [1])
    row.extend([3, 4])
    d = row.propose(1)
    assert d.tokens in ([11], [12]) and d.expected == pytest.approx(0.5)  # the oldest ([10]) is gone
    assert (
        store.tokens == 1 + 2 * 4 + 3
    )  # the prompt, two rollouts and the live row (each with the prompt's tail)


def test_token_bound_evicts_idle_groups_least_recent_first_never_a_decoding_row():
    store = HistoryStore(HistorySettings(max_tokens=20))
    for g in ("a", "b"):
        s = store.begin(g, [1])
        s.extend(list(range(2, 9)))
        s.finish()
    live = store.begin("c", [1])
    live.extend(list(range(2, 9)))  # 8 + 8 + 8 > 20: the least recently used idle group ("a") leaves
    assert list(store.groups) == ["b", "c"] and store.tokens <= 20
    live.extend(list(range(9, 40)))  # only decoding rows left to evict: its tokens stop being indexed
    assert store.tokens <= 20 and "c" in store.groups
    again = store.begin("c", [1])
    again.extend([2, 3])
    assert again.propose(4).tokens == [4, 5, 6, 7]  # what was indexed still drafts, contiguously


# ----------------------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("rule", ["expected", "history"])
def test_greedy_matches_hf_with_history_drafts(rule):
    """T=0, a ragged batch with slot refills and repeated prompts (siblings, then a later epoch of the same
    prompts): token-identical to HF greedy on a plain model (history only) and a converted one (both)."""
    prompts = PROMPTS * 3
    for policy, drafts in ((plain_policy(), "history"), (lively_policy("moe"), "both")):
        store = HistoryStore(HistorySettings(rule=rule))
        eng = BlockEngine(policy, "lossless", levels=["end"], max_batch=3, drafts=drafts, history=store)
        for _ in range(2):  # the second call drafts from the first call's rollouts too
            trajs = eng.generate(prompts, max_new_tokens=40, temperature=0, eos_token_id=None)
            assert [t.tokens for t in trajs] == [hf_greedy(policy, p, 40) for p in prompts]
        assert sum(t.history_accepted for t in trajs) > 40  # history drafts were offered and accepted
        assert eng.option.name == ("lossless[history]" if drafts == "history" else "lossless[end]+history")


@pytest.mark.parametrize(("drafts", "draft"), [("history", "dirac"), ("both", "sampled")])
def test_history_drafts_keep_lossless_exact(drafts, draft):
    """T = 1: the 3-token marginals of lossless with history drafts (siblings decoding beside each other, and the
    rollouts of earlier waves) are within sampling noise of exact AR sampling."""
    N = 6000
    policy = plain_policy(vocab=6, seed=3) if drafts == "history" else lively_policy("moe", 5, 2, seed=3)
    prompt = [2, 3]
    exact = exact_ar_distribution(policy, prompt, 3)
    # every pass verifies its longest draft: the run is reproducible, so its history use is too
    store = HistoryStore(HistorySettings(adaptive_length=False))
    eng = BlockEngine(
        policy, "lossless", levels=[0], max_batch=500, drafts=drafts, draft=draft, history=store
    )
    trajs = eng.generate([prompt] * N, max_new_tokens=3, temperature=1.0, seed=7, eos_token_id=None)
    assert sum(t.history_accepted for t in trajs) > N * 0.1  # history drafts were really used
    assert empirical_tv(trajs, exact) < tv_threshold(exact.values(), N)


def test_a_seeded_run_with_history_drafts_is_reproducible_without_the_adaptive_length():
    def run():
        store = HistoryStore(HistorySettings(adaptive_length=False))
        eng = BlockEngine(plain_policy(), "lossless", max_batch=4, drafts="history", history=store)
        return [t.tokens for t in eng.generate(PROMPTS * 4, 24, temperature=1.0, seed=5, eos_token_id=None)]

    assert run() == run()


def test_logit_mix_verifies_history_drafts_against_the_pure_ar_target():
    """logit_mix has no drafter logits for a history draft: those positions are tested (and recorded) under the
    AR distribution, so behaviour and AR log-probs agree on every step that verified a history draft."""
    policy = lively_policy("moe")
    eng = BlockEngine(policy, "logit_mix", mix_weight=0.3, levels=[0], drafts="both")
    eng.history.cfg = HistorySettings(rule="history")
    trajs = eng.generate(PROMPTS * 2, 30, temperature=1.0, seed=2, audit=True)
    checked = 0
    for t in trajs:
        i = 1  # the prefill's token
        for step in t.audit[1:]:
            n = len(step["committed"])
            if step["history"] and step["accept_len"]:
                a, b = t.behavior_logprobs[i : i + n - 1], t.ar_logprobs[i : i + n - 1]
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b))
                checked += 1
            i += n
    assert checked > 0


def test_plain_model_refuses_diffusion_drafts_and_logit_mix_needs_the_drafter():
    with pytest.raises(ValueError, match="drafts='history'"):
        BlockEngine(plain_policy(), "lossless", drafts="diffusion")
    with pytest.raises(ValueError, match="logit_mix"):
        BlockEngine(lively_policy("moe"), "logit_mix", drafts="history")


@pytest.mark.parametrize("drafts", ["history", "both"])
def test_auto_pilots_history_drafts_until_it_has_seen_enough_steps(drafts):
    """A short first call (a warm-up) drafts from an empty store: auto keeps running each option with history
    drafts (whole calls, so siblings can share) until it has seen HISTORY_PILOT_STEPS decode steps of it, and only
    then lets the cost model choose. With both sources it pilots both and history alone."""
    from rollout.auto import HISTORY_PILOT_STEPS, build_engine
    from rollout.settings import EngineSettings

    policy = plain_policy() if drafts == "history" else lively_policy("moe")
    auto = build_engine(policy, EngineSettings(sampler="auto", max_batch=2, drafts=drafts))
    expect = (
        ["lossless[history]"] if drafts == "history" else ["lossless[0, 1, 2]+history", "lossless[history]"]
    )
    assert [o.name for o in auto.pilots] == expect
    warm = auto.generate(PROMPTS[:2], max_new_tokens=4, temperature=0, eos_token_id=None)
    assert {t.sampler for t in warm} == {expect[0]} and auto.needs_pilot
    ran = []
    while auto.needs_pilot:
        pilot = auto.pilot.name
        trajs = auto.generate(PROMPTS * 4, max_new_tokens=40, temperature=0, eos_token_id=None)
        assert {t.sampler for t in trajs} == {pilot}
        ran.append(pilot)
    assert sorted(set(ran)) == sorted(expect)
    assert all(auto.cost.history_steps(o) >= HISTORY_PILOT_STEPS for o in auto.pilots)
    auto.generate(PROMPTS, max_new_tokens=8, temperature=0, eos_token_id=None)
    assert auto.last_choice == auto.cost.choose(auto.options, 2)  # the cost model's pick now, not a pilot's
