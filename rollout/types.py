"""Typed records that cross the engine (and Ray) boundary: sampling parameters in, trajectories out, and the
concrete sampler option (`Option`) that produced them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

END = "end"  # the level at the end of each step's draft (see `split_levels`)
Levels = list[int | Literal["end"]]  # a level list in configs: `[0, 4, 8]`, `[0, 8, end]`


def split_levels(levels) -> tuple[tuple[int, ...], bool]:
    """A level list as configs write it -> (the fixed levels, whether the draft's end is a level too).

    `end` is the level p = n of a step that carries n drafts: when all n are accepted, the next step drafts a full
    K tokens from there (a fixed level p < n leaves K - n + p). `[0, 8, end]` proposes from 0, from 8 (when the
    draft reaches it) and from the end."""
    fixed, tail = [], False
    for i, p in enumerate(levels):
        if p == END:
            tail = True
        elif isinstance(p, int) and not isinstance(p, bool):
            fixed.append(p)
        else:
            raise ValueError(f"levels[{i}]: expected an int or {END!r}, got {p!r}")
    return tuple(fixed), tail


def check_level_list(levels) -> tuple[tuple[int, ...], bool]:
    """`split_levels`, raising ValueError unless the levels are distinct, >= 0 and hold 0 or `end` (so a row always
    has a proposal to draft from, or drafts again after one step without). What a level list needs whatever the
    block size; `rollout.engine.check_levels` adds the bounds of a given K."""
    fixed, tail = split_levels(levels)
    if not (0 in fixed or tail) or any(p < 0 for p in fixed) or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct, >= 0 and contain 0 or {END}, got {list(levels)}")
    return fixed, tail


DRAFTS = ("diffusion", "history", "both")  # where a step's drafts come from (rollout/history.py)


@dataclass(frozen=True)
class Option:
    """A concrete sampler: what `auto` chooses among and what every trajectory records it was generated with."""

    sampler: str  # "ar" | "lossless" | "logit_mix"
    levels: tuple[int | str, ...] = ()  # ints, and END for the draft's end (`split_levels`)
    drafts: str = "diffusion"  # `DRAFTS`: the diffusion drafter, history drafts (rollout/history.py), or both

    @property
    def name(self) -> str:
        """`ar`, `lossless[end]`, `lossless[history]` (history drafts only), `lossless[end]+history` (both)."""
        if self.sampler == "ar":
            return "ar"
        if self.drafts == "history":
            return f"{self.sampler}[history]"
        return f"{self.sampler}{levels_label(self.levels)}" + ("+history" if self.drafts == "both" else "")


def levels_label(levels) -> str:
    """`[0, 8, end]`: a level list as configs write it (no quotes around `end`); "" for none."""
    return f"[{', '.join(map(str, levels))}]" if levels else ""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. Every distribution the samplers test against is the one after these processors."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    eos_token_id: int | tuple[int, ...] | None = None  # one id or several (e.g. Qwen's generation_config)
    stop_strings: tuple[str, ...] = ()
    banned_token_ids: tuple[int, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None  # None = all

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Trajectory:
    """One generated completion and how it was produced."""

    prompt_ids: list[int]
    # completion token ids (stop token included, nothing after)
    tokens: list[int] = field(default_factory=list)
    behavior_logprobs: list[float] = field(default_factory=list)  # log-prob under the sampler's distribution
    ar_logprobs: list[float] = field(default_factory=list)  # log-prob under the AR policy at temperature T
    accept_counts: list[int] = field(default_factory=list)  # drafts accepted at each decode step
    draft_counts: list[int] = field(default_factory=list)  # drafts offered at each decode step
    num_forwards: int = 0  # forward passes this row took part in (prefill included)
    history_steps: int = 0  # decode steps whose drafts came from history (rollout/history.py)
    history_accepted: int = 0  # history draft tokens accepted over those steps
    policy_version: int = 0
    # the concrete option that generated it (`Option.name`); "auto" where turns mixed options
    sampler: str = ""
    finish_reason: str = ""  # "eos" | "stop_string" | "length" | "cancelled"
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds: "total"
    audit: list[dict] | None = None  # per step: proposal drafts, accept_len, committed tokens
    # per token, the most likely alternatives under the behaviour distribution, [(id, log-prob)] best first; only
    # when the request asked for them (`Request.top_logprobs`)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # multi-turn episodes (rollout/multiturn.py): `tokens` interleaves model turns and env turns
    # per token: 1 = the model generated it (trained on), 0 = env observation
    env_mask: list[int] | None = None
    turn_ends: list[int] = field(default_factory=list)  # index in `tokens` of each model turn's last token
    turn_rewards: list[float] = field(default_factory=list)  # env reward after each model turn

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_model_tokens(self) -> int:
        """Tokens the model generated (env observation tokens of a multi-turn episode excluded)."""
        return len(self.tokens) if self.env_mask is None else sum(self.env_mask)

    @property
    def tokens_per_forward(self) -> float:
        """Model tokens per forward pass (env tokens were never decoded)."""
        return self.num_model_tokens / max(1, self.num_forwards)


@dataclass(frozen=True)
class Request:
    """One completion for the engine's step-level API (`EngineCore.add`): what `generate()` makes per prompt and
    what the server makes per choice.

    The request draws its randomness from its own generator, seeded by (params.seed, stream): the same request
    gives the same tokens alone or in any batch."""

    prompt_ids: tuple[int, ...] | list[int]
    params: SamplingParams
    stream: int = 0  # random stream index within the seed (the prompt index in generate, the choice in serve)
    audit: bool = False
    top_logprobs: int = 0  # alternatives recorded per token (Trajectory.top_logprobs); 0 = none
    # rows of one group share history drafts (a GRPO group's samples; rollout/history.py); None = the prompt
    group: tuple | int | str | None = None

    def __post_init__(self):
        if len(self.prompt_ids) == 0:
            raise ValueError("prompt_ids: every prompt needs at least one token")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass
class StepEvent:
    """What one request got from one engine step: the tokens it committed (with their behaviour log-probs and any
    alternatives), and its trajectory once it has finished or been cancelled."""

    request_id: int
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: Trajectory | None = None


def with_eos(params: SamplingParams, eos_ids: tuple[int, ...]) -> SamplingParams:
    """`params`, stopping at the model's EOS ids (`GenerateAPI.eos_ids`) when it names no EOS itself (what
    `generate()` does by default)."""
    if params.eos_token_id is not None or not eos_ids:
        return params
    return dataclasses.replace(params, eos_token_id=tuple(eos_ids))
