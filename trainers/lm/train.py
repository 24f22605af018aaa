"""`blockrl pretrain` and `blockrl convert`: AR pretraining from scratch and TiDAR conversion (mid-training).

Both share one loop: seeded batches drawn from the task corpus, AdamW with warmup + cosine decay, a JSONL loss log,
periodic atomic checkpoints, and exact resume (batches and block shifts are a pure function of (seed, step), so a
resumed run sees the same data as an uninterrupted one). The loss is the only difference:

- pretrain: next-token CE (+ MoE load balancing) of a freshly built model;
- convert:  TiDAR's (alpha * CE_AR + CE_diff) / (1 + alpha) on `[x | M]` with K+1-sized mask blocks at a random
            shift per step, so every draft slot the engine uses at inference (K+1-mask proposals at any offset)
            is trained.

    blockrl pretrain --config configs/pretrain_tiny_moe.yaml
    blockrl convert  --config configs/convert_tiny_moe.yaml --set init=runs/pretrain-tiny-moe/final
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm import tqdm

from common.checkpoint import load_trainer_state, recover, require_checkpoint, save_checkpoint
from common.config import ConfigError, Section, dump_config
from common.device import DeviceName
from common.distributed import DistContext, LossModule, Parallel, is_main_process
from common.metrics import append_jsonl, truncate_jsonl
from policy.factory import ModelSpec, build_model, count_parameters, make_config
from policy.families import UnsupportedModelError
from policy.hybrid import HybridPolicy
from policy.losses import ar_ce
from policy.metadata import load_tokenizer
from policy.tokenizer import (
    CHATML,
    build_char_tokenizer,
    chat_stop_ids,
    eos_ids,
    pad_id,
    train_bpe_tokenizer,
)
from trainers.lm.data import (
    Batch,
    Corpus,
    DataConfig,
    Sampler,
    check_files,
    collate,
    corpus_texts,
    load_corpus,
    num_targets,
)
from trainers.lm.evaluate import EvalConfig, diffusion_slot_accuracy, heldout_loss, solve_rate

log = logging.getLogger(__name__)


class OptimConfig(Section):
    """AdamW with linear warmup and cosine decay."""

    steps: int = Field(1000, ge=1)
    """optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """sequences per step."""
    lr: float = Field(1e-3, gt=0.0)
    """peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """final lr as a fraction of the peak."""
    warmup_steps: int = Field(100, ge=0)
    """linear warmup steps."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0.0)
    """global grad-norm clip."""
    grad_accum: int = Field(1, ge=1)
    """micro-batches per step and rank (batch_size is the global batch: world size x grad_accum x micro)."""

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (
            self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        )


class RunConfig(Section):
    """Fields shared by pretrain and convert."""

    run_dir: str = "runs/lm"
    """output directory: config.yaml, metrics.jsonl, checkpoint/, final/, eval.json."""
    seed: int = 0
    """model-init and batch-sampling seed."""
    threads: int = Field(1, ge=1)
    """torch intra-op threads."""
    log_every: int = Field(20, ge=1)
    """steps between JSONL loss records."""
    checkpoint_every: int = Field(250, ge=1)
    """steps between atomic checkpoints."""
    device: DeviceName = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is there, else cpu), cpu or cuda[:n]."""
    autocast: Literal["none", "bfloat16"] = "none"
    """bf16 autocast of the forward (weights and optimizer stay fp32; losses in fp32)."""
    stop_after: int | None = Field(None, ge=1)
    """stop (after checkpointing) once this step is done, keeping the schedule of optim.steps; resume later,
    e.g. under another world size."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp (every rank holds the model) or fsdp (FSDP2: parameters, gradients and optimizer state
    sharded across ranks, for models that do not fit one device)."""
    attention: Literal["auto", "dense", "flex"] = "auto"
    """the TiDAR training mask (convert): flex = a FlexAttention BlockMask, no dense [2S, 2S] mask (CUDA only: torch
    has no FlexAttention backward on CPU); dense = the [2S, 2S] mask; auto = flex on CUDA where the family passes
    flex's self-check, else dense."""
    activation_checkpointing: bool = False
    """recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)."""
    snapshot_steps: list[int] = Field(default_factory=list)
    """steps after which the model is also kept as <run_dir>/step-N (an HF directory), e.g. to convert from."""
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()


