"""One timed configuration of `blockrl bench` (`Cell`): a sampler on one batch of prompts (an engine, or HF
`generate`), warmed up, then timed repeat by repeat, round-robin with the other cells of its batch size
(`run_cells`); and where its prompts come from (`prompts_for`)."""

from __future__ import annotations

import functools
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from common.config import ConfigError
from common.records import BadRows, RecordError
from envs import splits
from envs.prompt_file import PromptRow, read_prompt_rows
from envs.tasks import TaskSample, score
from policy.generate import hf_generate_ids
from rollout.auto import AutoSampler, engine_factory
from rollout.bench.config import BenchConfig, RunResult
from rollout.cost_model import AcceptanceStats, default_options
from rollout.types import Option

log = logging.getLogger(__name__)


class PeakRSS:
    """Peak memory growth while the block runs: on CUDA the allocator's peak over its start; on the CPU the
    process's resident set (sampled every 20 ms)."""

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.device = device

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        # a sparse poll: a busy thread would steal GIL time from the timed run
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


@dataclass(frozen=True)
class BenchPrompt:
    """One prompt of a bench run: a built-in task sample (scored) or a row of the user's prompt file."""

    row: PromptRow
    sample: TaskSample | None = None  # None: a prompt-file row (not scored)

    def encode(self, tok, prompt_format: str) -> list[int]:
        """As `blockrl train` encodes it: text in the run's prompt format, a conversation through the template."""
        return self.row.encode(tok, prompt_format)


