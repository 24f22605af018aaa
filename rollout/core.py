"""The engine's step-level core (`EngineCore`): the one code path of every generation. `BlockEngine`
(rollout/engine.py) holds the settings and runs `generate()` on it; the server (rollout/serve) drives it request by
request. The algorithm, step by step: the module docstring of rollout/engine.py and docs/architecture.md.

    core = EngineCore(engine)
    rid = core.add(Request(prompt_ids, SamplingParams(max_new_tokens=64)))
    while core.has_work:
        for event in core.step(): ...
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from common.device import host_to_device
from policy.compiled import CUDA_EXTENT_BUCKET
from policy.families import sliding_layer_window
from rollout.cache import RaggedKVCache, kv_pool
from rollout.cost_model import KMCurve
from rollout.draft_choice import CURVE_KEEP, DraftChoice
from rollout.history import HistorySequence
from rollout.processors import constraint_mask
from rollout.step_timer import UNTIMED, StepTimer
from rollout.step_verify import PassGroup, VerifyDrafts
from rollout.stops import find_stop
from rollout.types import Request, SamplingParams, StepEvent, Trajectory


@dataclass
class _Row:
    """Book-keeping of one occupied batch slot (tensors for all slots live on the engine)."""

    index: int  # request id
    traj: Trajectory
    gen: torch.Generator  # on the engine's device: drawing the row's uniforms needs no host copy
    started: float
    params: SamplingParams
    key: tuple  # `_sampling_key(params)`: rows with equal keys are verified together
    top_n: int  # alternatives recorded per token
    # drafts the row carries into its next verify (host copy: a step's layout reads no device)
    n_drafts: int = 0
    hist: HistorySequence | None = None  # the row's place in the history store (history drafts on)
    hist_pred: float | None = None  # expected accepted length of the history draft it carries, None: none


def _sampling_key(p: SamplingParams) -> tuple:
    """The settings that shape a row's distribution: rows that share them are processed and verified together."""
    return (p.temperature, p.top_p, p.top_k, p.banned_token_ids, p.allowed_token_ids)


