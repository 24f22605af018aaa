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

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from envs.prompt_file import PromptRow
from envs.tasks import TaskSample
from policy.factory import build_model, make_config
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from policy.tokenizer import build_char_tokenizer
from rollout.auto import engine_factory
from rollout.bench.cells import BenchPrompt, Cell, profile_row, prompts_for, run_cell, run_cells
from rollout.bench.config import BenchConfig, RunResult
from rollout.cost_model import CostModel
from rollout.settings import EngineSettings

log = logging.getLogger(__name__)


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
