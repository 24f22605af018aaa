"""Self-speculative block decoding (docs/architecture.md, "The engine"): one forward verifies the last draft and drafts the next block.

Per row and step, the queries are the verify segment `[a, d_1..d_K]` at positions b..b+K plus one proposal block of
K+1 masks per level p (positions b+p+1..b+p+K+1). The verify logits give p_0..p_K; the fused verify accepts na drafts
and draws one more token; the cache keeps the KV of `a, d_1..d_na` only; the next drafts come from the proposal with
the largest level p <= na ("closest below"), slots covering positions b+na+2 onward. Prefill is the prompt (causal)
plus one proposal block, and the AR head samples the first anchor. A step lays out only what its drafts reach: a
verify segment of 1 + the pass's longest draft, the levels such a draft reaches, and with the level `end` the
proposal at the draft's end (`step_layout`).

The `ar` sampler is the same loop with an empty draft (verify segment = the anchor alone, no proposals): one token
per forward, our own baseline. Rows are ragged (own length, acceptance, cache extent) and finished rows are refilled
from the prompt queue (continuous batching). Each row draws its randomness from its own generator seeded by
(seed, prompt index), so a trajectory does not depend on which other prompts share its batch.

    from rollout import BlockEngine
    engine = BlockEngine(policy, sampler="lossless", levels=[0, 4, 8], tokenizer=tok)
    trajs = engine.generate([[2, 70, 71]], max_new_tokens=64, temperature=1.0, seed=0)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from kernels.verify import default_verify
from policy.compiled import CompileMode, compile_enabled, compiled_body
from policy.hybrid import HybridPolicy
from policy.masks import decode_step_layout, decode_step_mask
from policy.tokenizer import eos_ids
from rollout.core import EngineCore
from rollout.history import HistoryStore
from rollout.step_timer import PHASES, StepTimer
from rollout.types import (
    DRAFTS,
    END,
    Option,
    Request,
    SamplingParams,
    Trajectory,
    check_level_list,
    split_levels,
    with_eos,
)

__all__ = ["PHASES", "SAMPLERS", "BlockEngine", "EngineCore", "GenerateAPI", "StepTimer"]

SAMPLERS = ("ar", "lossless", "logit_mix")  # `auto` chooses among these: rollout/auto.py wraps engines


class StepLayout(NamedTuple):
    """One decode step's query layout (`BlockEngine.step_layout`), for a pass whose rows carry at most n drafts."""

    verify_len: int  # n + 1: the anchor and the drafts
    levels: tuple[int, ...]  # fixed proposal levels evaluated (every p <= n)
    offsets: torch.Tensor  # [Q] query positions relative to the anchor (the end block's as if at level 0)
    mask: torch.Tensor  # [Q, Q] bool query mask (the end block's as if at level n)
    levels_t: torch.Tensor  # the fixed levels on the device, for choosing each row's proposal
    end: bool  # a last block at each row's own draft end (`end` levels)
    end_rows: torch.Tensor  # [Q] bool: the end block's queries
    verify_slot: torch.Tensor  # [Q] verify slot index of each query, -1 outside the verify segment


def check_levels(block_size: int, levels) -> None:
    """Raise ValueError unless `levels` (ints and `end`, as configs write them) is a valid level set for drafts of
    `block_size`: fixed levels strictly increasing within 0..K, and 0 among them or `end` (so every row always has a
    proposal to draft from, or drafts again after one step without)."""
    fixed, _ = check_level_list(levels)
    decode_step_layout(block_size, list(fixed))


