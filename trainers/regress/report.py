"""Reporting for `blockrl regress`: the console summary, `report.md` with PNG plots (solve rate and reward with
their intervals vs the baseline, acceptance by draft position and tokens per forward, throughput vs the AR path),
and the wandb log."""

from __future__ import annotations

from pathlib import Path

from common.plots import pyplot
from trainers.regress.stats import Check

PLOTS = ("solve_rate.png", "acceptance.png", "throughput.png")


def verdict(out) -> str:
    if out.updated:
        return f"BASELINE UPDATED ({out.baseline_path})"
    return (
        f"FAIL: {len(out.failed)} of {len(out.checks)} gates"
        if out.failed
        else f"PASS ({len(out.checks)} gates)"
    )


def sampler_line(name: str, m, base) -> str:
    """`lossless  solve 78.3% [72.6, 83.1] (base 78.3%) | reward 0.81 | pass@4 0.95 | tpf 8.6 | ...`."""
    lo, hi = m.solve_ci95
    s = f"{name:<10} solve {m.solve_rate:.1%} [{100 * lo:.1f}, {100 * hi:.1f}]"
    if base is not None:
        s += f" (base {base.solve_rate:.1%})"
    s += f" | reward {m.reward_mean:.3f}"
    s += "".join(f" | pass@{k} {v:.3f}" for k, v in m.pass_at_k.items())
    if m.block_size:
        s += f" | tpf {m.tokens_per_forward:.2f} | accept {m.accept_rate:.2f}"
    return s + f" | {m.tok_per_s:.0f} tok/s ({m.speedup_vs_ar:.2f}x ar)"


