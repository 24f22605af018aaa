"""Where a job's model runs and in what precision: the `device` and `dtype` fields every job and worker shares.

- `device`: `auto` (CUDA when this process sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`. Under torchrun,
  `auto` and `cuda` mean `cuda:LOCAL_RANK`; in a Ray worker they mean the GPU Ray gave it (`gpus_per_worker`).
- `dtype`: the weights' precision, `float32`, `bfloat16` or `float16`. Logits for sampling and log-probs are fp32
  whatever the weights are (the engine's head and the learner's log-softmax upcast).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator

from common.config import ConfigError, Section

DTypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(v: str) -> str:
    if not _DEVICE.match(v):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


DeviceName = Annotated[str, AfterValidator(_check_device)]


class DeviceSettings(Section):
    """Device and weight precision of a job's model (mixed into job configs)."""

    device: DeviceName = "auto"
    """auto (CUDA when visible, else cpu), cpu, cuda or cuda:N."""
    dtype: DTypeName = "float32"
    """weights: float32, bfloat16 or float16 (logits and log-probs stay fp32)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def resolve_device(spec: str, field: str = "device") -> torch.device:
    """`auto` / `cuda` -> this process's GPU (LOCAL_RANK under torchrun) when CUDA is there; a ConfigError naming
    `field` when a GPU is asked for and none is visible."""
    _check_device(spec)
    has_cuda = torch.cuda.is_available()
    if spec == "auto":
        spec = "cuda" if has_cuda else "cpu"
    if spec == "cuda":
        spec = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not has_cuda:
            raise ConfigError(f"{field}: {spec} asked for, but this process sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{field}: {spec}, but only {torch.cuda.device_count()} CUDA devices are visible"
            )
    return dev


def host_to_device(values, device: torch.device, dtype=torch.long) -> torch.Tensor:
    """A small host list as a device tensor without a host sync: staged through pinned memory and copied
    asynchronously on CUDA (a pageable copy would wait for the stream); a plain tensor on the CPU."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
