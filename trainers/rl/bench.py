"""`blockrl learner-bench`: what keeping the drafter fresh costs the learner, arm by arm, side by side in one run.

One batch of real rollouts (lossless, the shipped checkpoint, task prompts, groups) is made once; then each arm (a
`lambda_diff` / diffusion-layout setting) takes full learner steps on it (GRPO loss, `minibatches` optimizer
steps, backward, AdamW), its own policy copy each. Arms alternate step by step, so neighbouring measurements see the
same background load, and the first round is a warm-up. Reported per arm: the median step time over the rounds,
its ratio to the `lambda_diff = 0` arm, and the freshness overhead (ratio - 1).

    blockrl learner-bench                                   # ~3 minutes on 2 CPU cores
    blockrl learner-bench --json docs/learner_bench.json
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm import tqdm

from common.config import Section, ShippedPath
from envs import splits
from envs.tasks import TaskName, score
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from policy.tokenizer import encode_prompt, pad_id
from rollout.bench.report import device_name
from rollout.engine import BlockEngine
from trainers.rl.learner import Learner, LearnerConfig, RolloutBatch

log = logging.getLogger(__name__)


class LearnerArm(Section):
    """One learner setting to time."""

    name: str
    lambda_diff: float = Field(0.5, ge=0.0)
    diffusion: Literal["blocks", "full"] = "blocks"
    diff_blocks: int = Field(4, ge=1)
    diff_width: int | None = Field(1, ge=1)
    diff_blocks_mean: float = Field(2.5, ge=0.0)
    diff_focus: float = Field(0.0, ge=0.0, le=1.0)
    diff_target: Literal["tokens", "ar"] = "tokens"
    """the diffusion-term settings, as in `LearnerConfig` (its docstrings)."""


class LearnerBenchConfig(Section):
    """`blockrl learner-bench` settings."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    run_dir: str = "runs/learner_bench"
    tasks: list[TaskName] = Field(
        default_factory=lambda: ["letter_counting", "chain_sum", "letter_counting", "spell_backward"]
    )
    """task mix of the rollout prompts (the ablation's)."""
    prompts: int = Field(32, ge=1)
    group_size: int = Field(4, ge=2)
    max_new_tokens: int = Field(160, ge=1)
    minibatches: int = Field(4, ge=1)
    threads: int = Field(2, ge=1)
    """torch threads of the learner (the demo's learner process has the machine's cores)."""
    rounds: int = Field(4, ge=2)
    """rounds of one step per arm; the first is a warm-up."""
    seed: int = 0
    arms: list[LearnerArm] = Field(
        default_factory=lambda: [
            LearnerArm(name="lambda_diff=0", lambda_diff=0.0),
            LearnerArm(name="full", diffusion="full"),
            LearnerArm(name="blocks x4 appended", diff_blocks=4, diff_width=None),
            LearnerArm(name="4 packed (default)", diff_blocks=4),
        ]
    )
    """the first arm is the reference (normally lambda_diff = 0)."""


def rollout_batch(cfg: LearnerBenchConfig, policy: HybridPolicy, tok) -> tuple[RolloutBatch, dict]:
    """`prompts` x `group_size` lossless rollouts of the ablation's task mix, scored, as one learner batch."""
    pool = splits.rl_prompt_pool(cfg.tasks, cfg.seed)
    samples = [pool[cfg.tasks[i % len(cfg.tasks)]][i // len(cfg.tasks)] for i in range(cfg.prompts)]
    prompt_ids = [
        encode_prompt(tok, s.prompt, policy.prompt_format) for s in samples for _ in range(cfg.group_size)
    ]
    engine = BlockEngine(policy, "lossless", levels=[0, 4, 8], max_batch=16, tokenizer=tok)
    trajs = engine.generate(prompt_ids, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    rewards = [score(samples[i // cfg.group_size], tok.decode(t.tokens)) for i, t in enumerate(trajs)]
    batch = RolloutBatch.from_trajectories(trajs, rewards, cfg.group_size, pad_id(tok))
    shape = {
        "rows": len(trajs),
        "padded_len": int(batch.input_ids.shape[1]),
        "mean_len": float(batch.valid.sum(1).mean()),
        "mean_completion": float(batch.completion.sum(1).mean()),
    }
    return batch, shape


def run_learner_bench(cfg: LearnerBenchConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    policy = HybridPolicy.from_pretrained(cfg.checkpoint)
    tok = load_tokenizer(cfg.checkpoint)
    batch, shape = rollout_batch(cfg, policy, tok)
    learners = {
        arm.name: Learner(
            copy.deepcopy(policy),
            LearnerConfig(
                lr=1e-5,
                minibatches=cfg.minibatches,
                **arm.model_dump(exclude={"name"}),
            ),
        )
        for arm in cfg.arms
    }
    times: dict[str, list[float]] = {name: [] for name in learners}
    blocks: dict[str, list[float]] = {name: [] for name in learners}
    bar = tqdm(total=cfg.rounds * len(learners), desc="learner steps", unit="step")
    for r in range(cfg.rounds):
        for name, learner in learners.items():
            torch.manual_seed(cfg.seed + r)  # the same minibatches and draft blocks for every arm in a round
            learner.version = batch.policy_version  # every round on-policy (no stale-batch extra forward)
            t0 = time.perf_counter()
            m = learner.step(batch)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
                if "train/diff_blocks_per_row" in m:
                    blocks[name].append(m["train/diff_blocks_per_row"])
            bar.update()
    bar.close()
    ref = statistics.median(times[cfg.arms[0].name])
    arms = []
    for arm in cfg.arms:
        med = statistics.median(times[arm.name])
        arms.append(
            {
                **arm.model_dump(),
                "step_s": times[arm.name],
                "median_s": med,
                "ratio": med / ref,
                "overhead": med / ref - 1.0,
                # draft blocks a row actually held (packing gives short rows more, long rows at least diff_width)
                "blocks_per_row": statistics.mean(blocks[arm.name]) if blocks[arm.name] else None,
            }
        )
    return {
        "device": device_name(),
        "threads": cfg.threads,
        "batch": shape,
        "minibatches": cfg.minibatches,
        "rounds_timed": cfg.rounds - 1,
        "reference": cfg.arms[0].name,
        "arms": arms,
    }


def format_summary(result: dict) -> str:
    b = result["batch"]
    lines = [
        f"learner step, {b['rows']} rollouts (padded length {b['padded_len']}, mean {b['mean_len']:.0f}), "
        f"{result['minibatches']} minibatches, {result['threads']} threads, median of {result['rounds_timed']}:",
        f"{'arm':<22} {'median s':>9} {'vs ' + result['reference']:>18} {'overhead':>9} {'blocks/row':>10}",
    ]
    for a in result["arms"]:
        per_row = f"{a['blocks_per_row']:.2f}" if a.get("blocks_per_row") is not None else "-"
        lines.append(
            f"{a['name']:<22} {a['median_s']:>9.2f} {a['ratio']:>17.2f}x {a['overhead']:>+8.0%} {per_row:>10}"
        )
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
