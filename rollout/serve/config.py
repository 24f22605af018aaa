"""`blockrl serve`'s config: the checkpoint and engine it serves, where it listens, and its request limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.config import ShippedPath
from rollout.settings import EngineSettings


class ServeConfig(EngineSettings):
    """An OpenAI-compatible server on one engine process (`sampler` is the default of requests that name none)."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """converted policy (HF directory) to serve."""
    host: str = "127.0.0.1"
    """interface to bind: loopback by default; 0.0.0.0 exposes the server to the network."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port (0 = any free port; the chosen one is logged)."""
    model_name: str | None = None
    """the model id clients pass as `model`; None = the checkpoint folder's name."""
    backend: Literal["engine", "hf"] = "engine"
    """engine: blockrl's step-level core (continuous batching, every sampler); hf: HF `generate` on batches of
    waiting requests, the baseline the benchmark compares with behind the same API."""
    auto_calibration: Literal["start", "first_use"] = "start"
    """when `auto` times its options at each batch size it may run (powers of two up to max_batch): all before
    serving (startup takes longer), or each on first use (that request, and every one sharing the engine, waits)."""
    calibration_cache: str | None = "runs/serve_cache"
    """directory of auto's cached calibrations, one JSON file per checkpoint, machine and timing settings (a
    restart with all of them unchanged skips the timing); relative to the working directory; None = no cache."""
    threads: int = Field(0, ge=0)
    """torch threads (0 = torch's default)."""
    max_n: int = Field(16, ge=1)
    """the largest `n` (choices per request) accepted."""
    default_max_tokens: int = Field(256, ge=1)
    """completion budget of a request that sets no max_tokens (capped by the context)."""
    api_key: str | None = None
    """if set, inference endpoints require `Authorization: Bearer <api_key>` (the OpenAI client's api_key)."""
    admin_token_env: str = "BLOCKRL_ADMIN_TOKEN"
    """environment variable holding the token that authorises weight updates (POST /v1/weights)."""
    admin_token: str | None = None
    """the weight-update token itself (the environment variable wins); neither set = weight updates disabled."""
    on_weight_update: Literal["finish", "cancel"] = "finish"
    """a request's fate if a weight update comes while it decodes: finish on its version (new requests wait for the
    swap), or stop at once (finish_reason "abort", its tokens so far returned). A request may set its own; an
    update that names one decides for every request in flight."""
    weights_root: str | None = None
    """if set, weight updates may only load checkpoints under this directory."""