class TokenizerConfig(Section):
    """The tokenizer of a model trained from scratch."""

    kind: Literal["char", "bpe", "pretrained"] = "char"
    """char: the built-in character vocabulary; bpe: a byte-level BPE trained on the training data (no BOS, ChatML
    template); pretrained: the tokenizer directory at tokenizer.path."""
    vocab_size: int = Field(1024, ge=260)
    """bpe: vocabulary size (256 byte tokens, 3 specials, merges)."""
    path: str = ""
    """pretrained: a tokenizer directory."""
    chat_template: bool = True
    """bpe: give the tokenizer the ChatML template (needed for messages rows)."""


class PretrainConfig(RunConfig):
    """`blockrl pretrain`: AR training of a fresh model on the task corpus or the user's data."""

    model: ModelSpec = ModelSpec()
    tokenizer: TokenizerConfig = TokenizerConfig()


def build_tokenizer(cfg: PretrainConfig):
    t = cfg.tokenizer
    if t.kind == "char":
        return build_char_tokenizer()
    if t.kind == "pretrained":
        if not t.path:
            raise ConfigError("tokenizer.path: kind=pretrained needs a tokenizer directory")
        return load_tokenizer(t.path)
    # under torchrun rank 0 trains it and the others load its copy, so every rank has the same vocabulary
    ctx = DistContext.from_env(cfg.device)
    shared = Path(cfg.run_dir) / "tokenizer"
    if ctx.is_main:
        texts = corpus_texts(cfg.data)
        log.info("training a byte-level BPE tokenizer (vocab %d) on %d strings", t.vocab_size, len(texts))
        tok = train_bpe_tokenizer(texts, t.vocab_size, CHATML if t.chat_template else None)
        if ctx.active:
            tok.save_pretrained(shared)
    ctx.barrier()
    return tok if ctx.is_main else load_tokenizer(shared)


class TidarConfig(Section):
    """TiDAR conversion settings."""

    block_size: int = Field(16, ge=1, le=64)
    """K: drafts per block at inference."""
    alpha: float = Field(1.0, ge=0.0)
    """weight of the AR term: L = (alpha * AR + diff) / (1 + alpha)."""
    train_layout: Literal["k_plus_1", "k"] = "k_plus_1"
    """train mask blocks of K+1 (the inference proposal size) or K tokens."""
    random_shift: bool = True
    """draw the block boundary offset per step, so blocks start at every position."""

    @property
    def train_block_size(self) -> int:
        return self.block_size + 1 if self.train_layout == "k_plus_1" else self.block_size


class ConvertConfig(RunConfig):
    """`blockrl convert`: TiDAR mid-training from an AR checkpoint directory."""

    init: str = ""
    """AR checkpoint directory to convert (plain HF or blockrl)."""
    tidar: TidarConfig = TidarConfig()


