"""Held-out solve rate of checkpoints on identical prompts and sampling seeds: the before/after measure of an RL run.

Prompts are the evaluation split of envs/splits.py (the held-out set `blockrl train` evaluates on, which no training
split holds), `--per-task` per task (at most 300); every checkpoint samples each prompt once per `--seeds` value at T = 1 with lossless
block decoding (exact AR samples). Reports overall and per-task rates with Wilson 95% intervals, and the drafter's
tokens per forward on those same prompts and seeds (a drafter comparison that the prompt mix of a step cannot move).

    python -m trainers.rl.heldout_compare checkpoints/tiny-moe runs/grpo-letters/checkpoint --per-task 300
"""

from __future__ import annotations

import argparse
import json

import torch

from envs import splits
from envs.tasks import CORPUS_TASKS, score
from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from policy.tokenizer import encode_prompt
from rollout.engine import BlockEngine
from trainers.lm.evaluate import wilson


def solve_rates(checkpoint: str, tok, samples, seeds: list[int]) -> dict:
    policy = HybridPolicy.from_pretrained(checkpoint).eval()
    engine = BlockEngine(policy, sampler="lossless", levels=[0, 4, 8], max_batch=32, tokenizer=tok)
    prompts = [encode_prompt(tok, s.prompt, policy.prompt_format) for s in samples]
    solved = []  # (task, ok) per sample
    tokens = forwards = 0
    for seed in seeds:
        trajs = engine.generate(prompts, max_new_tokens=160, temperature=1.0, seed=seed)
        tokens += sum(t.num_tokens for t in trajs)
        forwards += sum(t.num_forwards for t in trajs)
        solved += [
            (s.task, score(s, tok.decode(t.tokens, skip_special_tokens=True)) >= 1.0)
            for s, t in zip(samples, trajs, strict=True)
        ]
    out = {
        "checkpoint": checkpoint,
        "n": len(solved),
        "rate": sum(ok for _, ok in solved) / len(solved),
        "ci95": wilson(sum(ok for _, ok in solved), len(solved)),
        "per_task": {},
        "tokens_per_forward": tokens / max(forwards, 1),
    }
    for task in dict.fromkeys(t for t, _ in solved):
        own = [ok for t, ok in solved if t == task]
        out["per_task"][task] = {"rate": sum(own) / len(own), "ci95": wilson(sum(own), len(own))}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories (the first is the reference)")
    ap.add_argument("--tasks", nargs="*", default=list(CORPUS_TASKS))
    ap.add_argument("--per-task", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="*", default=[11, 12])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--train-seed", type=int, default=0, help="seed of the RL run: its training prompts are excluded"
    )
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.checkpoints[0])
    samples = splits.rl_heldout(
        args.tasks, args.per_task, exclude=splits.rl_train_prompts(args.tasks, args.train_seed)
    )
    results = [solve_rates(c, tok, samples, args.seeds) for c in args.checkpoints]
    for r in results:
        lo, hi = r["ci95"]
        tasks = ", ".join(f"{t} {v['rate']:.1%}" for t, v in r["per_task"].items())
        delta = f" ({100 * (r['rate'] - results[0]['rate']):+.1f} pts)" if r is not results[0] else ""
        print(
            f"{r['checkpoint']}: {r['rate']:.1%} [{lo:.1%}, {hi:.1%}] of {r['n']}{delta} | {tasks}"
            f" | tokens/forward {r['tokens_per_forward']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
