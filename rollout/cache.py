"""Ragged KV cache for block decoding, on the HF cache protocol (`transformers.Cache` + one layer per decoder layer).

Decision: our own layer class, not `DynamicCache`. Every row of the batch has its own length, and after each step a
row keeps only the KV of its accepted verify slots (anchor + na drafts); the proposal blocks and rejected drafts are
dropped without recomputation. `DynamicCache.crop` can only cut every row at the same length, and appending all Q
query tokens per step would grow the cache by (K+1)(1+levels) entries per row per step. Implementing the HF layer
protocol (`update`) means any HF attention module drives this cache unchanged; the engine passes its own 4D mask.

Storage per layer: keys/values `[B, H, cap, D]`, row r valid on `[0, lens[r])`. A forward for a row subset writes
its Q new entries into a scratch region at `[T, T+Q)` (T = max length of those rows) and attends over `[0, T+Q)`;
`commit` then moves each row's kept entries from the scratch region to `[lens[r], lens[r]+n_r)`. When the forward
covers every row, the returned keys are a view (no copy of the cache per step).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _RaggedState:
    """State shared by all layers of one cache: row lengths and the rows of the current forward."""

    def __init__(self, batch_size: int, device: torch.device):
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.rows: torch.Tensor | None = None  # rows of the current forward (None = all)
        self.extent = 0  # T: max length over the current rows
        self.capacity_hint = 64


class RaggedLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = False

    def __init__(self, state: _RaggedState):
        super().__init__()
        self.state = state
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B = self.state.lens.shape[0]
        _, H, _, D = key_states.shape
        cap = self.state.capacity_hint
        self.keys = key_states.new_zeros(B, H, cap, D)
        self.values = value_states.new_zeros(B, H, cap, D)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _ensure_capacity(self, needed: int) -> None:
        cap = self.keys.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        grow = (0, 0, 0, new_cap - cap)  # pad the sequence dim
        self.keys = torch.nn.functional.pad(self.keys, grow)
        self.values = torch.nn.functional.pad(self.values, grow)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states [R, H, Q, D] for the current rows -> keys over [0, T+Q) for those rows."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T, Q = self.state.extent, key_states.shape[2]
        self._ensure_capacity(T + Q)
        rows = self.state.rows
        self.pending = (key_states, value_states)
        if rows is None:
            self.keys[:, :, T : T + Q] = key_states
            self.values[:, :, T : T + Q] = value_states
            return self.keys[:, :, : T + Q], self.values[:, :, : T + Q]
        keys = torch.cat([self.keys[rows, :, :T], key_states], dim=2)
        values = torch.cat([self.values[rows, :, :T], value_states], dim=2)
        return keys, values

    def commit(self, rows: torch.Tensor, src: torch.Tensor, dest: torch.Tensor) -> None:
        """Copy pending query entries `src [R, n]` of `rows [R]` to cache positions `dest [R, n]`."""
        pk, pv = self.pending
        local = torch.arange(len(rows), device=src.device)[:, None]
        self._ensure_capacity(int(dest.max()) + 1)
        self.keys[rows[:, None], :, dest] = pk[local, :, src]  # [R, n, H, D]
        self.values[rows[:, None], :, dest] = pv[local, :, src]
        self.pending = None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.extent + query_length, 0

    def get_seq_length(self) -> int:
        return self.state.extent

    def get_max_length(self) -> int:
        return -1


class RaggedKVCache(Cache):
    """Per-row-length KV cache. Use: `begin(rows)` -> model forward -> `commit(rows, src, counts)`."""

    def __init__(self, num_layers: int, batch_size: int, device: torch.device | str = "cpu"):
        self.state = _RaggedState(batch_size, torch.device(device))
        super().__init__(layers=[RaggedLayer(self.state) for _ in range(num_layers)])

    @property
    def lens(self) -> torch.Tensor:
        return self.state.lens

    def begin(self, rows: torch.Tensor | None) -> int:
        """Select the rows of the next forward (None = all); returns T, the cache extent the queries attend over."""
        self.state.rows = rows
        lens = self.state.lens if rows is None else self.state.lens[rows]
        self.state.extent = int(lens.max()) if lens.numel() else 0
        return self.state.extent

    def commit(self, rows: torch.Tensor, src: torch.Tensor, counts: torch.Tensor) -> None:
        """Keep, for each row, query entries `src[r, :counts[r]]` (indices into this forward's queries).

        Entries past counts[r] are written beyond the new length, where they are invisible and later overwritten.
        """
        dest = self.state.lens[rows][:, None] + torch.arange(src.shape[1], device=src.device)[None]
        for layer in self.layers:
            layer.commit(rows, src, dest)
        self.state.lens[rows] += counts
        self.state.rows = None

    def reset_rows(self, rows: torch.Tensor) -> None:
        self.state.lens[rows] = 0

    def key_mask(self, rows: torch.Tensor | None, extent: int) -> torch.Tensor:
        """Bool [R, extent]: which cached positions each row may attend to."""
        lens = self.state.lens if rows is None else self.state.lens[rows]
        return torch.arange(extent, device=lens.device)[None] < lens[:, None]
