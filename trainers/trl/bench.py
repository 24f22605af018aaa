"""`blockrl trl-bench`: TRL GRPOTrainer step time with its default HF-generate path vs blockrl's rollout_func.

Same configuration for every variant: the shipped checkpoint's underlying HF model, the same held-out task prompts in
the same order (same trainer seed), num_generations, max_completion_length, temperature, learning rate, and the
reasoning-gym verifier as the reward (`envs.tasks.score`). Only `rollout_func` differs.

Decision: variants alternate step by step, not run after run. On a shared machine the background load drifts on a
scale of tens of seconds (measured here: per-round ratios from 0.9x to 2x when whole runs alternated). Each variant's
`trainer.train()` runs in its own thread and a baton lets exactly one trainer run one optimizer step at a time,
round-robin, so neighbouring steps of different variants see the same load. A step is timed from TRL's
`on_step_begin` to `on_step_end` (generation, scoring, loss, backward, optimizer); generation alone is timed around
`GRPOTrainer._generate`. The first `warmup_steps` per variant are not counted. Medians are reported, with the ratio
HF / variant.

    blockrl trl-bench                                       # ~1 minute on 2 CPU cores
    blockrl trl-bench --json docs/trl_bench.json --set 'variants=[hf,lossless,logit_mix,ar]' --set steps=16
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from tqdm import tqdm
from transformers import AutoModelForCausalLM, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from common.config import Section, ShippedPath
from common.plots import pyplot
from envs import splits
from envs.tasks import CORPUS_TASKS, TaskName, TaskSample, score
from policy.metadata import load_tokenizer
from rollout.bench.report import device_name
from rollout.types import Levels
from trainers.trl.adapter import BlockGRPOTrainer, BlockRolloutFunc

log = logging.getLogger(__name__)
Variant = Literal["hf", "ar", "lossless", "logit_mix", "auto", "ar+compiled", "lossless+compiled"]
COMPILED = "+compiled"  # the engine's decode step compiled (`compile: on`)


class TRLBenchConfig(Section):
    """`blockrl trl-bench` settings."""

    checkpoint: ShippedPath = "checkpoints/tiny-moe"
    """converted checkpoint directory (loaded as a plain HF causal LM)."""
    run_dir: str = "runs/trl_bench"
    """where results.json and trl_bench.png go; TRL's output_dir lives inside it."""
    variants: list[Variant] = Field(default_factory=lambda: ["hf", "lossless"])
    """hf = TRL's default generate; others = BlockRolloutFunc with that sampler; `+compiled` with the engine's decode
    step compiled (`compile: on`; it compiles in the warm-up steps)."""
    tasks: list[TaskName] = Field(default_factory=lambda: list(CORPUS_TASKS))
    """tasks the prompts come from."""
    prompts_per_task: int = Field(32, ge=1)
    """held-out prompts per task in the dataset."""
    data_seed: int = splits.HELDOUT_SEED
    """reasoning-gym seed of the prompts (1235 = held out from the shipped model's training)."""
    num_generations: int = Field(4, ge=2)
    """GRPO group size."""
    prompts_per_step: int = Field(4, ge=1)
    """prompts per optimizer step (batch = prompts_per_step * num_generations)."""
    max_completion_length: int = Field(128, ge=1)
    """completion budget."""
    temperature: float = Field(1.0, gt=0.0)
    """sampling temperature (both paths)."""
    learning_rate: float = Field(1e-6, gt=0.0)
    """small: the policy stays close to the checkpoint, so every round measures the same work."""
    levels: Levels = Field(default_factory=lambda: ["end"])
    """engine proposal levels."""
    mix_weight: float = Field(0.5, ge=0.0, le=1.0)
    """logit_mix w."""
    steps: int = Field(12, ge=1)
    """optimizer steps per variant (alternated step by step)."""
    warmup_steps: int = Field(1, ge=0)
    """leading steps per variant not counted."""
    threads: int = Field(1, ge=1)
    """torch threads (1: two threads on a busy 2-core machine spin against each other)."""
    seed: int = 0
    """trainer seed (prompt order) and rollout seed."""

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: give at least one, each once (got {self.variants})")
        return self

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.num_generations


