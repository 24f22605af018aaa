"""`blockrl train`: the on-policy RL driver. It reads like the algorithm:

    for step:  prompts -> rollouts (Ray workers, block decoding) -> rewards (verifiers) -> learner step
               (GRPO + lambda_diff diffusion loss) -> weight sync (numpy, versioned) -> drift checks -> log
               -> atomic checkpoint

Resume (`--resume`) restores the policy, optimizer, RNG, step and drift-detector state from `<run_dir>/checkpoint`
and drops metrics records past it, so `metrics.jsonl` has each step exactly once.

    blockrl train --config configs/grpo_tiny.yaml
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from envs.tasks import TaskSample, iter_samples, score
from policy.hybrid import HybridPolicy, load_tokenizer
from rollout.cost_model import AcceptanceStats
from rollout.pool import RolloutPool, init_ray
from rollout.worker import state_dict_numpy
from trainers.checkpoint import load_trainer_state, recover, save_checkpoint
from trainers.config import Section, dump_config
from trainers.drift import DetectorConfig, DriftMonitor
from trainers.learner import Learner, LearnerConfig, RolloutBatch
from trainers.metrics import JSONLSink, MultiSink, StdoutSink, WandbSink
from trainers.plots import plot_run

log = logging.getLogger(__name__)


class RolloutConfig(Section):
    """Rollout workers and sampling."""

    workers: int = Field(2, ge=1)
    """Ray rollout actors."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """Ray CPUs reserved per actor."""
    threads: int = Field(1, ge=1)
    """torch threads per actor."""
    sampler: Literal["ar", "lossless", "logit_mix", "auto"] = "lossless"
    """rollout sampler."""
    levels: list[int] = Field(default_factory=lambda: [0, 4, 8])
    """proposal levels per pass."""
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)
    """w of logit_mix."""
    max_batch: int = Field(16, ge=1)
    """engine batch per worker."""
    max_new_tokens: int = Field(160, ge=1)
    """completion budget."""
    temperature: float = Field(1.0, gt=0.0)
    """sampling temperature (the learner uses the same)."""
    address: str | None = None
    """Ray cluster address; None = local Ray inside the run dir."""


class TrainConfig(Section):
    """`blockrl train`: GRPO on the hybrid policy with block-decoded rollouts."""

    run_dir: str = "runs/grpo"
    """output: config.yaml, metrics.jsonl, checkpoint/, wandb/."""
    checkpoint: str = "checkpoints/tiny-moe"
    """converted policy to start from."""
    seed: int = 0
    """prompt sampling and rollout seeds."""
    steps: int = Field(20, ge=1)
    """RL steps."""
    tasks: list[str] = Field(default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"])
    """task mix (reasoning-gym verifiers score the rewards)."""
    prompts_per_step: int = Field(16, ge=1)
    """prompts per step; batch = prompts_per_step * group_size."""
    group_size: int = Field(4, ge=2)
    """samples per prompt (GRPO group)."""
    checkpoint_every: int = Field(5, ge=1)
    """steps between atomic checkpoints."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode."""
    drift_action: Literal["warn", "stop", "raise_lambda_diff"] = "warn"
    """what an acceptance-drop or reward-regression alarm does."""
    drift: list[DetectorConfig] = Field(
        default_factory=lambda: [
            DetectorConfig(metric="rollout/tokens_per_forward"),
            DetectorConfig(metric="reward/mean"),
            DetectorConfig(metric="reward/std", direction="up"),
        ]
    )
    """drift detectors."""
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size


def step_prompts(cfg: TrainConfig, step: int, pool: dict[str, list[TaskSample]]) -> list[TaskSample]:
    """The step's prompts: a pure function of (seed, step), so a resumed run draws the same ones."""
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    out = []
    for i in range(cfg.prompts_per_step):
        task = cfg.tasks[i % len(cfg.tasks)]
        out.append(pool[task][int(torch.randint(len(pool[task]), (1,), generator=g))])
    return out


