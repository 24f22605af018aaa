"""Measured cost model: decode-step cost vs (batch, sampler/levels) on this device, plus the live acceptance curve,
projecting tokens/s for each option; `choose` is what `sampler="auto"` uses.

Block decoding pays only where a forward's cost grows slowly with its query length (docs/architecture.md, "Regimes"), so
nothing is assumed: step costs are timed here, on this device, through the engine's own decode step (forward +
verify + book-keeping), and the acceptance curve is observed live.

Projection. With c_i = P(na >= i) measured at full draft length, the level set decides how many drafts a step has:
after a step that accepted s, the closest-below proposal p(s) leaves n(s) = K - s + p(s) drafts. That makes na a
Markov chain, P(na >= i | n) = c_i for i <= n (else 0); its stationary law gives tokens per step E[na] + 1, and

    projected tokens/s = B * tokens_per_step / step_seconds(B, levels).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rollout.types import END, Option, split_levels

# (option, max_batch) -> an engine running that option; `auto` and the calibration build engines through one
EngineFactory = Callable[[Option, int], "object"]


@dataclass
class AcceptanceStats:
    """Acceptance curve from decode steps, as a Kaplan-Meier estimate: a step that had n drafts and accepted na
    puts positions 1..min(na+1, n) at risk and rejects position na+1 when na < n (na == n is censored, since fewer
    drafts than K were offered). This stays unbiased when levels leave some steps with short drafts."""

    block_size: int
    at_risk: np.ndarray = None  # [K+1], index i = draft position (0 unused)
    rejected: np.ndarray = None  # [K+1]
    steps: int = 0

    def __post_init__(self):
        if self.at_risk is None:
            self.at_risk = np.zeros(self.block_size + 1)
            self.rejected = np.zeros(self.block_size + 1)

    def observe(self, accept_counts: Sequence[int], draft_counts: Sequence[int]) -> None:
        for na, n in zip(accept_counts, draft_counts, strict=True):
            n = min(int(n), self.block_size)
            self.at_risk[1 : min(na + 1, n) + 1] += 1
            if na < n:
                self.rejected[na + 1] += 1
            self.steps += 1

    def survival(self) -> np.ndarray:
        """c_i = P(na >= i) with K drafts, i = 0..K (c_0 = 1)."""
        hazard = np.divide(
            self.rejected, self.at_risk, out=np.ones_like(self.rejected), where=self.at_risk > 0
        )
        hazard[0] = 0.0
        return np.cumprod(1.0 - hazard)

    def acceptance_by_position(self) -> list[float]:
        """P(draft i accepted | drafts 1..i-1 accepted), i = 1..K."""
        c = self.survival()
        return [float(c[i] / c[i - 1]) if c[i - 1] > 0 else 0.0 for i in range(1, len(c))]


def tokens_per_step(survival: np.ndarray, levels: Sequence[int | str]) -> float:
    """Expected committed tokens per decode step under `levels` (stationary law of the draft-count chain).

    State n = drafts a step carries. It accepts na = a with P(na >= i) = c_i (i <= n), and leaves the next step
    n' = K - a + p(a) drafts, p(a) the largest level <= a among those the step evaluates (the fixed levels <= n,
    plus n itself when the draft's end is a level)."""
    K = len(survival) - 1
    fixed, tail = split_levels(levels)
    if not fixed:  # ar
        return 1.0
    lv = sorted(fixed)
    P = np.zeros((K + 1, K + 1))  # P[n, n']
    mean_na = np.zeros(K + 1)  # E[na | n]
    for n in range(K + 1):
        c = np.r_[survival[: n + 1], 0.0]
        law = c[:-1] - c[1:]  # P(na = a), a = 0..n
        step = [p for p in lv if p <= n] + ([n] if tail else [])
        for a in range(n + 1):
            P[n, K - a + max(p for p in step if p <= a)] += law[a]
        mean_na[n] = law @ np.arange(n + 1)
    pi, avg = np.zeros(K + 1), np.zeros(K + 1)
    pi[K] = 1.0  # a prefill leaves K drafts
    for _ in range(
        500
    ):  # the running mean converges even where the chain is periodic (e.g. [0], all accepted)
        avg += pi / 500
        pi = pi @ P
    return float(avg @ mean_na) + 1.0


