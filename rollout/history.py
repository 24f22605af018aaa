"""Drafts from history: a suffix index over what rollouts have already written, proposing Dirac drafts that the
engine verifies in the same pass, by the same AR verify, as its diffusion drafts (docs/architecture.md, "Drafts from
history").

Sources, all in one index per *group* (a GRPO group's rows share one: by default the group is the prompt):
- the row's own prompt and output so far (prompt lookup: copied spans, repeated phrases);
- the other rows of its group as they decode (Seer's sibling drafts);
- a bounded store of the group's recent finished rollouts, kept across calls (DAS, RhymeRL: later epochs revisit the
  same prompts).

The index maps every `min_match`-gram to where it ends in the group's sequences. A draft for a row: look up the
row's last `min_match` tokens, extend each occurrence's match backwards (up to `max_match`), keep the occurrences
with the longest match, then walk forward: at each depth the most frequent next token among the occurrences that
still agree, with its frequency as the estimate that the verify accepts it. The walk stops when the path's
probability falls below `min_prob` or at the draft length. `expected` = the sum of the path's prefix
probabilities: the estimated accepted length, which the engine weighs against the diffusion draft's
(`rollout.core`).

Why our own index: Arctic Inference's `SuffixDecodingCache` (what vLLM's `method="suffix"` uses) is published on
PyPI only as a source archive (0.3.0) whose build pulls CMake, nanobind, pinned protobuf/grpcio-tools and a whole
torch into its build environment and compiles C++; on these machines that build fails after about 2 minutes (CMake
finds no Python development headers), and a compiled package could not travel to the lent GPU machine either. The n-gram index here is a few dozen lines of dicts and lists, and its cost per step is measured
(`blockrl bench`, `history` phase of the step profile).

Memory bound and eviction (`HistorySettings`): at most `max_tokens` tokens are held over all groups; a group keeps
its last `max_per_group` finished rollouts (the oldest leaves first); over the token bound, the least recently used
group with no row decoding leaves whole. Rows still decoding are never evicted; past the bound, their new tokens are
simply not indexed.

    store = HistoryStore(HistorySettings())
    seq = store.begin(group=tuple(prompt), prompt=prompt)
    seq.extend(tokens)                       # as the row commits them
    draft = seq.propose(max_len=16)          # HistoryDraft(tokens, expected)
    seq.finish()                             # kept for later rows of the group
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from common.config import Section


class HistorySettings(Section):
    """The history draft source (`drafts: history | both`)."""

    max_tokens: int = Field(1_000_000, ge=1)
    """memory bound: tokens indexed over all groups (about 200 bytes each where no n-gram repeats, less in real
    text: 1M tokens is at most ~200 MB per engine)."""
    max_per_group: int = Field(32, ge=1)
    """finished rollouts kept per group (prompt); the oldest is evicted first."""
    min_match: int = Field(2, ge=1)
    """tokens of context a match needs (the index key)."""
    max_match: int = Field(16, ge=1)
    """longest context compared when ranking matches."""
    max_candidates: int = Field(32, ge=1)
    """most recent occurrences of a key considered per draft."""
    min_prob: float = Field(0.1, gt=0.0, le=1.0)
    """a draft stops where its estimated prefix probability falls below this."""
    max_draft: int = Field(16, ge=1)
    """longest history draft on a model with no diffusion drafter (a converted model drafts at most its K)."""
    adaptive_length: bool = True
    """cut each pass's verify length to what the measured step cost says pays (faster; since the cut follows
    wall-clock timings, a seeded run is exact but not bit-reproducible). false: every pass verifies its longest
    draft, and a seeded run is reproducible for the same batch."""
    rule: Literal["expected", "history", "diffusion"] = "expected"
    """per row and step, with `drafts: both`: `expected` = the draft with the larger expected accepted length;
    `history` = a history draft whenever there is one; `diffusion` = history only where no diffusion draft is."""


@dataclass(frozen=True)
class HistoryDraft:
    tokens: list[int]
    expected: float  # estimated accepted length: the sum of the draft's prefix probabilities


_SHIFT = 32  # an occurrence is (sequence id << 32) | end position


class _Group:
    """One group's sequences and their n-gram index."""

    def __init__(self):
        self.seqs: dict[int, list[int]] = {}  # sequence id -> tokens (prompt + output)
        self.finished: list[int] = []  # finished sequence ids, oldest first
        self.index: dict[tuple[int, ...], list[int]] = {}  # key n-gram -> occurrences (end of the n-gram)
        self.prompts: set[tuple[int, ...]] = set()  # prompts indexed as their own sequence
        self.frozen: set[int] = (
            set()
        )  # sequences that met the token bound: no longer indexed (kept contiguous)
        self.active = 0  # sequences still decoding
        self.tokens = 0


