"""`blockrl train`: the on-policy RL driver. It reads like the algorithm:

    for step:  weight sync (byte buckets by collective, or the object store; versioned) -> prompts or env
               episodes -> rollouts (Ray workers, block decoding) -> rewards (verifiers / env) -> learner step
               (GRPO or PPO + lambda_diff diffusion loss; one process, or a group of N ranks under DDP / FSDP2)
               -> drift checks -> log -> atomic checkpoint

`async_rollouts` launches step t+1's rollouts before learner step t, so they run one version behind; the learner
then takes its own log-probs as pi_old and truncated importance weights against the rollout policy.

Resume (`--resume`) restores the policy, optimizer, RNG, step and drift-detector state from `<run_dir>/checkpoint`
and drops metrics records past it, so `metrics.jsonl` has each step exactly once.

    blockrl train --config configs/grpo_tiny.yaml
    blockrl train --config configs/grpo_tiny.yaml --set learner.world_size=2 --set learner.strategy=fsdp
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from common.checkpoint import load_trainer_state, recover, rng_state
from common.config import ConfigError, Section, ShippedPath, dump_config
from common.device import resolve_device
from common.metrics import JSONLSink, MultiSink, StdoutSink, WandbSink
from envs import splits
from envs.prompt_file import PromptFileConfig, PromptFileTask
from envs.rewards import RewardFunctions, RewardSpec
from envs.tasks import TaskName
from policy.hybrid import HybridPolicy
from policy.metadata import (
    checkpoint_block_size,
    checkpoint_is_converted,
    checkpoint_prompt_format,
    load_tokenizer,
)
from policy.tokenizer import pad_id
from rollout.pool import RolloutPool, init_ray, reserve
from rollout.settings import EngineSettings, WorkerSettings
from rollout.types import SamplingParams
from rollout.weight_sync import WeightSyncConfig, pick_transport
from trainers.rl.drift import DetectorConfig, DriftMonitor
from trainers.rl.group import LearnerGroup, ranks_use_gpu
from trainers.rl.learner import Learner, LearnerConfig, RolloutBatch
from trainers.rl.plots import plot_run
from trainers.rl.rollouts import StepRollouts, heldout_eval, heldout_reward, rollout_metrics

log = logging.getLogger(__name__)


class RolloutConfig(EngineSettings, WorkerSettings):
    """Rollout workers and sampling."""

    max_new_tokens: int = Field(160, ge=1)
    """completion budget (an env episode's budget over all its turns)."""
    temperature: float = Field(1.0, gt=0.0)
    """sampling temperature (the learner uses the same)."""


class TrainConfig(Section):
    """`blockrl train`: GRPO on the hybrid policy with block-decoded rollouts."""

    run_dir: str = "runs/grpo"
    """output: config.yaml, metrics.jsonl, checkpoint/, wandb/."""
    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """policy to start from: a converted checkpoint, or a plain HF causal LM (history drafts only)."""
    seed: int = 0
    """prompt sampling and rollout seeds."""
    steps: int = Field(20, ge=1)
    """RL steps."""
    tasks: list[TaskName] = Field(default_factory=lambda: ["spell_backward", "letter_counting", "chain_sum"])
    """task mix, cycled over a step's prompts (repeat a task to weight it); reasoning-gym verifiers score rewards."""
    prompts_per_step: int = Field(16, ge=1)
    """prompts per step; batch = prompts_per_step * group_size."""
    group_size: int = Field(4, ge=2)
    """samples per prompt (GRPO group)."""
    checkpoint_every: int = Field(5, ge=1)
    """steps between atomic checkpoints."""
    env: str | None = None
    """multi-turn gymnasium env id (e.g. blockrl/calc-chain_sum-v0) instead of single-turn `tasks` prompts."""
    prompts: PromptFileConfig = PromptFileConfig()
    """the researcher's own task: prompt files (`prompt` or `messages` rows, other columns go to the rewards)
    instead of `tasks`; scored by `rewards`."""
    rewards: list[RewardSpec] = Field(default_factory=list)
    """reward functions for `prompts` (TRL's signature, by `module:function` or `file.py:function`), weighted."""
    on_reward_error: Literal["raise", "record"] = "raise"
    """a reward function that raises or returns a non-finite value: stop naming it and the row, or count it and
    let that term be 0."""
    prompt_format: Literal["auto", "text", "raw", "chat"] = "auto"
    """task prompt encoding: auto = the checkpoint's training format (chat for a model converted on chats)."""
    async_rollouts: bool = False
    """one step off-policy: step t+1's rollouts (weights of step t-1) overlap learner step t; truncated IS."""
    eval_every: int = Field(0, ge=0)
    """steps between held-out solve-rate evaluations (0 = off); also run before step 1 and after the last step."""
    eval_tasks: list[TaskName] | None = None
    """tasks of the held-out evaluation (None = the distinct `tasks`)."""
    eval_per_task: int = Field(60, ge=1, le=splits.HELDOUT_SIZE)
    """held-out prompts per task (one sample each, T=rollout temperature, seed-fixed, disjoint seed from training)."""
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
    sync: WeightSyncConfig = WeightSyncConfig()
    """how each policy version reaches the rollout workers."""
    colocate: bool = False
    """one node: the rollout engines run inside the learner's ranks, on their devices, instead of on separate
    workers (rollout.workers and the placement are then the learner's: learner.world_size ranks). Each rank decodes
    its share with the full weights, moved in process; on a GPU the rollout copy and its cache leave before the rank
    learns."""

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @model_validator(mode="after")
    def _one_task_source(self) -> TrainConfig:
        if self.prompts.files and self.env:
            raise ValueError("prompts.files and env are two task sources; give one")
        if self.prompts.files and not self.rewards:
            raise ValueError("rewards: prompts.files needs at least one reward function ('module:function')")
        if self.rewards and not self.prompts.files:
            raise ValueError("rewards: reward functions score prompt files; set prompts.files")
        if self.prompts.files and self.eval_every and not self.prompts.heldout_rows:
            raise ValueError(
                "eval_every with prompts.files needs prompts.heldout_rows > 0 (rows to evaluate on)"
            )
        return self

    @model_validator(mode="after")
    def _colocated_rollouts_wait(self) -> TrainConfig:
        if self.colocate and self.async_rollouts:
            raise ValueError(
                "async_rollouts: colocated rollouts share the learner's ranks and devices, so they cannot overlap its "
                "step; set colocate=false for one-step-off-policy rollouts"
            )
        return self

    @model_validator(mode="after")
    def _same_temperature(self) -> TrainConfig:
        if self.learner.temperature != self.rollout.temperature:
            raise ValueError(
                f"learner.temperature ({self.learner.temperature}) must equal rollout.temperature "
                f"({self.rollout.temperature}): the learner's log-probs are the rollout policy's at the same T"
            )
        return self


def train(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoint"
    dump_config(cfg, run_dir / "config.yaml")
    recover(ckpt)
    resuming = resume and ckpt.exists()
    source = (
        ckpt if resuming else Path(cfg.checkpoint)
    )  # the policy the learner (and so this step) starts from
    tok = load_tokenizer(cfg.checkpoint)
    r = cfg.rollout
    converted = checkpoint_is_converted(source)
    r.check_checkpoint(converted, checkpoint_block_size(source), "rollout.")
    if not converted:  # a plain causal LM: history drafts only, and nothing to keep fresh
        if cfg.drift_action == "raise_lambda_diff":
            raise ConfigError(
                "drift_action: raise_lambda_diff needs a converted checkpoint (a drafter to train)"
            )
        log.info(
            "%s is not converted: rollouts draft from history (rollout.drafts=%s); learner.lambda_diff=%g is "
            "not used (no drafter to train)",
            source,
            r.resolved_drafts(False),
            cfg.learner.lambda_diff,
        )
    fmt = checkpoint_prompt_format(source) if cfg.prompt_format == "auto" else cfg.prompt_format
    if cfg.env and fmt == "chat":
        raise ConfigError(f"prompt_format: env {cfg.env} feeds text turns; chat-format prompts need `tasks`")

    file_task = None
    if cfg.prompts.files:
        file_task = PromptFileTask(cfg.prompts, RewardFunctions(cfg.rewards, cfg.on_reward_error))
        log.info(
            "prompts: %d training rows, %d held out (%s)",
            len(file_task.train),
            len(file_task.heldout),
            file_task.bad.summary() if file_task.bad.skipped else "no bad rows",
        )
    init_ray(run_dir, r.address, num_cpus=None)
    state = load_trainer_state(source) if resuming else {}
    learner, pool = _learner_and_pool(cfg, source, state.get("learner"))
    start, drift, wandb_id = (
        state.get("step", 0),
        DriftMonitor(cfg.drift, state.get("drift")),
        state.get("wandb_id"),
    )
    if resuming:
        log.info("resumed %s at step %d", source, start)
    learner.version = start
    sink, wandb_sink = _sinks(cfg, run_dir, start, wandb_id)
    sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature)
    rollouts = StepRollouts(
        pool,
        tok,
        cfg.tasks,
        cfg.env,
        cfg.seed,
        cfg.prompts_per_step,
        cfg.group_size,
        sampling,
        fmt,
        file_task,
    )
    K = 0 if r.sampler == "ar" else checkpoint_block_size(source) if converted else r.history.max_draft

    heldout = (
        None
        if file_task
        else splits.rl_heldout(cfg.eval_tasks or cfg.tasks, cfg.eval_per_task, rollouts.train_prompts)
    )

    def evaluate() -> dict:  # held-out solve rate (built-in tasks) or mean reward (prompt-file rows)
        n = len(file_task.heldout) if file_task is not None else len(heldout)
        log.info(
            "held-out evaluation: %d prompts on %d workers (policy v%d)",
            n,
            len(pool.workers),
            learner.version,
        )
        t0 = time.time()
        out = (
            heldout_reward(pool, tok, file_task, sampling, fmt)
            if file_task is not None
            else heldout_eval(pool, tok, heldout, sampling, fmt)
        )
        log.info("held-out evaluation done in %.0f s", time.time() - t0)
        return out

    def publish() -> dict[str, float]:
        return _publish(pool, learner, cfg.sync, r.engine_settings().torch_dtype, r.gpus_per_worker)

    if not isinstance(learner, LearnerGroup) or not learner.colocated:
        transport, backend = pick_transport(cfg.sync, r.gpus_per_worker, _on_cuda(learner))
        log.info("weight sync: %s%s", transport, f" ({backend})" if transport == "collective" else "")

    history, pending = [], None
    try:
        if cfg.eval_every and start == 0:
            publish()
            sink.log(0, evaluate())
        for step in range(start, cfg.steps):
            t0, synced = time.time(), {}
            if pending is None:  # on-policy: the rollouts use the weights of the last learner step
                synced = publish()
                pending = rollouts.launch(step)
            batch = pending.result()
            pending = None
            # one step off-policy: step+1's rollouts overlap learning
            if cfg.async_rollouts and step + 1 < cfg.steps:
                synced |= publish()
                pending = rollouts.launch(step + 1)
            t1 = time.time()
            metrics = learner.step(
                RolloutBatch.from_trajectories(batch.trajs, batch.rewards, cfg.group_size, pad_id(tok))
            )
            metrics |= rollout_metrics(batch, cfg.group_size, K) | synced
            metrics |= {
                "time/train_s": time.time() - t1,
                "time/step_s": time.time() - t0,
                "train/lambda_diff": learner.lambda_diff,
            }
            metrics |= _check_drift(drift, metrics, cfg, learner, step)
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                if pending is not None:
                    pending.result()  # workers are busy with step+1; evaluate after (they hold older weights)
                publish()
                metrics |= evaluate()
            metrics = _finite(metrics, step)
            sink.log(step + 1, metrics)
            history.append({"step": step + 1, **metrics})
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                state = {
                    "step": step + 1,
                    "drift": drift.state_dict(),
                    "wandb_id": wandb_sink.run_id if wandb_sink else None,
                    "rng": rng_state(),
                }
                learner.save(ckpt, state)
            if cfg.drift_action == "stop" and any(k.endswith("_alarm") for k in metrics):
                log.warning("stopping on drift alarm at step %d", step + 1)
                break
    finally:
        rollouts.close()  # cancels a queued launch; a running collection ends when the pool goes
        if isinstance(learner, LearnerGroup):
            learner.close()
        pool.shutdown()
        sink.close()
    if (run_dir / "metrics.jsonl").exists():
        log.info("curves: %s", plot_run(run_dir))
    return history


class LocalLearner(Learner):
    """The learner in this process (world_size 1), saving with the run's tokenizer: the group's interface."""

    def __init__(self, policy: HybridPolicy, cfg: LearnerConfig, tokenizer):
        super().__init__(policy, cfg)
        self.tokenizer = tokenizer

    def save(self, dest: Path, extra: dict) -> None:
        super().save(dest, self.tokenizer, extra)


def _learner_bundles(cfg: LearnerConfig, gpus: float = 0.0) -> list[dict[str, float]]:
    """One placement-group bundle per learner rank: its CPUs, and its GPU on CUDA (colocated: at least the
    workers' share too, which it hosts). The single learner runs here, so here decides; a group's ranks take GPUs
    where the cluster has them (`ranks_use_gpu`)."""
    if cfg.world_size == 1 and gpus == 0.0:
        cuda = resolve_device(cfg.device, "learner.device").type == "cuda"
        return [{"CPU": 1.0} | ({"GPU": cfg.gpus} if cuda else {})]
    return [
        {"CPU": cfg.cpus_per_rank} | ({"GPU": 1.0} if ranks_use_gpu(cfg) or gpus else {})
    ] * cfg.world_size


def _learner_and_pool(cfg: TrainConfig, source: Path, learner_state: dict | None):
    """(learner, rollout pool). The learner is one rank in this process, or a group of Ray actors
    (`learner.world_size` > 1, or colocated); the pool is separate workers, or the learner's ranks (colocated).
    Under a placement group the learner's ranks take bundles 0..N-1, so workers never land on them."""
    r, lc = cfg.rollout, cfg.learner
    hint = f"blockrl train --config {Path(cfg.run_dir) / 'config.yaml'} --resume"
    resume = source if learner_state is not None else None  # the group's ranks read the state themselves
    if cfg.colocate:
        placement = None
        if r.placement != "none":
            placement = reserve(
                _learner_bundles(lc, gpus=r.gpus_per_worker), r.placement, r.placement_timeout_s
            )
        group = LearnerGroup(source, lc, resume=resume, placement=placement, resume_hint=hint)
        group.start_rollouts(source, r.engine_settings())
        return group, RolloutPool.over(group.ranks, r.shard_timeout_s, placement)
    pool = RolloutPool.from_settings(
        cfg.checkpoint, r.engine_settings(), r.worker_settings(), _learner_bundles(lc)
    )
    if lc.world_size > 1:
        placement = pool.placement_group if pool.learner_bundles else None
        try:
            return LearnerGroup(source, lc, resume=resume, placement=placement, resume_hint=hint), pool
        except BaseException:
            pool.shutdown()  # the workers and their reservation go with a group that could not start
            raise
    learner = LocalLearner(HybridPolicy.from_pretrained(source), lc, load_tokenizer(cfg.checkpoint))
    _check_learner_placement(pool, learner.device)
    if learner_state is not None:
        learner.load_state_dict(learner_state)
    return learner, pool


def _finite(metrics: dict, step: int) -> dict:
    """The loggable metrics; a non-finite loss stops the run."""
    if not math.isfinite(metrics["train/loss"]):
        raise FloatingPointError(f"train/loss is {metrics['train/loss']} at step {step + 1}; stopping")
    return {k: v for k, v in metrics.items() if isinstance(v, float | int) and math.isfinite(v)}


def _publish(
    pool: RolloutPool,
    learner: Learner | LearnerGroup,
    sync: WeightSyncConfig,
    dtype: torch.dtype,
    gpus_per_worker: float = 0.0,
) -> dict[str, float]:
    """Weight sync: the learner's weights go to every worker as `learner.version` (skipped when they already hold
    it), by collective or through the object store. Returns its cost: `time/weight_sync_s` (gather, send and every
    worker's load) and `sync/*` (bytes, GB/s, and whether the object store carried it)."""
    version = learner.version
    if pool.version == version:
        return {}
    transport, backend = pick_transport(sync, gpus_per_worker, _on_cuda(learner))
    t0 = time.perf_counter()
    if isinstance(learner, LearnerGroup) and learner.colocated:
        metrics = learner.load_rollout_weights(version) | {"sync/fallback": 0.0}
        pool.loaded(version)
    elif transport == "collective":

        def send(address):
            out = learner.send_weights(address, version, dtype, sync.bucket_mb)
            return out if isinstance(out, list) else [out]  # a local learner has sent when this returns

        metrics = pool.broadcast_weights(
            version, send, learner.weights_numpy, learner.published, sync.timeout_s, backend
        )
    else:
        nbytes = pool.sync_weights(learner.weights_numpy(), version=version)
        metrics = {"sync/bytes": float(nbytes), "sync/fallback": 0.0}
    seconds = time.perf_counter() - t0
    # end to end: every worker has loaded
    metrics["sync/gb_per_s"] = metrics.get("sync/bytes", 0.0) / seconds / 1e9
    colocated = isinstance(learner, LearnerGroup) and learner.colocated
    collective = transport == "collective" and not colocated
    return metrics | {"time/weight_sync_s": seconds, "sync/collective": float(collective)}


def _on_cuda(learner: Learner | LearnerGroup) -> bool:
    return learner.cuda if isinstance(learner, LearnerGroup) else learner.device.type == "cuda"


def _check_learner_placement(pool: RolloutPool, device: torch.device) -> None:
    """The learner runs in this process: say so if its reserved bundle is on another node or another GPU."""
    where = pool.learner_placement()
    if where is None:
        return
    here, gpus = where
    if not here:
        log.warning("placement: the learner's bundle is on another node than this driver: use strict_pack")
    elif gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # indices, or GPU-/MIG- UUIDs, as Ray reports them
        ids = (
            [x.strip() for x in visible.split(",")]
            if visible
            else [str(i) for i in range(torch.cuda.device_count())]
        )
        mine = ids[device.index or 0] if (device.index or 0) < len(ids) else None
        if mine not in gpus:
            log.warning(
                "placement: Ray reserved GPU %s for the learner, which runs on GPU %s: set learner.device",
                gpus,
                mine,
            )


def _check_drift(
    drift: DriftMonitor, metrics: dict, cfg: TrainConfig, learner: Learner | LearnerGroup, step: int
) -> dict:
    out = {}
    for name in drift.update(metrics):
        out[f"drift/{name.replace('/', '_')}_alarm"] = 1.0
        log.warning("drift alarm on %s at step %d (action: %s)", name, step + 1, cfg.drift_action)
        if cfg.drift_action == "raise_lambda_diff":
            learner.lambda_diff = max(2 * learner.lambda_diff, 0.1)
    return out | drift.metrics()


def _sinks(cfg: TrainConfig, run_dir: Path, start: int, wandb_id: str | None):
    jsonl = JSONLSink(run_dir / "metrics.jsonl")
    jsonl.truncate_after(start)
    sinks, wandb_sink = [jsonl, StdoutSink(cfg.steps)], None
    if cfg.wandb != "disabled":
        wandb_sink = WandbSink(run_dir, "blockrl", cfg.model_dump(mode="json"), cfg.wandb, wandb_id)
        sinks.append(wandb_sink)
    return MultiSink(sinks), wandb_sink
