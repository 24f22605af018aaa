"""Drift detectors: silent on a stationary series, alarm on a sustained drop/rise, state survives a round trip."""

import random

from trainers.rl.drift import DetectorConfig, DriftMonitor


def noisy(mean, n, sd=0.02, seed=0):
    rng = random.Random(seed)
    return [mean + rng.gauss(0, sd) for _ in range(n)]


def test_no_alarm_on_a_stationary_series():
    mon = DriftMonitor([DetectorConfig(metric="rollout/tokens_per_forward")])
    alarms = [mon.update({"rollout/tokens_per_forward": v}) for v in noisy(0.7, 200)]
    assert not any(alarms)


def test_alarm_soon_after_an_acceptance_drop():
    mon = DriftMonitor([DetectorConfig(metric="accept")])
    series = noisy(0.7, 20) + noisy(0.55, 20, seed=1)
    fired = [i for i, v in enumerate(series) if mon.update({"accept": v})]
    assert fired and 20 <= fired[0] <= 24  # within a few steps of the change point, never before it


def test_up_direction_for_exploding_variance_and_round_trip():
    cfgs = [DetectorConfig(metric="reward/std", direction="up")]
    mon = DriftMonitor(cfgs)
    for v in noisy(0.3, 12):
        assert not mon.update({"reward/std": v})
    restored = DriftMonitor(cfgs, mon.state_dict())
    fired = [restored.update({"reward/std": v}) for v in noisy(0.6, 10, seed=2)]
    assert any(fired)
    assert restored.metrics()["drift/reward_std_alarms"] >= 1
