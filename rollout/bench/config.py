"""`blockrl bench`'s typed boundary: its settings (`BenchConfig`, with the sweeps' `SweepConfig`) and one row of its
results (`RunResult`, what the JSON holds per run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

from pydantic import Field

from common.config import Section, ShippedPath
from common.device import DeviceSettings
from envs.prompt_file import PromptFileConfig
from envs.tasks import TaskName
from policy.factory import ModelSpec
from rollout.cost_model import AcceptanceStats
from rollout.history import HistorySettings
from rollout.types import Levels, Option


class SweepConfig(Section):
    """Extra single-axis sweeps (each empty list = skipped); run at batch size `batch_size`."""

    batch_size: int = Field(1, ge=1)
    """batch size of the sweeps."""
    block_sizes: list[int] = Field(default_factory=list)
    """K values for lossless, e.g. [4, 8, 16, 32]."""
    levels: list[Levels] = Field(default_factory=list)
    """level sets for lossless."""
    batch_sizes: list[int] = Field(default_factory=list)
    """batch sizes for ar vs lossless."""
    prompt_lens: list[int] = Field(default_factory=list)
    """extra prompt padding (tokens of a neutral prefix) for ar vs lossless."""
    mix_weights: list[float] = Field(default_factory=list)
    """w values for logit_mix."""
    draft_temperatures: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=list)
    """draft temperatures for logit_mix (w = mix_weight) with sampled drafts (draft ~ softmax(mixed / T_d)), e.g.
    [0.5, 1.0]: the other knob besides w that trades acceptance for exactness."""
    prompt_formats: list[Literal["text", "raw", "chat"]] = Field(default_factory=lambda: ["raw"])
    """other prompt encodings for ar vs lossless (raw: no special tokens), so the drafter's sensitivity to the
    prompt format is measured, not discovered."""


class BenchConfig(DeviceSettings):
    """`blockrl bench` settings (`device`, `dtype`: where every sampler, HF generate included, runs)."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """checkpoint directory: converted (diffusion and history drafts) or a plain HF causal LM (history drafts)."""
    run_dir: str = "runs/bench"
    """where results.json and bench.png go."""
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 16])
    """batch sizes of the default comparison."""
    prompts_per_row: int = Field(4, ge=1)
    """prompts per batch slot (n = max(B * this, min_prompts))."""
    min_prompts: int = Field(12, ge=1)
    """floor on prompts per run."""
    tasks: list[TaskName] = Field(default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"])
    """built-in tasks the prompts come from (held-out prompts, scored: the solve rate), unless `prompts.files`."""
    prompts: PromptFileConfig = PromptFileConfig()
    """your prompt files, as `blockrl train` reads them (`prompt` text or conversation, or `messages` rows),
    encoded as train encodes them: the bench decodes these instead of the built-in tasks (no solve rate: a file's
    rows are scored by your reward functions, which the bench does not run)."""
    label: str | None = None
    """the model's name in the table and the JSON; None = its directory (with the parent for a generic name)."""
    seed: int = 7
    """prompt and sampling seed."""
    prompt_format: Literal["auto", "text", "raw", "chat"] = "auto"
    """prompt encoding: auto = the checkpoint's training format (text: tokenizer(text); chat: the chat template)."""
    max_new_tokens: int = Field(160, ge=1)
    """generation budget per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    """sampling temperature."""
    repeats: int = Field(3, ge=1)
    """timed repeats per cell (median reported)."""
    levels: list[Levels] = Field(default_factory=lambda: [[0], [0, 4, 8], [0, 4, 8, 12]])
    """level sets lossless is run with (all reported; the best is the headline); [] = no lossless rows besides
    auto's choice (the quick default)."""
    logit_mix: bool = True
    """also run logit_mix at `mix_levels` with `mix_weight` (converted checkpoints)."""
    hf_compiled: bool = False
    """also HF generate with a static cache and `torch.compile` (HF's documented fast path; compiled in the untimed
    warm-up, once per batch size): every row's `speedup_vs_best_ar` is then against the fastest AR row of the run."""
    compiled: bool = False
    """also the engine's compiled rows (`compile: on`, policy/compiled.py): ar and every lossless row again with the
    decode step's model body under torch.compile, compiled in the untimed warm-up (its seconds in `compile_s`)."""
    drafts: list[Literal["auto", "diffusion", "history", "both"]] = Field(default_factory=lambda: ["auto"])
    """draft sources of the lossless rows: each level set runs once per source (`history` once: it has no
    levels); auto = diffusion on a converted checkpoint, history on a plain one. Sources a plain checkpoint cannot
    run are left out, and said so."""
    group_size: int = Field(1, ge=1)
    """samples per prompt, decoded side by side as a GRPO group (siblings share history drafts)."""
    history: HistorySettings = HistorySettings()
    """the history draft source. Every timed run starts from an empty store (no earlier epoch to draft from)."""
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)
    """w of logit_mix."""
    mix_levels: Levels = Field(default_factory=lambda: [0, 4, 8])
    """levels of logit_mix."""
    threads: int = Field(2, ge=1)
    """torch threads."""
    experts_implementation: str | None = None
    """MoE experts kernel for every sampler, HF included ("eager", "grouped_mm", ...; None = the model's default)."""
    model: ModelSpec | None = None
    """instead of `checkpoint`, a random-init model of this shape (converted, char-tokenizer prompts): speed and
    memory at a realistic size or vocabulary; its drafts are untrained, so tokens per forward means nothing there."""
    model_vocab: int = Field(32768, ge=128)
    """vocabulary of `model`."""
    compare: list[ShippedPath] = Field(default_factory=list)
    """other converted checkpoints, run in the same session beside `checkpoint` (hf, ar and every lossless level
    set at every batch size, on the same task prompts, each in its training prompt format under
    prompt_format: auto): e.g. the char-level and the
    BPE checkpoints side by side."""
    sweep: SweepConfig = SweepConfig()
    profile: bool = False
    """also time each engine row's decode step by phase (body, heads, verify, drafts, bookkeeping; `--profile`)."""
    profile_steps: int = Field(20, ge=1)
    """decode steps timed per row by the profile."""


