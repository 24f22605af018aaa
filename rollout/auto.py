"""`sampler="auto"`: pick the exact sampler (engine `ar` or `lossless` at some level set) with the best projected
tokens/s for this device and batch size, from the measured cost model and the live acceptance curve.

First call at a batch size: time decode steps of every option (`CostModel.calibrate`). With no acceptance data yet,
the first chunk of prompts runs as a lossless pilot (its trajectories are exact AR samples, so they are kept as
results). Every later call projects all options, runs the best, and folds its acceptance back into the curve. AR is
chosen unless a speculative option is projected faster, so auto is never knowingly slower than plain AR.
"""

from __future__ import annotations

import logging

from rollout.cost_model import CostModel, Option, default_options

log = logging.getLogger(__name__)


class AutoSampler:
    def __init__(self, make_engine, block_size: int, options: list[Option] | None = None):
        self.make_engine = make_engine  # (sampler, levels, max_batch) -> BlockEngine
        self.options = options or default_options(block_size)
        self.cost = CostModel(block_size)
        self.calibrated: set[int] = set()
        self.last_choice: Option | None = None
        self.pilot = next(o for o in self.options if o.sampler != "ar" and len(o.levels) > 1)

    def observe(self, trajs) -> None:
        for t in trajs:
            if t.accept_counts:
                self.cost.acceptance.observe(t.accept_counts, t.draft_counts)

    def generate(self, policy, prompt_ids, max_batch: int, index_offset: int = 0, **kwargs):
        B = min(max_batch, len(prompt_ids))
        if B not in self.calibrated:
            self.cost.calibrate(policy, self.options, [B])
            self.calibrated.add(B)
        results = []
        if self.cost.acceptance.steps == 0:
            head, prompt_ids = prompt_ids[:B], prompt_ids[B:]
            eng = self.make_engine(self.pilot.sampler, self.pilot.levels, B)
            pilot = eng.generate(head, index_offset=index_offset, **kwargs)
            self.observe(pilot)
            results += pilot
            if not prompt_ids:
                self.last_choice = self.pilot
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
        trajs = self.make_engine(choice.sampler, choice.levels or (0,), B).generate(
            prompt_ids, index_offset=offset, **kwargs
        )
        self.observe(trajs)
        return results + trajs
