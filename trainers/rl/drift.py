"""Drift detection across RL steps: EWMA-smoothed statistics against a reference window, with a
Page-Hinkley test per monitored metric.

Each `Detector` watches one scalar (e.g. `rollout/tokens_per_forward`, `reward/mean`, `reward/std`) in one direction
("down" for an acceptance drop or a reward regression, "up" for exploding reward variance). The first `warmup`
values form the reference mean and scale; after that the Page-Hinkley statistic accumulates deviations beyond a
tolerance `delta` (in reference standard deviations) and alarms when it exceeds `threshold`. The state is a small
dataclass, saved with trainer checkpoints so a resumed run keeps its alarms' history.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import Field

from common.config import Section


class DetectorConfig(Section):
    """One monitored metric."""

    metric: str
    """metrics key, e.g. rollout/tokens_per_forward."""
    direction: Literal["down", "up"] = "down"
    """alarm on a drop (acceptance, reward) or a rise (reward variance)."""
    warmup: int = Field(8, ge=2)
    """steps forming the reference window."""
    delta: float = Field(1.0, ge=0.0)
    """tolerated deviation, in reference standard deviations."""
    threshold: float = Field(10.0, gt=0.0)
    """Page-Hinkley alarm level, in reference standard deviations."""
    ewma: float = Field(0.3, gt=0.0, le=1.0)
    """smoothing of the reported EWMA."""


@dataclass
class DetectorState:
    n: int = 0
    ref_values: list[float] = field(default_factory=list)
    ref_mean: float = 0.0
    ref_std: float = 1.0
    ewma: float | None = None
    ph: float = 0.0  # Page-Hinkley cumulative statistic (>= 0)
    alarms: int = 0


class Detector:
    def __init__(self, cfg: DetectorConfig, state: DetectorState | None = None):
        self.cfg, self.state = cfg, state or DetectorState()

    def update(self, value: float) -> bool:
        """Feed one step's value; True when this step raises an alarm (the statistic then restarts)."""
        c, s = self.cfg, self.state
        if value is None or not math.isfinite(value):
            return False
        s.n += 1
        s.ewma = value if s.ewma is None else c.ewma * value + (1 - c.ewma) * s.ewma
        if len(s.ref_values) < c.warmup:
            s.ref_values.append(value)
            if len(s.ref_values) == c.warmup:
                s.ref_mean = sum(s.ref_values) / c.warmup
                var = sum((v - s.ref_mean) ** 2 for v in s.ref_values) / (c.warmup - 1)
                s.ref_std = max(math.sqrt(var), 1e-3 * max(1.0, abs(s.ref_mean)))
            return False
        z = (value - s.ref_mean) / s.ref_std
        dev = -z if c.direction == "down" else z
        s.ph = max(0.0, s.ph + dev - c.delta)
        if s.ph > c.threshold:
            s.alarms += 1
            s.ph = 0.0
            return True
        return False

    def to_dict(self) -> dict:
        return asdict(self.state)


class DriftMonitor:
    """All detectors of a run; `update(metrics)` returns the metric names that alarmed this step."""

    def __init__(self, configs: list[DetectorConfig], states: dict[str, dict] | None = None):
        states = states or {}
        self.detectors = {
            c.metric: Detector(c, DetectorState(**states[c.metric]) if c.metric in states else None)
            for c in configs
        }

    def update(self, metrics: dict[str, float]) -> list[str]:
        return [name for name, d in self.detectors.items() if name in metrics and d.update(metrics[name])]

    def metrics(self) -> dict[str, float]:
        out = {}
        for name, d in self.detectors.items():
            key = name.replace("/", "_")
            out[f"drift/{key}_ph"] = d.state.ph
            out[f"drift/{key}_alarms"] = float(d.state.alarms)
            if d.state.ewma is not None:
                out[f"drift/{key}_ewma"] = d.state.ewma
        return out

    def state_dict(self) -> dict[str, dict]:
        return {name: d.to_dict() for name, d in self.detectors.items()}