class Cell:
    """One sampler configuration on one batch of prompts: an engine (or HF generate), warmed up, timed run by run."""

    def __init__(
        self,
        policy,
        tok,
        samples,
        B: int,
        cfg: BenchConfig,
        sampler: str,
        levels=(0,),
        block_size=None,
        mix_weight=None,
        draft_temperature=None,
        drafts: str = "diffusion",
        compiled: bool = False,
    ):
        self.policy, self.tok, self.samples, self.B, self.cfg, self.sampler = (
            policy,
            tok,
            samples,
            B,
            cfg,
            sampler,
        )
        self.levels = tuple(levels)
        fmt = policy.resolve_prompt_format(cfg.prompt_format)
        self.prompts = [s.encode(tok, fmt) for s in samples]
        self.drafts = drafts if sampler not in ("hf", "hf_compiled", "ar") else ""
        if drafts == "history":
            self.levels = ()
        self.res = RunResult(
            B,
            sampler,
            list(self.levels) if sampler in ("lossless", "logit_mix") else [],
            block_size or (policy.block_size if sampler != "ar" else 0),
            mix_weight,
            draft_temperature,
            prompt_format=fmt,
            drafts=self.drafts,
            group_size=cfg.group_size,
            compiled=compiled,
        )
        self.engine = self.history = None
        if sampler not in ("hf", "hf_compiled"):
            make = engine_factory(
                policy,
                block_size=block_size,
                tokenizer=tok,
                mix_weight=mix_weight if mix_weight is not None else 0.5,
                draft="dirac" if draft_temperature is None else "sampled",
                draft_temperature=1.0 if draft_temperature is None else draft_temperature,
                history=cfg.history,
                compile="on" if compiled else "off",
            )
            self.history = make.history
            if sampler == "auto":
                K = cfg.history.max_draft if drafts == "history" else policy.block_size
                self.engine = AutoSampler(make, K, max_batch=B, options=default_options(K, drafts))
            else:
                self.engine = make(Option(sampler, self.levels, drafts), B)
                self.res.block_size = self.engine.K
        self.outs: list[list[int]] = []
        self.trajs = None

    def warm_up(self) -> None:
        """Untimed. auto calibrates its cost model here (once per batch size) and runs its pilots on whole calls of
        these prompts (at most 4, each from an empty history store), so the timed runs show what it then chooses:
        a job pilots on its first calls the same way."""
        cfg = self.cfg
        if self.engine is None and self.sampler == "hf_compiled":
            # the timed runs' shapes (every prompt, the full budget) build the graphs
            log.info("bench B=%d: compiling HF generate with a static cache (untimed)", self.B)
            self._hf(self.prompts, cfg.max_new_tokens, cfg.seed)
            return
        if self.engine is None:
            self._hf(self.prompts[: self.B], 16, cfg.seed)
            return
        body = getattr(self.engine, "body", None)
        before = body.compile_seconds if body is not None else 0.0
        self.engine.generate(
            self.prompts[: self.B], max_new_tokens=16, temperature=cfg.temperature, seed=cfg.seed
        )
        if body is not None:  # the one-row graph too (a batch's last row), so no timed run compiles
            self.engine.generate(
                self.prompts[:1], max_new_tokens=16, temperature=cfg.temperature, seed=cfg.seed
            )
            self.res.compile_s = body.compile_seconds - before
        for k in range(4):
            if not getattr(self.engine, "needs_pilot", False):
                break
            self.history.clear()
            self.engine.generate(
                self.prompts,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                seed=cfg.seed - 1 - k,
            )

    def _hf(self, ids: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
        cfg = self.cfg
        return hf_generate_ids(
            self.policy.model,
            self.tok,
            ids,
            max_new_tokens,
            cfg.temperature,
            self.B,
            seed,
            compiled=self.sampler == "hf_compiled",
        )

    def run_once(self, rep: int) -> None:
        cfg = self.cfg
        if self.history is not None:
            self.history.clear()  # no run drafts from an earlier repeat of the same prompts
        with PeakRSS(next(self.policy.parameters()).device) as mem:
            t0 = time.perf_counter()
            if self.engine is None:
                self.outs = self._hf(self.prompts, cfg.max_new_tokens, cfg.seed + rep)
            else:
                self.trajs = self.engine.generate(
                    self.prompts,
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    seed=cfg.seed + rep,
                )
                self.outs = [t.tokens for t in self.trajs]
            dt = time.perf_counter() - t0
        self.res.tokens_per_s_runs.append(sum(map(len, self.outs)) / dt)
        self.res.peak_mem_mb = max(self.res.peak_mem_mb, mem.mb)

    def finish(self) -> RunResult:
        """Median speed, quality and acceptance of the last repeat."""
        res, outs, trajs = self.res, self.outs, self.trajs
        res.tokens_per_s = statistics.median(res.tokens_per_s_runs)
        res.tokens_generated = sum(map(len, outs))
        res._lengths = [len(o) for o in outs]
        texts = self.tok.batch_decode(outs, skip_special_tokens=True)
        scored = [(p.sample, t) for p, t in zip(self.samples, texts, strict=True) if p.sample is not None]
        res.solved = sum(int(score(s, t) == 1.0) for s, t in scored)
        res.samples = len(scored)  # 0: prompt-file rows, not scored here
        res.solve_rate = res.solved / max(1, res.samples)
        if trajs is not None:
            res.tokens_per_forward = sum(t.num_tokens for t in trajs) / max(
                1, sum(t.num_forwards for t in trajs)
            )
            steps = sum(len(t.accept_counts) for t in trajs)
            res.history_share = sum(t.history_steps for t in trajs) / max(1, steps)
            if self.sampler != "ar":
                acc = AcceptanceStats(res.block_size)
                for t in trajs:
                    acc.observe(t.accept_counts, t.draft_counts)
                res.accept_by_position = acc.acceptance_by_position()
                res.accept_after_rejection = acc.acceptance_by_position("stale")
                res.accept_after_full = acc.acceptance_by_position("fresh")
                res._acc = acc
            res._option = (
                Option("ar") if self.sampler == "ar" else Option(self.sampler, self.levels, self.drafts)
            )
            if self.sampler == "auto":
                res._option = self.engine.last_choice
                res.choice = res._option.name
        return res


def run_cells(cells: list[Cell], repeats: int) -> list[RunResult]:
    """Warm every cell up, then time the repeats round-robin across cells, so that a slow phase of a noisy machine
    hits every sampler alike instead of one cell."""
    for c in cells:
        c.warm_up()
    for rep in range(repeats):
        for c in cells:
            log.info("bench B=%d %s %s repeat %d", c.B, c.sampler, c.res.levels or "", rep + 1)
            c.run_once(rep)
    return [c.finish() for c in cells]


def run_cell(policy, tok, samples, B: int, cfg: BenchConfig, sampler: str, **kw) -> tuple[RunResult, list]:
    """A single cell, timed on its own (demo and sweeps)."""
    cell = Cell(policy, tok, samples, B, cfg, sampler, **kw)
    res = run_cells([cell], cfg.repeats)[0]
    return res, cell.trajs


def profile_row(
    policy, tok, samples: list[BenchPrompt], cfg: BenchConfig, option: Option, compiled: bool = False
) -> dict[str, float]:
    """ms per decode step of `option` on these prompts (one batch), by phase (`BlockEngine.profile_decode_steps`)."""
    fmt = policy.resolve_prompt_format(cfg.prompt_format)
    ids = [s.encode(tok, fmt) for s in samples]
    make = engine_factory(
        policy,
        tokenizer=tok,
        mix_weight=cfg.mix_weight,
        history=cfg.history,
        compile="on" if compiled else "off",
    )
    engine = make(option, len(ids))
    phases = engine.profile_decode_steps(ids, cfg.profile_steps, cfg.temperature)
    return {k: 1e3 * v for k, v in phases.items()}


def prompts_for(cfg: BenchConfig, n: int) -> list[BenchPrompt]:
    """n samples: ceil(n / group_size) prompts (held-out built-in task prompts, or rows of `prompts.files`, in a
    seeded order), each `group_size` times in a row (a GRPO group)."""
    distinct = -(-n // cfg.group_size)
    if cfg.prompts.files:
        pool = [BenchPrompt(r) for r in file_rows(tuple(cfg.prompts.files), cfg.prompts.on_bad_row)]
    else:
        per = -(-distinct // len(cfg.tasks))
        pool = [
            BenchPrompt(PromptRow.from_task(s, s.task), s)
            for s in splits.bench_prompts(cfg.tasks, per, cfg.seed)
        ]
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(pool), generator=g).tolist()
    picked = [pool[order[i % len(pool)]] for i in range(distinct)]  # a short file is cycled
    return [s for s in picked for _ in range(cfg.group_size)][:n]


@functools.lru_cache(maxsize=4)
def file_rows(files: tuple[str, ...], on_bad_row: str) -> list[PromptRow]:
    """The usable rows of the bench's prompt files (read once per run); a bad file or row raises ConfigError
    naming it, as `blockrl train` does."""
    bad = BadRows(on_bad_row)
    try:
        rows = read_prompt_rows(list(files), bad)
    except RecordError as e:
        raise ConfigError(f"prompts.files: {e}") from None
    if bad.skipped:
        log.info("bench: prompts: %d rows, %s", len(rows), bad.summary())
    return rows
