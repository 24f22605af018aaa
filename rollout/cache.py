"""Ragged KV cache for block decoding, on the HF cache protocol (`transformers.Cache` + one layer per decoder layer).

Decision: our own layer class, not `DynamicCache`. Every row of the batch has its own length, and after each step a
row keeps only the KV of its accepted verify slots (anchor + na drafts); the proposal blocks and rejected drafts are
dropped without recomputation. `DynamicCache.crop` can only cut every row at the same length, and appending all Q
query tokens per step would grow the cache by (K+1)(1+levels) entries per row per step. Implementing the HF layer
protocol (`update`) means any HF attention module drives this cache unchanged; the engine supplies the 4D mask.

Layout: keys/values `[B, H, cap, D]`; row r is valid on `[0, lens[r])`. A forward writes row r's Q new entries in
place at `[lens[r], lens[r]+Q)` and attends over `[0, max lens + Q)`. Because the entries a row keeps (prompt, or
anchor + accepted drafts) are always a prefix of its queries, committing is just `lens[r] += kept`: rejected drafts
and proposal blocks stay beyond the new length, invisible, and are overwritten by the next step. Nothing is copied
or recomputed. When the forward covers every row, the keys handed to attention are a view of the buffer.
"""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _RaggedState:
    """State shared by all layers of one cache: row lengths and the layout of the current forward."""

    def __init__(self, batch_size: int, device: torch.device):
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.host_lens = [
            0
        ] * batch_size  # the same lengths on the host: laying out a step reads no device value
        self.rows: torch.Tensor | None = None  # rows of the current forward (None = all)
        self.write_pos: torch.Tensor | None = None  # [R, Q] cache positions of this forward's queries
        self.uniform_start: int | None = None  # common length when every row of the forward has the same one
        self.extent = 0  # keys attended over: max(lens of rows) + Q (rounded up to `extent_bucket`)
        self.extent_bucket = 1  # > 1 under CUDA graphs: one captured graph serves every extent of a bucket
        self.static = False  # buffers marked as static addresses (CUDA graphs write into them in place)


class RaggedLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = False

    def __init__(self, state: _RaggedState, capacity: int):
        super().__init__()
        self.state = state
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B = self.state.lens.shape[0]
        _, H, _, D = key_states.shape
        _, Hv, _, Dv = value_states.shape  # key and value head sizes may differ (MLA)
        self.keys = key_states.new_zeros(B, H, self.capacity, D)
        self.values = value_states.new_zeros(B, Hv, self.capacity, Dv)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True
        self._mark_static()

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Use these buffers (a finished cache's, `KVPool`), zeroed: stale entries are masked, but a non-finite one
        would still reach the output through a zero attention weight (0 * inf)."""
        self.keys, self.values = keys.zero_(), values.zero_()
        self.capacity = keys.shape[2]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def _mark_static(self) -> None:
        if self.state.static:  # a compiled step's CUDA graph writes into these buffers, never a copy of them
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def ensure_capacity(self, needed: int) -> None:
        """Room for `needed` positions per row (doubling); outside any compiled region (`RaggedKVCache.begin`)."""
        cap = self.keys.shape[2]
        if needed > cap:
            grow = (0, 0, 0, max(needed, 2 * cap) - cap)  # pad the sequence dim
            self.keys = torch.nn.functional.pad(self.keys, grow)
            self.values = torch.nn.functional.pad(self.values, grow)
            self._mark_static()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states [R, H, Q, D] of the current rows -> their keys over [0, extent)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        st = self.state
        self.ensure_capacity(st.extent)  # a no-op after `begin`, which grew every initialized layer
        if st.write_pos is None:  # all rows, same length: a plain slice write, no index_put
            start = st.uniform_start
            self.keys[:, :, start : st.extent] = key_states
            self.values[:, :, start : st.extent] = value_states
            return self.keys[:, :, : st.extent], self.values[:, :, : st.extent]
        rows = st.rows if st.rows is not None else torch.arange(key_states.shape[0], device=key_states.device)
        idx = (rows[:, None], slice(None), st.write_pos)  # selects [R, Q, H, D] (values: [R, Q, Hv, Dv])
        self.keys[idx] = key_states.transpose(1, 2)
        self.values[idx] = value_states.transpose(1, 2)
        if st.rows is None:
            return self.keys[:, :, : st.extent], self.values[:, :, : st.extent]
        return self.keys[st.rows, :, : st.extent], self.values[st.rows, :, : st.extent]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.extent, 0

    def get_seq_length(self) -> int:
        return self.state.extent

    def get_max_length(self) -> int:
        return -1


class KVPool:
    """The buffers of caches that are gone, for the next cache of the same batch. Under CUDA graphs the buffers are
    static inputs of the captured graphs: a new cache per `generate` call would give them new addresses and
    re-record every graph (torch gives up on CUDA graphs after its re-record limit). Reused, they keep their
    addresses from call to call. One pool per policy (`kv_pool`); caches alive at the same time (the server's
    cores) get buffers of their own."""

    def __init__(self):
        self.free: dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]] = defaultdict(list)
        self.out = 0  # caches holding buffers of this pool

    def release(self) -> None:
        """Drop the free buffers (colocated mode hands the device to the learner between rollouts)."""
        self.free.clear()

    def take(self, cache: RaggedKVCache) -> None:
        """Give `cache`'s layers the largest free set of buffers of its batch size, if there is one; when `cache` is
        garbage-collected, its layers' buffers come back here. With none free while others are out, one garbage
        collection first: a cache that dynamo traced stays in a reference cycle of its tracing state after its
        core is gone, until the collector runs."""
        free = self.free[len(cache.state.host_lens)]
        if not free and self.out:
            gc.collect()
        if free:  # the largest (a collection inside a sort could append to the list: no sort)
            largest = max(range(len(free)), key=lambda i: free[i][0][0].shape[2])
            for layer, (k, v) in zip(cache.layers, free.pop(largest), strict=True):
                layer.adopt(k, v)
        self.out += 1
        weakref.finalize(cache, self._give_back, cache.layers)

    def _give_back(self, layers: list[RaggedLayer]) -> None:
        self.out -= 1
        if all(layer.is_initialized for layer in layers):
            self.free[layers[0].keys.shape[0]].append([(layer.keys, layer.values) for layer in layers])


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kv_pool(owner) -> KVPool:
    """The pool of `owner` (a policy: its caches all have its layer shapes and dtype)."""
    if owner not in _POOLS:
        _POOLS[owner] = KVPool()
    return _POOLS[owner]


class RaggedKVCache(Cache):
    """Per-row-length KV cache. Use: `mask = begin(rows, qmask)` -> model forward -> `commit(rows, kept)`."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        capacity: int = 256,
        extent_bucket: int = 1,
        pool: KVPool | None = None,
    ):
        """extent_bucket > 1: the buffers are static addresses and every forward attends over an extent rounded up
        to a multiple of it, through the indexed write and a full mask (what a CUDA graph of the step needs: a
        bounded set of shapes, and a cache it writes into in place). pool: where the buffers come from and go back
        to (`KVPool`), so that they keep their addresses across calls."""
        self.state = _RaggedState(batch_size, torch.device(device))
        self.state.extent_bucket = extent_bucket
        self.state.static = extent_bucket > 1
        super().__init__(layers=[RaggedLayer(self.state, capacity) for _ in range(num_layers)])
        if pool is not None:
            pool.take(self)

    @property
    def lens(self) -> torch.Tensor:
        return self.state.lens

    @property
    def batch_size(self) -> int:
        return len(self.state.host_lens)

    def begin(
        self, rows: torch.Tensor | None, qmask: torch.Tensor, row_ids: list[int]
    ) -> torch.Tensor | None:
        """Lay out the next forward for `rows` (None = all; `row_ids` the same slots as a list) with query mask
        `qmask` bool [R or 1, Q, Q]. The extent comes from the host copy of the lengths: no device read.

        Returns the full bool mask [R, Q, extent]: row r's queries see its cache [0, lens[r]) and, through qmask,
        the queries written at [lens[r], lens[r]+Q). Returns None when no mask is needed at all (every row has the
        same length and a single query: plain AR decoding without raggedness, e.g. batch 1).
        """
        st = self.state
        st.rows = rows
        lens = st.lens if rows is None else st.lens[rows]
        Q = qmask.shape[-1]
        lo, hi = min(st.host_lens[r] for r in row_ids), max(st.host_lens[r] for r in row_ids)
        bucket = st.extent_bucket
        st.extent = -(-(hi + Q) // bucket) * bucket
        for layer in self.layers:  # grown here, outside the forward (and any graph compiled of it)
            if layer.is_initialized:
                layer.ensure_capacity(st.extent)
        st.uniform_start = lo if lo == hi else None
        # contiguous, see RaggedLayer.update (a padded extent needs the indexed write and the mask)
        slice_write = st.uniform_start is not None and rows is None and bucket == 1
        if slice_write and Q == 1:
            st.write_pos = None
            return None
        q = torch.arange(Q, device=lens.device)
        st.write_pos = None if slice_write else lens[:, None] + q[None]  # [R, Q]
        keys = torch.arange(st.extent, device=lens.device)
        rel = keys[None] - lens[:, None]  # [R, extent] key position relative to the row's first query
        in_step = (rel >= 0) & (rel < Q)
        qm = qmask.expand(len(lens), Q, Q)
        step = qm.gather(2, rel.clamp(0, Q - 1)[:, None, :].expand(-1, Q, -1))  # [R, Q, extent]
        return (rel < 0)[:, None, :] | (in_step[:, None, :] & step)

    def commit(
        self, rows: torch.Tensor | None, kept: torch.Tensor, row_ids: list[int], kept_host: list[int]
    ) -> None:
        """Row r keeps its first kept[r] queries of the last forward (they already sit at lens[r]..); `kept_host`
        is the same counts, already read by the caller, for the host copy."""
        if rows is None:
            self.state.lens += kept
        else:
            self.state.lens[rows] += kept
        for r, k in zip(row_ids, kept_host, strict=True):
            self.state.host_lens[r] += k
        self.state.rows = None

    def reset_rows(self, rows: torch.Tensor, row_ids: list[int]) -> None:
        self.state.lens[rows] = 0
        for r in row_ids:
            self.state.host_lens[r] = 0
