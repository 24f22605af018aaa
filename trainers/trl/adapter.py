"""TRL adapter: blockrl rollouts inside `trl.GRPOTrainer(rollout_func=...)`, with version-checked weight sync and
the truncated importance correction TRL only applies to vLLM.

    from trl import GRPOConfig
    from trainers.trl.adapter import BlockGRPOTrainer, BlockRolloutFunc

    rollout = BlockRolloutFunc(sampler="lossless", levels=["end"])  # shares the trainer's model: no weight copy
    trainer = BlockGRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=GRPOConfig(...),
                               train_dataset=ds, rollout_func=rollout)
    trainer.train()

How TRL 1.16 calls it (trl/trainer/grpo_trainer.py, `_generate`): `rollout_func(prompts, trainer)` once per generation
batch, with the prompts ALREADY repeated num_generations times (RepeatSampler), one completion per entry, in order.
It must return `prompt_ids`, `completion_ids` and `logprobs` (lists of per-sample lists); `env_mask` (1 = model token,
0 = env/tool token) becomes TRL's tool mask; every other key is forwarded to the reward functions as a kwarg.

Decisions:
- **Weights.** By default the engine wraps the trainer's own model (one set of weights, nothing to copy), and each
  call verifies the engine still holds that very module. With a separate engine policy (`policy=`: another device or
  dtype) the weights are copied with `load_state_dict` whenever the trainer's version moved. The version is
  `trainer.state.global_step` plus a content fingerprint (per-parameter sums, one read of the weights, cheap next to a
  rollout). NOTE: not the tensors' in-place version counters: the fused AdamW that HF Trainer picks by default does
  not bump them. Before every rollout the engine's copy itself is checksummed (`copy_checksum`: a strided sample of
  each tensor, cast to the copy's dtype, summed on CPU) against the trainer's weights, so a stale, partial or
  modified copy raises. The engine stamps `policy_version = global_step` on every trajectory.
- **Log-probs.** `logprobs` are the behaviour log-probs. For `lossless` (and `ar`, `auto`) they equal the AR log-probs
  at the trainer's temperature, so the batch is on-policy and plain `GRPOTrainer` is correct. For `logit_mix` they
  are p_mix at draft-covered positions: use `BlockGRPOTrainer`, which scales each token's advantage by
  w = min(pi_AR / pi_behaviour, C). For the PPO-style losses (grpo, dapo, dr_grpo, bnpo, luspo, cispo, sapo) that is
  exactly TRL's vLLM path, which multiplies the per-token loss by w (the loss is linear in the advantage, w >= 0).
- **Sampling** follows the trainer: temperature, top_p, top_k, max_completion_length, EOS ids. min_p,
  repetition_penalty and generation_kwargs are not supported by the engine and fail at the first call. top_k/top_p
  make the behaviour log-probs those of the truncated distribution while TRL's are the full softmax, so
  BlockGRPOTrainer refuses them unless `importance=ImportanceConfig(level="off")`.
- **Prompts** are tokenized like TRL's own path, honouring the trainer's tools, chat_template and
  chat_template_kwargs. Seeds derive from `global_step`, so a resumed run does not replay earlier streams.
- **Several processes** (accelerate / torchrun, DDP): each process's engine wraps its own full copy of the model and
  decodes its share of the prompts; sample seeds follow the global index (process_index x prompts per call + i), so
  the processes together return exactly the rollouts one process returns for all the prompts (tested with 2 CPU
  processes). A sharded trainer model (FSDP) is refused with a message: the engines need full weights.
- **Multi-turn.** `turn_fn(prompt_text, completion_text) -> reply | None` runs after every turn that ends on one of
  `stop_strings`; the reply's tokens are appended with `env_mask = 0` and log-prob 0, and generation continues. Without
  it, `env_mask` is all ones (single turn) when `return_env_mask` is set.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch.distributed.tensor import DTensor
from trl.data_utils import is_conversational

from common.device import DTYPES, DeviceName, DTypeName, resolve_device
from policy.hybrid import HybridPolicy
from policy.metadata import METADATA_KEY
from rollout.auto import AutoSampler, build_engine
from rollout.engine import BlockEngine
from rollout.multiturn import run_turns
from rollout.settings import EngineSettings
from rollout.types import SamplingParams, Trajectory
from trainers.rl.losses import ImportanceConfig, importance_weights  # noqa: F401 (the adapter's public API)
from trainers.trl.trainer import BlockGRPOTrainer  # noqa: F401 (the adapter's public API)

log = logging.getLogger(__name__)

# (prompt text, completion text so far) -> the env's reply, or None when the episode is over
TurnFn = Callable[[str, str], str | None]


class TRLRolloutConfig(EngineSettings):
    """`BlockRolloutFunc` settings: the engine (sampler, levels, mix_weight, max_batch; logit_mix is off-policy, so
    train it with BlockGRPOTrainer); sampling parameters come from the trainer (GRPOConfig)."""

    device: DeviceName | Literal["trainer"] = "trainer"
    """the engine's device: trainer = share the trainer's model (no copy); another device gets a synced copy."""
    dtype: DTypeName | Literal["trainer"] = "trainer"
    """the engine's weights: trainer = the trainer's model itself; e.g. bfloat16 gets a synced bf16 copy."""
    max_new_tokens: int | None = Field(None, ge=1)
    """completion budget; None = the trainer's max_completion_length."""
    seed: int = 0
    """base seed; a call uses seed + 10000 * global_step + (calls earlier at that step), each sample its own stream."""
    stop_strings: list[str] = Field(default_factory=list)
    """end a turn at these strings (multi-turn: turn_fn runs after each)."""
    max_turns: int = Field(1, ge=1, le=100)
    """model turns per episode when turn_fn is given."""
    return_env_mask: bool = True
    """return `env_mask` (all ones for single-turn rollouts)."""

    def engine_settings(self) -> EngineSettings:
        """The engine fields; the engine runs wherever its policy is (the trainer's model, or `engine_copy`)."""
        keep = {k: getattr(self, k) for k in EngineSettings.model_fields if k not in ("device", "dtype")}
        return EngineSettings(**keep)


