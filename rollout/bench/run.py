"""`blockrl bench`: HF `generate` vs engine `ar` vs `lossless` vs `logit_mix` vs `auto`, side by side in one run on
the same model, prompts, temperature and batch sizes.

Per (batch size, sampler): tokens/s as the median of repeats, ratios vs HF generate and vs engine `ar`, tokens per
forward, acceptance at draft positions 1..K, the task solve rate (quality parity, Wilson 95% interval), peak RSS
growth, and the cost model's projected tokens/s next to the measured value. Sweeps (block size, levels, batch size,
prompt length, logit_mix weight) add rows and a PNG. Prompts are held-out prompts of the built-in tasks; completions
stop at EOS or max_new_tokens.

    blockrl bench                                   # default: B = 1 and 16, ~5 minutes on 2 CPU cores
    blockrl bench --set sweep.block_sizes=[4,8,16,32] --json runs/bench/sweep.json
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from common.config import ConfigError, Section, ShippedPath
from common.device import DeviceSettings
from common.records import BadRows, RecordError
from envs import splits
from envs.prompt_file import PromptFileConfig, PromptRow, read_prompt_rows
from envs.tasks import TaskName, TaskSample, score
from policy.factory import ModelSpec, build_model, make_config
from policy.generate import hf_generate_ids
from policy.hybrid import HybridPolicy, load_tokenizer
from policy.tokenizer import build_char_tokenizer
from rollout.auto import AutoSampler, engine_factory
from rollout.cost_model import AcceptanceStats, CostModel, default_options
from rollout.history import HistorySettings
from rollout.settings import EngineSettings
from rollout.types import Levels, Option

log = logging.getLogger(__name__)


class SweepConfig(Section):
    """Extra single-axis sweeps (each empty list = skipped); run at batch size `batch_size`."""

    batch_size: int = Field(1, ge=1)
    """batch size of the sweeps."""
    block_sizes: list[int] = Field(default_factory=list)
    """K values for lossless, e.g. [4, 8, 16, 32]."""
    levels: list[Levels] = Field(default_factory=list)
    """level sets for lossless."""
    batch_sizes: list[int] = Field(default_factory=list)
    """batch sizes for ar vs lossless."""
    prompt_lens: list[int] = Field(default_factory=list)
    """extra prompt padding (tokens of a neutral prefix) for ar vs lossless."""
    mix_weights: list[float] = Field(default_factory=list)
    """w values for logit_mix."""
    draft_temperatures: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=list)
    """draft temperatures for logit_mix (w = mix_weight) with sampled drafts (draft ~ softmax(mixed / T_d)), e.g.
    [0.5, 1.0]: the other knob besides w that trades acceptance for exactness."""
    prompt_formats: list[Literal["text", "raw", "chat"]] = Field(default_factory=lambda: ["raw"])
    """other prompt encodings for ar vs lossless (raw: no special tokens), so the drafter's sensitivity to the
    prompt format is measured, not discovered."""


class BenchConfig(DeviceSettings):
    """`blockrl bench` settings (`device`, `dtype`: where every sampler, HF generate included, runs)."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """checkpoint directory: converted (diffusion and history drafts) or a plain HF causal LM (history drafts)."""
    run_dir: str = "runs/bench"
    """where results.json and bench.png go."""
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 16])
    """batch sizes of the default comparison."""
    prompts_per_row: int = Field(4, ge=1)
    """prompts per batch slot (n = max(B * this, min_prompts))."""
    min_prompts: int = Field(12, ge=1)
    """floor on prompts per run."""
    tasks: list[TaskName] = Field(default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"])
    """built-in tasks the prompts come from (held-out prompts, scored: the solve rate), unless `prompts.files`."""
    prompts: PromptFileConfig = PromptFileConfig()
    """your prompt files, as `blockrl train` reads them (`prompt` text or conversation, or `messages` rows),
    encoded as train encodes them: the bench decodes these instead of the built-in tasks (no solve rate: a file's
    rows are scored by your reward functions, which the bench does not run)."""
    label: str | None = None
    """the model's name in the table and the JSON; None = its directory (with the parent for a generic name)."""
    seed: int = 7
    """prompt and sampling seed."""
    prompt_format: Literal["auto", "text", "raw", "chat"] = "auto"
    """prompt encoding: auto = the checkpoint's training format (text: tokenizer(text); chat: the chat template)."""
    max_new_tokens: int = Field(160, ge=1)
    """generation budget per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    """sampling temperature."""
    repeats: int = Field(3, ge=1)
    """timed repeats per cell (median reported)."""
    levels: list[Levels] = Field(default_factory=lambda: [[0], [0, 4, 8], [0, 4, 8, 12]])
    """level sets lossless is run with (all reported; the best is the headline); [] = no lossless rows besides
    auto's choice (the quick default)."""
    logit_mix: bool = True
    """also run logit_mix at `mix_levels` with `mix_weight` (converted checkpoints)."""
    hf_compiled: bool = False
    """also HF generate with a static cache and `torch.compile` (HF's documented fast path; compiled in the untimed
    warm-up, once per batch size): every row's `speedup_vs_best_ar` is then against the fastest AR row of the run."""
    compiled: bool = False
    """also the engine's compiled rows (`compile: on`, policy/compiled.py): ar and every lossless row again with the
    decode step's model body under torch.compile, compiled in the untimed warm-up (its seconds in `compile_s`)."""
    drafts: list[Literal["auto", "diffusion", "history", "both"]] = Field(default_factory=lambda: ["auto"])
    """draft sources of the lossless rows: each level set runs once per source (`history` once: it has no
    levels); auto = diffusion on a converted checkpoint, history on a plain one. Sources a plain checkpoint cannot
    run are left out, and said so."""
    group_size: int = Field(1, ge=1)
    """samples per prompt, decoded side by side as a GRPO group (siblings share history drafts)."""
    history: HistorySettings = HistorySettings()
    """the history draft source. Every timed run starts from an empty store (no earlier epoch to draft from)."""
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)
    """w of logit_mix."""
    mix_levels: Levels = Field(default_factory=lambda: [0, 4, 8])
    """levels of logit_mix."""
    threads: int = Field(2, ge=1)
    """torch threads."""
    experts_implementation: str | None = None
    """MoE experts kernel for every sampler, HF included ("eager", "grouped_mm", ...; None = the model's default)."""
    model: ModelSpec | None = None
    """instead of `checkpoint`, a random-init model of this shape (converted, char-tokenizer prompts): speed and
    memory at a realistic size or vocabulary; its drafts are untrained, so tokens per forward means nothing there."""
    model_vocab: int = Field(32768, ge=128)
    """vocabulary of `model`."""
    compare: list[ShippedPath] = Field(default_factory=list)
    """other converted checkpoints, run in the same session beside `checkpoint` (hf, ar and every lossless level
    set at every batch size, on the same task prompts, each in its training prompt format under
    prompt_format: auto): e.g. the char-level and the
    BPE checkpoints side by side."""
    sweep: SweepConfig = SweepConfig()
    profile: bool = False
    """also time each engine row's decode step by phase (body, heads, verify, drafts, bookkeeping; `--profile`)."""
    profile_steps: int = Field(20, ge=1)
    """decode steps timed per row by the profile."""


