"""A decode step's verify and next drafts (`VerifyDrafts`, a part of `EngineCore`): the rows of a pass grouped by
sampling settings, processors, logit mixing, the fused verify with per-row uniforms, and the drafts for the next step
from the chosen proposal block."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from kernels.verify import VerifyOutput
from rollout.processors import process_logits
from rollout.types import SamplingParams


class PassGroup(NamedTuple):
    """Rows of one pass that share sampling settings (`EngineCore._group`)."""

    pos: torch.Tensor | None  # their positions among the pass's rows; None = all of them
    slots: list[int]
    params: SamplingParams
    banned: torch.Tensor | None  # constraint mask of these settings

    def take(self, x):
        """x's rows of this group (x itself for the one group of a uniform pass, None stays None)."""
        return x if x is None or self.pos is None else x[self.pos]


_VERIFY_FIELDS = [f.name for f in dataclasses.fields(VerifyOutput)]


class VerifyDrafts:
    """EngineCore's verify and drafting (its state: the core's slots, drafts, uniforms' generators and `_pass`)."""

    def verify(self, rows, ar_logits, drafts, draft_logits, n_drafts, draws: int = 1):
        """Per sampling group: processors -> (logit mixing) -> fused verify with per-row uniforms. Returns
        (VerifyOutput, ar_logprobs, n_drafts, top) with top = (log-probs, ids) [R, V, n] of the most likely
        tokens under the behaviour distribution when a row asked for alternatives, else None.

        Each row draws `draws` uniforms (K+1 in a decode step) however long the pass's verify segment is, so a
        row's random stream never depends on the rows beside it."""
        V = ar_logits.shape[1]
        q_all = self.draft_probs[self._idx, : V - 1] if self.draft_probs is not None and V > 1 else None
        top_n = min(self.V, max(self.slots[s].top_n for s in rows))
        dirac = None if self.dirac is None or draft_logits is None else self.dirac[self._idx]
        tensors = (ar_logits, drafts, draft_logits, n_drafts, q_all, dirac)
        parts = [self._verify_group(g, *(g.take(x) for x in tensors), top_n, draws) for g in self._pass]
        if len(parts) == 1:
            out, ar_lp, top = parts[0]
        else:  # each output field, scattered back over the pass's rows
            R = len(rows)
            out = VerifyOutput(*(self._scatter([getattr(p[0], f) for p in parts], R) for f in _VERIFY_FIELDS))
            ar_lp = self._scatter([p[1] for p in parts], R)
            top = tuple(self._scatter([p[2][i] for p in parts], R) for i in range(2)) if top_n else None
        return out, ar_lp, n_drafts, top

    def _scatter(self, parts: list[torch.Tensor], R: int) -> torch.Tensor:
        """Per-group results (each group's rows in order) -> one tensor over all R rows of the pass."""
        full = parts[0].new_empty((R, *parts[0].shape[1:]))
        for x, g in zip(parts, self._pass, strict=True):
            full[g.pos] = x
        return full

    def _verify_group(self, g: PassGroup, ar_logits, drafts, draft_logits, n_drafts, q, dirac, top_n, draws):
        eng, rows, p, banned = self.eng, g.slots, g.params, g.banned
        K1 = ar_logits.shape[1]
        target = ar_logits
        if eng.sampler == "logit_mix" and eng.mix_weight < 1.0 and K1 > 1:
            w = eng.mix_weight
            mixed = w * ar_logits[:, :-1] + (1 - w) * draft_logits.float()
            valid = torch.arange(K1 - 1, device=ar_logits.device)[None] < n_drafts[:, None]
            if dirac is not None:  # a history draft's positions keep the pure AR target (nothing to mix)
                valid = valid & ~dirac[:, None]
            valid = valid[..., None]
            target = torch.cat([torch.where(valid, mixed, ar_logits[:, :-1]), ar_logits[:, -1:]], dim=1)
        target = process_logits(target, p, banned)
        if p.temperature == 0:
            q = None
        gens = [self.slots[s].gen for s in rows]
        u = torch.stack([torch.rand(max(draws, K1), generator=g, device=ar_logits.device) for g in gens])
        # draft i's test reads u_i and the final draw the last uniform, whatever the pass's verify length
        u = torch.cat([u[:, : K1 - 1], u[:, -1:]], dim=1)
        out = eng.verify_fn(target, drafts, q, n_drafts, u, p.temperature)
        if p.temperature == 0:
            ar_lp = torch.zeros_like(out.logprobs)
        elif target is ar_logits or eng.sampler != "logit_mix":
            ar_lp = out.logprobs
        else:
            lp = torch.log_softmax(process_logits(ar_logits, p, banned) / p.temperature, dim=-1)
            emitted = torch.arange(K1, device=lp.device)[None] <= out.accept_len[:, None]
            ar_lp = torch.where(emitted, lp.gather(-1, out.tokens.clamp(min=0)[..., None]).squeeze(-1), 0.0)
        top = None
        if top_n:  # only when asked: the alternatives under the distribution the tokens were drawn from
            scaled = target if p.temperature in (0.0, 1.0) else target / p.temperature
            top = torch.log_softmax(scaled, dim=-1).topk(top_n, dim=-1)
        return out, ar_lp, top

    def set_drafts(
        self,
        rows: list[int],
        proposals: torch.Tensor,
        accept_len: torch.Tensor,
        levels: torch.Tensor,
        ends: torch.Tensor | None = None,
    ) -> None:
        """Next drafts from the closest-below proposal. proposals: hidden states [R, L(+1), K+1, H] of the blocks
        at the fixed `levels` [L], then, with `ends` (each row's draft count [R]), the block at each row's draft
        end, which a row that accepted its whole draft drafts from; accept_len [R]."""
        K = self.eng.K
        dev = proposals.device
        R = len(rows)
        if len(levels):
            lvl = torch.searchsorted(levels, accept_len, right=True) - 1  # largest level p <= na
        else:
            lvl = torch.full_like(accept_len, -1)
        found = lvl >= 0  # with levels [end] a rejected draft has none: the next step verifies no draft
        p = levels[lvl.clamp(min=0)] if len(levels) else torch.zeros_like(accept_len)
        if ends is not None:
            full = accept_len == ends
            lvl, p, found = torch.where(full, len(levels), lvl), torch.where(full, ends, p), found | full
        lvl = lvl.clamp(min=0)
        chosen = proposals[torch.arange(R, device=dev), lvl]  # [R, K+1, H]
        first = accept_len - p + 1  # slot of position b+na+2
        slot = (first[:, None] + torch.arange(K, device=dev)[None]).clamp(0, K)  # [R, K]
        with self.timed("heads"):
            dl = self.head(chosen.gather(1, slot[..., None].expand(R, K, chosen.shape[-1])))  # [R, K, V]
        with self.timed("drafts"):
            n = torch.where(found, K - accept_len + p, 0)
            rows_t = self._idx
            if self.draft_logits is not None:
                self.draft_logits[rows_t] = dl.to(self.draft_logits.dtype)
            self.n_drafts[rows_t] = n
            parts = []
            for g in self._pass:
                processed = process_logits(g.take(dl), g.params, g.banned)
                if self.eng.draft == "sampled" and g.params.temperature > 0:
                    probs = torch.softmax(processed / self.eng.draft_temperature, dim=-1)
                    self.draft_probs[g.take(rows_t)] = probs  # q, reused by the next verify
                    u = torch.stack([torch.rand(K, generator=self.slots[s].gen, device=dev) for s in g.slots])
                    cdf = probs.cumsum(-1)
                    parts.append((cdf <= u[..., None] * cdf[..., -1:]).sum(-1).clamp(max=probs.shape[-1] - 1))
                else:
                    parts.append(processed.argmax(-1))
            self.drafts[rows_t] = parts[0] if len(parts) == 1 else self._scatter(parts, R)
