"""`sampler="auto"`: a wrapper over engines that runs, per call, the exact sampler (engine `ar` or `lossless` at some
level set) with the best projected tokens/s for this device and batch size, from the measured cost model and the
live acceptance curve.

`AutoSampler` has the engine's `generate()` / `run()` signature and builds its engines from an engine factory, so
jobs hold "an engine" and never look inside one. First call at a batch size: time decode steps of every option
(`CostModel.calibrate`). With no acceptance data yet, the first chunk of prompts runs as a lossless pilot (its
trajectories are exact AR samples, so they are kept as results). Every later call projects all options, runs the
best, and folds its acceptance back into the curve. AR is chosen unless a speculative option is projected faster,
so auto is never knowingly slower than plain AR. Every trajectory names the option that produced it.

    engine = build_engine(policy, EngineSettings(sampler="auto"), tokenizer=tok)
    trajs = engine.generate(prompt_ids, max_new_tokens=64)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policy.hybrid import HybridPolicy
from rollout.cost_model import CostModel, EngineFactory, default_options, pilot_options
from rollout.engine import BlockEngine, GenerateAPI
from rollout.history import HistorySettings, HistoryStore
from rollout.settings import EngineSettings
from rollout.types import Option, SamplingParams, Trajectory

log = logging.getLogger(__name__)

# row decode steps auto runs history drafts for before it judges them: about 16 answers of 64 tokens at 4 per step
HISTORY_PILOT_STEPS = 256


def engine_factory(
    policy: HybridPolicy,
    *,
    block_size: int | None = None,
    mix_weight: float = 0.5,
    draft: str = "dirac",
    draft_temperature: float = 1.0,
    tokenizer=None,
    verify_fn=None,
    history: HistorySettings | None = None,
    compile: str = "off",
) -> EngineFactory:
    """(option, max_batch) -> a BlockEngine on `policy` with these shared settings. Engines with history drafts
    share one store (`HistoryStore`), kept across calls: later calls draft from earlier rollouts."""
    store = HistoryStore(history)

    def make(opt: Option, max_batch: int) -> BlockEngine:
        return BlockEngine(
            policy,
            opt.sampler,
            block_size,
            opt.levels or (0,),
            max_batch,
            mix_weight,
            draft,
            draft_temperature,
            tokenizer,
            verify_fn=verify_fn,
            drafts=opt.drafts,
            history=store,
            compile=compile,
        )

    make.history = store  # the shared store (a benchmark clears it between timed runs)
    return make


def build_engine(policy: HybridPolicy, settings: EngineSettings, tokenizer=None) -> BlockEngine | AutoSampler:
    """The engine a job's `EngineSettings` describe: a BlockEngine, or an AutoSampler over BlockEngines."""
    make = engine_factory(
        policy,
        mix_weight=settings.mix_weight,
        tokenizer=tokenizer,
        history=settings.history,
        compile=settings.compile,
    )
    drafts = settings.resolved_drafts(policy.is_converted)
    if settings.sampler == "auto":
        K = policy.block_size if drafts != "history" else settings.history.max_draft
        return AutoSampler(make, K, max_batch=settings.max_batch, options=default_options(K, drafts))
    return make(Option(settings.sampler, tuple(settings.levels), drafts), settings.max_batch)


@dataclass(frozen=True)
class AutoState:
    """What auto has seen and chosen (for reports; the trajectories themselves name their option)."""

    acceptance_steps: int
    pilot: str
    last_choice: str | None


