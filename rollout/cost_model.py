"""Measured cost model: decode-step cost vs (batch, sampler/levels) on this device, plus the live acceptance curve,
projecting tokens/s for each option; `choose` is what `sampler="auto"` uses.

Block decoding pays only where a forward's cost grows slowly with its query length (docs/architecture.md, "Regimes"), so
nothing is assumed: step costs are timed here, on this device, through the engine's own decode step (forward +
verify + book-keeping), and the acceptance curve is observed live.

Projection. With c_i = P(na >= i) measured at full draft length, the level set decides how many drafts a step has:
after a step that accepted s, the closest-below proposal p(s) leaves n(s) = K - s + p(s) drafts. That makes na a
Markov chain, P(na >= i | n) = c_i for i <= n (else 0), with one curve for steps after a rejection and one for the
rest (`AcceptanceStats`); its stationary law gives tokens per step E[na] + 1, and

    projected tokens/s = B * tokens_per_step / step_seconds(B, levels).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rollout.types import END, Option, Trajectory, split_levels

# (option, max_batch) -> an engine running that option; `auto` and the calibration build engines through one
EngineFactory = Callable[[Option, int], "object"]


@dataclass
class KMCurve:
    """Kaplan-Meier counts of one set of decode steps: position i at risk / rejected, i = 1..K (0 unused)."""

    at_risk: np.ndarray
    rejected: np.ndarray

    def observe(self, na: int, n: int) -> None:
        self.at_risk[1 : min(na + 1, n) + 1] += 1
        if na < n:
            self.rejected[na + 1] += 1

    def hazard(self) -> np.ndarray:
        return np.divide(self.rejected, self.at_risk, out=np.ones_like(self.rejected), where=self.at_risk > 0)

    def decay(self, keep: float) -> None:
        """Weigh what was seen so far by `keep` (a live curve follows a drafter and policy that change)."""
        self.at_risk *= keep
        self.rejected *= keep


def km_survival(hazard: np.ndarray) -> np.ndarray:
    h = hazard.copy()
    h[0] = 0.0
    return np.cumprod(1.0 - h)


@dataclass
class AcceptanceStats:
    """Acceptance curve from decode steps, as a Kaplan-Meier estimate: a step that had n drafts and accepted na
    puts positions 1..min(na+1, n) at risk and rejects position na+1 when na < n (na == n is censored, since fewer
    drafts than K were offered). This stays unbiased when levels leave some steps with short drafts.

    Steps are also split by what came before them (`observe` takes one trajectory's steps in order): a step after
    a rejection drafts from a proposal that guessed the rejected position wrong (the correction token is never in
    its context), so its drafts are accepted less often than those after a step that accepted everything (or
    after the prefill). `survival("fresh")` and `survival("stale")` are the two curves; each falls back to the
    pooled one at positions it has not seen."""

    block_size: int
    steps: int = 0
    curves: dict[str, KMCurve] = field(default_factory=dict)

    def __post_init__(self):
        for k in ("all", "fresh", "stale"):
            self.curves.setdefault(k, KMCurve(np.zeros(self.block_size + 1), np.zeros(self.block_size + 1)))

    def observe(self, accept_counts: Sequence[int], draft_counts: Sequence[int]) -> None:
        """One trajectory's decode steps, in order."""
        state = "fresh"  # the prefill's proposal: nothing rejected before it
        for na, n in zip(accept_counts, draft_counts, strict=True):
            n = min(int(n), self.block_size)
            self.curves["all"].observe(na, n)
            self.curves[state].observe(na, n)
            state = "fresh" if na >= n else "stale"
            self.steps += 1

    def survival(self, state: str = "all") -> np.ndarray:
        """c_i = P(na >= i) with K drafts, i = 0..K (c_0 = 1), over all steps or those after a full acceptance
        ("fresh") or after a rejection ("stale")."""
        pooled = self.curves["all"].hazard()
        if state == "all":
            return km_survival(pooled)
        c = self.curves[state]
        return km_survival(np.where(c.at_risk > 0, c.hazard(), pooled))

    def acceptance_by_position(self, state: str = "all") -> list[float]:
        """P(draft i accepted | drafts 1..i-1 accepted), i = 1..K (over the steps `survival(state)` covers)."""
        c = self.survival(state)
        return [float(c[i] / c[i - 1]) if c[i - 1] > 0 else 0.0 for i in range(1, len(c))]


@dataclass(frozen=True)
class ChainStats:
    """Stationary means of the draft-count chain (`draft_chain`). Queries count past the anchor."""

    tokens_per_step: float  # E[na] + 1
    queries: float = 0.0  # E[Q]: a one-row step's mean queries (its verified drafts plus its proposal blocks)
    full_queries: int = 0  # the full layout's (`step_queries` at n = K; 0 for ar)
    base_queries: int = 0  # the draft-less layout's (at n = 0: the level-0 and end blocks)

    def share(self, base: int) -> float:
        """Where the mean step lies between a layout of `base` queries (cost c_base) and the full one (c_full):
        the mean step costs c_base + (c_full - c_base) * share, if cost is affine in queries between them."""
        span = self.full_queries - base
        return 1.0 if span <= 0 else min(1.0, max(0.0, (self.queries - base) / span))


def draft_chain(
    survival: np.ndarray, levels: Sequence[int | str], stale: np.ndarray | None = None
) -> ChainStats:
    """Expected committed tokens and queries per decode step under `levels` (stationary law of the chain).

    State (n, after a rejection or not): a step with n drafts accepts na = a with P(na >= i) = c_i (i <= n), from
    `stale` after a rejection and `survival` otherwise (one curve for both when `stale` is None). The next step
    carries n' = K - a + p(a) drafts, p(a) the largest level <= a among those the step evaluates (the fixed levels
    <= n, plus n itself when the draft's end is a level; with none, n' = 0), and follows a rejection iff a < n."""
    K = len(survival) - 1
    fixed, tail = split_levels(levels)
    if not fixed and not tail:  # ar
        return ChainStats(1.0)
    curves = (survival, survival if stale is None else stale)  # index 0: fresh, 1: stale
    S = 2 * (K + 1)  # state index: n + (K+1) * stale
    P = np.zeros((S, S))
    mean_na, queries = np.zeros(S), np.zeros(S)
    for st, curve in enumerate(curves):
        for n in range(K + 1):
            c = np.r_[curve[: n + 1], 0.0]
            law = c[:-1] - c[1:]  # P(na = a), a = 0..n
            step = sorted({p for p in fixed if p <= n} | ({n} if tail else set()))
            queries[n + (K + 1) * st] = step_queries(K, levels, n)
            for a in range(n + 1):
                p = max((p for p in step if p <= a), default=None)  # None: no proposal, no draft next step
                nxt = 0 if p is None else K - a + p
                P[n + (K + 1) * st, nxt + (K + 1) * (a < n)] += law[a]
            mean_na[n + (K + 1) * st] = law @ np.arange(n + 1)
    pi, avg = np.zeros(S), np.zeros(S)
    pi[K] = 1.0  # a prefill leaves K fresh drafts
    # the running mean converges even where the chain is periodic (e.g. [0], all accepted)
    for _ in range(500):
        avg += pi / 500
        pi = pi @ P
    return ChainStats(
        float(avg @ mean_na) + 1.0,
        float(avg @ queries),
        step_queries(K, levels, K),
        step_queries(K, levels, 0),
    )


def step_queries(block_size: int, levels: Sequence[int | str], n: int) -> int:
    """Queries past the anchor of a step whose longest draft is n, as `BlockEngine.step_layout(n)` lays it out: the
    n drafts, one block of K+1 per fixed level <= n, and the end block (a block of its own even where n is also a
    fixed level)."""
    fixed, tail = split_levels(levels)
    return n + (block_size + 1) * (sum(p <= n for p in fixed) + bool(tail))


def default_options(block_size: int, drafts: str = "diffusion") -> list[Option]:
    """`auto`'s candidates: ar, and lossless at a few level sets, with and without the draft's end (`END`).
    history: ar and lossless[history]. both: the diffusion sets, history alone, and the first multi-level set with
    both sources (`pilot_options` runs the last two before the cost model chooses); a pass with diffusion drafts is
    laid out for a whole block, so on a task the drafter does not know history alone can be the fastest."""
    if drafts == "history":
        return [Option("ar"), Option("lossless", (), "history")]
    K = block_size
    sets = [
        (0,),
        (0, K // 4, K // 2),
        (0, K // 4, K // 2, 3 * K // 4),
        tuple(range(0, K + 1, max(1, K // 8))),
    ]
    fixed = sorted({tuple(sorted(set(s))) for s in sets}, key=len)
    tails = [(END,), (0, END)] + ([(0, K // 2, END)] if K >= 2 else [])
    if drafts == "both":
        pilot = next(s for s in fixed if len(s) > 1) if len(fixed) > 1 else fixed[0]
        extra = [Option("lossless", pilot, "both"), Option("lossless", (), "history")]
        return [Option("ar"), *[Option("lossless", s, "diffusion") for s in fixed + tails], *extra]
    return [Option("ar"), *[Option("lossless", s, drafts) for s in fixed + tails]]


def pilot_options(options: Sequence[Option]) -> list[Option]:
    """The options `auto` runs before it lets the cost model choose: those with history drafts (whose yield is
    observed, not projected), else the first diffusion option with several levels (for the acceptance curve)."""
    spec = [o for o in options if o.sampler != "ar"]
    hist = [o for o in spec if o.drafts != "diffusion"]
    return hist or [next((o for o in spec if len(o.levels) > 1), spec[0])]


class CalibrationStopped(RuntimeError):
    """`CostModel.calibrate` was told to stop before it had timed everything (its timings so far are partial)."""


@dataclass
class CostModel:
    """Step seconds per (option, batch) measured on this device, and the live acceptance curve."""

    block_size: int
    step_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    prefill_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    # one-row step without drafts, per option: the least a step of that option lays out (`ChainStats.base_queries`)
    draftless_seconds: dict[str, float] = field(default_factory=dict)
    acceptance: AcceptanceStats = None
    # options with history drafts, by name: (tokens committed, decode steps) observed, their tokens per step
    observed: dict[str, list[int]] = field(default_factory=dict)
    # options with history drafts, by (name, rows): (seconds, steps) of their real decode steps. A history pass is
    # laid out by what its rows drafted (`EngineCore._pass_length`), so its cost is measured where it ran, not
    # projected from the full layout
    observed_steps: dict[tuple[str, int], list[float]] = field(default_factory=dict)

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
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Time real engine steps (median over repeats) per option and batch size: one decode step at the full
        layout, and the prefill of that many prompts; at one row also the draft-less step (the layout's least).
        `tails` also times the smaller batches a run passes through as its rows finish (B/2, B/4, 1), and the
        prefills of that many rows (a step's freed slots are refilled together). `stop` is asked before every
        timed probe; when it says True, `CalibrationStopped` is raised (a server shutting down while it starts)."""

        def probe(eng, prompts, draftless=False) -> tuple[float, float]:
            if stop is not None and stop():
                raise CalibrationStopped("calibration stopped")
            return eng.time_decode_steps(prompts, steps, draftless=draftless)

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
                times = [probe(eng, prompts) for _ in range(repeats)]
                self.step_seconds[(opt.name, B)] = statistics.median(t[1] for t in times)
                self.prefill_seconds[(opt.name, B)] = statistics.median(t[0] for t in times)
                if B == 1 and opt.sampler != "ar":
                    bare = [probe(eng, prompts, draftless=True)[1] for _ in range(repeats)]
                    self.draftless_seconds[opt.name] = statistics.median(bare)

    def step_cost(self, opt: Option, b: int, chain: ChainStats | None = None) -> float:
        """Seconds of one decode step with b active rows: linear between the calibrated batch sizes.

        Calibration times the full layout (a step's most queries). A one-row step lays out only what its draft
        reaches, so at b = 1 (given the chain's mean queries) its cost lies between the draft-less step's and the
        full one's, affine in queries; without a draft-less timing, between the AR step's (no query past the
        anchor) and the full one's. A batch's step is laid out for its longest draft, which is nearly always
        full."""
        seen = self.observed_steps.get((opt.name, b))
        if seen and seen[1] >= 8:
            return seen[0] / seen[1]
        pts = sorted(n for (name, n) in self.step_seconds if name == opt.name)
        full = float(np.interp(b, pts, [self.step_seconds[(opt.name, n)] for n in pts]))
        if b != 1 or chain is None or opt.sampler == "ar":
            return full
        if opt.name in self.draftless_seconds:
            bare = self.draftless_seconds[opt.name]
            return bare + (full - bare) * chain.share(chain.base_queries)
        ar = self.step_seconds.get(("ar", 1))
        return full if ar is None else ar + (full - ar) * chain.share(0)

    def prefill_cost(self, opt: Option, rows: int) -> float:
        pts = sorted(n for (name, n) in self.prefill_seconds if name == opt.name)
        return float(np.interp(rows, pts, [self.prefill_seconds[(opt.name, n)] for n in pts]))

    def observe_run(self, t: Trajectory) -> None:
        """One trajectory's decode steps: the diffusion acceptance curve learns only from rows that drafted from
        the drafter alone (history drafts are accepted at another rate); an option with history drafts keeps its
        observed tokens per step."""
        if not t.accept_counts:
            return
        if t.history_steps == 0:
            self.acceptance.observe(t.accept_counts, t.draft_counts)
        if t.sampler.endswith(("[history]", "+history")):
            seen = self.observed.setdefault(t.sampler, [0, 0])
            seen[0] += sum(t.accept_counts) + len(t.accept_counts)
            seen[1] += len(t.accept_counts)

    def observe_steps(self, opt: Option, step_stats: dict[int, list]) -> None:
        """An engine's timed decode steps by row count (`BlockEngine.step_stats`), for an option with history."""
        if opt.drafts == "diffusion":
            return
        for rows, (sec, n) in step_stats.items():
            seen = self.observed_steps.setdefault((opt.name, rows), [0.0, 0])
            seen[0] += sec
            seen[1] += n

    def history_steps(self, opt: Option) -> int:
        """Decode steps observed for an option with history drafts (auto keeps piloting it until it has enough)."""
        return self.observed.get(opt.name, [0, 0])[1]

    def chain(self, opt: Option, acc: AcceptanceStats) -> ChainStats:
        """Tokens and queries per decode step of `opt` under the acceptance `acc` has seen. An option with history
        drafts is projected from its own observed tokens per step, at the full layout's cost (a pass is laid out
        for its longest draft); before it has run, history-only as AR and `both` as its diffusion drafts alone."""
        if opt.sampler == "ar":
            return ChainStats(1.0)
        seen = self.observed.get(opt.name)
        if opt.drafts != "diffusion" and seen and seen[1]:
            return ChainStats(seen[0] / seen[1])
        if opt.drafts == "history":
            return ChainStats(1.0)
        return draft_chain(acc.survival("fresh"), opt.levels, stale=acc.survival("stale"))

    def project(self, opt: Option, batch_size: int) -> float:
        """Projected steady-state tokens/s of `opt` with `batch_size` busy rows (0 if not calibrated)."""
        if (opt.name, batch_size) not in self.step_seconds:
            return 0.0
        chain = self.chain(opt, self.acceptance)
        return batch_size * chain.tokens_per_step / self.step_cost(opt, batch_size, chain)

    def project_run(
        self,
        opt: Option,
        batch_size: int,
        lengths: Sequence[int],
        acceptance: AcceptanceStats | None = None,
    ) -> float:
        """Projected tokens/s of a whole `generate` call over prompts whose completions have `lengths`.

        Replays the engine's schedule: a first prefill of `batch_size` rows (it emits one token per row), decode
        steps in which every active row commits tokens_per_step tokens, one prefill after each step for every slot
        that step freed (`EngineCore.admit` refills them together), and the tail in which the batch drains. Step
        and prefill costs are the calibrated ones at each active count.
        """
        if (opt.name, batch_size) not in self.step_seconds:
            return 0.0
        acc = acceptance or self.acceptance
        chain = self.chain(opt, acc)
        tps = chain.tokens_per_step
        steps_left = [max(0.0, (n - 1) / tps) for n in lengths]  # decode steps each prompt needs
        queue = list(range(len(lengths)))[::-1]
        active = [queue.pop() for _ in range(min(batch_size, len(queue)))]
        seconds = self.prefill_cost(opt, len(active))
        remaining = {i: steps_left[i] for i in active}
        while remaining:
            dt = min(remaining.values())  # advance to the next finishing row
            whole = max(1.0, np.ceil(dt - 1e-9)) if dt > 0 else 0.0  # float error must not add a step
            seconds += whole * self.step_cost(opt, len(remaining), chain)
            done = {i for i in remaining if remaining[i] - whole <= 1e-9}
            remaining = {i: r - whole for i, r in remaining.items() if i not in done}
            refill = [queue.pop() for _ in range(min(len(done), len(queue)))]
            if refill:
                seconds += self.prefill_cost(opt, len(refill))
                remaining.update((j, steps_left[j]) for j in refill)
        return sum(lengths) / seconds

    def choose(self, options: Sequence[Option], batch_size: int) -> Option:
        """Best projected option; `ar` unless a speculative option is projected faster (never slower than AR)."""
        projected = {o: self.project(o, batch_size) for o in options}
        best = max(options, key=projected.__getitem__)
        ar = next((o for o in options if o.sampler == "ar"), None)
        if ar is not None and projected[best] <= projected[ar]:
            return ar
        return best
