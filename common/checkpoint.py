"""Atomic checkpoints: an HF model directory plus trainer state, swapped in with renames so a crash never leaves a
half-written checkpoint behind.

Layout of `<run_dir>/checkpoint/`: the HF files (safetensors, config with blockrl metadata, tokenizer) and
`trainer_state.pt` (optimizer, step, RNG states, anything else the trainer adds).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConfigError

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states: CPU torch, numpy, python, and one CUDA state per visible GPU under "cuda"."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": _cuda_rng_states(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _cuda_rng_states() -> list[torch.Tensor]:
    """Per-GPU generator states; [] where CUDA was never initialised in this process: it never drew on a GPU, so
    there is nothing to resume (and a CPU-only driver is not made to open a CUDA context just to checkpoint)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    return list(torch.cuda.get_rng_state_all())


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s output. CUDA states are restored for the GPUs both runs have: a checkpoint written
    without them (older format, or a CPU run) or with a different GPU count still loads."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda", [])
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)  # lazy until CUDA initialises


def atomic_dir_write(dest: Path, write) -> None:
    """Call `write(tmp_dir)`, then replace `dest` by it: rename old away, rename new in, delete old."""
    dest = Path(dest)
    tmp, old = dest.with_name(dest.name + ".tmp"), dest.with_name(dest.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def recover(dest: Path) -> None:
    """After a crash between the two renames only `<dest>.old` exists: bring it back."""
    old = dest.with_name(dest.name + ".old")
    if not dest.exists() and old.exists():
        os.replace(old, dest)


def require_checkpoint(path: str | Path, field: str = "checkpoint") -> None:
    """A config error naming `field` unless `path` is an HF checkpoint directory."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(missing_checkpoint(path, field))


def missing_checkpoint(path: str | Path, field: str) -> str:
    """Why `path` is no checkpoint, and, when it reads as a Hub id, how to get one: blockrl runs with the Hub
    offline (HF_HUB_OFFLINE=1), so a model is downloaded first, by hand."""
    msg = f"{field}: {path} is not a checkpoint directory (no config.json)"
    p = str(path)
    if not Path(p).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", p) and not p.startswith("."):
        msg += (
            f"; {p!r} looks like a Hugging Face Hub id, and blockrl runs with the Hub offline: download it first, "
            f"e.g. `hf download {p} --local-dir models/{p.split('/')[1]}`, and pass that directory"
        )
    return msg


def save_checkpoint(dest: Path, policy, tokenizer, state: dict[str, Any]) -> None:
    """The policy as an HF directory plus `state` and this process's RNG states (unless `state` carries the RNG of
    another process: a learner group's rank 0 writes the driver's)."""

    def write(tmp: Path) -> None:
        policy.save_pretrained(tmp, tokenizer)
        torch.save({"rng": rng_state(), **state}, tmp / STATE_FILE)

    atomic_dir_write(dest, write)


def read_trainer_state(dest: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, leaving this process's RNG alone."""
    return torch.load(Path(dest) / STATE_FILE, weights_only=False, map_location="cpu")  # any device resumes


def load_trainer_state(dest: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint, restoring this process's RNG from it."""
    state = read_trainer_state(dest)
    set_rng_state(state.pop("rng"))
    return state