@dataclass
class RunResult:
    batch_size: int
    sampler: str  # hf | hf_compiled | ar | lossless | logit_mix | auto
    levels: Levels = field(default_factory=list)
    block_size: int = 0
    mix_weight: float | None = None
    draft_temperature: float | None = None  # logit_mix with sampled drafts at this T_d (None: Dirac drafts)
    drafts: str = ""  # the draft source (diffusion | history | both; "" for hf and ar)
    compiled: bool = False  # the engine's decode step compiled (`BenchConfig.compiled`)
    compile_s: float = (
        0.0  # seconds this row's warm-up spent compiling (graphs are shared: later rows reuse them)
    )
    group_size: int = 1  # samples per prompt (GRPO groups)
    history_share: float = 0.0  # share of decode steps whose drafts came from history
    note: str = ""  # why a block-decoding row lost to ar, and what would help (`explain_losses`)
    tokens_per_s: float = 0.0
    tokens_per_s_runs: list[float] = field(default_factory=list)
    speedup_vs_hf: float = 0.0
    speedup_vs_ar: float = 0.0
    speedup_vs_best_ar: float = (
        0.0  # against the fastest AR row of its group: hf, hf_compiled or the engine's ar
    )
    tokens_per_forward: float = 1.0
    accept_by_position: list[float] = field(default_factory=list)
    # acceptance by position over the steps after a rejected draft, and over the rest (after a full acceptance
    # or a prefill)
    accept_after_rejection: list[float] = field(default_factory=list)
    accept_after_full: list[float] = field(default_factory=list)
    solve_rate: float = 0.0
    solved: int = 0
    samples: int = 0
    tokens_generated: int = 0  # completion tokens of one repeat
    peak_mem_mb: float = 0.0
    projected_tokens_per_s: float | None = None
    choice: str = ""  # auto's pick
    sweep: str = ""  # which sweep a row belongs to ("" = default comparison)
    prompt_format: str = ""  # how the prompts were encoded (text | raw | chat)
    checkpoint: str = ""  # the checkpoint directory that ran
    label: str = ""  # its name in tables (`BenchConfig.label`, or `model_label`)
    vocab_size: int = 0  # its tokenizer's vocabulary
    step_ms: dict[str, float] = field(default_factory=dict)  # --profile: ms per decode step by phase
    _acc: AcceptanceStats | None = field(default=None, repr=False)  # observed acceptance (for the projection)
    _option: Option | None = field(default=None, repr=False)  # the concrete option that ran
    _lengths: list[int] = field(default_factory=list, repr=False)  # completion lengths of the last repeat

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


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