@dataclass
class SyncRecord:
    """What one call synced and verified (kept in `BlockRolloutFunc.history`)."""

    call: int
    global_step: int  # trainer.state.global_step at the call = the policy_version generated with
    fingerprint: int  # hash of the trainer's per-parameter sums (changes with any weight update)
    shared: bool  # engine policy is the trainer's own module
    loaded: bool  # weights were copied into a separate engine policy at this call
    sync_s: float
    rollout_s: float = 0.0
    tokens_per_forward: float = 0.0


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> int:
    """Hash of every parameter's float64 sum: changes with any optimizer step or load, whatever the optimizer."""
    sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()])
    return hash(tuple(sums.tolist()))


@torch.no_grad()
def copy_checksum(model: torch.nn.Module, like: torch.nn.Module | None = None, samples: int = 1024) -> dict:
    """Per-parameter float64 sum, on CPU, of a strided sample (<= ~2 x `samples` entries) of each tensor, first
    cast to `like`'s dtype for that parameter. Exact for a model and a faithful copy of it on any device or dtype
    (same entries, same values, same summation order); any optimizer step or stale/partial load changes it."""
    params = dict(model.named_parameters())
    dtypes = {name: p.dtype for name, p in (like or model).named_parameters()}
    if params.keys() != dtypes.keys():
        missing = sorted(params.keys() ^ dtypes.keys())
        raise ValueError(
            f"trl adapter: engine copy and trainer model have different parameters, e.g. {missing[:3]}"
        )
    out = {}
    for name, dtype in dtypes.items():
        flat = params[name].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // samples)]
        out[name] = sample.to(dtype).cpu().double().sum().item()
    return out


def _unwrap(trainer) -> torch.nn.Module:
    return trainer.accelerator.unwrap_model(trainer.model)


