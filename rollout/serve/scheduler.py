"""The server's engine thread: continuous batching of concurrent HTTP requests on the engine's step-level core.

Request handlers never touch the engine. They `submit` a `Submission` (one `Request` per choice, the sampler to
run) and get `Delivery`s back through a thread-safe callback: every step's new tokens of each choice, then its
trajectory. The engine thread owns everything else:

    loop:
        apply commands (submit, cancel, weight update)
        feed the backlog into cores with free slots         # requests join between decode steps
        apply a pending weight update once no row runs on the old weights
        step every core that has work; deliver its events   # finished rows leave between steps

One core per concrete sampler option (`ar`, `lossless[levels]`, `logit_mix[levels]`, and the options `auto` picks
among), all on one shared policy. `auto` is resolved per choice when it joins a core, by the cost model with the
acceptance observed on this server's own traffic. With `backend: hf` one `HFCore` serves every request: HF
`generate` behind the same interface, the benchmark's baseline.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from policy.generate import left_pad
from policy.hybrid import HybridPolicy
from policy.tokenizer import pad_id
from rollout.auto import AutoSampler, engine_factory
from rollout.core import EngineCore
from rollout.cost_model import default_options
from rollout.serve.calibration import cache_path, calibration_key, read_calibration, write_calibration
from rollout.serve.config import ServeConfig
from rollout.serve.metrics import ServeMetrics
from rollout.stops import find_stop
from rollout.types import Option, Request, StepEvent, Trajectory

log = logging.getLogger(__name__)
_ids = itertools.count()
AUTO_REVISIT_S = 2.0  # under steady load, auto's option is re-chosen at most this often


@dataclass(frozen=True)
class Delivery:
    """What the engine thread hands a request handler: one choice's step event (its `finished` trajectory last),
    or an error that ends the whole submission. `option` names the sampler option that ran the choice."""

    choice: int
    event: StepEvent | None = None
    option: str = ""
    error: str | None = None


@dataclass
class Submission:
    """One HTTP request's generations: a `Request` per choice, the sampler to run them with, and where their
    deliveries go (called on the engine thread; it must hand them over thread-safely)."""

    requests: list[Request]
    sampler: str  # ar | lossless | logit_mix | auto
    deliver: Callable[[Delivery], None]
    on_weight_update: str = "finish"  # finish | cancel
    stream: bool = True  # False: deliver only finished choices (no wake-up of the handler per decode step)
    sub_id: int = field(default_factory=lambda: next(_ids))


@dataclass
class _Choice:
    sub: Submission
    index: int
    key: str = ""  # the core running it ("" while in the backlog)
    rid: int = -1


class UpdateInProgress(RuntimeError):
    """A weight update was asked for while another one is still draining."""


@dataclass
class _Update:
    state_dict: dict
    version: int
    mode: (
        str | None
    )  # finish | cancel for every request in flight; None = each request's own on_weight_update
    done: Future


class HFCore:
    """HF `generate` behind the step-level interface (`add`, `step`, `cancel`): each step takes the oldest queued
    request and up to max_batch - 1 others with the same sampling settings, runs `model.generate` on them as one
    left-padded batch (static batching: the batch runs until its longest row ends), and finishes them all. Seeds
    are per batch (HF draws from the global generator), so only a request alone is reproducible."""

    def __init__(self, policy: HybridPolicy, tokenizer, max_batch: int):
        self.policy, self.tokenizer, self.max_batch = policy, tokenizer, max_batch
        self.queue: deque[tuple[int, Request]] = deque()
        self.policy_version = 0
        self._next_id = 0
        self.device = next(policy.parameters()).device

    num_active = 0  # a batch runs within one step

    @property
    def num_queued(self) -> int:
        return len(self.queue)

    @property
    def has_work(self) -> bool:
        return bool(self.queue)

    def add(self, req: Request) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        self.queue.append((rid, req))
        return rid

    def cancel(self, rid: int) -> Trajectory | None:
        for i, (qid, req) in enumerate(self.queue):
            if qid == rid:
                del self.queue[i]
                return Trajectory(list(req.prompt_ids), finish_reason="cancelled", sampler="hf")
        return None

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        if not self.queue:
            return []
        rid0, first = self.queue.popleft()
        key = _hf_key(first)
        batch = [(rid0, first)]
        for item in list(self.queue):
            if len(batch) == self.max_batch:
                break
            if _hf_key(item[1]) == key:
                batch.append(item)
                self.queue.remove(item)
        p = first.params
        model = self.policy.model
        model.eval()
        pad = pad_id(self.tokenizer)
        enc = {k: v.to(self.device) for k, v in left_pad([list(r.prompt_ids) for _, r in batch], pad).items()}
        sampling = dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p) if p.temperature > 0 else {}
        eos = p.eos_token_id
        torch.manual_seed(p.seed % (1 << 63))
        t0 = time.perf_counter()
        out = model.generate(
            **enc,
            **sampling,
            do_sample=p.temperature > 0,
            max_new_tokens=max(r.params.max_new_tokens for _, r in batch),
            pad_token_id=pad,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            output_scores=True,
            return_dict_in_generate=True,
        )
        seconds = time.perf_counter() - t0
        S = enc["input_ids"].shape[1]
        gen = out.sequences[:, S:]
        # scores: the processed logits (temperature, top-k/p warpers) each token was drawn from
        logp = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1)  # [B, T, V]
        lp = logp.gather(-1, gen[..., None]).squeeze(-1).tolist()
        want = max(r.top_logprobs for _, r in batch)
        top = logp.topk(min(want, logp.shape[-1]), dim=-1) if want else None
        events = []
        for b, (rid, req) in enumerate(batch):
            toks = gen[b].tolist()
            cut, reason = find_stop(toks, 0, req.params, self.tokenizer)
            n = cut if cut is not None else len(toks)
            t = Trajectory(
                list(req.prompt_ids),
                tokens=toks[:n],
                behavior_logprobs=lp[b][:n],
                ar_logprobs=lp[b][:n],
                num_forwards=n,
                policy_version=self.policy_version,
                sampler="hf",
                finish_reason=reason or "length",
                timings={"total": seconds},
            )
            if req.top_logprobs:
                vals, ids = top.values[b, :n].tolist(), top.indices[b, :n].tolist()
                t.top_logprobs = [
                    [(i, v) for i, v in zip(ii[: req.top_logprobs], vv, strict=False) if v != float("-inf")]
                    for ii, vv in zip(ids, vals, strict=True)
                ]
            events.append(StepEvent(rid, t.tokens, t.behavior_logprobs, t.top_logprobs, t))
        return events


def _hf_key(req: Request) -> tuple:
    """What one `generate` call must share (the seed is not: HF seeds a batch, from its oldest request)."""
    p = req.params
    return (p.temperature, p.top_p, p.top_k, p.eos_token_id, p.stop_strings)


class Scheduler:
    """Owns the policy, its cores and the engine thread (module docstring)."""

    def __init__(self, policy: HybridPolicy, tokenizer, cfg: ServeConfig, metrics: ServeMetrics):
        self.policy, self.tokenizer, self.cfg, self.metrics = policy, tokenizer, cfg, metrics
        self.version = 0
        self.make = engine_factory(
            policy,
            mix_weight=cfg.mix_weight,
            tokenizer=tokenizer,
            history=cfg.history,
            compile=cfg.compile,
        )
        # a plain (unconverted) model drafts from history only (`EngineSettings.drafts`)
        self.drafts = cfg.resolved_drafts(policy.is_converted)
        K = cfg.history.max_draft if self.drafts == "history" else policy.block_size
        self.auto = (
            AutoSampler(self.make, K, max_batch=cfg.max_batch, options=default_options(K, self.drafts))
            if cfg.backend == "engine"
            else None
        )
        self.cores: dict[str, EngineCore | HFCore] = {}
        self._commands: queue.Queue = queue.Queue()
        self._backlog: deque[_Choice] = deque()
        self._running: dict[tuple[str, int], _Choice] = {}  # (core key, request id) -> choice
        self._subs: dict[int, list[_Choice]] = {}  # submission id -> its unfinished choices
        self._update: _Update | None = None
        self._auto: Option | None = None  # the option auto traffic runs on now (`_auto_option`)
        self._auto_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="blockrl-engine", daemon=True)

    # ------------------------------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Start the engine thread (after `load_calibration` / `calibrate`, which run on the caller's thread)."""
        self._thread.start()

    @property
    def calibrates_at_start(self) -> bool:
        return self.auto is not None and self.cfg.auto_calibration == "start"

    def _cache_file(self) -> tuple[Path, dict] | None:
        """This server's calibration cache file and the key it must hold; None without auto or a cache dir."""
        if self.auto is None or not self.cfg.calibration_cache:
            return None
        device = next(self.policy.parameters()).device
        key = calibration_key(self.cfg, device, self.auto.options, self.auto.K, self.calibration_sizes)
        return cache_path(self.cfg.calibration_cache, key), key

    @property
    def calibration_sizes(self) -> list[int]:
        """The batch sizes auto times: powers of two up to max_batch, and max_batch (`AutoSampler._bucket`)."""
        return sorted({min(self.cfg.max_batch, 1 << i) for i in range(self.cfg.max_batch.bit_length() + 1)})

    def load_calibration(self) -> Path | None:
        """auto's timings from the cache file whose key matches this checkpoint, machine and settings exactly;
        the file's path when one did (nothing is timed then, at start or on first use), else None."""
        found = self._cache_file()
        if found is None:
            return None
        path, key = found
        if not read_calibration(path, key, self.auto.cost, self.calibration_sizes):
            return None
        self.auto.calibrated.update(self.calibration_sizes)
        return path

    def calibrate(self, stop: Callable[[], bool] | None = None) -> Path | None:
        """Time every option `auto` chooses among at each batch size it may see (`calibration_sizes`), before
        serving: otherwise the first `auto` request at each size would stall the engine while it is timed. `stop`
        is asked between timed probes (`CalibrationStopped` when it says True). Writes the cache file, and returns
        its path (None when there is no cache dir or it could not be written)."""
        t0 = time.perf_counter()
        found = self._cache_file()
        log.info(
            "auto: calibrating %d options at batch sizes %s (%s)",
            len(self.auto.options),
            self.calibration_sizes,
            f"not in the cache: {found[0]}" if found else "no calibration_cache",
        )
        for b in self.calibration_sizes:
            self.auto.calibrate(b, stop)
        log.info("auto calibrated up to batch %d in %.1fs", self.cfg.max_batch, time.perf_counter() - t0)
        if found is None:
            return None
        try:
            write_calibration(found[0], found[1], self.auto.cost)
        except OSError as e:  # a read-only or full disk costs the next start its time, never this one
            log.warning("auto: could not write the calibration cache %s: %s", found[0], e)
            return None
        return found[0]

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=30)

    def submit(self, sub: Submission) -> None:
        self._commands.put(("submit", sub))

    def cancel(self, sub_id: int) -> None:
        """Drop a submission's unfinished choices (a client that went away): their slots free at the next step."""
        self._commands.put(("cancel", sub_id))

    def update_weights(self, state_dict: dict, version: int, mode: str | None) -> Future:
        """Swap in new weights between steps; the future resolves to the new version once they serve. mode: what
        happens to requests decoding now (`finish` on the old weights, or `cancel`); None lets each request's own
        `on_weight_update` decide."""
        done: Future = Future()
        self._commands.put(("update", _Update(state_dict, version, mode, done)))
        return done

    @property
    def samplers(self) -> tuple[str, ...]:
        if self.cfg.backend == "hf":
            return ("ar", "lossless", "logit_mix", "auto")  # accepted, and all served by HF generate
        # logit_mix mixes the diffusion drafter's logits: a plain model has none
        return (
            ("ar", "lossless", "logit_mix", "auto")
            if self.drafts != "history"
            else ("ar", "lossless", "auto")
        )

    # ------------------------------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception as e:  # anything outside a core's step: fail what is in flight, keep serving
                log.exception("engine loop failed")
                for ch in list(self._backlog) + list(self._running.values()):
                    if ch.sub.sub_id in self._subs:
                        self._fail(ch.sub, f"engine error: {e}")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _iteration(self) -> None:
        busy = bool(self._backlog) or any(c.has_work for c in self.cores.values())
        self._apply_commands(block=not busy and self._update is None)
        self._feed()
        self._maybe_swap()
        for key, core in list(self.cores.items()):
            if core.has_work:
                try:
                    events = core.step()
                except Exception as e:  # a failing step fails its requests, never the server
                    log.exception("engine step failed on %s", key)
                    self._fail_core(key, f"engine error: {e}")
                    continue
                self._deliver(key, events)
        self._gauges()

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind = cmd[0]
            if kind == "submit":
                sub = cmd[1]
                choices = [_Choice(sub, i) for i in range(len(sub.requests))]
                self._subs[sub.sub_id] = choices
                self._backlog.extend(choices)
            elif kind == "cancel":
                self._cancel(cmd[1])
            elif kind == "update":
                self._begin_update(cmd[1])
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _core(self, sampler: str) -> tuple[str, EngineCore | HFCore]:
        if self.cfg.backend == "hf":
            key = "hf"
            if key not in self.cores:
                self.cores[key] = HFCore(self.policy, self.tokenizer, self.cfg.max_batch)
                self.cores[key].policy_version = self.version
            return key, self.cores[key]
        if sampler == "auto":
            opt = self._auto_option()
        else:
            opt = Option(sampler, () if sampler == "ar" else tuple(self.cfg.levels), self.drafts)
        if opt.name not in self.cores:
            engine = self.make(opt, self.cfg.max_batch)
            engine.policy_version = self.version
            self.cores[opt.name] = EngineCore(engine)
        return opt.name, self.cores[opt.name]

    def _auto_option(self) -> Option:
        """auto's current option, for the rows it would run with: its core's rows plus the auto choices waiting.
        Re-chosen when that core has drained, or at most every `AUTO_REVISIT_S` under steady load. One option at a
        time otherwise: two cores stepping in turn each wait for the other (while a switch drains the old core,
        both run)."""
        cur, now = self._auto, time.perf_counter()
        core = self.cores.get(cur.name) if cur is not None else None
        if core is None or not core.has_work or now - self._auto_at > AUTO_REVISIT_S:
            waiting = sum(1 for ch in self._backlog if ch.sub.sampler == "auto")  # besides the one joining
            busy = (core.num_active + core.num_queued if core is not None else 0) + waiting + 1
            self._auto, self._auto_at = self.auto.choose_for(busy), now
        return self._auto

    def _feed(self) -> None:
        """Backlog -> cores with a free slot, oldest first (a full core does not hold back the others)."""
        if self._update is not None:
            return  # new work waits for the swap
        if not self._backlog:
            return
        full: set[str] = set()
        keep: deque[_Choice] = deque()
        while self._backlog:
            ch = self._backlog.popleft()
            if ch.sub.sub_id not in self._subs:  # its submission failed while this feed ran
                continue
            sampler = ch.sub.sampler
            if sampler in full:
                keep.append(ch)
                continue
            key, core = self._core(sampler)
            if core.num_active + core.num_queued >= core.max_batch:
                full.add(sampler)
                keep.append(ch)
                continue
            try:
                ch.rid = core.add(ch.sub.requests[ch.index])
            except ValueError as e:
                self._fail(ch.sub, str(e))
                continue
            ch.key = key
            self._running[(key, ch.rid)] = ch
        self._backlog = keep

    def _deliver(self, key: str, events: list[StepEvent]) -> None:
        m = self.metrics
        if key == "hf":  # one event per completion: a forward per token
            m.forwards.inc(sum(len(ev.tokens) for ev in events))
        else:
            m.forwards.inc(len(events))  # one event per row and engine pass
        for ev in events:
            ch = self._running.get((key, ev.request_id))
            m.tokens.inc(len(ev.tokens))
            if ch is None:  # cancelled after the step began
                continue
            if ch.sub.stream or ev.finished is not None:
                ch.sub.deliver(Delivery(ch.index, ev, key))
            if ev.finished is not None:
                self._done(ch)
                t = ev.finished
                if self.auto is not None and key.startswith("lossless") and sum(t.draft_counts):
                    self.auto.observe([t])  # auto's live acceptance: this server's own exact drafts

    def _done(self, ch: _Choice) -> None:
        self._running.pop((ch.key, ch.rid), None)
        left = self._subs.get(ch.sub.sub_id)
        if left is not None:
            left.remove(ch)
            if not left:
                del self._subs[ch.sub.sub_id]

    def _drop(self, sub_id: int) -> int:
        """Remove a submission's unfinished choices, from the backlog or their cores; returns how many."""
        choices = self._subs.pop(sub_id, [])
        for ch in choices:
            if ch.key:
                self.cores[ch.key].cancel(ch.rid)
                self._running.pop((ch.key, ch.rid), None)
        self._backlog = deque(ch for ch in self._backlog if ch.sub.sub_id != sub_id)
        return len(choices)

    def _cancel(self, sub_id: int) -> None:
        self.metrics.cancelled.inc(self._drop(sub_id))

    def _fail(self, sub: Submission, message: str) -> None:
        self._drop(sub.sub_id)
        sub.deliver(Delivery(-1, error=message))

    def _fail_core(self, key: str, message: str) -> None:
        subs = {ch.sub.sub_id: ch.sub for (k, _), ch in list(self._running.items()) if k == key}
        for sub in subs.values():
            self._fail(sub, message)
        del self.cores[key]  # its state is suspect: the next request builds a fresh core

    # ------------------------------------------------------------------------------------------ weights
    def _begin_update(self, upd: _Update) -> None:
        if self._update is not None:
            upd.done.set_exception(UpdateInProgress("a weight update is already in progress"))
            return
        self._update = upd
        # stop the started choices that cancel now; queued ones run on the new weights
        for (key, rid), ch in list(self._running.items()):
            if (upd.mode or ch.sub.on_weight_update) == "cancel":
                core = self.cores[key]
                if isinstance(core, EngineCore) and any(r is not None and r.index == rid for r in core.slots):
                    traj = core.cancel(rid)
                    traj.finish_reason = "abort"
                    ch.sub.deliver(Delivery(ch.index, StepEvent(rid, [], [], None, traj), key))
                    self._done(ch)

    def _maybe_swap(self) -> None:
        upd = self._update
        if upd is None or any(c.num_active for c in self.cores.values()):
            return  # rows still decode on the old weights
        try:
            self.policy.model.load_state_dict(upd.state_dict)
        except Exception as e:  # shapes checked before; anything else leaves the old weights serving
            self._update = None
            upd.done.set_exception(e)
            return
        self.version = upd.version
        for core in self.cores.values():
            if isinstance(core, EngineCore):
                core.eng.policy_version = upd.version
            else:
                core.policy_version = upd.version
        if self.auto is not None:
            self.auto.policy_version = upd.version
        self.metrics.policy_version.set(upd.version)
        self._update = None
        upd.done.set_result(upd.version)
        log.info("serving policy version %d", upd.version)

    # ------------------------------------------------------------------------------------------ metrics
    def _gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(len(self._backlog) + sum(c.num_queued for c in self.cores.values()))
        active = sum(c.num_active for c in self.cores.values())
        m.active_rows.set(active)
        stepping = (
            sum(1 for c in self.cores.values() if c.num_active) or 1
        )  # cores holding rows: each has max_batch
        m.occupancy.set(active / (self.cfg.max_batch * stepping))
        m.tick()