class EngineCore(VerifyDrafts, DraftChoice):
    """The engine's step-level API, and the one code path of every generation. Requests join (`add`) and leave
    (finished, or `cancel`) between steps; each `step` prefills queued requests into free slots, runs one decode
    step over every active row, and returns what each request got (`StepEvent`). `BlockEngine.run` drives it over
    a prompt list; the server (rollout/serve) drives it from its request queue.

    Rows may differ in every sampling setting: rows that share temperature, top-p, top-k and token constraints are
    processed and verified together (`_group`; one group in the common case, at no extra cost).

        core = EngineCore(engine)
        rid = core.add(Request(prompt_ids, SamplingParams(max_new_tokens=64)))
        while core.has_work:
            for event in core.step(): ...
    """

    def __init__(self, eng, max_batch: int | None = None):
        """eng: the BlockEngine whose policy and settings this core runs (it imports this module, not the reverse)."""
        self.eng = eng
        B, K, dev = max_batch or eng.max_batch, eng.K, eng.device
        cfg = eng.policy.config
        self.V = eng.vocab_size
        # compiled: at least 2 cache rows, so torch never specializes the graphs on a one-row cache (a one-slot
        # core's graph would not serve a batch's last row, nor the reverse); under CUDA graphs the cache has the
        # engine's max_batch rows whatever this call's size (one buffer set and fewer captured shapes), its
        # buffers from the policy's pool, at the addresses the graphs captured
        cache_rows = B if eng.body is None else max(eng.max_batch if eng.cuda_graphs else B, 2)
        self.cache = RaggedKVCache(
            cfg.num_hidden_layers,
            cache_rows,
            dev,
            extent_bucket=CUDA_EXTENT_BUCKET if eng.cuda_graphs else 1,
            pool=kv_pool(eng.policy) if eng.cuda_graphs else None,
        )
        self.dtype = eng.policy.model.dtype
        self.window = sliding_layer_window(cfg)  # sliding-window layers need key positions in the mask
        self.slots: list[_Row | None] = [None] * B
        self.anchor = torch.zeros(B, dtype=torch.long, device=dev)
        self.drafts = torch.zeros(B, max(K, 1), dtype=torch.long, device=dev)
        self.n_drafts = torch.zeros(B, dtype=torch.long, device=dev)
        # per-row draft logits [B, K, V] only where logit mixing reads them; Dirac drafts keep just their ids
        mixing = K and eng.sampler == "logit_mix" and eng.mix_weight < 1.0
        # (in bf16: half the fp32 state; the mixed target is what is sampled, and its log-probs are recorded
        # exactly, so the rounding changes the behaviour policy slightly, never its bookkeeping)
        self.draft_logits = torch.zeros(B, K, self.V, dtype=torch.bfloat16, device=dev) if mixing else None
        self.draft_probs = (
            torch.zeros(B, K, self.V, device=dev) if K and eng.draft == "sampled" else None
        )  # q of sampled drafts, which the next verify needs
        # history drafts (rollout/history.py): which rows carry one (logit mixing and sampled drafts treat them as
        # Dirac drafts), the diffusion drafts' live acceptance curve and the history estimates' calibration, which
        # the per-row choice between the two reads (`_history_drafts`)
        self.history = eng.history
        self.dirac = torch.zeros(B, dtype=torch.bool, device=dev) if self.history is not None else None
        self.diff_curve = KMCurve(np.zeros(K + 1), np.zeros(K + 1))
        self.hist_curve = KMCurve(np.zeros(K + 1), np.zeros(K + 1))  # history drafts' acceptance by position
        self.hist_calib = [1.0, 1.0]  # (accepted, predicted) over history drafts, with one pseudo-count
        self.step_fit: dict[
            int, np.ndarray
        ] = {}  # rows -> decayed sums for step seconds ~ a + b * verify length
        self.queue: deque[tuple[int, Request]] = deque()
        self._next_id = 0
        self._banned: dict[tuple, torch.Tensor | None] = {}  # constraint mask per sampling key
        self._events: list[StepEvent] = []
        # slot lists as device tensors, built once each
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.timer: StepTimer | None = None  # set by profile_decode_steps
        # every step at the full layout (the probes: a step's most cost, for calibration)
        self.full_layout = False
        self._level0 = torch.zeros(1, dtype=torch.long, device=dev)  # prefill's one proposal

    # ---------------------------------------------------------------------------------------------- requests
    @property
    def max_batch(self) -> int:
        return len(self.slots)

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def num_queued(self) -> int:
        return len(self.queue)

    @property
    def has_work(self) -> bool:
        return bool(self.queue) or any(r is not None for r in self.slots)

    def add(self, req: Request) -> int:
        """Queue a request; it joins the batch at the next step with a free slot. Returns its id."""
        if req.params.stop_strings and self.eng.tokenizer is None:
            raise ValueError("stop_strings need the engine's tokenizer")
        rid, self._next_id = self._next_id, self._next_id + 1
        self.queue.append((rid, req))
        return rid

    def cancel(self, rid: int) -> Trajectory | None:
        """Drop a request between steps (queued or running): its slot is free for the next step. Returns what it
        had generated (finish_reason "cancelled"), or None for an unknown or finished id."""
        for i, (qid, req) in enumerate(self.queue):
            if qid == rid:
                del self.queue[i]
                traj = self._trajectory(req)
                traj.finish_reason = "cancelled"
                return traj
        for s, row in enumerate(self.slots):
            if row is not None and row.index == rid:
                row.traj.finish_reason = "cancelled"
                row.traj.timings["total"] = time.perf_counter() - row.started
                if row.hist is not None:
                    row.hist.finish()
                self.slots[s] = None
                return row.traj
        return None

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Admit queued requests into free slots (one prefill pass), then one decode step over every active row."""
        self.admit()
        active = [s for s, r in enumerate(self.slots) if r is not None]
        if active:
            self.decode_step(active)
        events, self._events = self._events, []
        return events

    def admit(self) -> None:
        free = [s for s, r in enumerate(self.slots) if r is None]
        if self.queue and free:
            self.prefill([(s, *self.queue.popleft()) for s in free[: len(self.queue)]])

    def _trajectory(self, req: Request) -> Trajectory:
        eng = self.eng
        traj = Trajectory(
            prompt_ids=list(req.prompt_ids), policy_version=eng.policy_version, sampler=eng.option.name
        )
        traj.audit = [] if req.audit else None
        traj.top_logprobs = [] if req.top_logprobs else None
        return traj

    def timed(self, phase: str):
        return UNTIMED if self.timer is None else self.timer(phase)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self, rows: list[int], ids: torch.Tensor, pos: torch.Tensor, qmask: torch.Tensor, decode: bool = False
    ) -> torch.Tensor:
        """ids/pos [R, Q], qmask bool [R or 1, Q, Q] -> final hidden states [R, Q, H] over cache + queries. A decode
        step's body runs compiled when the engine compiles (`BlockEngine.body`); prefill stays eager.

        Logits are taken later with `head`, only for the rows that are used (verify slots, the last prompt token,
        the one proposal block each row drafts from): with a real vocabulary, [R, Q, V] logits for every level
        would dominate memory."""
        compiled = decode and self.eng.body is not None
        # None: every slot, the cache's view path (a compiled step always indexes its rows and passes a mask: one
        # graph, whichever rows step)
        rows_t = None if len(rows) == self.cache.batch_size and not compiled else self._idx
        self._rows_t, self._rows = rows_t, rows
        mask = self.cache.begin(rows_t, qmask, rows)  # [R, Q, extent] or None (uniform single-query step)
        policy = self.eng.policy
        k_pos = None
        if self.window is not None:
            lens = self.cache.lens if rows_t is None else self.cache.lens[rows_t]
            extent = self.cache.state.extent
            if mask is None:
                mask = torch.ones(len(rows), ids.shape[1], extent, dtype=torch.bool, device=ids.device)
            keys = torch.arange(extent, device=ids.device)[None]
            rel = (keys - lens[:, None]).clamp(0, ids.shape[1] - 1)
            k_pos = torch.where(keys < lens[:, None], keys, pos.gather(1, rel))  # [R, extent] token positions
        body = self.eng.body if compiled else policy.model.base_model
        out = body(
            input_ids=ids,
            position_ids=pos,
            attention_mask=None if mask is None else policy.attention_mask_4d(mask, self.dtype, pos, k_pos),
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., H] -> fp32 logits [..., V], as the model's own forward makes them (LM head plus
        any family-specific transform after it)."""
        return self.eng.policy.logits(hidden).float()

    def commit(self, kept: torch.Tensor, kept_host: list[int]) -> None:
        """Keep each row's first `kept` queries of the last forward (prompt, or anchor + accepted drafts);
        `kept_host` holds the same counts, read already."""
        self.cache.commit(self._rows_t, kept, self._rows, kept_host)

    def drop_drafts(self, rows: list[int]) -> None:
        """Forget these active rows' drafts: their next step verifies none (a probe's draft-less step)."""
        if self.eng.K:
            self.n_drafts[self.index(rows)] = 0
        for s in rows:
            self.slots[s].n_drafts = 0

    def index(self, rows: list[int]) -> torch.Tensor:
        """The slot list as a device tensor (cached: in steady state a step copies nothing to the device)."""
        key = tuple(rows)
        if key not in self._indices:
            if len(self._indices) > 64:
                self._indices.clear()
            self._indices[key] = host_to_device(rows, self.eng.device)
        return self._indices[key]

    def _group(self, rows: list[int]) -> None:
        """Split this pass's rows by sampling settings, once per pass (verify and drafting both read it):
        `self._pass` = [PassGroup], one in the common case (positions None: every row of the pass)."""
        by: dict[tuple, list[int]] = {}
        for r, s in enumerate(rows):
            by.setdefault(self.slots[s].key, []).append(r)
        groups = []
        for key, pos in by.items():
            params = self.slots[rows[pos[0]]].params
            if key not in self._banned:
                self._banned[key] = constraint_mask(params, self.V, self.eng.device)
            idx = None if len(by) == 1 else self.index(pos)
            groups.append(PassGroup(idx, [rows[r] for r in pos], params, self._banned[key]))
        self._pass = groups

    # ---------------------------------------------------------------------------------------------- prefill
    def prefill(self, take: list[tuple[int, int, Request]]) -> None:
        """Prompts (causal) + one proposal block of K+1 masks after each; the AR head samples the first anchor.
        take: (slot, request id, request) per newcomer."""
        eng, dev, K = self.eng, self.eng.device, self.eng.K
        rows = [s for s, _, _ in take]
        self._idx = self.index(rows)  # the slot indices of this pass
        prompts = [list(req.prompt_ids) for _, _, req in take]
        host_lens = [len(p) for p in prompts]
        lens = host_to_device(host_lens, dev)
        P = max(host_lens)
        n = K + 1 if eng.diffusion else 0
        R, Q = len(take), P + n
        pad = eng.policy.mask_token_id or 0
        ids = host_to_device([p + [pad] * (Q - len(p)) for p in prompts], dev)
        q = torch.arange(Q, device=dev)
        is_prompt = q[None, :] < lens[:, None]  # [R, Q]
        is_mask = q[None, :] >= P
        pos = torch.where(is_mask, lens[:, None] + (q[None, :] - P), torch.where(is_prompt, q[None, :], 0))
        causal = (q[None, :] <= q[:, None])[None] & is_prompt[:, None, :] & is_prompt[:, :, None]
        block = is_mask[:, :, None] & (is_prompt[:, None, :] | is_mask[:, None, :])
        pad_self = (~is_prompt & ~is_mask)[:, :, None] & torch.eye(Q, dtype=torch.bool, device=dev)[None]
        self.cache.reset_rows(self._idx, rows)
        hidden = self.forward(rows, ids, pos, causal | block | pad_self)
        self.commit(lens, host_lens)
        for s, rid, req in take:
            seed = (req.params.seed * 1_000_003 + req.stream) % (1 << 63)  # any int seeds a generator
            gen = torch.Generator(device=dev).manual_seed(seed)
            p = req.params
            self.slots[s] = _Row(
                rid, self._trajectory(req), gen, time.perf_counter(), p, _sampling_key(p), req.top_logprobs, K
            )
            if self.history is not None:
                group = req.group if req.group is not None else tuple(req.prompt_ids)
                self.slots[s].hist = self.history.begin(group, req.prompt_ids)
        if K and not eng.diffusion:  # history only: no draft until the history offers one (`_history_drafts`)
            self.n_drafts[self._idx] = 0
            for s in rows:
                self.slots[s].n_drafts = 0
        self._group(rows)
        last = self.head(hidden[torch.arange(R, device=dev), lens - 1])  # [R, V]: AR distribution of token 1
        empty = torch.zeros(R, 0, dtype=torch.long, device=dev)
        out = self.verify(rows, last[:, None], empty, None, torch.zeros(R, dtype=torch.long, device=dev))
        if eng.diffusion:
            proposal = hidden[:, P:]  # [R, K+1, H] at positions lens..lens+K: level 0 with na = 0
            self.set_drafts(
                rows, proposal[:, None], torch.zeros(R, dtype=torch.long, device=dev), self._level0
            )
        self.emit(rows, out, drafts_used=None)
        if self.history is not None:
            with self.timed("history"):
                self._history_drafts(rows)

    # ---------------------------------------------------------------------------------------------- decode
    def decode_step(self, rows: list[int]) -> None:
        """One forward over every row of the pass: verify each row's drafts, draft its next block (module docstring
        of rollout/engine.py). The layout fits the pass's longest draft (`BlockEngine.step_layout`): slots past
        every row's drafts and levels no draft reaches are not computed."""
        eng, dev, K = self.eng, self.eng.device, self.eng.K
        with self.timed("bookkeeping"):
            t_step = time.perf_counter()
            rows_t = self._idx = self.index(rows)  # the slot indices of this pass
            self._group(rows)
            longest = K if self.full_layout else max(self.slots[s].n_drafts for s in rows)
            if self.history is not None and longest and not self.full_layout:
                longest = self._pass_length(rows, longest)
            lay = self._layout = eng.step_layout(longest)
        R, V = len(rows), lay.verify_len
        n_drafts = self.n_drafts[rows_t] if K else torch.zeros(R, dtype=torch.long, device=dev)
        with self.timed("body"):
            ids = torch.cat([self.anchor[rows_t, None], self.drafts[rows_t, : V - 1]], dim=1)  # [R, V]
            blocks = len(lay.levels) + lay.end
            if blocks:
                masks = torch.full((R, blocks * (K + 1)), eng.policy.mask_token_id, device=dev)
                ids = torch.cat([ids, masks], dim=1)
            pos = self.cache.lens[rows_t, None] + lay.offsets[None]
            qmask = lay.mask[None]
            if lay.end:  # each row's end block: at its own draft's end, seeing verify slots 0..n_r only
                pos = pos + lay.end_rows[None] * n_drafts[:, None]
                hidden_past = lay.verify_slot[None, None, :] > n_drafts[:, None, None]  # [R, 1, Q]
                qmask = qmask & ~(lay.end_rows[None, :, None] & hidden_past)
            hidden = self.forward(rows, ids, pos, qmask, decode=True)
        with self.timed("heads"):
            ar_logits = self.head(hidden[:, :V])
        with self.timed("verify"):
            drafts = self.drafts[rows_t, : V - 1]
            verified = self.verify(
                rows,
                ar_logits,
                drafts,
                None if self.draft_logits is None else self.draft_logits[rows_t, : V - 1],
                n_drafts,
                draws=K + 1,
            )
        accept_len = verified[0].accept_len
        if eng.diffusion:
            proposals = hidden[:, V:].view(R, blocks, K + 1, -1)
            self.set_drafts(rows, proposals, accept_len, lay.levels_t, n_drafts if lay.end else None)
        with self.timed("bookkeeping"):
            na = self.emit(rows, verified, drafts_used=drafts)  # the step's one host read
            self.commit(accept_len + 1, [n + 1 for n in na])
        if self.history is not None:
            with self.timed("history"):
                self._history_drafts(rows)
        dt = time.perf_counter() - t_step
        seen = eng.step_stats.setdefault(
            len(rows), [0.0, 0]
        )  # (seconds, steps) per row count, kept by the engine
        seen[0] += dt
        seen[1] += 1
        if self.history is not None:
            self._observe_step(len(rows), longest, dt)

    # ---------------------------------------------------------------------------------------------- outputs
    def emit(self, rows: list[int], verified, drafts_used) -> list[int]:
        """Append each row's committed tokens, cut at stops, free finished slots, queue each request's StepEvent;
        returns the accept lengths.

        Everything the host needs from the step (accept lengths, this and the next step's draft counts, tokens,
        both log-probs, any asked-for alternatives) comes back in one packed float64 copy (ids are exact in float64
        below 2**53; the fp32 log-probs convert exactly): the one host sync of a decode step."""
        out, ar_lp, n_drafts, top = verified
        rows_t = self._idx
        R, K1 = out.tokens.shape
        self.anchor[rows_t] = out.tokens[torch.arange(R, device=rows_t.device), out.accept_len]  # last token
        next_n = self.n_drafts[rows_t] if self.eng.K else n_drafts  # the drafts set for the next step
        parts = [out.accept_len[:, None], n_drafts[:, None], next_n[:, None], out.tokens, out.logprobs, ar_lp]
        if top is not None:
            parts += [top[0].flatten(1), top[1].flatten(1)]
        packed = torch.cat([x.double() for x in parts], dim=1)
        host = packed.tolist()
        na = [int(h[0]) for h in host]
        now = time.perf_counter()
        self._hist_updates = []
        if drafts_used is not None and self.history is not None:
            # the live curves that choose a row's draft source forget at CURVE_KEEP per step (an RL run's drafter
            # and policy change under them: a cold drafter's first curve would otherwise rule a trained one)
            self.diff_curve.decay(CURVE_KEEP)
            self.hist_curve.decay(CURVE_KEEP)
            self.hist_calib = [1.0 + (a - 1.0) * CURVE_KEEP for a in self.hist_calib]
        for r, s in enumerate(rows):
            row = self.slots[s]
            t, h = row.traj, host[r]
            n = na[r] + 1
            row.n_drafts = int(h[2])
            if drafts_used is not None:  # a decode step (prefill emits the first anchor)
                t.accept_counts.append(na[r])
                t.draft_counts.append(int(h[1]))
                if row.hist_pred is not None:  # its drafts came from history
                    self.hist_curve.observe(na[r], int(h[1]))
                    t.history_steps += 1
                    t.history_accepted += na[r]
                    self.hist_calib[0] += na[r]
                    self.hist_calib[1] += row.hist_pred
                elif int(h[1]):
                    self.diff_curve.observe(na[r], int(h[1]))
            t.num_forwards += 1
            chunk = [int(x) for x in h[3 : 3 + n]]
            if t.audit is not None:
                t.audit.append(
                    {
                        "drafts": drafts_used[r, : int(h[1])].tolist() if drafts_used is not None else [],
                        "accept_len": na[r],
                        "committed": chunk,
                        "history": row.hist_pred is not None,  # the drafts came from history
                    }
                )
            start = len(t.tokens)
            t.tokens += chunk
            t.behavior_logprobs += h[3 + K1 : 3 + K1 + n]
            t.ar_logprobs += h[3 + 2 * K1 : 3 + 2 * K1 + n]
            if t.top_logprobs is not None:
                t.top_logprobs += _alternatives(h[3 + 3 * K1 :], n, K1, row.top_n)
            cut, reason = find_stop(t.tokens, start, row.params, self.eng.tokenizer)
            if cut is not None:
                del t.tokens[cut:], t.behavior_logprobs[cut:], t.ar_logprobs[cut:]
                if t.top_logprobs is not None:
                    del t.top_logprobs[cut:]
                t.finish_reason = reason
                t.timings["total"] = now - row.started
                self.slots[s] = None
            if row.hist is not None:
                self._hist_updates.append((row, t.tokens[start:], cut is not None))
            self._events.append(
                StepEvent(
                    row.index,
                    t.tokens[start:],
                    t.behavior_logprobs[start:],
                    None if t.top_logprobs is None else t.top_logprobs[start:],
                    t if cut is not None else None,
                )
            )
        return na


def _alternatives(flat: list[float], n: int, K1: int, want: int) -> list[list[tuple[int, float]]]:
    """The packed top log-probs and ids [K1 * top] + [K1 * top] of a row -> its first n tokens' `want` best
    alternatives, [(id, log-prob)] best first (tokens a processor excluded, at -inf, left out)."""
    top = len(flat) // (2 * K1)
    vals, ids = flat[: K1 * top], flat[K1 * top :]
    return [
        [
            (int(ids[j * top + i]), vals[j * top + i])
            for i in range(want)
            if vals[j * top + i] != float("-inf")
        ]
        for j in range(n)
    ]