@dataclass
class RunResult:
    batch_size: int
    sampler: str  # hf | hf_compiled | ar | lossless | logit_mix | auto
    levels: Levels = field(default_factory=list)
    block_size: int = 0
    mix_weight: float | None = None
    draft_temperature: float | None = None  # logit_mix with sampled drafts at this T_d (None: Dirac drafts)
    drafts: str = ""  # the draft source (diffusion | history | both; "" for hf and ar)
    compiled: bool = False  # the engine's decode step compiled (`BenchConfig.compiled`)
    compile_s: float = (
        0.0  # seconds this row's warm-up spent compiling (graphs are shared: later rows reuse them)
    )
    group_size: int = 1  # samples per prompt (GRPO groups)
    history_share: float = 0.0  # share of decode steps whose drafts came from history
    note: str = ""  # why a block-decoding row lost to ar, and what would help (`explain_losses`)
    tokens_per_s: float = 0.0
    tokens_per_s_runs: list[float] = field(default_factory=list)
    speedup_vs_hf: float = 0.0
    speedup_vs_ar: float = 0.0
    speedup_vs_best_ar: float = (
        0.0  # against the fastest AR row of its group: hf, hf_compiled or the engine's ar
    )
    tokens_per_forward: float = 1.0
    accept_by_position: list[float] = field(default_factory=list)
    # acceptance by position over the steps after a rejected draft, and over the rest (after a full acceptance
    # or a prefill)
    accept_after_rejection: list[float] = field(default_factory=list)
    accept_after_full: list[float] = field(default_factory=list)
    solve_rate: float = 0.0
    solved: int = 0
    samples: int = 0
    tokens_generated: int = 0  # completion tokens of one repeat
    peak_mem_mb: float = 0.0
    projected_tokens_per_s: float | None = None
    choice: str = ""  # auto's pick
    sweep: str = ""  # which sweep a row belongs to ("" = default comparison)
    prompt_format: str = ""  # how the prompts were encoded (text | raw | chat)
    checkpoint: str = ""  # the checkpoint directory that ran
    label: str = ""  # its name in tables (`BenchConfig.label`, or `model_label`)
    vocab_size: int = 0  # its tokenizer's vocabulary
    step_ms: dict[str, float] = field(default_factory=dict)  # --profile: ms per decode step by phase
    _acc: AcceptanceStats | None = field(default=None, repr=False)  # observed acceptance (for the projection)
    _option: Option | None = field(default=None, repr=False)  # the concrete option that ran
    _lengths: list[int] = field(default_factory=list, repr=False)  # completion lengths of the last repeat

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}