LossFn = Callable[[Batch, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


def choose_training_attention(policy: HybridPolicy, kind: str, device: torch.device) -> None:
    """Set the policy's TiDAR training mask (RunConfig.attention); `flex` where it cannot run is a ConfigError."""
    on_cuda = device.type == "cuda"
    if kind == "flex" and not on_cuda:
        raise ConfigError(
            f"attention: flex needs CUDA (torch has no FlexAttention backward on {device.type}); use dense or auto"
        )
    policy.set_training_attention("dense")
    if kind == "flex" or (kind == "auto" and on_cuda):
        try:
            policy.set_training_attention("flex")
        except UnsupportedModelError as e:
            if kind == "flex":
                raise
            log.info("attention auto: %s; using the dense mask", e)
    log.info("attention: %s TiDAR mask", policy.training_attention)


def train_loop(
    cfg: RunConfig, policy: HybridPolicy, tokenizer, loss_fn: LossFn, resume: bool, data: Corpus
) -> dict:
    """Shared loop (data-parallel under torchrun, see common/distributed.py): returns the final evaluation
    (on rank 0; other ranks return {})."""
    torch.set_num_threads(cfg.threads)
    ctx = DistContext.from_env(cfg.device)
    micro, rem = divmod(cfg.optim.batch_size, ctx.world * cfg.optim.grad_accum)
    if rem or not micro:
        raise ConfigError(
            f"optim.batch_size={cfg.optim.batch_size} must be a multiple of world size {ctx.world} x "
            f"optim.grad_accum={cfg.optim.grad_accum}"
        )
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoint"
    if ctx.is_main:
        log.info("corpus: %d training sequences, %d held-out", len(data.train), len(data.heldout))
        (run_dir / "data.json").write_text(json.dumps(data.stats, indent=1))
    sampler = Sampler(data.train, cfg.data.batching)
    par = Parallel(
        ctx, policy, LossModule(policy, loss_fn), cfg.parallel
    )  # before the move: FSDP's rank-0 CPU copy
    if not par.fsdp:
        policy.to(ctx.device)  # FSDP instead shards the CPU model and moves only each rank's shards (place)
    if policy.is_converted:
        choose_training_attention(policy, cfg.attention, ctx.device)
    if cfg.activation_checkpointing:
        policy.model.activation_checkpointing_enable({"use_reentrant": False})
    par.place()
    opt = torch.optim.AdamW(par.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    start = 0
    if ctx.is_main:
        recover(ckpt)
    ctx.barrier()
    if resume and ckpt.exists():
        state = load_trainer_state(ckpt)
        par.load_optimizer_state(opt, state["optimizer"])
        start = state["step"]
        log.info("resumed from %s at step %d (world size %d, %s)", ckpt, start, ctx.world, cfg.parallel)
    metrics_path = run_dir / "metrics.jsonl"
    if ctx.is_main:
        truncate_jsonl(metrics_path, start)
    model = par.module
    autocast = torch.autocast(ctx.device.type, torch.bfloat16, enabled=cfg.autocast == "bfloat16")

    policy.train()
    t0, tokens = time.time(), 0
    bar = tqdm(
        range(start, cfg.optim.steps),
        initial=start,
        total=cfg.optim.steps,
        desc=run_dir.name,
        unit="step",
        disable=not ctx.is_main,
    )
    for step in bar:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        examples = sampler(cfg.optim.batch_size, gen)  # the global batch, the same on every rank
        loss_rng = gen.get_state()  # the step's block shift: the same for every rank and micro-batch
        n_global = sum(num_targets(e, cfg.data.exclude_prompt) for e in examples)
        lr = cfg.optim.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        local = ctx.shard(examples)
        sums: dict[str, float] = {}
        for i in range(cfg.optim.grad_accum):
            chunk = local[i * micro : (i + 1) * micro]
            batch = collate(chunk, pad_id(tokenizer), cfg.data.exclude_prompt).to(ctx.device)
            n = int(batch.loss_mask[:, 1:].sum())
            g = torch.Generator()
            g.set_state(loss_rng)
            with par.no_sync(last=i == cfg.optim.grad_accum - 1):
                with autocast:
                    loss, metrics = model(batch, g)
                (loss * (n * ctx.world / max(1, n_global))).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n
            tokens += batch.num_tokens
        metrics = {k: ctx.sum(v) / max(1, n_global) for k, v in sums.items()}  # global token means
        gnorm = par.clip_grad_norm(cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if ctx.is_main and (done % cfg.log_every == 0 or done == cfg.optim.steps):
            elapsed = time.time() - t0
            rec = {
                "step": done,
                **metrics,
                "grad_norm": float(gnorm),
                "lr": lr,
                "tokens_per_s": tokens * ctx.world / elapsed,
                "elapsed_s": elapsed,
                "world_size": ctx.world,
            }
            append_jsonl(metrics_path, rec)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        do_eval = bool(cfg.eval.every) and done % cfg.eval.every == 0 and done < cfg.optim.steps
        do_snapshot = done in cfg.snapshot_steps
        do_ckpt = done % cfg.checkpoint_every == 0 or done in (cfg.optim.steps, cfg.stop_after)
        if do_eval or do_snapshot or do_ckpt:
            full = par.full_policy()  # every rank joins (FSDP gathers); the full weights on rank 0
            opt_state = par.optimizer_state(opt) if do_ckpt else None
            if ctx.is_main:
                if do_eval:
                    append_jsonl(
                        run_dir / "eval.jsonl", {"step": done, **evaluate(cfg, full, tokenizer, data)}
                    )
                    policy.train()
                if do_snapshot:
                    full.save_pretrained(run_dir / f"step-{done}", tokenizer)
                if do_ckpt:
                    save_checkpoint(ckpt, full, tokenizer, {"optimizer": opt_state, "step": done})
        ctx.barrier()
        if done == cfg.stop_after and done < cfg.optim.steps:
            bar.close()
            log.info("stopped after step %d of %d (resume with --resume)", done, cfg.optim.steps)
            ctx.close()
            return {"step": done, "stopped": True}
    bar.close()
    result: dict = {}
    full = par.full_policy()
    if ctx.is_main:
        full.save_pretrained(run_dir / "final", tokenizer)
        result = {"step": cfg.optim.steps, **evaluate(cfg, full, tokenizer, data)}
        append_jsonl(run_dir / "eval.jsonl", result)
        (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    ctx.barrier()
    ctx.close()
    return result


def evaluate(cfg: RunConfig, policy: HybridPolicy, tokenizer, data: Corpus) -> dict:
    """Held-out figures: the AR loss, the solve rate (built-in tasks, which have verifiers) and, for a converted
    policy, the diffusion top-1 accuracy per draft slot."""
    heldout = data.heldout
    if data.heldout_tasks is not None:  # first samples_per_task of each task
        per_task: dict[str, int] = {}
        keep = []
        for i, s in enumerate(data.heldout_tasks):
            if per_task.get(s.task, 0) < cfg.eval.samples_per_task:
                per_task[s.task] = per_task.get(s.task, 0) + 1
                keep.append(i)
        heldout = [data.heldout[i] for i in keep]
    else:
        heldout = heldout[: cfg.eval.max_sequences]
    out: dict = {"heldout_ar_loss": heldout_loss(policy, tokenizer, heldout, cfg.data.exclude_prompt)}
    if data.heldout_tasks is not None:  # plain AR mode, nothing banned
        tasks = [data.heldout_tasks[i] for i in keep]
        out["solve"] = solve_rate(policy.model, tokenizer, tasks, cfg.eval, policy.prompt_format)
    if policy.is_converted:
        acc = diffusion_slot_accuracy(policy, tokenizer, heldout)
        out["slot_accuracy"] = acc
        out["slot0_accuracy"] = acc[0]
        out["mean_draft_slot_accuracy"] = sum(acc[1:]) / max(1, len(acc) - 1)
    return out


def data_config(cfg: DataConfig, policy: HybridPolicy) -> DataConfig:
    """`cfg` with `max_seq_len` resolved against the model's positions (and refused where it is over them)."""
    limit = getattr(policy.config, "max_position_embeddings", None)
    if cfg.max_seq_len is None:
        return cfg.model_copy(update={"max_seq_len": min(limit or 4096, 4096)})
    if limit is not None and cfg.max_seq_len > limit:
        raise ConfigError(f"data.max_seq_len={cfg.max_seq_len} is over the model's {limit} positions")
    return cfg


def adopt_chat_format(policy: HybridPolicy, tokenizer, data: Corpus) -> None:
    """A model trained on chats takes task prompts through its chat template (`prompt_format: chat` in its
    metadata, the `auto` of every job) and stops where the template closes an assistant turn: that token joins the
    EOS ids of its generation config (HF generate and every engine read them)."""
    if not data.has_chat:
        return
    policy.prompt_format = "chat"  # task prompts reach this model through its chat template
    stops = chat_stop_ids(tokenizer)
    gen = policy.model.generation_config
    gen.eos_token_id = list(dict.fromkeys(eos_ids(tokenizer, gen) + stops))
    log.info("EOS ids: %s (chat template end-of-turn: %s)", policy.eos_ids(tokenizer), stops)


# ---------------------------------------------------------------------------------------------------- entry points
def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    run_dir = Path(cfg.run_dir)
    check_files(cfg.data)  # before the tokenizer and model are built
    if is_main_process():
        dump_config(cfg, run_dir / "config.yaml")
    if is_main_process():  # a crash mid-write leaves checkpoint.old: restore it first
        recover(run_dir / "checkpoint")
    if resume and (run_dir / "checkpoint").exists():
        tokenizer = load_tokenizer(run_dir / "checkpoint")
        policy = HybridPolicy.from_pretrained(run_dir / "checkpoint")
    else:
        tokenizer = build_tokenizer(cfg)
        hf_cfg = make_config(
            cfg.model,
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        policy = HybridPolicy(build_model(hf_cfg, seed=cfg.seed))
    log.info("model: %s, %.2fM parameters", cfg.model.arch, count_parameters(policy) / 1e6)
    moe = policy.moe
    coef = float(getattr(policy.config, "router_aux_loss_coef", 0.0))

    def loss_fn(batch: Batch, gen: torch.Generator):
        out = policy.model(
            input_ids=batch.input_ids, attention_mask=batch.valid, output_router_logits=bool(moe)
        )
        ar = ar_ce(out.logits, batch.input_ids, batch.loss_mask)
        loss = ar + coef * out.aux_loss if moe else ar
        metrics = {"loss": loss.item(), "ar_loss": ar.item()}
        if moe:
            metrics["aux_loss"] = out.aux_loss.item()
        return loss, metrics

    data = load_corpus(data_config(cfg.data, policy), tokenizer)
    adopt_chat_format(policy, tokenizer, data)
    return train_loop(cfg, policy, tokenizer, loss_fn, resume, data)


def convert(cfg: ConvertConfig, resume: bool = False) -> dict:
    run_dir = Path(cfg.run_dir)
    if is_main_process():  # a crash mid-write leaves checkpoint.old: restore it first
        recover(run_dir / "checkpoint")
    resuming = resume and (run_dir / "checkpoint").exists()
    src = run_dir / "checkpoint" if resuming else Path(cfg.init)
    if not cfg.init and not resuming:
        raise ConfigError("init: convert needs an AR checkpoint directory (--set init=PATH)")
    require_checkpoint(src, "init")
    check_files(cfg.data)  # before the model loads
    if is_main_process():
        dump_config(cfg, run_dir / "config.yaml")
    tokenizer = load_tokenizer(src) if (src / "tokenizer.json").is_file() else build_char_tokenizer()
    policy = HybridPolicy.from_pretrained(src)
    policy.convert(tokenizer, block_size=cfg.tidar.block_size)
    log.info(
        "converting %s: mask token %d, K=%d, training blocks of %d",
        src,
        policy.mask_token_id,
        cfg.tidar.block_size,
        cfg.tidar.train_block_size,
    )
    bs = cfg.tidar.train_block_size
    data = load_corpus(data_config(cfg.data, policy), tokenizer)
    adopt_chat_format(policy, tokenizer, data)

    def loss_fn(batch: Batch, gen: torch.Generator):
        shift = int(torch.randint(bs, (1,), generator=gen)) if cfg.tidar.random_shift else 0
        out = policy.tidar_loss(batch.input_ids, batch.loss_mask, batch.valid, cfg.tidar.alpha, bs, shift)
        return out.loss, out.metrics()

    return train_loop(cfg, policy, tokenizer, loss_fn, resume, data)
