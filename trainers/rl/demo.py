"""`blockrl demo` (what `make demo` runs): GRPO on the shipped checkpoint with lossless block-decoded rollouts on two
Ray workers, on CPU, in a few minutes. It measures the held-out solve rate before and after, prints the per-step
lines and the acceptance curve, compares rollout tokens/s of lossless against engine `ar` at the same batch, and says
where the plots, JSONL and wandb run are.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray
import torch

from common.config import load_config
from envs import splits
from envs.tasks import score
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from policy.tokenizer import encode_prompt
from rollout.engine import BlockEngine
from trainers.lm.evaluate import wilson
from trainers.rl.run import TrainConfig, train

log = logging.getLogger(__name__)


def heldout_solve_and_speed(
    checkpoint: str | Path, tok, tasks: list[str], per_task: int, batch: int, seed: int
) -> dict:
    """Held-out solve rate at T=1 with lossless rollouts, and tokens/s of lossless vs engine ar on the same prompts."""
    torch.set_num_threads(2)
    policy = HybridPolicy.from_pretrained(checkpoint).eval()
    samples = splits.rl_heldout(tasks, per_task, exclude=splits.rl_train_prompts(tasks, seed))
    prompts = [encode_prompt(tok, s.prompt, policy.prompt_format) for s in samples]
    out = {}
    for sampler in ("lossless", "ar"):
        log.info("demo: %s on %d held-out prompts of %s (batch %d)", sampler, len(prompts), checkpoint, batch)
        eng = BlockEngine(policy, sampler=sampler, levels=[0, 4, 8], max_batch=batch, tokenizer=tok)
        t0 = time.perf_counter()
        trajs = eng.generate(prompts, max_new_tokens=160, temperature=1.0, seed=splits.HELDOUT_SAMPLING_SEED)
        dt = time.perf_counter() - t0
        log.info("demo: %s done in %.1fs", sampler, dt)
        out[f"{sampler}_tok_s"] = sum(t.num_tokens for t in trajs) / dt
        if sampler == "lossless":
            solved = sum(
                score(s, tok.decode(t.tokens, skip_special_tokens=True)) == 1.0
                for s, t in zip(samples, trajs, strict=True)
            )
            out |= {"solved": solved, "n": len(samples), "ci95": wilson(solved, len(samples))}
    return out


def run_demo(run_dir: str, checkpoint: str, steps: int, overrides: list[str]) -> int:
    cfg = load_config(
        TrainConfig,
        "grpo_demo",
        [f"run_dir={run_dir}", f"checkpoint={checkpoint}", f"steps={steps}", *overrides],
    )
    tok = load_tokenizer(checkpoint)
    tasks = cfg.eval_tasks or list(dict.fromkeys(cfg.tasks))
    before = heldout_solve_and_speed(checkpoint, tok, tasks, 100, 16, cfg.seed)
    history = train(cfg)
    ray.shutdown()
    after = heldout_solve_and_speed(Path(cfg.run_dir) / "checkpoint", tok, tasks, 100, 16, cfg.seed)
    tpf = [h["rollout/tokens_per_forward"] for h in history]
    print("\n== blockrl demo: GRPO on the shipped checkpoint, lossless rollouts on 2 Ray workers ==")
    for name, r in (("before", before), ("after", after)):
        lo, hi = r["ci95"]
        print(
            f"held-out solve rate {name:>6}: {r['solved']}/{r['n']} = {r['solved'] / r['n']:.1%} "
            f"[{lo:.1%}, {hi:.1%}] (T=1.0, lossless rollouts)"
        )
    print("acceptance (tokens per forward) by step: " + " ".join(f"{v:.1f}" for v in tpf))
    print(
        f"rollout tokens/s at batch 16, trained policy: lossless {after['lossless_tok_s']:.0f} vs engine ar "
        f"{after['ar_tok_s']:.0f} ({after['lossless_tok_s'] / after['ar_tok_s']:.2f}x)"
    )
    print(
        f"per-step metrics: {Path(cfg.run_dir) / 'metrics.jsonl'} | curves: {Path(cfg.run_dir) / 'curves.png'} | "
        f"wandb ({cfg.wandb}): {Path(cfg.run_dir) / 'wandb'}"
    )
    return 0