def hybrid_of(model: torch.nn.Module) -> HybridPolicy:
    """The HF model as a HybridPolicy (no copy), with the mask token / block size its config records."""
    meta = getattr(model.config, METADATA_KEY, None) or {}
    return HybridPolicy(model, meta.get("mask_token_id"), int(meta.get("block_size", 16)))


def engine_copy(model: torch.nn.Module, cfg: TRLRolloutConfig) -> HybridPolicy:
    """A separate copy of the trainer's model for the engine, on `cfg.device` with weights in `cfg.dtype` (either
    "trainer" = as the trainer's model); `sync` keeps it at the trainer's version."""
    param = next(model.parameters())
    device = param.device if cfg.device == "trainer" else resolve_device(cfg.device, "device")
    dtype = param.dtype if cfg.dtype == "trainer" else DTYPES[cfg.dtype]
    return hybrid_of(copy.deepcopy(model).to(device=device, dtype=dtype)).eval()


class BlockRolloutFunc:
    """`rollout_func` for `trl.GRPOTrainer`: block-decoded rollouts on blockrl's engine, weights synced by version.

    policy: None shares the trainer's model (recommended); a HybridPolicy is a separate copy kept in sync.
    """

    def __init__(
        self,
        config: TRLRolloutConfig | None = None,
        *,
        policy: HybridPolicy | None = None,
        turn_fn: TurnFn | None = None,
        **overrides,
    ):
        self.cfg = config or TRLRolloutConfig(**overrides)
        if config is not None and overrides:
            raise ValueError("pass either a TRLRolloutConfig or keyword overrides, not both")
        if turn_fn is not None and not self.cfg.stop_strings:
            raise ValueError("turn_fn needs stop_strings: they end a model turn")
        self.policy = policy
        self.turn_fn = turn_fn
        self.engine: BlockEngine | AutoSampler | None = None
        self.history: list[SyncRecord] = []
        self._synced: tuple[int, int] | None = None  # (global_step, fingerprint) last copied into `policy`
        self._calls: tuple[int, int] = (-1, -1)  # (global_step, rollout calls at that step - 1): the seed

    @property
    def off_policy(self) -> bool:
        """True when `logprobs` (behaviour) differ from the AR policy's: needs BlockGRPOTrainer's correction."""
        return self.cfg.sampler == "logit_mix" and self.cfg.mix_weight < 1.0

    # ------------------------------------------------------------------------------------------------ weights
    def sync(self, trainer) -> SyncRecord:
        """Make the engine generate with the trainer's current weights; raise if that cannot be verified."""
        t0 = time.perf_counter()
        model = _unwrap(trainer)
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise RuntimeError(
                "trl adapter: the trainer's model is sharded (FSDP), and each process's engine decodes with the full "
                "weights: run the trainer data-parallel (accelerate's default multi-process mode, DDP), or shard the "
                "learner with blockrl train (learner.strategy=fsdp), which gathers them for its engines"
            )
        step, fp = trainer.state.global_step, weights_fingerprint(model)
        # policy=hybrid_of(the trainer's model) is shared too
        shared = self.policy is None or self.policy.model is model
        loaded = False
        if self.engine is None:
            if self.policy is None and (self.cfg.device, self.cfg.dtype) != ("trainer", "trainer"):
                self.policy = engine_copy(model, self.cfg)
                shared = False
            policy = hybrid_of(model) if self.policy is None else self.policy
            self.engine = build_engine(policy, self.cfg.engine_settings(), tokenizer=trainer.processing_class)
            log.info(
                "trl adapter: %s engine on %s", "shared" if shared else "separate-copy", self.cfg.sampler
            )
        if shared:
            if self.engine.policy.model is not model:
                raise RuntimeError(
                    "trl adapter: the trainer's model is no longer the module the engine wraps (was it wrapped or "
                    "replaced after the first rollout?); pass policy= for a separate, synced copy"
                )
        else:
            if self._synced != (step, fp):
                self.policy.model.load_state_dict(model.state_dict())
                loaded, self._synced = True, (step, fp)
            self._verify_copy(model, step)
        self.engine.policy_version = step
        rec = SyncRecord(len(self.history), step, fp, shared, loaded, time.perf_counter() - t0)
        self.history.append(rec)
        return rec

    def _verify_copy(self, model: torch.nn.Module, step: int) -> None:
        """Checksum the engine's copy itself against the trainer's weights (cast to the copy's dtypes)."""
        want = copy_checksum(model, like=self.policy.model)
        got = copy_checksum(self.policy.model)
        if got != want:
            bad = [name for name in want if got.get(name) != want[name]]
            raise RuntimeError(
                f"trl adapter: the engine's weight copy differs from the trainer's at step {step} "
                f"({len(bad)} of {len(want)} tensors, e.g. {bad[:3]}); was it modified after the sync, or did "
                "load_state_dict not reach it?"
            )

    # ------------------------------------------------------------------------------------------------ rollout
    def __call__(self, prompts: list, trainer) -> dict[str, list]:
        rec = self.sync(trainer)
        tok = trainer.processing_class
        prompt_ids = tokenize_prompts(prompts, tok, **_chat_settings(trainer))
        model = _unwrap(trainer)
        was_training = model.training  # the engine puts the (shared) model in eval mode
        t0 = time.perf_counter()
        try:
            episodes = self._episodes(prompts, prompt_ids, trainer, self._call_seed(rec.global_step))
        finally:
            model.train(was_training)
        rec.rollout_s = time.perf_counter() - t0
        out = {
            "prompt_ids": prompt_ids,
            "completion_ids": [e.tokens for e in episodes],
            "logprobs": [
                e.behavior_logprobs for e in episodes
            ],  # behaviour = AR log-probs for exact samplers
            "tokens_per_forward": [e.tokens_per_forward for e in episodes],
            "accept_rate": [_accept_rate([e]) for e in episodes],
            "policy_version": [rec.global_step] * len(episodes),
        }
        if self.cfg.return_env_mask:
            out["env_mask"] = [e.env_mask for e in episodes]
        self._log(trainer, episodes, rec)
        return out

    def _sampling(self, trainer, seed: int) -> SamplingParams:
        args = trainer.args
        for name, ok in (
            ("min_p", args.min_p is None),
            ("repetition_penalty", args.repetition_penalty == 1.0),
            ("generation_kwargs", not args.generation_kwargs),
        ):
            if not ok:
                raise ValueError(
                    f"GRPOConfig.{name}={getattr(args, name)!r} is not supported by the block engine"
                )
        return SamplingParams(
            max_new_tokens=self.cfg.max_new_tokens or trainer.max_completion_length,
            temperature=trainer.temperature,
            top_p=trainer.top_p,
            top_k=trainer.top_k or 0,
            seed=seed * 100,  # turn r of the call draws from seed * 100 + r
            eos_token_id=tuple(trainer.eos_token_ids),
            stop_strings=tuple(self.cfg.stop_strings),
        )

    def _call_seed(self, step: int) -> int:
        """seed + 10000 * global_step + (rollout calls earlier at this step): a resumed run continues the streams
        of an uninterrupted one instead of restarting them."""
        calls = self._calls[1] + 1 if self._calls[0] == step else 0
        self._calls = (step, calls)
        return self.cfg.seed + 10_000 * step + calls

    def _episodes(self, prompts: list, prompt_ids: list[list[int]], trainer, seed: int) -> list[Trajectory]:
        """Generate every sample; with a turn_fn, alternate model turns and env replies up to the budget
        (rollout/multiturn.py's loop)."""
        tok = trainer.processing_class

        params = self._sampling(trainer, seed)

        def respond(i: int, ep: Trajectory, turn: list[int], finish: str) -> list[int] | None:
            if self.turn_fn is None or finish != "stop_string" or len(ep.tokens) >= params.max_new_tokens:
                return None
            reply = self.turn_fn(_text(prompts[i]), tok.decode(ep.tokens))
            return None if reply is None else tok(reply, add_special_tokens=False)["input_ids"]

        # each process's samples: their own streams
        offset = trainer.accelerator.process_index * len(prompt_ids)
        return run_turns(
            self.engine,
            prompt_ids,
            params,
            respond,
            index_offset=offset,
            max_turns=self.cfg.max_turns if self.turn_fn else 1,
            seed_stride=1,
        )

    def _log(self, trainer, episodes: list[Trajectory], rec: SyncRecord) -> None:
        """Acceptance and timing into TRL's per-step metrics (averaged per logging step, like `log_metric`)."""
        tokens = sum(e.num_model_tokens for e in episodes)
        rec.tokens_per_forward = tokens / max(1, sum(e.num_forwards for e in episodes))
        metrics = {
            "rollout/tokens_per_forward": rec.tokens_per_forward,
            "rollout/accept_rate": _accept_rate(episodes),
            "rollout/policy_version": float(rec.global_step),
            "perf/rollout_tok_per_s": tokens / max(rec.rollout_s, 1e-9),
            "time/rollout_s": rec.rollout_s,
            "time/sync_s": rec.sync_s,
        }
        if self.off_policy:
            gaps = [
                abs(b - a)
                for e in episodes
                for b, a, m in zip(e.behavior_logprobs, e.ar_logprobs, e.env_mask, strict=True)
                if m
            ]
            metrics["rollout/behavior_ar_logp_gap"] = sum(gaps) / max(1, len(gaps))
        for k, v in metrics.items():
            if hasattr(trainer, "_log_metric"):  # TRL's reward-function `log_metric` hook
                trainer._log_metric(k, v)
            else:
                mode = "train" if trainer.model.training else "eval"
                trainer._metrics[mode][k].append(v)


