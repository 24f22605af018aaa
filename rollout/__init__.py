"""Block-diffusion rollout engine: ragged KV cache, samplers, trajectories."""

from rollout.engine import SAMPLERS, BlockEngine
from rollout.types import SamplingParams, Trajectory

__all__ = ["SAMPLERS", "BlockEngine", "SamplingParams", "Trajectory"]
