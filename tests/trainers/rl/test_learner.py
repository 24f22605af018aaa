"""Learner on real engine rollouts from a tiny model: exact on-policy log-probs, and rewarded tokens get likelier."""

import pytest
import torch

from common.paths import SHIPPED_CHECKPOINT
from policy import HybridPolicy, load_tokenizer
from policy.factory import build_model, tiny_moe_config
from rollout import BlockEngine
from rollout.types import Trajectory
from trainers.rl.learner import (
    Learner,
    LearnerConfig,
    RolloutBatch,
    draft_misses,
    sample_block_starts,
    token_logprobs,
)


def rollouts(policy, G=4, seed=0):
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=8)
    return eng.generate([[2, 5, 6]] * G + [[2, 9]] * G, max_new_tokens=8, temperature=1.0, seed=seed)


def tiny_policy():
    cfg = tiny_moe_config(37)
    cfg.initializer_range = 0.3
    policy = HybridPolicy(build_model(cfg, seed=2))
    policy.convert(block_size=4)
    return policy


def test_learner_logprobs_match_lossless_rollouts_in_fp32():
    """On-policy exactness: the learner's AR log-probs equal the rollout's ar_logprobs (mean |delta| <= 1e-3)."""
    policy = tiny_policy().eval()
    trajs = rollouts(policy)
    batch = RolloutBatch.from_trajectories(trajs, [0.0] * len(trajs), 4, pad_id=0)
    with torch.no_grad():
        logits = policy(input_ids=batch.input_ids, attention_mask=batch.valid).logits
    lp = token_logprobs(logits, batch.input_ids, 1.0)
    m = batch.completion.bool()
    assert (lp[m] - batch.ar_logprobs[m]).abs().mean() <= 1e-3
    assert torch.equal(batch.ar_logprobs[m], batch.behavior_logprobs[m])  # lossless: behaviour == AR


def first_token_task(policy):
    """Rollouts rewarded 1 when their first token is the most common one, and a probe of that token's mean
    log-prob at the first completion position (which a working learner step must raise)."""
    trajs = rollouts(policy, G=8, seed=1)
    first = [t.tokens[0] for t in trajs]
    target = max(set(first), key=first.count)
    batch = RolloutBatch.from_trajectories(trajs, [float(f == target) for f in first], 8, pad_id=0)
    pos = torch.tensor([len(t.prompt_ids) for t in trajs])

    def target_logprob() -> float:
        with torch.no_grad():
            logits = policy(input_ids=batch.input_ids, attention_mask=batch.valid).logits
        return float(torch.log_softmax(logits[torch.arange(len(trajs)), pos - 1], -1)[:, target].mean())

    return batch, target_logprob


def test_learner_step_moves_probability_towards_rewarded_samples():
    """Reward = 1 for samples whose first token is the most common one: its log-prob must go up."""
    policy = tiny_policy()
    batch, target_logprob = first_token_task(policy)
    learner = Learner(policy, LearnerConfig(lr=3e-3, lambda_diff=0.5, epochs=2))
    before = target_logprob()
    metrics = learner.step(batch)
    assert target_logprob() > before
    assert metrics["rollout/logprob_mismatch"] <= 1e-3
    # on-policy lossless rollouts: importance weights are all 1 (ESS 1, KL 0), and the policy is not collapsed
    assert abs(metrics["rollout/is_ess"] - 1) < 1e-5 and abs(metrics["rollout/mismatch_kl"]) < 1e-5
    assert metrics["train/entropy"] > 0.1
    assert {"train/loss", "train/diff_loss", "train/clipfrac", "reward/mean"} <= set(metrics)


def test_a_stale_batch_takes_the_learner_as_pi_old_with_importance_weights():
    policy = tiny_policy()
    trajs = rollouts(policy, G=8, seed=1)
    rewards = [float(t.tokens[0] % 2) for t in trajs]
    batch = RolloutBatch.from_trajectories(trajs, rewards, 8, pad_id=0)
    learner = Learner(policy, LearnerConfig(lr=3e-3, lambda_diff=0.0))
    first = learner.step(batch)
    second = learner.step(batch)  # the rollouts are now one policy version old
    assert first["rollout/staleness"] == 0 and second["rollout/staleness"] == 1
    assert abs(first["train/is_weight_mean"] - 1) < 1e-6
    assert abs(second["train/is_weight_mean"] - 1) > 1e-4 and second["rollout/is_ess"] < 1


