"""Statistics of `blockrl regress`: interval estimates of one run, the baseline comparison with its gates, and a
seeded simulation of those gates (false-alarm rate and power of the default suite).

Interval estimates: Wilson for solve rates, a prompt-level (cluster) bootstrap for the mean reward, since samples
of one prompt are correlated, and the unbiased pass@k estimator from n samples per prompt (Chen et al. 2021,
`1 - C(n-c, k) / C(n, k)`).

Gates. A regression is a drop; a rise never fails.
- Quality, paired (the baseline stores every sample's solved bit). Baseline and current run decode the same prompts
  with the same seeds, so sample i of one run is paired with sample i of the other. Solve rate, overall and per
  task: McNemar's exact one-sided test. Given the m discordant pairs, the number solved before and failed now is
  Binomial(m, 1/2) if nothing dropped, whatever each prompt's difficulty. pass@k: the same exact sign test over
  prompts (prompts whose pass@k fell vs rose). Under an unchanged model with fresh randomness (another machine)
  the two runs' samples are exchangeable, so both tests are exact; on the same machine an unchanged checkpoint
  reproduces every bit (no discordant pair, p = 1).
- Quality, unpaired fallback (a baseline without bits): pooled two-proportion z-test for rates, Welch for means.
- The mean reward is gated (Welch) only when some reward is not 0/1; otherwise it is the solve rate again.
- All quality gates of the run form one family: Holm's step-down at `alpha` (the k-th smallest p of m is tested at
  alpha / (m - k + 1), stopping at the first that passes), so the whole run raises a false alarm with probability
  at most alpha. Holm flags a regression exactly when Bonferroni would (same first step) and names more of the
  failing gates. A gate fails only if its drop also exceeds `min_effect` (absolute).
- Acceptance (tokens per forward, accept rate) and throughput (speed-up over the engine's AR path, measured in the
  same run): relative tolerances, since timings are noisy and acceptance is a smooth function of the model.

The simulation of these gates (false-alarm rate and power of a suite) is in trainers/regress/simulate.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import Field

from common.config import Section


class ToleranceConfig(Section):
    """When a drop against the baseline counts as a regression."""

    alpha: float = Field(0.01, gt=0.0, lt=1.0)
    """family-wise false-alarm level of all quality gates together (Holm step-down)."""
    min_effect: float = Field(0.05, ge=0.0, le=1.0)
    """smallest absolute drop of a rate/reward/pass@k that can fail, however significant."""
    per_task: bool = True
    """also gate the solve rate of each task (more gates in the Holm family)."""
    tpf_rel: float | None = Field(0.10, ge=0.0, le=1.0)
    """relative drop of tokens per forward and of the accept rate that fails (null = not gated)."""
    speedup_rel: float | None = Field(0.40, ge=0.0, le=1.0)
    """relative drop of tok/s vs the engine AR path that fails (null = not gated; timings are noisy)."""
    min_speedup: float | None = Field(0.95, ge=0.0)
    """floor on every gated sampler's tok/s vs the engine AR path of the same run, baseline or not: block decoding
    must not cost speed (1.0x less 5% timing noise; null = not gated)."""


# ------------------------------------------------------------------------------------------------ estimates
_erfc = np.vectorize(math.erfc, otypes=[float])


def normal_cdf(z):
    """Standard normal CDF; scalar in, float out; array in, array out."""
    out = 0.5 * _erfc(-np.asarray(z, dtype=float) / math.sqrt(2.0))
    return float(out) if out.ndim == 0 else out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_table(n: int, k: int) -> np.ndarray:
    """[n + 1]: pass@k for c = 0..n correct samples (index it with per-prompt counts)."""
    return np.array([pass_at_k(n, c, k) for c in range(n + 1)])


def bootstrap_mean_ci(
    values: np.ndarray, level: float = 0.95, reps: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of the mean of `values` [P, n], resampling rows (prompts) with replacement."""
    rng = np.random.default_rng(seed)
    P = values.shape[0]
    idx = rng.integers(0, P, size=(reps, P))
    means = values[idx].mean(axis=(1, 2))
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ tests
@lru_cache(maxsize=8)
def _half_binomial_tail(m_max: int) -> np.ndarray:
    """[m_max + 1, m_max + 2]: P(Binomial(m, 1/2) >= b) at [m, b] (Pascal's rule in float64, 0 past b > m)."""
    table = np.zeros((m_max + 1, m_max + 2))
    pmf = np.ones(1)
    for m in range(m_max + 1):
        if m:
            pmf = 0.5 * (np.r_[pmf, 0.0] + np.r_[0.0, pmf])
        table[m, : m + 1] = np.cumsum(pmf[::-1])[::-1]
    return table


