"""The host-sync counter sees every kind of device read and data-dependent shape, and nothing else."""

import torch

from common.host_sync import HostSyncs


def test_counts_reads_and_data_dependent_shapes():
    x = torch.arange(6.0)
    cases = [
        lambda: x.tolist(),
        lambda: x[0].item(),
        lambda: int(x[1]),
        lambda: float(x.sum()),
        lambda: bool((x > 2).any()),
        lambda: x.numpy(),
        lambda: torch.nonzero(x),
        lambda: x[x > 2],
        lambda: x.masked_select(x > 2),
        lambda: torch.unique(x),
        lambda: torch.repeat_interleave(x, torch.ones(6, dtype=torch.long)),
        lambda: torch.where(x > 2),
    ]
    for k, case in enumerate(cases):
        with HostSyncs() as s:
            case()
        assert s.count == 1, (k, s.report())
        assert "test_host_sync.py" in s.events[0].where


def test_device_side_work_is_not_a_sync():
    x = torch.arange(6.0)
    idx = torch.tensor([0, 2])
    with HostSyncs() as s:
        y = x[idx] * 2 + x.cumsum(0)[1:3]
        torch.where(x > 2, x, 0.0).softmax(0).argmax()
        torch.cat([y, y]).view(2, 2).gather(1, torch.zeros(2, 1, dtype=torch.long))
        torch.rand(3, generator=torch.Generator().manual_seed(0))
    assert s.count == 0, s.report()
