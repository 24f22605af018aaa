"""Learner on real engine rollouts from a tiny model: exact on-policy log-probs, and rewarded tokens get likelier."""

import torch

from policy import HybridPolicy
from policy.factory import build_model, tiny_moe_config
from rollout import BlockEngine
from trainers.rl.learner import Learner, LearnerConfig, RolloutBatch, token_logprobs


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


def test_ppo_with_the_diffusion_term_runs_one_forward_per_minibatch(monkeypatch):
    """PPO + lambda_diff: the values come from the clean half of the TiDAR forward (equal to the AR forward's hidden
    states), so a minibatch step runs one forward; only the no-grad GAE pass at the start runs the AR forward."""
    from trainers.rl.ppo import PPOConfig

    policy = tiny_policy()
    trajs = rollouts(policy.eval())
    batch = RolloutBatch.from_trajectories(trajs, [float(i % 2) for i in range(len(trajs))], 4, pad_id=0)
    with torch.no_grad():
        tidar = policy.tidar_forward(batch.input_ids, batch.valid)
        ar = policy.ar_forward(batch.input_ids, batch.valid)
    real = batch.valid.bool()
    assert torch.allclose(tidar.hidden[real], ar.hidden[real], atol=1e-5)
    calls = {"ar": 0, "tidar": 0}
    for name in calls:
        fn = getattr(policy, f"{name}_forward")

        def counted(*a, _fn=fn, _name=name, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        monkeypatch.setattr(policy, f"{name}_forward", counted)
    cfg = LearnerConfig(lr=1e-3, algo="ppo", lambda_diff=0.5, minibatches=2, ppo=PPOConfig())
    m = Learner(policy, cfg).step(batch)
    assert calls == {"ar": 1, "tidar": 2}
    assert "train/value_loss" in m and "train/diff_loss" in m