def rollout_metrics(
    trajs, samples: list[TaskSample], rewards: list[float], group: int, K: int
) -> dict[str, float]:
    acc = AcceptanceStats(K) if K else None
    for t in trajs:
        if acc is not None and t.accept_counts:
            acc.observe(t.accept_counts, t.draft_counts)
    m = {
        "rollout/tokens_per_forward": sum(t.num_tokens for t in trajs)
        / max(1, sum(t.num_forwards for t in trajs)),
        "rollout/length_mean": sum(t.num_tokens for t in trajs) / len(trajs),
    }
    steps = sum(len(t.accept_counts) for t in trajs)
    if acc is not None and steps:
        m["rollout/accept_rate"] = sum(sum(t.accept_counts) for t in trajs) / max(
            1, sum(sum(t.draft_counts) for t in trajs)
        )
        for i, a in enumerate(acc.acceptance_by_position(), start=1):
            m[f"rollout/accept_pos_{i}"] = a
    for task in sorted({s.task for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.task == task]
        rs = [rewards[j * group + k] for j in idx for k in range(group)]
        m[f"reward/{task}/mean"] = sum(rs) / len(rs)
        m[f"reward/{task}/pass@{group}"] = sum(
            max(rewards[j * group : (j + 1) * group]) >= 1.0 for j in idx
        ) / len(idx)
    return m


def train(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoint"
    recover(ckpt)
    resuming = resume and ckpt.exists()
    dump_config(cfg, run_dir / "config.yaml")
    policy = HybridPolicy.from_pretrained(ckpt if resuming else cfg.checkpoint)
    tok = load_tokenizer(cfg.checkpoint)
    learner = Learner(policy, cfg.learner)
    start, drift_state, wandb_id = 0, None, None
    if resuming:
        state = load_trainer_state(ckpt)
        learner.opt.load_state_dict(state["optimizer"])
        start, drift_state, wandb_id = state["step"], state["drift"], state.get("wandb_id")
        log.info("resumed %s at step %d", run_dir, start)
    drift = DriftMonitor(cfg.drift, drift_state)
    jsonl = JSONLSink(run_dir / "metrics.jsonl")
    jsonl.truncate_after(start)
    sinks = [jsonl, StdoutSink(cfg.steps)]
    wandb_sink = None
    if cfg.wandb != "disabled":
        wandb_sink = WandbSink(run_dir, "blockrl", cfg.model_dump(mode="json"), cfg.wandb, wandb_id)
        sinks.append(wandb_sink)
    sink = MultiSink(sinks)

    init_ray(run_dir, cfg.rollout.address, num_cpus=None)
    r = cfg.rollout
    engine_kwargs = {
        "sampler": r.sampler,
        "levels": r.levels,
        "max_batch": r.max_batch,
        "mix_weight": r.mix_weight,
    }
    pool = RolloutPool(cfg.checkpoint, r.workers, engine_kwargs, r.cpus_per_worker, threads=r.threads)
    pool.sync_weights(state_dict_numpy(policy), version=start)
    prompt_pool = {t: list(iter_samples(t, 2000, cfg.seed + 17)) for t in cfg.tasks}
    K = policy.block_size if r.sampler != "ar" else 0
    lambda_diff = cfg.learner.lambda_diff
    history = []
    try:
        for step in range(start, cfg.steps):
            samples = step_prompts(cfg, step, prompt_pool)
            prompt_ids = [
                [tok.bos_token_id, *tok(s.prompt, add_special_tokens=False)["input_ids"]] for s in samples
            ]
            t0 = time.time()
            sampling = {"max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "seed": cfg.seed * 100_003 + step,
                        "eos_token_id": tok.eos_token_id}  # fmt: skip
            trajs = pool.collect(prompt_ids, cfg.group_size, sampling)
            t1 = time.time()
            texts = tok.batch_decode([t.tokens for t in trajs], skip_special_tokens=True)
            rewards = [score(samples[i // cfg.group_size], text) for i, text in enumerate(texts)]
            batch = RolloutBatch.from_trajectories(trajs, rewards, cfg.group_size, tok.pad_token_id)
            metrics = learner.step(batch)
            t2 = time.time()
            pool.sync_weights(state_dict_numpy(policy), version=step + 1)
            t3 = time.time()
            metrics |= rollout_metrics(trajs, samples, rewards, cfg.group_size, K)
            n_tok = sum(t.num_tokens for t in trajs)
            metrics |= {"perf/tok_per_s": n_tok / max(1e-9, t1 - t0), "time/rollout_s": t1 - t0,
                        "time/train_s": t2 - t1, "time/sync_s": t3 - t2, "train/lambda_diff": learner.cfg.lambda_diff}  # fmt: skip
            for name in drift.update(metrics):
                metrics[f"drift/{name.replace('/', '_')}_alarm"] = 1.0
                log.warning("drift alarm on %s at step %d (action: %s)", name, step + 1, cfg.drift_action)
                if cfg.drift_action == "raise_lambda_diff":
                    lambda_diff = max(2 * lambda_diff, 0.1)
                    learner.cfg = learner.cfg.model_copy(update={"lambda_diff": lambda_diff})
            metrics |= drift.metrics()
            metrics = {k: v for k, v in metrics.items() if isinstance(v, float | int) and math.isfinite(v)}
            sink.log(step + 1, metrics)
            history.append({"step": step + 1, **metrics})
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(ckpt, policy, tok, {"optimizer": learner.opt.state_dict(), "step": step + 1,
                                                    "drift": drift.state_dict(),
                                                    "wandb_id": wandb_sink.run_id if wandb_sink else None})  # fmt: skip
            if cfg.drift_action == "stop" and any(k.endswith("_alarm") for k in metrics):
                log.warning("stopping on drift alarm at step %d", step + 1)
                break
    finally:
        pool.shutdown()
        sink.close()
    if (run_dir / "metrics.jsonl").exists():
        log.info("curves: %s", plot_run(run_dir))
    return history
