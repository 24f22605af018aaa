"""auto's calibration cache for `blockrl serve`: the cost model's step timings per checkpoint, machine and settings,
so a restart with an equal key skips the timing (`ServeConfig.calibration_cache`)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from policy.compiled import compile_enabled
from rollout.cost_model import CostModel
from rollout.serve.config import ServeConfig
from rollout.types import Option

CALIBRATION_FORMAT = 1  # bump when what `CostModel.calibrate` times, or how, changes


def calibration_key(
    cfg: ServeConfig, device: torch.device, options: list[Option], block_size: int, sizes: list[int]
) -> dict:
    """Everything auto's step timings depend on, as JSON values: the checkpoint (its path, and the size and mtime
    of its config and weight files), the machine (CPU model and count, torch threads, the device and its GPU, the
    dtype, torch's version) and the timing settings (options, batch sizes, block size, compiled or not). A cached calibration is
    used only under an equal key."""
    ckpt = Path(cfg.checkpoint).resolve()
    files = [
        [f.name, f.stat().st_size, f.stat().st_mtime_ns]
        for f in (sorted(ckpt.iterdir()) if ckpt.is_dir() else [])
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    ]
    machine = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": cfg.dtype,
        "torch": torch.__version__,
    }
    settings = {
        "options": [o.name for o in options],
        "batch_sizes": list(sizes),
        "block_size": block_size,
        "compile": compile_enabled(cfg.compile, device),  # a compiled step costs less: its own timings
        "format": CALIBRATION_FORMAT,
    }
    return {"checkpoint": str(ckpt), "files": files, "machine": machine, "settings": settings}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path(cache_dir: str, key: dict) -> Path:
    """`<cache_dir>/<checkpoint folder>-<hash of the key>.json`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(key['checkpoint']).name}-{digest}.json"


def write_calibration(path: Path, key: dict, cost: CostModel) -> None:
    """The cost model's timings under `key`, written whole or not at all (a temp file, then renamed)."""
    body = {
        "key": key,
        "step_seconds": [[name, b, s] for (name, b), s in cost.step_seconds.items()],
        "prefill_seconds": [[name, b, s] for (name, b), s in cost.prefill_seconds.items()],
        "draftless_seconds": cost.draftless_seconds,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)


def read_calibration(path: Path, key: dict, cost: CostModel, sizes: list[int]) -> bool:
    """Load the timings at `path` into `cost` if the file holds exactly `key` and a timing of every option at
    every size; False (and `cost` untouched) for a missing, unreadable, stale or partial file."""
    try:
        body = json.loads(path.read_text())
        if body.get("key") != json.loads(json.dumps(key)):
            return False
        step = {(n, int(b)): float(s) for n, b, s in body["step_seconds"]}
        prefill = {(n, int(b)): float(s) for n, b, s in body["prefill_seconds"]}
        bare = {str(n): float(s) for n, s in body["draftless_seconds"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    names = key["settings"]["options"]
    if any((n, b) not in step or (n, b) not in prefill for n in names for b in sizes):
        return False
    cost.step_seconds.update(step)
    cost.prefill_seconds.update(prefill)
    cost.draftless_seconds.update(bare)
    return True