def test_kl_to_the_reference_starts_at_zero_and_grows_as_the_policy_moves():
    policy = tiny_policy()
    trajs = rollouts(policy, G=8, seed=1)
    batch = RolloutBatch.from_trajectories(trajs, [float(t.tokens[0] % 2) for t in trajs], 8, pad_id=0)
    learner = Learner(policy, LearnerConfig(lr=3e-3, lambda_diff=0.0, grpo={"kl_coef": 0.1}))
    kls = [learner.step(batch)["train/kl"] for _ in range(3)]
    assert abs(kls[0]) < 1e-6 and kls[2] > 1e-4


def test_moe_aux_loss_is_kept_without_the_diffusion_term():
    policy = tiny_policy()
    batch = RolloutBatch.from_trajectories(rollouts(policy), [0.0] * 8, 4, pad_id=0)
    learner = Learner(policy, LearnerConfig(lambda_diff=0.0))
    logits, diff, aux, _ = learner._forward(batch.input_ids, batch.valid, need_diff=False, need_values=False)
    assert diff is None and aux is not None and float(aux) > 0
    with torch.no_grad():
        plain = policy(input_ids=batch.input_ids, attention_mask=batch.valid).logits
    torch.testing.assert_close(logits, plain)


def test_metrics_are_the_mean_over_every_minibatch_and_epoch(monkeypatch):
    """2 epochs x 3 minibatches = 6 optimizer steps: each train metric is the mean of what the 6 steps measured,
    not the last minibatch's value."""
    import trainers.rl.learner as learner_mod

    seen = []
    loss_fn = learner_mod.grpo_loss

    def recording(x, cfg):
        loss, m = loss_fn(x, cfg)
        seen.append(m["train/is_weight_mean"])
        return loss, {**m, "train/is_weight_mean": float(len(seen))}  # 1, 2, ..., 6: the mean is 3.5

    monkeypatch.setattr(learner_mod, "grpo_loss", recording)
    policy = tiny_policy()
    trajs = rollouts(policy.eval())
    batch = RolloutBatch.from_trajectories(trajs, [float(i % 2) for i in range(len(trajs))], 4, pad_id=0)
    m = Learner(policy, LearnerConfig(lr=1e-3, epochs=2, minibatches=3)).step(batch)
    assert len(seen) == 6 and m["train/optimizer_steps"] == 6.0
    assert m["train/is_weight_mean"] == 3.5


@pytest.mark.parametrize("layout", ["blocks", "full"])
def test_ppo_with_the_diffusion_term_runs_one_forward_per_minibatch(monkeypatch, layout):
    """PPO + lambda_diff: the values come from the clean half of the diffusion forward (equal to the AR forward's
    hidden states, under either layout), so a minibatch step runs one forward; only the no-grad GAE pass at the
    start runs the AR forward."""
    from trainers.rl.ppo import PPOConfig

    policy = tiny_policy()
    trajs = rollouts(policy.eval())
    batch = RolloutBatch.from_trajectories(trajs, [float(i % 2) for i in range(len(trajs))], 4, pad_id=0)
    diff_forward = {"full": "tidar_forward", "blocks": "draft_blocks_forward"}[layout]
    with torch.no_grad():
        args = (batch.input_ids, batch.valid)
        if layout == "blocks":
            args += (sample_block_starts(batch.completion, 2)[0],)
        diff = getattr(policy, diff_forward)(*args)
        ar = policy.ar_forward(batch.input_ids, batch.valid)
    real = batch.valid.bool()
    assert torch.allclose(diff.hidden[real], ar.hidden[real], atol=1e-5)
    calls = {"ar_forward": 0, diff_forward: 0}
    for name in calls:
        fn = getattr(policy, name)

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        monkeypatch.setattr(policy, name, counted)
    cfg = LearnerConfig(
        lr=1e-3, algo="ppo", lambda_diff=0.5, diffusion=layout, minibatches=2, ppo=PPOConfig()
    )
    m = Learner(policy, cfg).step(batch)
    assert calls == {"ar_forward": 1, diff_forward: 2}
    assert "train/value_loss" in m and "train/diff_loss" in m


def test_block_starts_are_distinct_eligible_positions():
    eligible = torch.zeros(3, 20)
    eligible[0, 5:15] = 1
    eligible[1, 18:] = 1  # only two eligible positions
    starts, ok = sample_block_starts(eligible, 4)
    assert starts.shape == ok.shape == (3, 4)
    assert ok[0].all() and set(starts[0].tolist()) <= set(range(5, 15)) and len(set(starts[0].tolist())) == 4
    assert ok[1].sum() == 2 and set(starts[1][ok[1]].tolist()) == {18, 19}
    assert not ok[2].any()