def default_options(block_size: int) -> list[Option]:
    """`auto`'s candidates: ar, and lossless at a few level sets, with and without the draft's end (`END`)."""
    K = block_size
    sets = [
        (0,),
        (0, K // 4, K // 2),
        (0, K // 4, K // 2, 3 * K // 4),
        tuple(range(0, K + 1, max(1, K // 8))),
    ]
    fixed = sorted({tuple(sorted(set(s))) for s in sets}, key=len)
    tails = [] if K < 2 else [(0, END), (0, K // 2, END)]
    return [Option("ar"), *[Option("lossless", s) for s in fixed + tails]]


@dataclass
class CostModel:
    """Step seconds per (option, batch) measured on this device, and the live acceptance curve."""

    block_size: int
    step_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    prefill_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    acceptance: AcceptanceStats = None

    def __post_init__(self):
        if self.acceptance is None:
            self.acceptance = AcceptanceStats(self.block_size)

    def calibrate(
        self,
        make_engine: EngineFactory,
        options: Sequence[Option],
        batch_sizes: Sequence[int],
        prompt_len: int = 64,  # the mean context of a built-in-task rollout (prompt ~30 + half a ~70-token answer)
        steps: int = 6,
        repeats: int = 3,
        tails: bool = False,
    ) -> None:
        """Time real engine steps (median over repeats) per option and batch size: one decode step, and the
        prefill of that many prompts. `tails` also times the smaller batches a run passes through as its rows
        finish (B/2, B/4, 1), and single-row prefills (continuous batching refills rows one at a time)."""
        g = torch.Generator().manual_seed(0)
        sizes = set(batch_sizes)
        if tails:
            sizes |= {max(1, b // d) for b in batch_sizes for d in (2, 4)} | {1}
        V = make_engine(options[0], 1).vocab_size
        for B in sorted(sizes):
            # ragged lengths, as in real batches (a uniform batch would time the no-mask fast path)
            prompts = [
                torch.randint(4, max(5, V - 2), (prompt_len - (7 * i) % 24,), generator=g).tolist()
                for i in range(B)
            ]
            for opt in options:
                eng = make_engine(opt, B)
                times = [eng.time_decode_steps(prompts, steps) for _ in range(repeats)]
                self.step_seconds[(opt.name, B)] = statistics.median(t[1] for t in times)
                self.prefill_seconds[(opt.name, B)] = statistics.median(t[0] for t in times)

    def step_cost(self, opt: Option, b: int) -> float:
        """Seconds of one decode step with b active rows: linear between the calibrated batch sizes."""
        pts = sorted(n for (name, n) in self.step_seconds if name == opt.name)
        return float(np.interp(b, pts, [self.step_seconds[(opt.name, n)] for n in pts]))

    def prefill_cost(self, opt: Option, rows: int) -> float:
        pts = sorted(n for (name, n) in self.prefill_seconds if name == opt.name)
        return float(np.interp(rows, pts, [self.prefill_seconds[(opt.name, n)] for n in pts]))

    def project(self, opt: Option, batch_size: int) -> float:
        """Projected steady-state tokens/s of `opt` with `batch_size` busy rows (0 if not calibrated)."""
        sec = self.step_seconds.get((opt.name, batch_size))
        if not sec:
            return 0.0
        tps = tokens_per_step(self.acceptance.survival(), opt.levels) if opt.sampler != "ar" else 1.0
        return batch_size * tps / sec

    def project_run(
        self,
        opt: Option,
        batch_size: int,
        lengths: Sequence[int],
        acceptance: AcceptanceStats | None = None,
    ) -> float:
        """Projected tokens/s of a whole `generate` call over prompts whose completions have `lengths`.

        Replays the engine's schedule: a first prefill of `batch_size` rows (it emits one token per row), decode
        steps in which every active row commits tokens_per_step tokens, a one-row prefill per refilled slot, and
        the tail in which the batch drains. Step and prefill costs are the calibrated ones at each active count.
        """
        if (opt.name, batch_size) not in self.step_seconds:
            return 0.0
        acc = acceptance or self.acceptance
        tps = tokens_per_step(acc.survival(), opt.levels) if opt.sampler != "ar" else 1.0
        steps_left = [max(0.0, (n - 1) / tps) for n in lengths]  # decode steps each prompt needs
        queue = list(range(len(lengths)))[::-1]
        active = [queue.pop() for _ in range(min(batch_size, len(queue)))]
        seconds = self.prefill_cost(opt, len(active))
        remaining = {i: steps_left[i] for i in active}
        while remaining:
            dt = min(remaining.values())  # advance to the next finishing row
            whole = max(1.0, np.ceil(dt)) if dt > 0 else 0.0
            seconds += whole * self.step_cost(opt, len(remaining))
            for i in list(remaining):
                remaining[i] -= whole
                if remaining[i] <= 1e-9:
                    del remaining[i]
                    if queue:
                        j = queue.pop()
                        seconds += self.prefill_cost(opt, 1)
                        remaining[j] = steps_left[j]
        return sum(lengths) / seconds

    def choose(self, options: Sequence[Option], batch_size: int) -> Option:
        """Best projected option; `ar` unless a speculative option is projected faster (never slower than AR)."""
        best = max(options, key=lambda o: self.project(o, batch_size))
        ar = next((o for o in options if o.sampler == "ar"), None)
        if ar is not None and self.project(best, batch_size) <= self.project(ar, batch_size):
            return ar
        return best
