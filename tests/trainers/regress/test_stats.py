"""`blockrl regress` statistics: pass@k against enumeration, exact paired tests against integer binomial sums, Holm,
gates on synthetic metrics; and a seeded Monte Carlo of the default suite's gate logic (false-alarm rate of an
unchanged model decoded with fresh randomness <= alpha, power >= 0.8 against a 15-point drop).
"""

import itertools
import math

import numpy as np
import pytest

from common.config import load_config
from trainers.lm.evaluate import wilson
from trainers.regress.config import RegressConfig
from trainers.regress.job import SamplerMetrics
from trainers.regress.simulate import simulate_alarm_rate
from trainers.regress.stats import (
    ToleranceConfig,
    bits_array,
    bits_string,
    compare,
    holm,
    mcnemar_p,
    paired_drop_p,
    pass_at_k,
    sign_test_p,
    two_proportion_p,
    welch_p,
)


# ------------------------------------------------------------------------------------------------ statistics
def test_pass_at_k_matches_enumeration():
    """The unbiased estimator equals the fraction of k-subsets of the n samples that contain a correct one."""
    for n, c, k in itertools.product(range(1, 7), range(7), range(1, 7)):
        if c > n or k > n:
            continue
        draws = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(draws, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_one_sided_tests():
    """Unpaired fallback: equal rates give p=0.5, a drop a small p (smaller with more samples), a rise p > 0.5."""
    assert two_proportion_p(50, 100, 50, 100) == pytest.approx(0.5)
    assert two_proportion_p(100, 100, 100, 100) == 0.5
    small, large = two_proportion_p(80, 100, 60, 100), two_proportion_p(800, 1000, 600, 1000)
    assert large < small < 0.01
    assert two_proportion_p(60, 100, 80, 100) > 0.99
    assert welch_p(0.8, 0.3, 100, 0.7, 0.3, 100) < 0.05 < welch_p(0.8, 0.3, 100, 0.79, 0.3, 100)


def test_paired_tests_are_exact_binomial_tails():
    """p = P(Binomial(losses + gains, 1/2) >= losses), checked against exact integer sums; vectorised like the
    scalar call; McNemar counts only discordant pairs and the sign test only untied prompts."""
    grid = [(b, c) for b in range(40) for c in range(40)]
    ps = paired_drop_p([b for b, _ in grid], [c for _, c in grid])
    for (b, c), p in zip(grid, ps, strict=True):
        m = b + c
        exact = sum(math.comb(m, j) for j in range(b, m + 1)) / 2**m
        assert p == pytest.approx(exact, rel=1e-9) and paired_drop_p(b, c) == pytest.approx(exact, rel=1e-9)
    assert paired_drop_p(0, 0) == 1.0 and paired_drop_p(150, 0) == pytest.approx(2.0**-150)
    rng = np.random.default_rng(0)
    base = rng.random((48, 4)) < 0.7
    now = base.copy()
    assert mcnemar_p(base, now) == 1.0  # reproduced bit for bit: no evidence of a drop
    now[0] = ~now[0]  # flip one prompt's samples: losses and gains as counted
    losses, gains = int((base[0] & ~now[0]).sum()), int((~base[0] & now[0]).sum())
    assert mcnemar_p(base, now) == pytest.approx(paired_drop_p(losses, gains))
    assert sign_test_p([0.5, 0.5, 1.0, 0.2], [0.5, 0.0, 1.0, 0.1]) == pytest.approx(0.25)  # 2 falls, 0 rises


def test_holm_step_down():
    """The k-th smallest p is tested at alpha / (m - k + 1) until one passes: it rejects everything Bonferroni
    rejects, sometimes more, never a gate after the first that passes."""
    rej, level, step = holm([0.004, 0.03, 0.011, 0.5], 0.05)
    assert step.tolist() == [1, 3, 2, 4]
    assert level.tolist() == pytest.approx([0.0125, 0.025, 0.05 / 3, 0.05])
    assert rej.tolist() == [True, False, True, False]  # Bonferroni (0.0125) rejects only the first
    assert holm([0.02, 0.021], 0.04)[0].tolist() == [
        False,
        False,
    ]  # first step fails: stop, although 0.021 < 0.04
    rng = np.random.default_rng(0)
    p = rng.random((500, 7)) ** 3
    rej = holm(p, 0.05)[0]
    assert (rej >= (p < 0.05 / 7)).all() and (rej.sum(-1) > (p < 0.05 / 7).sum(-1)).any()
    assert (rej.any(-1) == (p < 0.05 / 7).any(-1)).all()  # same first step: flags a run iff Bonferroni does


def fake(
    solved: int,
    n: int = 400,
    tpf: float = 8.0,
    accept: float = 0.7,
    speedup: float = 1.5,
    K: int = 16,
    bits: np.ndarray | None = None,
):
    """SamplerMetrics of `n` samples (4 per prompt); with `bits` [n] also the per-sample solved bits (2 tasks)."""
    if bits is not None:
        solved, n = int(bits.sum()), bits.size
    rate = solved / n
    return SamplerMetrics(
        sampler="lossless" if K else "ar",
        block_size=K,
        n_prompts=n // 4,
        n_samples=n,
        solved=solved,
        solve_rate=rate,
        solve_ci95=wilson(solved, n),
        reward_mean=rate,
        reward_std=math.sqrt(rate * (1 - rate)),
        reward_ci95=(0.0, 1.0),
        pass_at_k={"4": rate},
        pass_at_k_std={"4": 0.3},
        per_task={},
        mean_length=60.0,
        tokens_per_forward=tpf,
        accept_rate=accept,
        accept_by_position=[accept] * K,
        tok_per_s=100.0 * speedup,
        tok_per_s_runs=[100.0 * speedup],
        speedup_vs_ar=speedup,
        speedup_runs=[speedup],
        rewards_binary=bits is not None,
        solved_bits=None
        if bits is None
        else {t: bits_string(b.reshape(-1, 4)) for t, b in zip(("t1", "t2"), np.split(bits, 2), strict=True)},
    )


def failed(base: dict, now: dict, **tol) -> set[str]:
    return {c.name for c in compare(base, now, ToleranceConfig(**tol)) if c.failed}


def test_gates_flag_drops_only():
    """Unpaired fallback (no per-sample bits) and the relative gates."""
    base = {"ar": fake(300, K=0, speedup=1.0), "lossless": fake(300)}
    assert failed(base, base) == set()
    assert failed(base, {"ar": fake(340, K=0), "lossless": fake(340, tpf=9.0, speedup=2.0)}) == set()  # rises
    drop = failed(base, {"ar": fake(200, K=0, speedup=1.0), "lossless": fake(300)})
    assert {"ar/solve_rate", "ar/reward_mean"} <= drop and not any(n.startswith("lossless") for n in drop)
    # significant (n large) but below min_effect: not a regression
    big = {"ar": fake(30000, n=40000, K=0, speedup=1.0)}
    assert failed(big, {"ar": fake(29200, n=40000, K=0, speedup=1.0)}, min_effect=0.05) == set()
    assert "ar/solve_rate" in failed(big, {"ar": fake(29200, n=40000, K=0, speedup=1.0)}, min_effect=0.0)
    assert failed(base, {**base, "lossless": fake(300, tpf=7.0, accept=0.6)}) == {
        "lossless/tokens_per_forward",
        "lossless/accept_rate",
    }
    slow = {**base, "lossless": fake(300, speedup=0.9)}
    assert failed(base, slow, speedup_rel=0.3) == {"lossless/speedup_vs_ar"}
    assert failed(base, slow, speedup_rel=None) == set()


def test_paired_gates_use_the_bits():
    """With bits on both sides: exact paired tests; 0/1 rewards drop the reward_mean gate; a drop the unpaired
    test misses (same rates elsewhere, 15 samples lost and none gained) is flagged; bits on one side only fall
    back to the unpaired tests."""
    rng = np.random.default_rng(0)
    bits = rng.random(400) < 0.75
    base = {"ar": fake(0, K=0, bits=bits)}
    checks = compare(base, base, ToleranceConfig())
    assert {c.metric: c.test for c in checks} == {
        "solve_rate": "McNemar exact",
        "pass@4": "sign exact",
        "t1/solve_rate": "McNemar exact",
        "t2/solve_rate": "McNemar exact",
    }
    assert all(c.p_value == 1.0 and not c.failed for c in checks)
    assert sum("not reached (step 1 passed)" in c.threshold for c in checks) == len(checks) - 1  # Holm stops
    worse = bits.copy()
    # task t1 loses 30 of ~150 solved
    worse[rng.choice(np.flatnonzero(bits[:200]), 30, replace=False)] = False
    drop = failed(base, {"ar": fake(0, K=0, bits=worse)})
    assert {"ar/solve_rate", "ar/t1/solve_rate"} <= drop and "ar/t2/solve_rate" not in drop
    # unpaired: misses
    assert failed({"ar": fake(int(bits.sum()), K=0)}, {"ar": fake(0, K=0, bits=worse)}) == set()
    mixed = compare({"ar": fake(int(bits.sum()), K=0)}, {"ar": fake(0, K=0, bits=worse)}, ToleranceConfig())
    assert {c.test for c in mixed} == {"z unpaired", "Welch unpaired"}
    graded = fake(0, K=0, bits=bits).model_copy(update={"rewards_binary": False})  # partial-credit rewards
    assert "reward_mean" in {c.metric for c in compare({"ar": graded}, {"ar": graded}, ToleranceConfig())}
    assert bits_array(bits_string(bits.reshape(-1, 4)), 4).ravel().tolist() == bits.tolist()


def default_suite() -> tuple[RegressConfig, dict[str, int]]:
    cfg = load_config(RegressConfig, "regress", [])
    return cfg, {t: cfg.prompts_per_task for t in cfg.tasks}


def test_false_alarm_rate_of_an_unchanged_model():
    """Monte Carlo over 2000 simulated nightly runs of the default suite (every sampler, every quality gate, Holm):
    an unchanged model decoded with fresh randomness (both runs independent draws of each sample), or flipping
    10% of samples both ways, raises a false alarm in at most alpha of the runs (+ 3 MC standard errors)."""
    cfg, sizes = default_suite()
    S, P, runs, alpha = len(cfg.samplers), len(cfg.tasks) * cfg.prompts_per_task, 2000, cfg.tolerance.alpha
    slack = 3 * math.sqrt(alpha * (1 - alpha) / runs)
    flat = np.full((S, P), 0.75)
    varied = np.random.default_rng(1).beta(2.0, 0.7, size=(S, P))  # most prompts easy, a few hard
    for p, coupling, paired in [
        (flat, 0.0, True),
        (varied, 0.0, True),
        (varied, 0.9, True),
        (flat, 0.0, False),
    ]:
        rate = simulate_alarm_rate(
            p,
            p,
            cfg.samples_per_prompt,
            sizes,
            cfg.pass_k,
            cfg.tolerance,
            runs=runs,
            coupling=coupling,
            paired=paired,
            seed=3,
        )
        assert rate <= alpha + slack, (coupling, paired, rate)


def test_power_against_a_15_point_drop():
    """A drop of 75% -> 60% on every sampler is flagged in >= 80% of simulated runs even in the worst case for
    pairing (fresh randomness, all prompts alike); when the same seed keeps half the samples' randomness
    (coupling 0.5), the paired tests beat the unpaired ones on a 10-point drop."""
    cfg, sizes = default_suite()
    flat = np.full((len(cfg.samplers), len(cfg.tasks) * cfg.prompts_per_task), 0.75)
    args = (cfg.samples_per_prompt, sizes, cfg.pass_k, cfg.tolerance)
    assert simulate_alarm_rate(flat, flat - 0.15, *args, runs=2000, seed=4) >= 0.8
    paired = simulate_alarm_rate(flat, flat - 0.10, *args, runs=2000, coupling=0.5, seed=5)
    unpaired = simulate_alarm_rate(flat, flat - 0.10, *args, runs=2000, coupling=0.5, paired=False, seed=5)
    assert paired > unpaired + 0.1
