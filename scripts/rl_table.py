"""Means of a few metrics over windows of RL steps, one row per run: `python scripts/rl_table.py RUN... [--steps
1-5 16-20]` (reads RUN/metrics.jsonl; the rollout share is time/rollout_s over time/step_s)."""

import argparse
import json
from pathlib import Path

KEYS = {
    "tpf": "rollout/tokens_per_forward",
    "tok/s": "perf/tok_per_s",
    "rollout s": "time/rollout_s",
    "step s": "time/step_s",
    "history share": "rollout/history_share",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--steps", nargs="+", default=["1-5", "16-20"])
    args = ap.parse_args()
    windows = [tuple(map(int, w.split("-"))) for w in args.steps]
    head = ["run"] + [f"{k} {a}-{b}" for a, b in windows for k in KEYS] + ["rollout share"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for run in args.runs:
        recs = [
            json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines() if line.strip()
        ]
        cells = [Path(run).name]
        for a, b in windows:
            win = [r for r in recs if a <= r.get("step", -1) <= b and "time/rollout_s" in r]
            for key in KEYS.values():
                vals = [r[key] for r in win if key in r]
                cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "-")
        both = [r for r in recs if "time/step_s" in r and "time/rollout_s" in r and r["step"] > 1]
        share = sum(r["time/rollout_s"] for r in both) / max(1e-9, sum(r["time/step_s"] for r in both))
        cells.append(f"{share:.0%}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
