"""Where a decode step's time goes: its phases (`PHASES`) and the timer that brackets them (`StepTimer`), for
`BlockEngine.profile_decode_steps` and `blockrl bench --profile`."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = (
    "body",
    "heads",
    "verify",
    "drafts",
    "history",
    "bookkeeping",
)  # a decode step's parts (`StepTimer`)
UNTIMED = contextlib.nullcontext()  # a phase when no timer is set


class StepTimer:
    """Wall time of a decode step's phases: the forward body (mask layout, decoder layers), the LM heads (verify
    slots and the chosen proposal block), the verify (processors, uniforms, the fused ratio test and draw), draft
    selection, history drafts (index updates and lookups, rollout/history.py), and bookkeeping (the one host read,
    stop checks, cache commit). On CUDA each phase is bracketed by a
    synchronize, so profiling adds syncs: it measures, it is not the fast path."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[phase] += time.perf_counter() - t