def project(cost: CostModel, res: RunResult) -> float | None:
    """Cost-model projection for a run: its option's calibrated step costs, its own observed acceptance.
    logit_mix is projected with lossless step costs at the same levels (same compute per step)."""
    if res._option is None or (res._option.name, res.batch_size) not in cost.step_seconds:
        return None
    return cost.project_run(res._option, res.batch_size, res._lengths, res._acc)


def load_bench_policy(path: str, cfg: BenchConfig):
    policy = HybridPolicy.from_pretrained(path, dtype=cfg.torch_dtype).to(cfg.torch_device())
    tok = load_tokenizer(path)
    if cfg.experts_implementation and policy.moe:
        policy.model.set_experts_implementation(cfg.experts_implementation)
    return policy.eval(), tok


def random_bench_policy(cfg: BenchConfig):
    """A converted random-init policy of shape `cfg.model` with `cfg.model_vocab` tokens (prompts use the char
    tokenizer's ids, all below the vocabulary)."""
    tok = build_char_tokenizer()
    hf = make_config(
        cfg.model,
        cfg.model_vocab,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    policy = HybridPolicy(build_model(hf, seed=cfg.seed))
    policy.convert(tok, block_size=16)
    return policy.to(device=cfg.torch_device(), dtype=cfg.torch_dtype).eval(), tok


def run_bench(
    cfg: BenchConfig, on_batch: Callable[[list[RunResult], list[int]], None] | None = None
) -> list[RunResult]:
    """Every row of the run. `on_batch(results, batch_sizes_done)` is called after each batch size of the default
    comparison, so a run stopped part-way (a time box) still leaves the batch sizes it finished on disk."""
    torch.set_num_threads(cfg.threads)
    if cfg.hf_compiled:  # torch.compile's cache stays in the run directory
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.run_dir).resolve() / ".inductor"))
    if cfg.model is not None:
        policy, tok = random_bench_policy(cfg)
    else:
        policy, tok = load_bench_policy(cfg.checkpoint, cfg)
    cost = CostModel(policy.block_size)
    results: list[RunResult] = []
    done: list[int] = []  # batch sizes of the default comparison finished so far
    log.info("bench: checkpoint %s", cfg.checkpoint if cfg.model is None else "random-init model")
    for B in cfg.batch_sizes:
        n = max(B * cfg.prompts_per_row, cfg.min_prompts)
        samples = prompts_for(cfg, n)
        specs = [("hf", {}), *([("hf_compiled", {})] if cfg.hf_compiled else []), ("ar", {})]
        specs += lossless_specs(cfg, policy)
        if cfg.compiled:  # the engine's compiled ar and lossless rows
            specs += [(s, {**kw, "compiled": True}) for s, kw in specs if s in ("ar", "lossless")]
        if policy.is_converted and cfg.logit_mix:  # logit_mix mixes the drafter's logits
            specs.append(("logit_mix", {"levels": cfg.mix_levels, "mix_weight": cfg.mix_weight}))
        specs.append(("auto", {"drafts": bench_drafts(cfg, policy)[0]}))
        rows = run_cells([Cell(policy, tok, samples, B, cfg, s, **kw) for s, kw in specs], cfg.repeats)
        for res in rows:
            # time this option's steps now, in the machine state the runs just saw
            if res._option is not None and not res.compiled:  # (compiled rows: no projection)
                cost.calibrate(engine_factory(policy), [res._option], [B], steps=12, tails=True)
            if cfg.profile and res.sampler in ("ar", "lossless", "logit_mix"):
                res.step_ms = profile_row(policy, tok, samples[:B], cfg, res._option, res.compiled)
        finish_rows(rows, cost)
        explain_losses(rows, cost)
        name_rows(rows, cfg, policy)
        results += rows
        done.append(B)
        if on_batch is not None:
            on_batch(results, list(done))
    results += run_sweeps(policy, tok, cfg, cost)
    for i, path in enumerate(cfg.compare, start=1):
        log.info("bench: comparison checkpoint %d of %d: %s (the same prompts)", i, len(cfg.compare), path)
        results += run_comparison(path, cfg)
    name_rows(results, cfg, policy)
    return results


