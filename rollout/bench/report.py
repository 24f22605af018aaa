"""Reporting for `blockrl bench`: results JSON (with the device named), a rich table, and a PNG of the runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from common.plots import pyplot
from rollout.bench.config import BenchConfig, RunResult
from rollout.bench.run import model_label
from rollout.types import levels_label


def write_json(
    results: list[RunResult], path: Path, cfg: BenchConfig, batch_sizes_done: list[int] | None = None
) -> None:
    """The results JSON. With `batch_sizes_done` it is a partial one, written as each batch size finishes
    (`"partial": true`: the run may yet stop, e.g. at a time box); the final write has `"partial": false`.
    Written to a temporary file and renamed, so a run killed mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": cfg.model_dump(mode="json"), "device": device_name(), "threads": cfg.threads}
    body = {
        "partial": batch_sizes_done is not None,
        "batch_sizes_done": list(cfg.batch_sizes) if batch_sizes_done is None else batch_sizes_done,
        "meta": meta,
        "runs": [r.to_json() for r in results],
        "checkpoints": checkpoint_summary(results),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def print_table(results: list[RunResult]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    models = {r.label or r.checkpoint for r in results}
    table = Table(title=f"blockrl bench: {', '.join(sorted(models))} (median tokens/s over repeats)")
    for col in ("B", "sampler", "tok/s", "vs HF", "vs ar", "TPF", "solve", "MB"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r.batch_size),
            escape(row_name(r)),  # `lossless[end]` would read as markup
            f"{r.tokens_per_s:.0f}",
            f"{r.speedup_vs_hf:.2f}x" if r.speedup_vs_hf else "-",
            f"{r.speedup_vs_ar:.2f}x" if r.speedup_vs_ar else "-",
            f"{r.tokens_per_forward:.2f}",
            f"{r.solve_rate:.0%} ({r.solved}/{r.samples})" if r.samples else "-",
            f"{r.peak_mem_mb:.0f}",
        )
    console = Console(width=min(100, Console().width))  # fits a 100-column terminal (cells wrap)
    console.print(table)
    for r in results:
        if r.note:
            console.print(escape(r.note), soft_wrap=True)


def row_name(r: RunResult) -> str:
    """sampler, levels and draft source, the settings that differ, auto's choice and the sweep, in one cell."""
    name = r.sampler
    if r.drafts == "history":
        name += "[history]"
    elif r.sampler in ("lossless", "logit_mix"):
        name += levels_label(r.levels) + ("+history" if r.drafts == "both" else "")
    name += "+compiled" if r.compiled else ""
    name += f" w={r.mix_weight}" if r.mix_weight is not None else ""
    name += f" T_d={r.draft_temperature:g}" if r.draft_temperature is not None else ""
    name += f" K={r.block_size}" if r.sweep == "block_size" else ""
    name += f" -> {r.choice}" if r.choice else ""
    if r.sweep and r.sweep not in ("block_size", "levels"):
        name += f" ({r.sweep})"
    return name


def print_profile(results: list[RunResult]) -> None:
    """`--profile`: ms per decode step by phase, and each phase's share, for every profiled row."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rollout.engine import PHASES

    rows = [r for r in results if r.step_ms]
    if not rows:
        return
    t = Table(title="decode step by phase (ms per step; share of the step)")
    for col in ("B", "sampler", "levels", "step ms", *PHASES, "other"):
        t.add_column(col, justify="right")
    for r in rows:
        total = r.step_ms["total"]
        cells = [f"{r.step_ms[ph]:.2f} ({r.step_ms[ph] / total:.0%})" for ph in (*PHASES, "other")]
        sampler = r.sampler + ("+compiled" if r.compiled else "")
        t.add_row(str(r.batch_size), sampler, escape(levels_label(r.levels)), f"{total:.2f}", *cells)
    Console(width=min(100, Console().width)).print(t)


def checkpoint_summary(results: list[RunResult]) -> list[dict]:
    """Per checkpoint and batch size: ar, and the best lossless level set by tokens/s (the side-by-side figures)."""
    out = []
    groups = dict.fromkeys(
        (r.checkpoint, r.batch_size) for r in results if not r.sweep or r.sweep.startswith("checkpoint=")
    )
    for ckpt, B in groups:
        rows = [
            r
            for r in results
            if (r.checkpoint, r.batch_size) == (ckpt, B)
            and (not r.sweep or r.sweep.startswith("checkpoint="))
        ]
        ar = next((r for r in rows if r.sampler == "ar"), None)
        best = max((r for r in rows if r.sampler == "lossless"), key=lambda r: r.tokens_per_s, default=None)
        if ar is None or best is None:
            continue
        out.append(
            {
                "checkpoint": ckpt,
                "vocab_size": best.vocab_size,
                "prompt_format": best.prompt_format,
                "batch_size": B,
                "ar_tokens_per_s": ar.tokens_per_s,
                "lossless_levels": best.levels,
                "lossless_tokens_per_s": best.tokens_per_s,
                "tokens_per_forward": best.tokens_per_forward,
                "speedup_vs_ar": best.speedup_vs_ar,
                "speedup_vs_hf": best.speedup_vs_hf,
                "accept_by_position": best.accept_by_position,
                "solve_rate": best.solve_rate,
            }
        )
    return out


def print_checkpoints(results: list[RunResult]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rows = checkpoint_summary(results)
    if len({r["checkpoint"] for r in rows}) < 2:
        return
    table = Table(title="checkpoints side by side (best lossless level set vs the engine's ar, same prompts)")
    for col in (
        "checkpoint",
        "vocab",
        "format",
        "B",
        "ar tok/s",
        "lossless",
        "tok/s",
        "TPF",
        "vs ar",
        "solve",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            model_label(r["checkpoint"]),
            str(r["vocab_size"]),
            r["prompt_format"],
            str(r["batch_size"]),
            f"{r['ar_tokens_per_s']:.0f}",
            escape(levels_label(r["lossless_levels"])),
            f"{r['lossless_tokens_per_s']:.0f}",
            f"{r['tokens_per_forward']:.2f}",
            f"{r['speedup_vs_ar']:.2f}x",
            f"{r['solve_rate']:.0%}",
        )
    Console(width=min(100, Console().width)).print(table)


def plot(results: list[RunResult], path: Path) -> None:
    plt = pyplot()

    main = [r for r in results if not r.sweep]
    sweeps = sorted({r.sweep for r in results if r.sweep})
    fig, axes = plt.subplots(1, 2 + len(sweeps), figsize=(6 * (2 + len(sweeps)), 4.5), squeeze=False)
    ax = axes[0, 0]
    bss = sorted({r.batch_size for r in main})
    labels = [f"{r.sampler}{levels_label(r.levels)}" for r in main if r.batch_size == bss[0]]
    width = 0.8 / max(1, len(bss))
    for i, B in enumerate(bss):
        vals = [r.speedup_vs_hf for r in main if r.batch_size == B]
        ax.bar([j + i * width for j in range(len(vals))], vals, width, label=f"B={B}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(
        [j + width * (len(bss) - 1) / 2 for j in range(len(labels))],
        labels,
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("tokens/s vs HF generate")
    ax.legend()
    ax = axes[0, 1]
    for r in main:
        if r.accept_by_position:
            ax.plot(
                range(1, len(r.accept_by_position) + 1),
                r.accept_by_position,
                marker=".",
                label=f"B={r.batch_size} {r.sampler}{levels_label(r.levels)}",
            )
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(accept | previous accepted)")
    ax.legend(fontsize=6)
    for k, name in enumerate(sweeps, start=2):
        ax = axes[0, k]
        rows = [r for r in results if r.sweep == name]
        ax.bar(
            [
                f"{r.sampler}{levels_label(r.levels) if name == 'levels' else ''}"
                + (f"K{r.block_size}" if name == "block_size" else "")
                + (f"w{r.mix_weight}" if name == "mix_weight" else "")
                + (f"T{r.draft_temperature:g}" if name == "draft_temperature" else "")
                + (f"B{r.batch_size}" if name == "batch_size" or name.startswith("checkpoint=") else "")
                for r in rows
            ],
            [r.tokens_per_s for r in rows],
        )
        ax.set_title(f"sweep: {name}")
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
