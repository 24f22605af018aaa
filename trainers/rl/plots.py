"""PNG curves of RL runs from their `metrics.jsonl`.

- `plot_run(run_dir)` -> `<run_dir>/curves.png`: reward (mean, and per task or reward function), acceptance (tokens
  per forward, accept rate) and, when the run evaluates, the held-out solve rate or mean reward.
- `plot_compare({label: run_dir}, out)`: acceptance of several runs side by side (e.g. the lambda_diff ablation),
  each step faint and a 5-step running mean bold; `compare_table` is the same comparison as a markdown table.

    python -m trainers.rl.plots runs/grpo-abl-ld0 runs/grpo-abl-ld05 --labels "lambda_diff=0" "lambda_diff=0.5" \\
        --out docs/ablation_lambda_diff.png --table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.plots import pyplot


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path) -> Path:
    plt = pyplot()
    run_dir = Path(run_dir)
    fig = run_figure(_records(run_dir))
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _label(key: str) -> str:
    """`reward/<task>/mean` -> the task, `reward/fn/<function>/mean` -> the function's name."""
    return key.removeprefix("reward/").removesuffix("/mean").removeprefix("fn/")


def run_figure(recs: list[dict]):
    """The run's curves: batch reward (all, per task or reward function), acceptance, and the held-out evaluation
    (solve rate on the built-in tasks, or mean reward on a prompt file's held-out rows) when the run has one."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    evals = [k for k in ("eval/solve_rate", "eval/reward_mean") if any(k in r for r in recs)]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(16 if evals else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(*_series(recs, "reward/mean"), label="all", lw=2)
    for key in sorted({k for r in recs for k in r if k.startswith("reward/") and k.endswith("/mean")}):
        if key != "reward/mean":
            ax1.plot(*_series(recs, key), label=_label(key), lw=1, alpha=0.7)
    ax1.set(xlabel="RL step", ylabel="batch reward")
    ax1.legend(fontsize=7)
    lines = ax2.plot(*_series(recs, "rollout/tokens_per_forward"), label="tokens per forward")
    ax2.set(xlabel="RL step", ylabel="tokens per forward")
    if any("rollout/accept_rate" in r for r in recs):
        twin = ax2.twinx()
        lines += twin.plot(*_series(recs, "rollout/accept_rate"), color="tab:orange", label="accept rate")
        twin.set_ylabel("accept rate")
    ax2.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower left")  # both axes' lines
    if evals:
        ax3 = axes[2]
        if "eval/solve_rate" in evals:
            ax3.plot(*_series(recs, "eval/solve_rate"), "o-", lw=2, label="task mix")
            for key in sorted({k for r in recs for k in r if k.startswith("eval/") and k.count("/") == 2}):
                ax3.plot(*_series(recs, key), ".--", lw=1, alpha=0.7, label=key.split("/")[1])
            ax3.set(ylabel="held-out solve rate (T=1)", ylim=(0, 1.02))
        else:
            ax3.plot(*_series(recs, "eval/reward_mean"), "o-", lw=2, label="held-out rows")
            ax3.set(ylabel="held-out mean reward")
        ax3.set(xlabel="RL step")
        ax3.legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    fig.tight_layout()
    return fig


def _running_mean(ys: list[float], n: int = 5) -> list[float]:
    return [sum(ys[max(0, i - n + 1) : i + 1]) / len(ys[max(0, i - n + 1) : i + 1]) for i in range(len(ys))]


def plot_compare(runs: dict[str, str | Path], out: str | Path) -> Path:
    """Acceptance rate and tokens per forward per RL step for each run, on shared axes (faint: each step; bold: the
    5-step running mean)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, run_dir) in enumerate(runs.items()):
        recs = _records(Path(run_dir))
        for ax, key in ((ax1, "rollout/accept_rate"), (ax2, "rollout/tokens_per_forward")):
            x, y = _series(recs, key)
            ax.plot(x, y, color=f"C{i}", lw=0.8, alpha=0.3)
            ax.plot(x, _running_mean(y), color=f"C{i}", lw=2, label=label)
    ax1.set(xlabel="RL step", ylabel="draft accept rate")
    ax2.set(xlabel="RL step", ylabel="tokens per forward")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _window_mean(recs: list[dict], key: str, lo: int, hi: int) -> float:
    ys = [r[key] for r in recs if lo <= r["step"] <= hi and key in r]
    return sum(ys) / len(ys) if ys else float("nan")


def compare_table(runs: dict[str, str | Path], window: int = 5) -> str:
    """Markdown: per run, tokens per forward and accept rate over the first and last `window` steps (mean) and
    their relative change, the batch reward of the last 10 steps, and the median learner seconds per step."""
    rows = [
        f"| run | tokens/forward, steps 1-{window} -> last {window} | change | accept rate, first -> last | change "
        "| reward, last 10 | learner s/step (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run_dir in runs.items():
        recs = _records(Path(run_dir))
        last = max(r["step"] for r in recs)
        cells = [label]
        for key in ("rollout/tokens_per_forward", "rollout/accept_rate"):
            a, b = _window_mean(recs, key, 1, window), _window_mean(recs, key, last - window + 1, last)
            cells += [f"{a:.2f} -> {b:.2f}", f"{100 * (b / a - 1):+.1f}%"]
        cells.append(f"{_window_mean(recs, 'reward/mean', last - 9, last):.3f}")
        train_s = sorted(r["time/train_s"] for r in recs if "time/train_s" in r)
        cells.append(f"{train_s[len(train_s) // 2]:.2f}" if train_s else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="compare the acceptance curves of RL runs")
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    p.add_argument("--labels", nargs="*", default=None, help="one label per run (default: directory names)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--table", action="store_true", help="also print the comparison as a markdown table")
    args = p.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    runs = dict(zip(labels, args.runs, strict=True))
    print(plot_compare(runs, args.out))
    if args.table:
        print(compare_table(runs))


if __name__ == "__main__":
    main()