def paired_drop_p(losses, gains):
    """One-sided exact p of H0 "no drop" from discordant pairs: P(Binomial(losses + gains, 1/2) >= losses).
    losses: pairs solved before and failed now; gains: the reverse. Equal shapes; no discordant pair gives 1."""
    losses, gains = np.asarray(losses, dtype=np.int64), np.asarray(gains, dtype=np.int64)
    m = losses + gains
    top = int(m.max()) if m.size else 0
    p = _half_binomial_tail(max(64, 1 << top.bit_length()))[m, losses]
    return float(p) if p.ndim == 0 else p


def mcnemar_p(base, now):
    """McNemar's exact one-sided test on solved bits `base`, `now` [..., P, n] of the same samples."""
    base, now = np.asarray(base, dtype=bool), np.asarray(now, dtype=bool)
    return paired_drop_p((base & ~now).sum((-2, -1)), (~base & now).sum((-2, -1)))


def sign_test_p(base, now):
    """Exact one-sided sign test on paired per-prompt values `base`, `now` [..., P] (ties dropped)."""
    base, now = np.asarray(base), np.asarray(now)
    return paired_drop_p((now < base).sum(-1), (now > base).sum(-1))


def two_proportion_p(k_base, n_base, k_now, n_now):
    """One-sided p-value of H0 "the rate did not drop" (pooled two-proportion z-test); broadcasts."""
    k_base, k_now = np.asarray(k_base, dtype=float), np.asarray(k_now, dtype=float)
    pool = (k_base + k_now) / (n_base + n_now)
    se = np.sqrt(pool * (1 - pool) * (1 / n_base + 1 / n_now))
    z = np.divide(k_now / n_now - k_base / n_base, se, out=np.zeros_like(se), where=se > 0)
    p = np.where(se > 0, normal_cdf(z), 0.5)  # se 0: both all-solved or all-failed, identical rates
    return float(p) if p.ndim == 0 else p


def welch_p(mean_base, sd_base, n_base, mean_now, sd_now, n_now):
    """One-sided p-value of H0 "the mean did not drop" (Welch z-test; n is large here); broadcasts."""
    diff = np.asarray(mean_now, dtype=float) - mean_base
    se = np.sqrt(
        np.asarray(sd_base, dtype=float) ** 2 / n_base + np.asarray(sd_now, dtype=float) ** 2 / n_now
    )
    z = np.divide(diff, se, out=np.zeros_like(diff * se), where=se > 0)
    p = np.where(se > 0, normal_cdf(z), np.where(diff >= 0, 0.5, 0.0))
    return float(p) if p.ndim == 0 else p


