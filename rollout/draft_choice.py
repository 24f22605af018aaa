"""Which drafts a row carries with history drafts on (`DraftChoice`, a part of `EngineCore`): each row's history draft
against its diffusion draft by expected accepted length, from live acceptance curves that forget at `CURVE_KEEP` per
step, and the pass's verify length cut to what the measured step cost pays."""

from __future__ import annotations

import numpy as np
import torch

from common.device import host_to_device
from rollout.cost_model import km_survival

CURVE_KEEP = 0.99  # per decode step: the draft-source curves remember about the last 100 steps


class DraftChoice:
    """EngineCore's history-draft choice (its state: the core's curves, calibration and step-cost fit)."""

    def _pass_length(self, rows: list[int], longest: int) -> int:
        """The verify length of a pass with history drafts: a pass is laid out for its longest draft, so every row
        pays for one row's long draft. Choose n <= longest maximising the pass's expected tokens per second,
        (rows + sum_r sum_{i <= min(n_r, n)} P(draft i of row r accepted)) / (a + b * n), with acceptance from the
        live curves (history or diffusion, by the row's source) and the step cost fit from this core's own timed
        steps at this many rows; drafts past n are dropped. Until two lengths have been timed: the longest."""
        fit = self.step_fit.get(len(rows))
        if fit is None or fit[0] < 4 or not self.history.cfg.adaptive_length:
            return longest
        n_obs, sx, sy, sxx, sxy = fit
        var = sxx - sx * sx / n_obs
        if var <= 1e-9:
            return longest
        b = max(0.0, (sxy - sx * sy / n_obs) / var)
        a = max(1e-6, (sy - b * sx) / n_obs)
        gain = np.zeros(longest + 1)
        curves = {}
        for s in rows:
            row = self.slots[s]
            n = min(row.n_drafts, longest)
            if n:
                src = "h" if row.hist_pred is not None else "d"
                if src not in curves:
                    c = self.hist_curve if src == "h" else self.diff_curve
                    # a prior of hazard 0.3 where few steps were seen, so an unseen position is still tried
                    curves[src] = np.cumprod(1.0 - (c.rejected + 0.3) / (c.at_risk + 1.0))
                gain[1 : n + 1] += curves[src][:n]
        tokens = len(rows) + np.cumsum(gain)
        best = int(np.argmax(tokens / (a + b * np.arange(longest + 1))))
        if best < longest:
            self.n_drafts[self._idx] = self.n_drafts[self._idx].clamp(max=best)
            for s in rows:
                self.slots[s].n_drafts = min(self.slots[s].n_drafts, best)
        return best

    def _observe_step(self, R: int, n: int, seconds: float) -> None:
        """One timed decode step (R rows, verify length n + 1) into the decayed least-squares sums of its cost."""
        fit = self.step_fit.setdefault(R, np.zeros(5))
        fit *= 0.98  # recent steps weigh more (the machine's load changes)
        fit += (1.0, n, seconds, n * n, n * seconds)

    def _history_drafts(self, rows: list[int]) -> None:
        """After a step's emit: index each row's new tokens, then give each row still decoding the history draft
        (rollout/history.py) where the rule (`HistorySettings.rule`) prefers it to the diffusion draft it got. The
        default rule compares expected accepted lengths: the history draft's own estimate, scaled by how history
        estimates have fared so far (accepted / predicted), against sum_{i<=n} P(na >= i) of the n diffusion
        drafts, from their live acceptance curve. One host-to-device copy, only when some row's drafts change
        source."""
        K, rule, dev = self.eng.K, self.history.cfg.rule, self.eng.device
        scale = self.hist_calib[0] / self.hist_calib[1]
        e_diff = None
        use, changed, packed = [], False, []
        for row, new, finished in self._hist_updates:
            row.hist.extend(new)
            had = row.hist_pred is not None
            row.hist_pred = None
            d = None
            if finished:
                row.hist.finish()
            else:
                d = row.hist.propose(K)
            take = d is not None
            if take and self.eng.diffusion and row.n_drafts and rule != "history":
                if rule == "diffusion":
                    take = False
                else:
                    if e_diff is None:  # E[accepted | n drafts] = sum_{i=1..n} c_i, for every n at once
                        e_diff = km_survival(self.diff_curve.hazard()).cumsum() - 1.0
                    take = d.expected * scale > e_diff[min(row.n_drafts, K)]
            if take:
                row.hist_pred = d.expected
                row.n_drafts = len(d.tokens)
            use.append(take)
            changed |= take or had
            toks = d.tokens if take else []
            packed.append([int(take), len(toks), *toks, *[0] * (K - len(toks))])
        if not changed:
            return
        packed_t = host_to_device(packed, dev)  # [R, 2 + K]: uses history, its length, its tokens
        rows_t, use_t = self._idx, packed_t[:, 0].bool()
        self.drafts[rows_t, :K] = torch.where(use_t[:, None], packed_t[:, 2:], self.drafts[rows_t, :K])
        self.n_drafts[rows_t] = torch.where(use_t, packed_t[:, 1], self.n_drafts[rows_t])
        if self.dirac is not None:
            self.dirac[rows_t] = use_t
        if self.draft_probs is not None and any(
            use
        ):  # q of a Dirac draft: one-hot (the ratio test's p(d) / 1)
            sel = use_t.nonzero().squeeze(1)
            self.draft_probs[rows_t[sel]] = torch.nn.functional.one_hot(packed_t[sel, 2:], self.V).float()
