"""Metric sinks behind one protocol: stdout (one dense line per step), JSONL (the source of truth, resume-safe),
wandb (offline unless configured online, all its dirs inside the run directory), fanned out by `MultiSink`.

Keys are namespaced and stable: `rollout/tokens_per_forward`, `rollout/accept_pos_3`, `reward/mean`,
`drift/..._alarms`, `train/clipfrac`, `perf/tok_per_s`, `time/weight_sync_s`, `memory/train_gb`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JSONLSink:
    """Appends `{"step": n, ...}`; on resume, `truncate_after(step)` drops records a crash left past the checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        truncate_jsonl(self.path, step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.path, {"step": step, **metrics})

    def close(self) -> None:
        pass

    def read(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def format_line(step: int, total: int, m: dict[str, float]) -> str:
    """`step 42/200 | reward 0.61±0.20 | tpf 5.8 | accept 0.71 | tok/s 18.4k | rollout 4.1s train 2.3s sync 0.1s |
    mem 1.0GB`."""
    parts = [f"step {step}/{total}"]
    if "eval/solve_rate" in m:
        parts.append(f"held-out solve {m['eval/solve_rate']:.1%}")
    if "eval/reward_mean" in m:  # a prompt file's held-out rows
        parts.append(f"held-out reward {m['eval/reward_mean']:.3f}")
    if "reward/mean" in m:
        parts.append(f"reward {m['reward/mean']:.2f}±{m.get('reward/std', 0.0):.2f}")
    if "rollout/tokens_per_forward" in m:
        parts.append(f"tpf {m['rollout/tokens_per_forward']:.1f}")
    if "rollout/accept_rate" in m:
        parts.append(f"accept {m['rollout/accept_rate']:.2f}")
    if "perf/tok_per_s" in m:
        v = m["perf/tok_per_s"]
        parts.append(f"tok/s {v / 1000:.1f}k" if v >= 1000 else f"tok/s {v:.0f}")
    times = [
        f"{label} {m[k]:.1f}s"
        for label, k in (
            ("rollout", "time/rollout_s"),
            ("train", "time/train_s"),
            ("sync", "time/weight_sync_s"),
        )
        if k in m
    ]
    if times:
        parts.append(" ".join(times))
    memory = [v for k, v in m.items() if k.startswith("memory/")]
    if memory:  # the largest phase peak of any learner rank
        parts.append(f"mem {max(memory):.1f}GB")
    if "train/kl" in m:
        parts.append(f"kl {m['train/kl']:.3f}")
    if "rollout/logprob_mismatch" in m:
        parts.append(f"|dlogp| {m['rollout/logprob_mismatch']:.1e}")
    alarms = [k for k, v in m.items() if k.startswith("drift/") and k.endswith("_alarm") and v]
    if alarms:
        parts.append("ALARM " + ",".join(a[6:-6] for a in alarms))
    return " | ".join(parts)


class StdoutSink:
    def __init__(self, total_steps: int):
        self.total = total_steps

    def log(self, step: int, metrics: dict[str, float]) -> None:
        print(format_line(step, self.total, metrics), flush=True)

    def close(self) -> None:
        pass


class WandbSink:
    """wandb with every directory inside the run dir; `mode` "offline" (default), "online" or "disabled"."""

    def __init__(
        self, run_dir: str | Path, project: str, config: dict, mode: str = "offline", resume_id=None
    ):
        run_dir = Path(run_dir).resolve()
        for var, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", "wandb-cache"),
            ("WANDB_CONFIG_DIR", "wandb-config"),
            ("WANDB_DATA_DIR", "wandb-data"),
        ):
            path = run_dir / sub
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(path)
        os.environ.setdefault("WANDB_SILENT", "true")  # one dense line per step is ours; wandb stays quiet
        import wandb

        self.run = wandb.init(
            project=project,
            dir=str(run_dir),
            config=config,
            mode=mode,
            id=resume_id,
            resume="allow" if resume_id else None,
        )

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiSink:
    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a resume starts from), so no step is duplicated."""
    if not path.exists():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))
