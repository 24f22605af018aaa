"""Peak memory per phase of one process (rollout, train, sync), for the step's metrics.

On a GPU it is what the peers bound: the CUDA allocator's peak over the phase (`torch.cuda.max_memory_allocated`,
reset when the phase opens). On the CPU there is no per-phase peak to read, so it is the host resident set at the
phase's end (`/proc/self/statm`): a lower bound of the phase's peak, comparable across phases and steps.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def host_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PhaseMemory:
    """`with memory.phase("train"): ...` records that phase's peak; `take()` returns {memory/<phase>_gb} since the
    last take (the largest of each phase's occurrences) and starts afresh."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: dict[str, int] = {}

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            used = torch.cuda.max_memory_allocated(self.device) if self.cuda else host_rss_bytes()
            self.peaks[name] = max(self.peaks.get(name, 0), used)

    def take(self) -> dict[str, float]:
        out = {f"memory/{k}_gb": v / 2**30 for k, v in self.peaks.items()}
        self.peaks = {}
        return out