def holm(p_values, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Holm's step-down over the last axis of `p_values` [..., m]: (rejected [..., m] bool, level [..., m] each
    gate's level, step [..., m] its 1-based rank). The k-th smallest p is tested at alpha / (m - k + 1); testing
    stops at the first that is not below its level, and nothing after it is rejected."""
    p = np.asarray(p_values, dtype=float)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    levels = np.broadcast_to(alpha / (m - np.arange(m)), p.shape)
    passed = np.cumprod(np.take_along_axis(p, order, -1) < levels, axis=-1).astype(bool)
    rejected, level, step = np.empty_like(passed), np.empty_like(p), np.empty(p.shape, dtype=np.int64)
    np.put_along_axis(rejected, order, passed, -1)
    np.put_along_axis(level, order, levels, -1)
    np.put_along_axis(step, order, np.broadcast_to(np.arange(1, m + 1), p.shape), -1)
    return rejected, level, step


def bits_array(bits: str, n: int) -> np.ndarray:
    """'0'/'1' string, prompt-major -> [P, n] bool."""
    return (np.frombuffer(bits.encode("ascii"), dtype=np.uint8) == ord("1")).reshape(-1, n)


def bits_string(solved: np.ndarray) -> str:
    """[P, n] bool -> '0'/'1' string, prompt-major (sample j of prompt i at i * n + j)."""
    return (np.asarray(solved, dtype=bool).ravel().astype(np.uint8) + ord("0")).tobytes().decode("ascii")


# ------------------------------------------------------------------------------------------------ gates
@dataclass(frozen=True)
class BitGates:
    """Quality gates computed from solved bits; arrays carry the leading axes of the bits (none for one run)."""

    names: list[str]
    tests: list[str]  # test of each gate
    p_value: np.ndarray  # [..., m]
    baseline: np.ndarray  # [..., m]
    now: np.ndarray  # [..., m]


def bit_gates(
    base, now, task_sizes: Mapping[str, int], pass_k: Sequence[int], paired: bool = True
) -> BitGates:
    """Solve rate, pass@k and (when `task_sizes`) per-task solve-rate gates from solved bits `base`, `now`
    [..., P, n] of the same suite (task t = the next task_sizes[t] prompts). `paired` uses the exact paired
    tests; otherwise the unpaired fallback on the same bits' summaries (what a baseline without bits gets)."""
    base, now = np.asarray(base, dtype=bool), np.asarray(now, dtype=bool)
    P, n = base.shape[-2:]
    names, tests, ps, bv, nv = [], [], [], [], []

    def rate_gate(name: str, b: np.ndarray, c: np.ndarray) -> None:
        N = b.shape[-1] * b.shape[-2]
        kb, kc = b.sum((-2, -1)), c.sum((-2, -1))
        p = mcnemar_p(b, c) if paired else two_proportion_p(kb, N, kc, N)
        names.append(name), tests.append("McNemar exact" if paired else "z unpaired")
        ps.append(p), bv.append(kb / N), nv.append(kc / N)

    rate_gate("solve_rate", base, now)
    for k in pass_k:
        table = pass_at_k_table(n, k)
        a, c = table[base.sum(-1)], table[now.sum(-1)]  # [..., P]
        if paired:
            p = sign_test_p(a, c)
        else:
            p = welch_p(a.mean(-1), a.std(-1, ddof=1), P, c.mean(-1), c.std(-1, ddof=1), P)
        names.append(f"pass@{k}"), tests.append("sign exact" if paired else "Welch unpaired")
        ps.append(p), bv.append(a.mean(-1)), nv.append(c.mean(-1))
    start = 0
    for task, size in task_sizes.items():
        rate_gate(f"{task}/solve_rate", base[..., start : start + size, :], now[..., start : start + size, :])
        start += size
    if start not in (0, P):
        raise ValueError(f"task_sizes {dict(task_sizes)} add up to {start} prompts, the bits have {P}")
    stack = lambda xs: np.stack([np.asarray(x, dtype=float) for x in xs], axis=-1)  # noqa: E731
    return BitGates(names, tests, stack(ps), stack(bv), stack(nv))


def gate_decisions(p_values, drops, tol: ToleranceConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quality gates [..., m] of one run (the whole family): (failed, Holm level, Holm step)."""
    rejected, level, step = holm(p_values, tol.alpha)
    return rejected & (np.asarray(drops) > tol.min_effect), level, step


@dataclass(frozen=True)
class Check:
    """One gate of the comparison: `sampler/metric: baseline vs now`, with its p-value or relative change."""

    sampler: str
    metric: str
    baseline: float
    now: float
    failed: bool
    p_value: float | None = None  # quality gates
    threshold: str = ""  # what failing means, e.g. "Holm 1/18: p < 0.00056 and drop > 0.05" or "drop > 10%"
    test: str = ""  # quality gates: "McNemar exact", "sign exact", "z unpaired", "Welch unpaired"

    @property
    def name(self) -> str:
        return f"{self.sampler}/{self.metric}"

    def describe(self) -> str:
        s = f"{self.name}: baseline {self.baseline:.4g} vs now {self.now:.4g}"
        if self.p_value is not None:
            s += f", p={self.p_value:.2g} ({self.test})"
        else:
            s += f", {100 * (self.now / self.baseline - 1) if self.baseline else 0.0:+.1f}%"
        return s + f" (fails if {self.threshold})"


@dataclass(frozen=True)
class QualityTest:
    """A quality gate before the Holm levels are known."""

    sampler: str
    metric: str
    baseline: float
    now: float
    p_value: float
    test: str


def _paired_bits(base, now) -> tuple[np.ndarray, np.ndarray, dict[str, int]] | None:
    """[P, n] solved bits of both runs and the prompts per task, or None if either lacks them or they differ."""
    if base.solved_bits is None or now.solved_bits is None:
        return None
    shape = {t: len(s) for t, s in now.solved_bits.items()}
    n = now.n_samples // max(1, now.n_prompts)
    if shape != {t: len(s) for t, s in base.solved_bits.items()} or any(v % n for v in shape.values()):
        return None
    b = np.concatenate([bits_array(s, n) for s in base.solved_bits.values()])
    c = np.concatenate([bits_array(now.solved_bits[t], n) for t in base.solved_bits])
    return b, c, {t: v // n for t, v in shape.items()}


def quality_tests(name: str, base, now, tol: ToleranceConfig) -> list[QualityTest]:
    """Quality gates of one sampler; `base` and `now` are `SamplerMetrics` of the same suite."""
    ks = [int(k) for k in now.pass_at_k]
    paired = _paired_bits(base, now)
    tests = []
    if paired is not None:
        b, c, sizes = paired
        g = bit_gates(b, c, sizes if tol.per_task else {}, ks)
        tests += [
            QualityTest(name, m, float(g.baseline[i]), float(g.now[i]), float(g.p_value[i]), g.tests[i])
            for i, m in enumerate(g.names)
        ]
    else:
        tests.append(
            QualityTest(
                name,
                "solve_rate",
                base.solve_rate,
                now.solve_rate,
                two_proportion_p(base.solved, base.n_samples, now.solved, now.n_samples),
                "z unpaired",
            )
        )
        for k in ks:
            if str(k) in base.pass_at_k:
                b, c = base.pass_at_k[str(k)], now.pass_at_k[str(k)]
                p = welch_p(
                    b, base.pass_at_k_std[str(k)], base.n_prompts, c, now.pass_at_k_std[str(k)], now.n_prompts
                )
                tests.append(QualityTest(name, f"pass@{k}", b, c, p, "Welch unpaired"))
        for task, t in now.per_task.items() if tol.per_task else ():
            if task in base.per_task:
                b = base.per_task[task]
                p = two_proportion_p(b.solved, b.n, t.solved, t.n)
                tests.append(QualityTest(name, f"{task}/solve_rate", b.rate, t.rate, p, "z unpaired"))
    if not (base.rewards_binary and now.rewards_binary):  # 0/1 rewards: reward_mean is solve_rate again
        p = welch_p(
            base.reward_mean, base.reward_std, base.n_samples, now.reward_mean, now.reward_std, now.n_samples
        )
        tests.append(QualityTest(name, "reward_mean", base.reward_mean, now.reward_mean, p, "Welch unpaired"))
    return tests


def relative_check(name: str, metric: str, base: float, now: float, rel: float) -> Check:
    return Check(name, metric, base, now, failed=now < base * (1 - rel), threshold=f"drop > {rel:.0%}")


def floor_check(name: str, metric: str, floor: float, now: float) -> Check:
    """An absolute gate: `now` must reach `floor` (reported in the baseline column)."""
    return Check(name, metric, floor, now, failed=now < floor, threshold=f"below {floor:g}")


def compare(baseline: dict, current: dict, tol: ToleranceConfig) -> list[Check]:
    """All gates, for samplers present in both {name: SamplerMetrics} maps (new samplers have no baseline yet)."""
    common = [s for s in current if s in baseline]
    tests = [t for s in common for t in quality_tests(s, baseline[s], current[s], tol)]
    checks = []
    if tests:
        m, p = len(tests), np.array([t.p_value for t in tests])
        failed, level, step = gate_decisions(p, [t.baseline - t.now for t in tests], tol)
        stop = int(step[p >= level].min()) if (p >= level).any() else m + 1  # first Holm step that passed

        def threshold(i: int) -> str:
            cond = f"p < {level[i]:.2g}" if step[i] <= stop else f"not reached (step {stop} passed)"
            return f"Holm {step[i]}/{m}: {cond} and drop > {tol.min_effect:g}"

        checks = [
            Check(
                t.sampler,
                t.metric,
                t.baseline,
                t.now,
                failed=bool(failed[i]),
                p_value=t.p_value,
                test=t.test,
                threshold=threshold(i),
            )
            for i, t in enumerate(tests)
        ]
    for s in common:
        b, n = baseline[s], current[s]
        if n.block_size == 0 or b.block_size == 0:  # ar: one token per forward, nothing to accept
            continue
        if tol.tpf_rel is not None:
            checks.append(
                relative_check(
                    s, "tokens_per_forward", b.tokens_per_forward, n.tokens_per_forward, tol.tpf_rel
                )
            )
            checks.append(relative_check(s, "accept_rate", b.accept_rate, n.accept_rate, tol.tpf_rel))
        if tol.speedup_rel is not None:
            checks.append(
                relative_check(s, "speedup_vs_ar", b.speedup_vs_ar, n.speedup_vs_ar, tol.speedup_rel)
            )
    return checks


def median(xs: Sequence[float]) -> float:
    return float(np.median(np.asarray(xs, dtype=float))) if len(xs) else 0.0