class GenerateAPI:
    """`generate()` in keyword form over `run(prompt_ids, SamplingParams)`: the interface BlockEngine and the
    AutoSampler wrapper share. Subclasses provide `run`, `policy` and `tokenizer`."""

    policy = None
    tokenizer = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation: the tokenizer's EOS and the model's generation_config EOS ids."""
        if self.policy is None:
            return eos_ids(self.tokenizer)
        return self.policy.eos_ids(self.tokenizer)

    def generate(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        audit: bool = False,
        index_offset: int = 0,
        **kwargs,
    ) -> list[Trajectory]:
        """One Trajectory per prompt, in order. Extra kwargs go to SamplingParams (eos_token_id, stop_strings, ...);
        EOS defaults to the model's EOS ids (`eos_ids`).

        Prompt i draws its randomness from seed (seed, index_offset + i): callers that split one logical batch into
        several calls pass the global index, so repeated prompts (GRPO groups) never share a random stream."""
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, **kwargs)
        if "eos_token_id" not in kwargs:
            params = with_eos(params, self.eos_ids)
        return self.run(prompt_ids, params, index_offset=index_offset, audit=audit)

    def run(self, prompt_ids, params: SamplingParams, index_offset: int = 0, audit: bool = False):
        raise NotImplementedError


class BlockEngine(GenerateAPI):
    def __init__(
        self,
        policy: HybridPolicy,
        sampler: str = "lossless",
        block_size: int | None = None,
        levels: Sequence[int] | str = (0,),
        max_batch: int = 16,
        mix_weight: float = 0.5,
        draft: str = "dirac",
        draft_temperature: float = 1.0,
        tokenizer=None,
        policy_version: int = 0,
        verify_fn=None,
        drafts: str = "diffusion",
        history: HistoryStore | None = None,
        compile: CompileMode = "off",
    ):
        """drafts: where a step's drafts come from (`DRAFTS`): the diffusion drafter (a converted policy), history
        (rollout/history.py: any causal LM, converted or not), or both, chosen per row and step. `history` is the
        store those drafts come from, shared by every engine of a job (a new one when None). compile: the decode
        steps' model body under torch.compile (policy/compiled.py; auto = on CUDA only)."""
        if sampler == "auto":
            raise ValueError("sampler 'auto' chooses among engines: build it with rollout.auto.build_engine")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if drafts not in DRAFTS:
            raise ValueError(f"drafts must be one of {DRAFTS}, got {drafts!r}")
        self.diffusion = sampler != "ar" and drafts != "history"  # the proposal blocks run
        if self.diffusion and not policy.is_converted:
            raise ValueError(
                f"sampler {sampler!r} with diffusion drafts needs a converted policy (mask token); "
                "use drafts='history' (no conversion) or sampler='ar'"
            )
        if sampler == "logit_mix" and drafts == "history":
            raise ValueError(
                "logit_mix mixes the diffusion drafter's logits: use drafts 'diffusion' or 'both'"
            )
        if draft not in ("dirac", "sampled"):
            raise ValueError(f"draft must be 'dirac' or 'sampled', got {draft!r}")
        if not 0.0 <= mix_weight <= 1.0:
            raise ValueError(f"mix_weight must be in [0, 1], got {mix_weight}")
        self.policy = policy
        self.sampler = sampler
        self.drafts = "diffusion" if sampler == "ar" else drafts
        self.history = None
        if sampler != "ar" and drafts != "diffusion":
            self.history = history if history is not None else HistoryStore()
        if sampler == "ar":
            self.K = 0
        elif self.diffusion:
            self.K = block_size or policy.block_size
        else:  # history drafts only: as long as the store's setting (no proposal blocks)
            self.K = block_size or self.history.cfg.max_draft
        fixed, tail = split_levels(levels)
        self.levels = list(fixed) if self.diffusion else []
        self.tail = self.diffusion and tail  # the draft's end is a level too (rollout.types.split_levels)
        self.max_batch = max_batch
        self.step_stats: dict[int, list] = {}  # active rows -> [seconds, decode steps] of this engine's steps
        self.mix_weight = mix_weight
        self.draft = draft
        self.draft_temperature = draft_temperature
        self.tokenizer = tokenizer
        self.policy_version = policy_version
        self.device = next(policy.parameters()).device
        self.verify_fn = verify_fn or default_verify(self.device)  # Triton on CUDA, torch reference on CPU
        self.compile = compile
        self.body = compiled_body(policy, self.device) if compile_enabled(compile, self.device) else None
        # CUDA graphs record one graph per shape: verify lengths go up to powers of two, extents to a bucket
        self.cuda_graphs = self.body is not None and self.body.cuda_graphs
        if self.diffusion:
            check_levels(self.K, levels)
        # one layout per longest draft n = 0..K, built here: a step copies nothing to the device
        self._layouts = [self._build_layout(n) for n in range(self.K + 1)]

    def step_layout(self, n: int) -> StepLayout:
        """The decode step's layout for a pass whose rows carry at most n drafts: a verify segment of n + 1 slots
        (a slot past every row's draft verifies nothing), the fixed levels such a draft can reach (p <= n), and,
        when `end` is a level, one more block per row at its own draft's end (`EngineCore.decode_step` places it).
        Under CUDA graphs n is rounded up to a power of two (at most K): slots past every draft verify nothing, and
        the step has log2(K) + 2 query lengths instead of K + 1."""
        if self.cuda_graphs and n:
            n = min(self.K, 1 << (n - 1).bit_length())
        return self._layouts[n]

    def _build_layout(self, n: int) -> StepLayout:
        dev, K = self.device, self.K
        if not K:  # ar: the anchor alone
            offsets, mask, levels = torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), []
        elif not self.diffusion:  # history drafts only: the verify segment, causal
            offsets, mask, levels = torch.arange(n + 1), torch.ones(n + 1, n + 1, dtype=torch.bool).tril(), []
        else:
            levels = [p for p in self.levels if p <= n]
            offsets, _ = decode_step_layout(K, levels, n + 1)
            mask = decode_step_mask(K, levels, n + 1)
        Q = len(offsets)
        end_rows = torch.zeros(Q + (K + 1) * self.tail, dtype=torch.bool)
        verify_slot = torch.full_like(end_rows, -1, dtype=torch.long)
        verify_slot[: n + 1] = torch.arange(n + 1)
        if self.tail:
            # the end block, placed as level 0 here; decode_step shifts it to each row's n_r, hides slots past n_r
            end_rows[Q:] = True
            offsets = torch.cat([offsets, torch.arange(1, K + 2)])
            grown = torch.zeros(len(end_rows), len(end_rows), dtype=torch.bool)
            grown[:Q, :Q] = mask
            grown[Q:, : n + 1] = True
            grown[Q:, Q:] = True
            mask = grown
        return StepLayout(
            n + 1,
            tuple(levels),
            offsets.to(dev),
            mask.to(dev),
            torch.tensor(levels, dtype=torch.long, device=dev),
            self.tail,
            end_rows.to(dev),
            verify_slot.to(dev),
        )

    @property
    def option(self) -> Option:
        """The concrete sampler this engine runs (stamped on every trajectory)."""
        return Option(self.sampler, (*self.levels, END) if self.tail else tuple(self.levels), self.drafts)

    @property
    def vocab_size(self) -> int:
        return self.policy.model.get_output_embeddings().weight.shape[0]

    # ------------------------------------------------------------------------------------------------ public API
    @torch.inference_mode()
    def run(
        self, prompt_ids: list[list[int]], params: SamplingParams, index_offset: int = 0, audit: bool = False
    ) -> list[Trajectory]:
        """`generate` with the sampling settings as one typed object (what crosses the Ray boundary): one request
        per prompt on the step-level core, stepped until every one has finished."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids: every prompt needs at least one token")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need the engine's tokenizer")
        self.policy.eval()
        core = EngineCore(self, min(self.max_batch, len(prompt_ids)))
        ids = [0] * len(prompt_ids)
        for i in self.admission_order(prompt_ids):
            ids[i] = core.add(Request(prompt_ids[i], params, index_offset + i, audit))
        done: dict[int, Trajectory] = {}
        while core.has_work:
            done |= {ev.request_id: ev.finished for ev in core.step() if ev.finished is not None}
        return [done[i] for i in ids]

    def admission_order(self, prompt_ids: list[list[int]]) -> list[int]:
        """The order prompts join the batch. With history drafts, a group's samples (equal prompts) are spread out:
        the first sample of every group, then the second, ...; so a group's later samples decode after its earlier
        ones have written theirs, and draft from them (Seer's insight), instead of all in lockstep with nothing
        ahead to copy. Each sample keeps its own random stream (seeded by its index), so the order changes which
        drafts are offered, never the distribution sampled."""
        if self.history is None:
            return list(range(len(prompt_ids)))
        seen: dict[tuple, int] = {}
        rank = []
        for i, p in enumerate(prompt_ids):
            k = tuple(p)
            rank.append((seen.get(k, 0), i))
            seen[k] = seen.get(k, 0) + 1
        return [i for _, i in sorted(rank)]

    def _probe(
        self, prompt_ids: list[list[int]], temperature: float, caller: str, full_layout: bool = True
    ) -> tuple[EngineCore, list[int]]:
        """A core holding one batch of these prompts that never stop (no EOS, no length limit), not yet admitted:
        the probes below step it by hand through the same code path as `generate`, at the full step layout unless
        `full_layout` is off (random prompts draft little: the full layout times a step's most cost)."""
        if len(prompt_ids) > self.max_batch:
            raise ValueError(f"{caller}: {len(prompt_ids)} prompts exceed max_batch={self.max_batch}")
        params = SamplingParams(max_new_tokens=1 << 30, temperature=temperature, eos_token_id=None)
        core = EngineCore(self, len(prompt_ids))
        core.full_layout = full_layout
        for i, p in enumerate(prompt_ids):
            core.add(Request(p, params, i))
        return core, list(range(len(prompt_ids)))

    @torch.inference_mode()
    def time_decode_steps(
        self, prompt_ids: list[list[int]], steps: int, temperature: float = 1.0, draftless: bool = False
    ) -> tuple[float, float]:
        """(prefill seconds, median seconds of one decode step) for this batch of prompts: the cost model's
        calibration probe. Steps are laid out in full, or with `draftless` without drafts (each step's drafts
        dropped before it: the least a step lays out, as after a rejected draft under [end])."""
        run, rows = self._probe(prompt_ids, temperature, "time_decode_steps", full_layout=not draftless)
        t0 = time.perf_counter()
        run.admit()
        prefill = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            if draftless:
                run.drop_drafts(rows)
            t = time.perf_counter()
            run.decode_step(rows)
            times.append(time.perf_counter() - t)
        return prefill, statistics.median(times)

    @torch.inference_mode()
    def profile_decode_steps(
        self, prompt_ids: list[list[int]], steps: int, temperature: float = 1.0
    ) -> dict[str, float]:
        """Seconds per decode step of each phase (`PHASES`, plus `total` and the unattributed `other`), over `steps`
        steps of this batch after one warm step: where a step's time goes, for a user tuning levels or K."""
        run, rows = self._probe(prompt_ids, temperature, "profile_decode_steps")
        run.admit()
        run.decode_step(rows)  # warm
        run.timer = StepTimer(self.device)
        with run.timer("total"):
            for _ in range(steps):
                run.decode_step(rows)
        out = {ph: run.timer.seconds[ph] / steps for ph in PHASES}
        out["total"] = run.timer.seconds["total"] / steps
        out["other"] = max(0.0, out["total"] - sum(out[ph] for ph in PHASES))  # level choice, slicing
        return out