def test_focused_starts_take_the_misses_first_in_proportion_to_them():
    """n_focus of the n starts go to positions with misses (weighted by the miss count), the rest are uniform;
    a row with fewer misses fills up uniformly."""
    eligible = torch.zeros(2, 30)
    eligible[:, 10:30] = 1
    misses = torch.zeros(2, 30)
    misses[0, 12], misses[0, 20] = 1.0, 3.0  # row 0: two failed proposals, one losing 3x the drafts
    misses[1, 25] = 2.0  # row 1: one
    torch.manual_seed(0)
    hits = {12: 0, 20: 0}
    for _ in range(2000):
        starts, ok = sample_block_starts(eligible, 3, misses, n_focus=1)
        assert ok.all() and len(set(starts[0].tolist())) == 3 and len(set(starts[1].tolist())) == 3
        assert set(starts.flatten().tolist()) <= set(range(10, 30))
        s0 = set(starts[0].tolist())
        assert s0 & {12, 20}  # the focused block sits at a miss
        hits[12] += 12 in s0 and 20 not in s0
        hits[20] += 20 in s0 and 12 not in s0
        assert 25 in starts[1].tolist()  # the only miss is always taken
    # the focused draw picks 20 with p = 3/4; a uniform block (2 of 19 left) then takes the other one sometimes
    assert 0.70 < hits[20] / (hits[12] + hits[20]) < 0.82
    starts, ok = sample_block_starts(eligible, 3, misses, n_focus=3)  # more focus than misses: uniform fill
    assert ok.all() and {12, 20} <= set(starts[0].tolist()) and 25 in starts[1].tolist()


def test_the_packed_width_grows_until_rows_hold_the_mean_asked():
    """Ragged rows fill their padding, so one block's width gives them the mean; equal rows need the width itself."""
    learner = Learner(tiny_policy(), LearnerConfig(diff_blocks=4, diff_width=1, diff_blocks_mean=2.5))
    L = learner.policy.block_size + 1
    ok = torch.ones(4, 4, dtype=torch.bool)
    ragged = learner._pack(torch.tensor([40, 10, 10, 10]), 40, ok)  # three rows with 30 columns of padding
    assert ((ragged >= 0).sum(1)).tolist() == [1, 4, 4, 4] and int((ragged + L).max()) <= 40 + L
    equal = learner._pack(torch.tensor([40, 40, 40, 40]), 40, ok)
    assert ((equal >= 0).sum(1)).tolist() == [3, 3, 3, 3]  # 2 blocks' width holds 2 < 2.5
    few = learner._pack(torch.tensor([40] * 4), 40, torch.tensor([[True, False, False, False]] * 4))
    assert ((few >= 0).sum(1)).tolist() == [1, 1, 1, 1]  # rows with one start need no wider layout


def test_draft_misses_mark_the_proposals_that_failed_on_real_rollouts():
    """On the shipped checkpoint's lossless rollouts (audited): every decode step that rejected a draft inside the
    kept tokens is listed, at the position before its first drafted token, with the drafts it lost; the kept tokens
    agree with the drafts up to the rejection and differ at it."""
    policy = HybridPolicy.from_pretrained(SHIPPED_CHECKPOINT).eval()
    tok = load_tokenizer(SHIPPED_CHECKPOINT)
    words = ["planet", "qzxvw", "kitchenette", "sunlightbrr", "mmmarble", "wjndqwow"]
    prompts = [tok(tok.bos_token + f"reverse: {w}\n", add_special_tokens=False)["input_ids"] for w in words]
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 4, 8], max_batch=8)
    trajs = eng.generate(prompts, max_new_tokens=80, temperature=1.0, seed=0, audit=True)
    listed = 0
    for t in trajs:
        expected, c = [], 1
        for step, offered in zip(t.audit[1:], t.draft_counts, strict=True):  # audit[0] is the prefill
            drafts, na = step["drafts"][:offered], step["accept_len"]
            kept = t.tokens[c : c + na]  # the last step may be cut by the stop
            assert kept == drafts[: len(kept)]
            if na < len(drafts) and c + na < len(t.tokens):
                assert (
                    t.tokens[c + na] != drafts[na]
                )  # lossless with argmax drafts: a rejection changes the token
                expected.append((c - 1, len(drafts) - na))
            c += len(step["committed"])
        assert draft_misses(t) == expected
        listed += len(expected)
    assert listed > 0