class _Baton:
    """One trainer step at a time, round-robin over the trainers still running (each trains in its own thread)."""

    def __init__(self, names: list[str]):
        self.names, self.live, self.ready = list(names), set(names), set()
        self.i = 0
        self.cv = threading.Condition()

    def mark_ready(self, name: str) -> None:
        with self.cv:
            self.ready.add(name)
            self.cv.notify_all()

    def acquire(self, name: str) -> None:
        """Block until every live trainer has finished its set-up and it is `name`'s turn."""
        with self.cv:
            self.cv.wait_for(lambda: self.ready >= self.live and self.names[self.i] == name)

    def release(self) -> None:
        with self.cv:
            self._advance()
            self.cv.notify_all()

    def finish(self, name: str) -> None:
        with self.cv:
            self.live.discard(name)
            self.ready.add(name)
            if self.names[self.i] == name:
                self._advance()
            self.cv.notify_all()

    def _advance(self) -> None:
        for _ in range(len(self.names)):
            self.i = (self.i + 1) % len(self.names)
            if self.names[self.i] in self.live:
                return


class _StepTimer(TrainerCallback):
    def __init__(self, name: str, baton: _Baton, bar: tqdm):
        self.name, self.baton, self.bar = name, baton, bar
        self.steps: list[float] = []
        self.starts: list[float] = []  # perf_counter at each step's start: shows the alternation

    def on_train_begin(self, args, state, control, **kw):
        self.baton.mark_ready(self.name)

    def on_step_begin(self, args, state, control, **kw):
        self.baton.acquire(self.name)
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(time.perf_counter() - self.starts[-1])
        self.bar.update(1)
        self.baton.release()


def _reward_fn(by_prompt: dict[str, TaskSample]):
    def verifier(prompts, completions, **kw):
        return [score(by_prompt[p], c) for p, c in zip(prompts, completions, strict=True)]

    return verifier


@dataclass
class _Variant:
    name: str
    trainer: object
    timer: _StepTimer
    gen_times: list[float] = field(default_factory=list)
    error: BaseException | None = None


def _build(cfg: TRLBenchConfig, variant: str, dataset, tok, by_prompt, baton: _Baton, bar: tqdm) -> _Variant:
    """A trainer for one variant, from the checkpoint; `_generate` (the generation of a step) is timed."""
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(Path(cfg.run_dir) / "trl" / variant),
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        learning_rate=cfg.learning_rate,
        seed=cfg.seed,
    )
    rollout = None
    if variant != "hf":
        rollout = BlockRolloutFunc(
            sampler=variant.removesuffix(COMPILED),
            compile="on" if variant.endswith(COMPILED) else "off",
            levels=cfg.levels,
            mix_weight=cfg.mix_weight,
            max_batch=cfg.batch_size,
            seed=cfg.seed,
        )
    timer = _StepTimer(variant, baton, bar)
    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint)
    cls = (
        BlockGRPOTrainer if variant.startswith("logit_mix") else GRPOTrainer
    )  # exact samplers need no correction
    trainer = cls(
        model=model,
        processing_class=tok,
        reward_funcs=[_reward_fn(by_prompt)],
        args=args,
        train_dataset=dataset,
        rollout_func=rollout,
        callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)
    v = _Variant(variant, trainer, timer)
    generate = trainer._generate

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = generate(prompts)
        v.gen_times.append(time.perf_counter() - t0)
        return out

    trainer._generate = timed_generate
    return v


def _train(v: _Variant, baton: _Baton, threads: int) -> None:
    torch.set_num_threads(threads)  # NOTE: the intra-op thread count is per thread (OpenMP); set it in each
    try:
        v.trainer.train()
    except BaseException as e:  # deliberate: re-raised in the main thread after the others finish
        v.error = e
    finally:
        baton.finish(v.name)


def _steps(cfg: TRLBenchConfig, v: _Variant, t0: float) -> list[dict]:
    logs = [h for h in v.trainer.state.log_history if "loss" in h]
    return [
        {
            "step": i,
            "start_s": v.timer.starts[i] - t0,
            "step_s": s,
            "generate_s": g,
            "warmup": i < cfg.warmup_steps,
            "mean_length": h["completions/mean_length"],
            "reward": h["reward"],
            "tokens_per_forward": h.get("rollout/tokens_per_forward", 1.0),
        }
        for i, (s, g, h) in enumerate(zip(v.timer.steps, v.gen_times, logs, strict=True))
    ]