def format_console(out) -> str:
    base = out.baseline.samplers if out.baseline is not None else {}
    lines = [sampler_line(n, m, base.get(n)) for n, m in out.results.samplers.items()]
    lines += [f"REGRESSION {c.describe()}" for c in out.failed]
    lines += [f"note: {n}" for n in out.notes]
    lines.append(f"regress: {verdict(out)} | report: {out.run_dir / 'report.md'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report.md
def _pct_ci(rate: float, ci) -> str:
    return f"{100 * rate:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _summary_table(out) -> list[str]:
    base = out.baseline.samplers if out.baseline is not None else {}
    ks = list(next(iter(out.results.samplers.values())).pass_at_k)
    head = ["sampler", "solve rate (Wilson 95%)", "baseline", "reward (bootstrap 95%)", "baseline"]
    head += [f"pass@{k}" for k in ks] + ["TPF", "accept", "tok/s", "vs ar", "baseline vs ar"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in out.results.samplers.items():
        b = base.get(name)
        cells = [
            name,
            _pct_ci(m.solve_rate, m.solve_ci95),
            _pct_ci(b.solve_rate, b.solve_ci95) if b else "-",
            f"{m.reward_mean:.3f} [{m.reward_ci95[0]:.3f}, {m.reward_ci95[1]:.3f}]",
            f"{b.reward_mean:.3f}" if b else "-",
        ]
        cells += [
            f"{m.pass_at_k[k]:.3f}" + (f" ({b.pass_at_k[k]:.3f})" if b and k in b.pass_at_k else "")
            for k in ks
        ]
        cells += [
            f"{m.tokens_per_forward:.2f}",
            f"{m.accept_rate:.2f}" if m.block_size else "-",
            f"{m.tok_per_s:.0f}",
            f"{m.speedup_vs_ar:.2f}x",
            f"{b.speedup_vs_ar:.2f}x" if b else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _task_table(out) -> list[str]:
    base = out.baseline.samplers if out.baseline is not None else {}
    tasks = list(next(iter(out.results.samplers.values())).per_task)
    rows = ["| sampler | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, m in out.results.samplers.items():
        b = base.get(name)
        cells = [
            _pct_ci(m.per_task[t].rate, m.per_task[t].ci95)
            + (f" (base {100 * b.per_task[t].rate:.1f}%)" if b and t in b.per_task else "")
            for t in tasks
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def _gate_table(checks: list[Check]) -> list[str]:
    rows = [
        "| gate | baseline | now | test | p-value / change | fails if | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        stat = (
            f"{c.p_value:.2g}"
            if c.p_value is not None
            else f"{100 * (c.now / c.baseline - 1) if c.baseline else 0:+.1f}%"
        )
        rows.append(
            f"| {c.name} | {c.baseline:.4g} | {c.now:.4g} | {c.test or 'relative'} | {stat} | "
            f"{c.threshold} | {'**FAIL**' if c.failed else 'ok'} |"
        )
    return rows


def write_report(out, cfg) -> Path:
    """report.md plus the PNGs it shows, in the run dir."""
    plot_solve(out, out.run_dir / PLOTS[0])
    plot_acceptance(out, out.run_dir / PLOTS[1])
    plot_throughput(out, out.run_dir / PLOTS[2], cfg.tolerance.speedup_rel)
    r, meta = out.results, out.results.meta
    suite = r.suite
    if "prompts_sha256" in suite:  # the researcher's prompts file
        m = next(iter(r.samplers.values()))
        source = (
            f"`{cfg.prompts_file}` (rows sha256 {suite['prompts_sha256']}): {m.n_prompts} prompts, labels "
            f"{', '.join(m.per_task)}"
        )
    else:
        source = (
            f"{len(suite['tasks'])} tasks ({', '.join(suite['tasks'])}) x {suite['prompts_per_task']} prompts, "
            f"prompt seed {suite['prompt_seed']}"
        )
    rewards = (
        ", ".join(f"{x['function']} x {x['weight']:g}" for x in suite.get("rewards", []))
        or "the built-in verifier"
    )
    lines = [f"# blockrl regress: {verdict(out)}", ""]
    lines += [
        f"- checkpoint: `{meta['checkpoint']}` (weights sha256 {meta['checkpoint_sha256']}), run {r.created}",
        f"- suite: {source} x {suite['samples_per_prompt']} samples, T={suite['temperature']:g}, "
        f"max_new_tokens {suite['max_new_tokens']}, batch {suite['max_batch']}, sampling seed {suite['seed']}",
        f"- rewards: {rewards}; solved = reward >= {suite.get('solve_threshold', 1.0):g}",
        f"- device: {meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}; "
        f"throughput: median of {cfg.repeats} alternating pass(es)",
    ]
    if out.baseline is not None:
        b = out.baseline
        lines.append(
            f"- baseline: `{out.baseline_path}` ({b.created}, `{b.meta.get('checkpoint')}` sha256 "
            f"{b.meta.get('checkpoint_sha256')}, {b.meta.get('device')})"
        )
    t = cfg.tolerance
    tests = sorted({c.test for c in out.checks if c.p_value is not None})
    lines.append(
        f"- gates: quality one-sided tests ({', '.join(tests) or 'none'}; paired = same prompt and seed "
        f"as the baseline's sample) with Holm step-down at family-wise alpha {t.alpha:g} and a drop > "
        f"{t.min_effect:g}; TPF/accept relative drop > {t.tpf_rel}; speed-up vs ar relative drop > "
        f"{t.speedup_rel} (None = not gated)"
    )
    lines.append(f"- reproduce: `blockrl regress --config {out.run_dir / 'config.yaml'}`")
    lines += [f"- note: {n}" for n in out.notes]
    if out.failed:
        lines += ["", "## Regressions", ""] + [f"- `{c.describe()}`" for c in out.failed]
    lines += ["", "## Samplers", "", *_summary_table(out)]
    lines += ["", "## Solve rate per task", "", *_task_table(out)]
    if out.checks:
        lines += ["", "## Gates", "", *_gate_table(out.checks)]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in PLOTS] + [""]
    path = out.run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------------------ plots
def _bars(ax, now: dict, base: dict, attr: str, ci: str | None, ylabel: str) -> None:
    """Per sampler, side-by-side bars of `attr`: baseline (grey, when present) and now (blue), with the `ci`
    interval as error bars."""
    names = list(now)
    xs = range(len(names))
    for shift, src, color, label in ((-0.2, base, "0.7", "baseline"), (0.2, now, "tab:blue", "now")):
        have = [n for n in names if n in src]
        if not have:
            continue
        vals = [getattr(src[n], attr) for n in have]
        err = None
        if ci is not None:
            cis = [getattr(src[n], ci) for n in have]
            err = [
                [max(0.0, v - c[0]) for v, c in zip(vals, cis, strict=True)],
                [max(0.0, c[1] - v) for v, c in zip(vals, cis, strict=True)],
            ]
        ax.bar(
            [names.index(n) + shift for n in have], vals, 0.4, color=color, label=label, yerr=err, capsize=3
        )
    ax.set_xticks(list(xs), names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def plot_solve(out, path: Path) -> None:
    plt = pyplot()
    base = out.baseline.samplers if out.baseline is not None else {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    _bars(a1, out.results.samplers, base, "solve_rate", "solve_ci95", "solve rate (Wilson 95%)")
    _bars(a2, out.results.samplers, base, "reward_mean", "reward_ci95", "mean reward (bootstrap 95%)")
    a1.set_ylim(0, 1.05)
    a2.set_ylim(0, 1.05)
    fig.suptitle("quality per sampler: now vs baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_acceptance(out, path: Path) -> None:
    plt = pyplot()
    base = out.baseline.samplers if out.baseline is not None else {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(out.results.samplers)
    for i, name in enumerate(n for n in names if out.results.samplers[n].block_size):
        m, b, c = out.results.samplers[name], base.get(name), colors[i % len(colors)]
        # drawn first, wide and light: visible under an identical "now"
        if b is not None and b.accept_by_position:
            xb = range(1, len(b.accept_by_position) + 1)
            a1.plot(xb, b.accept_by_position, "--", color=c, lw=3, alpha=0.4, label=f"{name} baseline")
        xs = range(1, len(m.accept_by_position) + 1)
        a1.plot(xs, m.accept_by_position, "o-", color=c, ms=3, label=f"{name} now")
    a1.set_xlabel("draft position i")
    a1.set_ylabel("P(accept i | 1..i-1 accepted)")
    a1.set_ylim(0, 1.05)
    a1.legend(fontsize=7)
    _bars(a2, out.results.samplers, base, "tokens_per_forward", None, "tokens per forward")
    fig.suptitle("acceptance: now vs baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_throughput(out, path: Path, rel_tol: float | None) -> None:
    plt = pyplot()
    base = out.baseline.samplers if out.baseline is not None else {}
    names = list(out.results.samplers)
    now = [out.results.samplers[n] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _bars(ax, out.results.samplers, base, "speedup_vs_ar", None, "tok/s vs engine ar (median)")
    for x, m in enumerate(now):  # every timed pass
        ax.plot([x + 0.2] * len(m.speedup_runs), m.speedup_runs, "k.", ms=4)
        if rel_tol is not None and names[x] in base and m.block_size:
            ax.plot([x - 0.4, x + 0.4], [base[names[x]].speedup_vs_ar * (1 - rel_tol)] * 2, "r-", lw=1)
    ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
    ax.set_title("throughput ratio vs AR (red: fail line)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ wandb
def flat_metrics(out) -> dict[str, float]:
    m: dict[str, float] = {
        "regress/failed_gates": float(len(out.failed)),
        "regress/gates": float(len(out.checks)),
    }
    for name, s in out.results.samplers.items():
        p = f"regress/{name}/"
        m |= {
            p + "solve_rate": s.solve_rate,
            p + "reward_mean": s.reward_mean,
            p + "tokens_per_forward": s.tokens_per_forward,
            p + "accept_rate": s.accept_rate,
            p + "tok_per_s": s.tok_per_s,
            p + "speedup_vs_ar": s.speedup_vs_ar,
        }
        m |= {p + f"pass@{k}": v for k, v in s.pass_at_k.items()}
        m |= {p + f"{t}/solve_rate": r.rate for t, r in s.per_task.items()}
    return m


def log_wandb(out, cfg) -> None:
    from common.metrics import WandbSink

    sink = WandbSink(out.run_dir, cfg.wandb_project, cfg.model_dump(mode="json"), cfg.wandb)
    try:
        sink.log(0, flat_metrics(out))
        import wandb

        sink.run.log({f"regress/{p[:-4]}": wandb.Image(str(out.run_dir / p)) for p in PLOTS}, step=0)
        sink.run.summary["regress/verdict"] = verdict(out)
    finally:
        sink.close()
