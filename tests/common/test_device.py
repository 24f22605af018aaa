"""`device` / `dtype` fields: validated by field, resolved to this process's device, refused clearly without CUDA."""

import pytest
import torch
from pydantic import ValidationError

from common.config import ConfigError
from common.device import DeviceSettings, resolve_device


def test_device_strings_are_validated_by_field():
    assert DeviceSettings(device="cuda:1", dtype="bfloat16").torch_dtype == torch.bfloat16
    for bad in ("gpu", "cuda:", "cuda:x", "tpu"):
        with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
            DeviceSettings(device=bad)
    with pytest.raises(ValidationError, match="dtype"):
        DeviceSettings(dtype="float64")


def test_auto_and_cpu_resolve_here(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(
            ConfigError, match=r"rollout\.device: cuda:0 asked for, but this process sees no CUDA"
        ):
            resolve_device("cuda", "rollout.device")
        with pytest.raises(ConfigError, match=r"learner\.device: cuda:3"):
            resolve_device("cuda:3", "learner.device")