def name_rows(rows: list[RunResult], cfg: BenchConfig, policy) -> None:
    """Stamp the bench's own model (checkpoint, label, vocabulary) on rows that name none yet (comparison rows
    name theirs)."""
    name = (
        f"random {cfg.model.arch} h{cfg.model.hidden_size} V{cfg.model_vocab}"
        if cfg.model
        else cfg.checkpoint
    )
    vocab = policy.model.get_input_embeddings().weight.shape[0]
    for r in rows:
        r.checkpoint = r.checkpoint or str(name)
        r.label = r.label or cfg.label or (name if cfg.model else model_label(name))
        r.vocab_size = r.vocab_size or vocab


def bench_drafts(cfg: BenchConfig, policy) -> list[str]:
    """The draft sources this checkpoint runs (`BenchConfig.drafts`, auto resolved); a plain checkpoint runs
    history only (said once when others were asked for)."""
    out = []
    for d in cfg.drafts:
        d = EngineSettings(drafts=d).resolved_drafts(policy.is_converted)
        if d != "history" and not policy.is_converted:
            log.info("bench: drafts %s left out: the checkpoint is not converted (no diffusion drafter)", d)
            continue
        out.append(d)
    return list(dict.fromkeys(out)) or ["history"]


def lossless_specs(cfg: BenchConfig, policy) -> list[tuple[str, dict]]:
    """The lossless rows: every level set per draft source, history once."""
    out = []
    for d in (
        bench_drafts(cfg, policy) if cfg.levels else []
    ):  # no level sets: no lossless rows (the quick bench)
        levels = [()] if d == "history" else cfg.levels
        out += [("lossless", {"levels": lv, "drafts": d}) for lv in levels]
    return out


def model_label(path: str) -> str:
    """A checkpoint's name for tables: its directory, with the parent when the name alone says nothing (a run's
    `final` or `checkpoint`)."""
    p = Path(path)
    return (
        f"{p.parent.name}/{p.name}"
        if p.name in ("final", "checkpoint", "latest") and p.parent.name
        else p.name
    )


def explain_losses(rows: list[RunResult], cost: CostModel) -> None:
    """One line on each block-decoding row slower than ar (`RunResult.note`): the tokens per forward it reached, what
    a step of it costs against an ar step on this machine (the tokens per forward it needs to break even), and
    what would help."""
    ar = next((r for r in rows if r.sampler == "ar"), None)
    for r in rows:
        opt = r._option
        if ar is None or opt is None or opt.sampler == "ar" or not r.speedup_vs_ar or r.speedup_vs_ar >= 1.0:
            continue
        B = r.batch_size
        ratio = None
        if (opt.name, B) in cost.step_seconds and ("ar", B) in cost.step_seconds and not r.compiled:
            ratio = cost.step_cost(opt, B) / cost.step_seconds[("ar", B)]
        cost_part = f"; a step costs {ratio:.1f}x an ar step here, so it needs ~{ratio:.1f}" if ratio else ""
        help_ = (
            "history drafts pay where text repeats (GRPO groups, later epochs, multi-turn chats)"
            if opt.drafts == "history"
            else "train the drafter longer (blockrl convert, or the RL freshness term), add history drafts "
            "(drafts: both)"
        )
        r.note = (
            f"B={B} {opt.name}: {r.speedup_vs_ar:.2f}x ar at {r.tokens_per_forward:.2f} tokens per forward"
            f"{cost_part}. To help: {help_}; or sampler: auto, which runs ar where blocks do not pay."
        )


def run_comparison(path: str, cfg: BenchConfig) -> list[RunResult]:
    """Another checkpoint on the same prompts: hf, ar and every lossless level set at every batch size."""
    policy, tok = load_bench_policy(path, cfg)
    out = []
    for B in cfg.batch_sizes:
        samples = prompts_for(cfg, max(B * cfg.prompts_per_row, cfg.min_prompts))
        specs = [("hf", {}), ("ar", {}), *lossless_specs(cfg, policy)]
        rows = run_cells([Cell(policy, tok, samples, B, cfg, s, **kw) for s, kw in specs], cfg.repeats)
        finish_rows(rows, None)
        for r in rows:
            r.sweep, r.checkpoint, r.label = f"checkpoint={Path(path).name}", str(path), model_label(path)
            r.vocab_size = policy.model.get_input_embeddings().weight.shape[0]
        out += rows
    return out