class HistoryStore:
    """The bounded store of every group's sequences (module docstring). One per engine, kept across calls."""

    def __init__(self, settings: HistorySettings | None = None):
        self.cfg = settings or HistorySettings()
        self.groups: OrderedDict[Hashable, _Group] = OrderedDict()  # least recently used first
        self.tokens = 0
        self._next = 0

    def clear(self) -> None:
        """Forget every group (a benchmark's timed runs each start from an empty store)."""
        self.groups.clear()
        self.tokens = 0

    def begin(self, group: Hashable, prompt: Sequence[int]) -> HistorySequence:
        """A new row of `group`: its prompt is indexed (once per group), and its output as it is extended."""
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = _Group()
        self.groups.move_to_end(group)
        g.active += 1
        prompt = tuple(prompt)
        if prompt not in g.prompts:  # siblings share their prompt: it is indexed once, as its own sequence
            g.prompts.add(prompt)
            pid = self._new_id()
            g.seqs[pid] = []
            self._append(g, pid, prompt)
        sid = self._new_id()
        g.seqs[sid] = []
        # the row's own sequence opens with the prompt's last `max_match` tokens: spans that cross from the prompt
        # into the output are indexed, and matches extend back into the prompt
        self._append(g, sid, prompt[-self.cfg.max_match :])
        return HistorySequence(self, g, sid, list(prompt))

    def _new_id(self) -> int:
        self._next += 1
        return self._next

    def _append(self, g: _Group, sid: int, tokens: Sequence[int]) -> None:
        if sid in g.frozen:
            return
        if self.tokens + len(tokens) > self.cfg.max_tokens:
            self._evict(keep=g, need=len(tokens))
            if self.tokens + len(tokens) > self.cfg.max_tokens:
                g.frozen.add(sid)  # over the bound with only decoding rows left: what it has stays indexed
                return
        seq, m, cap = g.seqs[sid], self.cfg.min_match, self.cfg.max_candidates
        for t in tokens:
            seq.append(t)
            if len(seq) >= m:
                occ = g.index.setdefault(tuple(seq[-m:]), [])
                occ.append((sid << _SHIFT) | len(seq))
                if len(occ) > 2 * cap:  # keep the most recent (trimmed in halves: amortised O(1))
                    del occ[:-cap]
        g.tokens += len(tokens)
        self.tokens += len(tokens)

    def _finish(self, g: _Group, sid: int) -> None:
        g.active -= 1
        g.finished.append(sid)
        if len(g.finished) > self.cfg.max_per_group:
            for old in g.finished[: -self.cfg.max_per_group]:
                self._drop(g, old)
            g.finished = g.finished[-self.cfg.max_per_group :]
            self._reindex(g)

    def _drop(self, g: _Group, sid: int) -> None:
        g.frozen.discard(sid)
        n = len(g.seqs.pop(sid))
        g.tokens -= n
        self.tokens -= n

    def _reindex(self, g: _Group) -> None:
        """Rebuild a group's index from the sequences it keeps (after an eviction inside the group)."""
        seqs = g.seqs
        g.seqs, g.index = {}, {}
        self.tokens -= g.tokens
        g.tokens = 0
        for sid, toks in seqs.items():
            g.seqs[sid] = []
            g.frozen.discard(sid)
            self._append(g, sid, toks)

    def _evict(self, keep: _Group, need: int) -> None:
        """Drop least recently used groups with no decoding row until `need` more tokens fit the bound."""
        for key in list(self.groups):
            if self.tokens + need <= self.cfg.max_tokens:
                return
            g = self.groups[key]
            if g is not keep and g.active == 0:
                self.tokens -= g.tokens
                del self.groups[key]

    def propose(self, g: _Group, context: list[int], max_len: int) -> HistoryDraft | None:
        """The draft continuing `context` (the row's prompt + output), from the group's index; None if no match."""
        cfg = self.cfg
        m = cfg.min_match
        if len(context) < m or max_len < 1:
            return None
        occ = g.index.get(tuple(context[-m:]))
        if not occ:
            return None
        seqs, n_ctx = g.seqs, len(context)
        best, cands = 0, []
        for code in reversed(occ[-cfg.max_candidates :]):  # most recent first
            other, end = code >> _SHIFT, code & ((1 << _SHIFT) - 1)
            seq = seqs.get(other)
            if seq is None or end >= len(seq):
                continue  # evicted, or nothing after it yet (e.g. the row's own current end)
            length, limit = m, min(cfg.max_match, end, n_ctx)
            while length < limit and seq[end - length - 1] == context[n_ctx - length - 1]:
                length += 1
            if length > best:
                best, cands = length, [(seq, end)]
            elif length == best:
                cands.append((seq, end))
        tokens: list[int] = []
        prob, expected, depth = 1.0, 0.0, 0
        while cands and depth < max_len:
            counts: dict[int, int] = {}
            for seq, end in cands:
                if end + depth < len(seq):
                    t = seq[end + depth]
                    counts[t] = counts.get(t, 0) + 1
            if not counts:
                break
            tok, c = max(counts.items(), key=lambda kv: kv[1])
            prob *= c / sum(counts.values())
            if prob < cfg.min_prob:
                break
            tokens.append(tok)
            expected += prob
            cands = [(s, e) for s, e in cands if e + depth < len(s) and s[e + depth] == tok]
            depth += 1
        return HistoryDraft(tokens, expected) if tokens else None


class HistorySequence:
    """One row's handle on the store: extended as the row commits tokens, finished when it stops."""

    def __init__(self, store: HistoryStore, group: _Group, sid: int, context: list[int]):
        self.store, self.group, self.sid = store, group, sid
        self.context = context  # prompt + output so far (what a draft continues)
        self.done = False

    def extend(self, tokens: Sequence[int]) -> None:
        self.context.extend(tokens)
        self.store._append(self.group, self.sid, tokens)

    def propose(self, max_len: int) -> HistoryDraft | None:
        return self.store.propose(self.group, self.context, max_len)

    def finish(self) -> None:
        """The row stopped: its sequence stays in the group's store (bounded by `max_per_group`)."""
        if not self.done:
            self.done = True
            self.store._finish(self.group, self.sid)
