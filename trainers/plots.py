"""PNG curves of an RL run from its `metrics.jsonl`: reward (mean and per task) and acceptance (tokens per forward,
accept rate), written into the run directory."""

from __future__ import annotations

import json
from pathlib import Path


def plot_run(run_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in recs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, [r.get("reward/mean") for r in recs], label="all", lw=2)
    for key in sorted({k for r in recs for k in r if k.startswith("reward/") and k.endswith("/mean")}):
        if key != "reward/mean":
            ax1.plot(steps, [r.get(key) for r in recs], label=key.split("/")[1], lw=1, alpha=0.7)
    ax1.set_xlabel("RL step")
    ax1.set_ylabel("reward")
    ax1.legend(fontsize=7)
    ax2.plot(steps, [r.get("rollout/tokens_per_forward") for r in recs], label="tokens per forward")
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("tokens per forward")
    if any("rollout/accept_rate" in r for r in recs):
        twin = ax2.twinx()
        twin.plot(
            steps, [r.get("rollout/accept_rate") for r in recs], color="tab:orange", label="accept rate"
        )
        twin.set_ylabel("accept rate")
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