def _summary(steps: list[dict], batch: int) -> dict:
    kept = [s for s in steps if not s["warmup"]]
    med = {k: statistics.median(s[k] for s in kept) for k in ("step_s", "generate_s")}
    tokens = sum(s["mean_length"] * batch for s in kept)
    return {
        "median_step_s": med["step_s"],
        "median_generate_s": med["generate_s"],
        "median_rest_s": statistics.median(s["step_s"] - s["generate_s"] for s in kept),
        "generate_tok_per_s": tokens / sum(s["generate_s"] for s in kept),
        "mean_completion_length": statistics.fmean(s["mean_length"] for s in kept),
        "mean_reward": statistics.fmean(s["reward"] for s in kept),
        "mean_tokens_per_forward": statistics.fmean(s["tokens_per_forward"] for s in kept),
        "steps_counted": len(kept),
    }


def run_trl_bench(cfg: TRLBenchConfig) -> dict:
    """Run every variant, alternating step by step; returns the results dict (also what the JSON holds)."""
    from datasets import Dataset

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(cfg.threads)
    tok = load_tokenizer(cfg.checkpoint)
    samples = splits.task_prompts(cfg.tasks, cfg.prompts_per_task, cfg.data_seed)
    by_prompt = {tok.bos_token + s.prompt: s for s in samples}  # TRL tokenizes the prompt text as given
    dataset = Dataset.from_list([{"prompt": p} for p in by_prompt])
    baton = _Baton(cfg.variants)
    with tqdm(total=cfg.steps * len(cfg.variants), desc="trl-bench steps", unit="step") as bar:
        variants = [_build(cfg, v, dataset, tok, by_prompt, baton, bar) for v in cfg.variants]
        threads = [
            threading.Thread(target=_train, args=(v, baton, cfg.threads), name=f"trl-{v.name}")
            for v in variants
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for v in variants:
        if v.error is not None:
            raise RuntimeError(f"trl-bench: variant {v.name} failed") from v.error
    t0 = min(v.timer.starts[0] for v in variants)
    steps = {v.name: _steps(cfg, v, t0) for v in variants}
    summary = {v: _summary(s, cfg.batch_size) for v, s in steps.items()}
    if "hf" in summary:
        hf = summary["hf"]
        for v, s in summary.items():
            s["step_speedup_vs_hf"] = hf["median_step_s"] / s["median_step_s"]
            s["generate_speedup_vs_hf"] = hf["median_generate_s"] / s["median_generate_s"]
            # the same step index of two variants ran back to back, under the same background load
            pairs = [(a, b) for a, b in zip(steps["hf"], steps[v], strict=True) if not a["warmup"]]
            s["paired_step_speedup_vs_hf"] = statistics.median(a["step_s"] / b["step_s"] for a, b in pairs)
            s["paired_generate_speedup_vs_hf"] = statistics.median(
                a["generate_s"] / b["generate_s"] for a, b in pairs
            )
    meta = {
        "config": cfg.model_dump(mode="json"),
        "device": device_name(),
        "torch_threads": cfg.threads,
        "batch_size": cfg.batch_size,
    }
    return {"meta": meta, "summary": summary, "steps": steps}


def write_report(result: dict, json_path: Path, png_path: Path | None = None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    if png_path is None:
        return
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for v, steps in result["steps"].items():
        line = ax.plot(
            [s["step"] for s in steps], [s["step_s"] for s in steps], marker="o", label=f"{v} step"
        )
        ax.plot(
            [s["step"] for s in steps],
            [s["generate_s"] for s in steps],
            ls="--",
            color=line[0].get_color(),
            alpha=0.6,
            label=f"{v} generate",
        )
    ax.set_xlabel("optimizer step (variants alternate step by step)")
    ax.set_ylabel("seconds")
    ax.set_title("TRL GRPOTrainer: HF generate vs blockrl rollout_func")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def format_summary(result: dict) -> str:
    head = ("variant", "step s", "gen s", "rest s", "vs hf", "paired", "TPF", "len", "reward")
    lines = [f"{head[0]:<10} " + " ".join(f"{h:>7}" for h in head[1:])]
    for v, s in result["summary"].items():
        lines.append(
            f"{v:<10} {s['median_step_s']:>7.2f} {s['median_generate_s']:>7.2f} {s['median_rest_s']:>7.2f} "
            f"{s.get('step_speedup_vs_hf', float('nan')):>6.2f}x {s.get('paired_step_speedup_vs_hf', float('nan')):>6.2f}x "
            f"{s['mean_tokens_per_forward']:>7.1f} {s['mean_completion_length']:>7.1f} {s['mean_reward']:>7.2f}"
        )
    return "\n".join(lines)