def test_draft_misses_follow_the_model_turns_of_an_episode():
    """Env tokens are skipped and each turn opens with its prefill token; steps are consumed turn by turn."""
    t = Trajectory(
        prompt_ids=[1], tokens=list(range(14)), behavior_logprobs=[0.0] * 14, ar_logprobs=[0.0] * 14
    )
    t.env_mask = [1] * 5 + [0] * 3 + [1] * 6
    t.accept_counts, t.draft_counts = [2, 0, 4, 2], [4, 4, 4, 4]  # turn 1: 1 + 3 + 1; turn 2: 1 + 5 (cut)
    assert draft_misses(t) == [(0, 2), (3, 4)]  # turn 2's last step rejected past the cut: not counted
    batch = RolloutBatch.from_trajectories([t], [0.0], 1, pad_id=0)
    assert batch.draft_miss[0, 1] == 2 and batch.draft_miss[0, 4] == 4 and batch.draft_miss.sum() == 6


@pytest.mark.parametrize("layout", ["blocks", "full", "packed"])
@pytest.mark.parametrize("target", ["tokens", "ar"])
def test_the_diffusion_term_trains_the_drafter_on_the_rollouts(layout, target, monkeypatch):
    """Every layout, either target: the diffusion loss on the rollouts falls over learner steps (no reward signal
    at all, so only the diffusion term moves the drafter). Packed: the forward is one block wider than the
    padded batch, and each row holds between diff_width and diff_blocks blocks."""
    policy = tiny_policy()
    trajs = rollouts(policy, G=8, seed=3)
    batch = RolloutBatch.from_trajectories(trajs, [0.0] * len(trajs), 8, pad_id=0)
    packed = layout == "packed"
    cfg = LearnerConfig(
        lr=3e-3,
        lambda_diff=1.0,
        diffusion="blocks" if packed else layout,
        diff_blocks=3 if packed else 2,
        diff_width=1 if packed else None,
        diff_blocks_mean=0.0,  # the narrowest layout: one block past the padded batch
        diff_target=target,
    )
    widths, forward = [], policy.draft_blocks_forward

    def spy(ids, valid, starts, **kw):
        if kw.get("cols") is not None:
            per_row = (kw["cols"] >= 0).sum(1)
            assert ((per_row >= 1) & (per_row <= 3)).all()
            widths.append(int((kw["cols"] + policy.block_size + 1).max()) - ids.shape[1])
        return forward(ids, valid, starts, **kw)

    monkeypatch.setattr(policy, "draft_blocks_forward", spy)
    learner = Learner(policy, cfg)
    torch.manual_seed(0)
    losses = [learner.step(batch)["train/diff_loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.2
    if packed:
        assert widths and max(widths) <= policy.block_size + 1


def test_the_distillation_target_is_the_ar_distribution_at_the_slot():
    """diff_target=ar: a block slot at position t is scored against softmax(AR logits at t-1 / T); with the drafter's
    logits set to the AR ones the loss is the AR entropy there, and the sampled token plays no part."""
    policy = tiny_policy()
    trajs = rollouts(policy, G=4, seed=4)
    batch = RolloutBatch.from_trajectories(trajs, [0.0] * len(trajs), 4, pad_id=0)
    learner = Learner(policy, LearnerConfig(lambda_diff=1.0, diff_target="ar", temperature=0.7))
    ids, comp = batch.input_ids, batch.completion
    starts, ok = sample_block_starts(comp, 2)
    L = policy.block_size + 1
    ar = torch.randn(*ids.shape, 37)
    pos = (starts[:, :, None] + torch.arange(L)).flatten(1).clamp(max=ids.shape[1] - 1)
    same = ar.gather(1, (pos - 1)[:, :, None].expand(-1, -1, 37)) / 0.7
    got, weight = learner._diff_loss(same, ar, ids, comp, starts, ok)
    logp = torch.log_softmax(same, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    from policy.masks import draft_block_targets

    _, w = draft_block_targets(ids, comp, starts, L)
    w = w * ok.repeat_interleave(L, dim=1)
    torch.testing.assert_close(got, (entropy * w).sum() / w.sum())
    assert float(weight) == float(w.sum())  # the count the term is a mean over (a learner group's share)
    other = ids.clone()
    other[comp.bool()] = 1  # different sampled tokens, same AR logits: the same loss
    torch.testing.assert_close(learner._diff_loss(same, ar, other, comp, starts, ok)[0], got)
