"""Count the host syncs a block of torch code makes, on any device, CPU included.

On CUDA, a host sync is any operation that makes the CPU wait for the GPU: reading a value (`.item()`, `int(t)`,
`bool(t)`, `.tolist()`, `.cpu()`, `.numpy()`) and every op whose output size depends on tensor values (`nonzero`,
boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave` with tensor repeats). On the CPU none of
these waits for anything, which is why CI could never see them; this counter sees the same operations on any
device, by intercepting them at the torch-function and dispatcher levels, so a CPU test can assert the sync budget
of code meant for a GPU (`torch.cuda.set_sync_debug_mode` is the GPU-side check, where a device is lent).

    with HostSyncs() as syncs:
        engine_step()
    assert syncs.count == 1, syncs.report()
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# reads of tensor data by the host (the torch-function level: on the CPU `tolist` and `numpy` never reach the
# dispatcher)
READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__"}
# dispatcher ops whose output shape depends on values: they read a count back from the device
DATA_DEPENDENT = {
    "nonzero",
    "nonzero_static",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
}


@dataclass
class SyncEvent:
    op: str
    where: str  # the innermost frame outside torch: file:line function


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "?"


@dataclass
class HostSyncs:
    """Context manager: every host sync inside it, with the line that caused it."""

    events: list[SyncEvent] = field(default_factory=list)

    def __post_init__(self):
        self._fn, self._disp = _FunctionLevel(self), _DispatchLevel(self)
        self._reading = 0  # inside a host read: its own dispatcher ops are the same sync

    @property
    def count(self) -> int:
        return len(self.events)

    def report(self) -> str:
        return "\n".join(f"{e.op} at {e.where}" for e in self.events) or "no host syncs"

    def __enter__(self) -> HostSyncs:
        self._fn.__enter__()
        self._disp.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._disp.__exit__(*exc)
        self._fn.__exit__(*exc)

    def _record(self, op: str) -> None:
        self.events.append(SyncEvent(op, _caller()))


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in READS:
            return func(*args, **(kwargs or {}))
        self.owner._record(name)
        self.owner._reading += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.owner._reading -= 1


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.owner._reading:
            name = func._schema.name.split("::")[-1]
            if name == "_local_scalar_dense" or name in DATA_DEPENDENT:
                self.owner._record(name)
            elif name == "repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor):
                if "output_size" not in kwargs:
                    self.owner._record(name)
            elif name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 else [])
            ):
                self.owner._record("index(bool mask)")
        return func(*args, **kwargs)