def _accept_rate(trajs: list[Trajectory]) -> float:
    drafted = sum(sum(t.draft_counts) for t in trajs)
    return sum(sum(t.accept_counts) for t in trajs) / drafted if drafted else 0.0


def _text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    content = [m["content"] for m in prompt]
    return "".join(c if isinstance(c, str) else "".join(part.get("text", "") for part in c) for c in content)


def _chat_settings(trainer) -> dict:
    """The chat-template arguments TRL's own `GRPOTrainer._tokenize_prompts` passes (TRL 1.16)."""
    if getattr(trainer, "environment_factories", None) is not None:
        raise ValueError(
            "trl adapter: GRPOTrainer(environment_factory=...) renders each prompt with its environment's tools; "
            "not supported with BlockRolloutFunc (pass tools= or a turn_fn instead)"
        )
    return {
        "tools": getattr(trainer, "tools", None),
        "chat_template": getattr(trainer, "chat_template", None),
        "chat_template_kwargs": getattr(trainer, "chat_template_kwargs", None),
    }


def tokenize_prompts(
    prompts: list,
    tok,
    *,
    tools: list | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[list[int]]:
    """Prompt token ids as TRL's own generate path (`GRPOTrainer._tokenize_prompts`) makes them: `tok(text=...)` for
    strings; for conversational prompts one batched `apply_chat_template(add_generation_prompt=True)` with the
    trainer's `tools` (None when empty), `chat_template` (TRL's training template, or None for the tokenizer's) and
    GRPOConfig `chat_template_kwargs`. Image (or other non-text) message parts are refused."""
    if not prompts:
        raise ValueError("rollout_func: got no prompts")
    if not is_conversational({"prompt": prompts[0]}):
        return [list(ids) for ids in tok(text=prompts)["input_ids"]]
    for i, prompt in enumerate(prompts):
        for m in prompt:
            parts = m["content"] if isinstance(m.get("content"), list) else []
            if any(part.get("type") != "text" for part in parts):
                raise ValueError(
                    f"rollout_func: prompt {i} has non-text message parts; multimodal is not supported"
                )
    if chat_template is None and getattr(tok, "chat_template", None) is None:
        raise ValueError("rollout_func: conversational prompts need a tokenizer with a chat template")
    out = tok.apply_chat_template(
        conversation=prompts,
        tools=tools or None,  # like TRL: some templates render tool boilerplate for tools=[]
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        **(chat_template_kwargs or {}),
    )
    return [list(ids) for ids in out["input_ids"]]
