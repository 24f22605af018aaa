"""The decoder body under `torch.compile`: what removes the eager HF forward's fixed cost (Python, dispatch, one
kernel launch per op) from every decode step.

One `CompiledBody` per policy (`compiled_body`), shared by every engine on it (auto's options, the server's engine):
the graphs compiled for one engine serve the next. It wraps `policy.model.base_model`, the decoder layers without
the LM head (the engine takes logits only where it needs them), and compiles it with dynamic shapes:

- On the CPU (inductor's C++ kernels) one graph serves every row count, query length and cache extent. torch
  specializes sizes 0 and 1, so a decode step has at most four graphs (one row or more, one query or more: the
  latter only for `ar` and history-only steps without drafts), and never recompiles once they have run.
- On CUDA the graphs are also captured as CUDA graphs (`mode="reduce-overhead"`): one capture per concrete shape,
  so the engine buckets its shapes there (`CUDA_EXTENT_BUCKET`, and verify lengths rounded up to powers of two,
  `rollout.engine.BlockEngine.step_layout`), and the KV cache is a static buffer the graph writes into in place
  (`rollout.cache.RaggedKVCache`).

The weights stay graph inputs (no freezing), so a weight load (`load_state_dict`, in place) is seen by the next
step without recompiling. A family whose body does not compile falls back to eager, with one logged reason.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Literal

import torch

log = logging.getLogger(__name__)

CompileMode = Literal["off", "on", "auto"]
MAX_GRAPHS = 4  # a settled decode step's graphs: one row or several x one query or several
CUDA_EXTENT_BUCKET = 256  # CUDA graphs: the attended cache extent is padded to a multiple of this


def compile_enabled(mode: str, device: torch.device) -> bool:
    """`compile` resolved for a device. auto = on CUDA only: there an eager small-batch step is launch-bound and CUDA
    graphs remove it; on these CPUs the compiled body saves a fraction of a step and costs tens of seconds of
    compilation per process (docs/benchmarks.md, "The compiled decode step"), so the CPU compiles only when asked."""
    if mode not in ("off", "on", "auto"):
        raise ValueError(f"compile must be off, on or auto, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (torch's own counter): a steady state adds none."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class CompiledBody:
    """`policy.model.base_model(**inputs)`, compiled; eager after a failure, with the reason in `fallback`."""

    def __init__(self, policy, device: torch.device):
        self._policy = weakref.ref(policy)  # the policy keys `_BODIES` weakly: no strong reference back
        self.cuda_graphs = device.type == "cuda"
        self.fallback: str | None = None  # why the body runs eager, once it does
        self.compile_seconds = 0.0  # wall time of the calls that compiled a new graph
        self.graphs = 0  # graphs this body compiled (dynamo reuses another policy's graphs of the same shape)
        self.steps = 0  # decode steps run compiled
        # CPU: inductor's C++ wrapper launches the kernels without a Python call each (measured: a B = 1 lossless
        # step 5.1 ms against 6.2 ms with the Python wrapper, docs/benchmarks.md); CUDA: CUDA graphs
        self._fn = torch.compile(
            policy.model.base_model,
            dynamic=True,
            mode="reduce-overhead" if self.cuda_graphs else None,
            options=None if self.cuda_graphs else {"cpp_wrapper": True},
        )

    @property
    def policy(self):
        return self._policy()

    def __call__(self, **inputs):
        if self.fallback is not None:
            return self.policy.model.base_model(**inputs)
        if self.cuda_graphs:  # a new decode step: the previous step's graph outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        before, t0 = graphs_compiled(), time.perf_counter()
        try:
            # no duck sizing: a first step over every slot must not tie the row count to the cache's batch
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                out = self._fn(**inputs)
        except torch.OutOfMemoryError:
            raise  # the device is full: not a reason to give up compiling, nor one eager would escape
        except (
            Exception
        ) as e:  # a compile failure (dynamo, inductor, the C++ toolchain) means eager, said once
            family = self.policy.model.config.model_type
            cause = getattr(e, "inner_exception", None) or e  # inductor's failure wraps the one that says why
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            self.fallback = f"{type(cause).__name__}: {first}"
            log.warning(
                "compile: %s does not compile (%s); its decode steps run eager", family, self.fallback
            )
            # a failed compile may have run some layers already: the eager forward rewrites the same cache slots
            return self.policy.model.base_model(**inputs)
        self.steps += 1
        new = graphs_compiled() - before
        if new > 0:
            seconds = time.perf_counter() - t0
            self.compile_seconds += seconds
            self.graphs += new
            log.info("compile: %d graph(s) of the decode step compiled in %.1fs", new, seconds)
            if self.graphs > MAX_GRAPHS >= self.graphs - new:  # said once
                log.warning(
                    "compile: %s recompiles per shape (%d graphs; a settled step has at most %d): past torch's "
                    "recompile limit its new shapes run eager",
                    self.policy.model.config.model_type,
                    self.graphs,
                    MAX_GRAPHS,
                )
        return out


_BODIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_body(policy, device: torch.device) -> CompiledBody:
    """The policy's one compiled body (built on first use)."""
    body = _BODIES.get(policy)
    if body is None:
        body = _BODIES[policy] = CompiledBody(policy, device)
    return body