def finish_rows(rows: list[RunResult], cost: CostModel | None) -> None:
    """Ratios against the HF and engine-ar rows of the same group, plus projections (when a cost model is given:
    sweep rows change K or prompts, which the main calibration does not cover)."""
    hf = next((r.tokens_per_s for r in rows if r.sampler == "hf"), None)
    ar = next((r.tokens_per_s for r in rows if r.sampler == "ar" and not r.compiled), None)
    best = max((r.tokens_per_s for r in rows if r.sampler in ("hf", "hf_compiled", "ar")), default=None)
    for r in rows:
        r.speedup_vs_hf = r.tokens_per_s / hf if hf else 0.0
        r.speedup_vs_ar = r.tokens_per_s / ar if ar else 0.0
        r.speedup_vs_best_ar = r.tokens_per_s / best if best else 0.0
        # (the cost model times eager steps: a compiled row has no projection)
        r.projected_tokens_per_s = project(cost, r) if cost is not None and not r.compiled else None


def run_sweeps(policy, tok, cfg: BenchConfig, cost: CostModel) -> list[RunResult]:
    sw, out = cfg.sweep, []
    B = sw.batch_size
    samples = prompts_for(cfg, max(B * cfg.prompts_per_row, cfg.min_prompts))
    for K in sw.block_sizes:
        r, _ = run_cell(policy, tok, samples, B, cfg, "lossless", levels=(0,), block_size=K)
        r.sweep = "block_size"
        out.append(r)
    for lv in sw.levels:
        r, _ = run_cell(policy, tok, samples, B, cfg, "lossless", levels=lv)
        r.sweep = "levels"
        out.append(r)
    for w in sw.mix_weights:
        r, _ = run_cell(policy, tok, samples, B, cfg, "logit_mix", levels=cfg.mix_levels, mix_weight=w)
        r.sweep = "mix_weight"
        out.append(r)
    for t in sw.draft_temperatures:
        r, _ = run_cell(
            policy,
            tok,
            samples,
            B,
            cfg,
            "logit_mix",
            levels=cfg.mix_levels,
            mix_weight=cfg.mix_weight,
            draft_temperature=t,
        )
        r.sweep = "draft_temperature"
        out.append(r)
    for b in sw.batch_sizes:
        s = prompts_for(cfg, max(b * cfg.prompts_per_row, cfg.min_prompts))
        for sampler in ("ar", "lossless"):
            r, _ = run_cell(policy, tok, s, b, cfg, sampler, levels=cfg.mix_levels)
            r.sweep = "batch_size"
            out.append(r)
    tasks = [s.sample for s in samples if s.sample is not None]
    if sw.prompt_lens and len(tasks) < len(samples):
        log.info("bench: sweep.prompt_lens left out: it pads built-in task prompts with worked examples")
    for extra in sw.prompt_lens if len(tasks) == len(samples) else []:
        # longer prompts: worked examples of other prompts as context (in-distribution)
        padded = []
        for i, s in enumerate(tasks):
            long = TaskSample(s.task, worked_prefix(tasks, i, extra) + s.prompt, s.completion, s.entry)
            padded.append(BenchPrompt(PromptRow.from_task(long, s.task), long))
        for sampler in ("ar", "lossless"):
            r, _ = run_cell(policy, tok, padded, B, cfg, sampler, levels=cfg.mix_levels)
            r.sweep = f"prompt_len+{extra}"
            out.append(r)
    for fmt in sw.prompt_formats:  # the same prompts, encoded another way
        other = cfg.model_copy(update={"prompt_format": fmt})
        for sampler in ("ar", "lossless"):
            r, _ = run_cell(policy, tok, samples, B, other, sampler, levels=cfg.mix_levels)
            r.sweep = f"prompt_format={fmt}"
            out.append(r)
    for name in dict.fromkeys(r.sweep for r in out):  # ratios within each sweep, against its own ar row
        finish_rows([r for r in out if r.sweep == name], None)
    return out


def worked_prefix(samples: list[TaskSample], i: int, min_chars: int) -> str:
    """Gold worked examples of the other prompts, whole, until at least `min_chars` characters."""
    text, j = "", i
    while len(text) < min_chars:
        j = (j + 1) % len(samples)
        text += samples[j].prompt + samples[j].completion + "\n"
    return text