class AutoSampler(GenerateAPI):
    sampler = "auto"

    def __init__(
        self,
        make_engine: EngineFactory,
        block_size: int,
        max_batch: int = 16,
        options: Sequence[Option] | None = None,
    ):
        self.make_engine = make_engine
        self.max_batch = max_batch
        self.options = list(options or default_options(block_size))
        self.cost = CostModel(block_size)
        self.calibrated: set[int] = set()
        self.last_choice: Option | None = None
        self.pilots = pilot_options(self.options)
        self.policy_version = 0  # stamped on the trajectories, like BlockEngine.policy_version
        probe = make_engine(self.options[0], 1)
        self.policy, self.tokenizer = probe.policy, probe.tokenizer  # the engines' shared policy; default EOS
        self.K = block_size

    def state(self) -> AutoState:
        last = self.last_choice.name if self.last_choice is not None else None
        return AutoState(self.cost.acceptance.steps, self.pilot.name, last)

    def _unpiloted(self, opt: Option) -> bool:
        """No acceptance seen yet; with history drafts, fewer than `HISTORY_PILOT_STEPS` decode steps run with them
        (a short first call, such as a warm-up, drafts from an empty store and would judge history on nothing)."""
        if opt.drafts != "diffusion":
            return self.cost.history_steps(opt) < HISTORY_PILOT_STEPS
        return self.cost.acceptance.steps == 0

    @property
    def pilot(self) -> Option:
        """The next option to pilot (the first, once all have been)."""
        return next((o for o in self.pilots if self._unpiloted(o)), self.pilots[0])

    @property
    def needs_pilot(self) -> bool:
        return any(self._unpiloted(o) for o in self.pilots)

    def observe(self, trajs: Sequence[Trajectory]) -> None:
        for t in trajs:
            self.cost.observe_run(t)

    def _engine(self, opt: Option, batch: int) -> BlockEngine:
        eng = self.make_engine(opt, batch)
        eng.policy_version = self.policy_version
        return eng

    def _bucket(self, rows: int) -> int:
        """The calibrated batch size that covers `rows`: powers of two up to max_batch (a multi-turn job's calls
        shrink as episodes end; each size would otherwise be timed anew)."""
        return min(self.max_batch, 1 << max(0, rows - 1).bit_length())

    def calibrate(self, batch_size: int, stop: Callable[[], bool] | None = None) -> None:
        """Time every option at this batch size, once (`CostModel.calibrate`; `stop` can end it early)."""
        if batch_size not in self.calibrated:
            log.info(
                "auto: timing %d options at batch %d (once per batch size)", len(self.options), batch_size
            )
            t0 = time.perf_counter()
            self.cost.calibrate(self.make_engine, self.options, [batch_size], stop=stop)
            self.calibrated.add(batch_size)
            log.info("auto: timed batch %d in %.1fs", batch_size, time.perf_counter() - t0)

    def choose_for(self, busy_rows: int) -> Option:
        """The option a request joining `busy_rows` others should run (the server's per-request auto): the
        lossless pilot until some acceptance has been observed (`observe`), then the cost model's choice at the
        calibrated batch size that covers them (powers of two up to max_batch, each calibrated on first use)."""
        B = self._bucket(busy_rows)
        self.calibrate(B)
        choice = self.pilot if self.needs_pilot else self.cost.choose(self.options, B)
        self.last_choice = choice
        return choice

    def run(
        self, prompt_ids: list[list[int]], params: SamplingParams, index_offset: int = 0, audit: bool = False
    ) -> list[Trajectory]:
        B = self._bucket(len(prompt_ids))
        self.calibrate(B)
        results: list[Trajectory] = []
        if self.needs_pilot:
            # a diffusion pilot needs one batch; history drafts are judged on a whole call, because what they yield
            # depends on the call itself: a group's later samples draft from its earlier ones
            pilot = self.pilot
            cut = B if pilot.drafts == "diffusion" else len(prompt_ids)
            head, prompt_ids = prompt_ids[:cut], prompt_ids[cut:]
            eng = self._engine(pilot, B)
            trajs = eng.run(head, params, index_offset, audit)
            self.observe(trajs)
            self.cost.observe_steps(pilot, eng.step_stats)
            results += trajs
            if not prompt_ids:
                self.last_choice = pilot
                return results
        choice = self.cost.choose(self.options, B)
        self.last_choice = choice
        log.info(
            "auto: %s (projected %.0f tok/s; ar %.0f)",
            choice.name,
            self.cost.project(choice, B),
            self.cost.project(self.options[0], B),
        )
        offset = index_offset + len(results)  # global prompt index: no random stream is reused
        eng = self._engine(choice, B)
        trajs = eng.run(prompt_ids, params, offset, audit)
        self.observe(trajs)
        self.cost.observe_steps(choice, eng.step_stats)
        return results + trajs
