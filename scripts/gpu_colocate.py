"""GPU check stage: colocated RL steps on one GPU, in one process (the lent machine has no Ray).

A learner (fp32 weights and AdamW state, bf16 autocast) and a bf16 rollout copy of the same policy take turns on the
device exactly as a colocated learner rank does (trainers/rl/colocate.py): sync (weights copied in place, in
process: NCCL cannot join two processes on one GPU), rollout (lossless block decoding), train. Rewards are synthetic
(completions near 24 tokens score higher): this checks the machinery and measures it, not learning.

Prints, and writes to --out, one JSON record per step: seconds and peak GPU memory per phase, tokens per forward,
the rollout-vs-learner log-prob mismatch (lossless: exact samples of the policy being trained), and where the rollout
copy and AdamW's moments sit while the learner trains (they must be off the GPU).

    python scripts/gpu_colocate.py --checkpoint checkpoints/tiny-moe --steps 2 --out colocate.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from policy.hybrid import HybridPolicy
from policy.metadata import load_tokenizer
from policy.tokenizer import pad_id
from rollout.settings import EngineSettings
from rollout.types import SamplingParams
from rollout.worker import Shard
from trainers.rl.colocate import ColocatedRollouts
from trainers.rl.learner import Learner, LearnerConfig, RolloutBatch

PROMPTS = [
    "Spell backward: castle\n",
    "How many r in strawberry?\n",
    "Sum: 3 + 4 + 12\n",
    "Spell backward: river\n",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/tiny-moe")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--out", default="colocate.json")
    ap.add_argument("--device", default="cuda", help="cuda (the check), or cpu (a smoke run of this script)")
    args = ap.parse_args()
    tok = load_tokenizer(args.checkpoint)
    learner = Learner(
        HybridPolicy.from_pretrained(args.checkpoint),
        LearnerConfig(device=args.device, autocast="bfloat16", minibatches=2, lr=1e-5),
    )
    col = ColocatedRollouts(
        learner,
        args.checkpoint,
        EngineSettings(device=args.device, dtype="bfloat16", max_batch=32),
        threads=4,
    )
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    samples = [p for p in prompts for _ in range(args.group)]
    records = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        sync = col.load(learner.version)
        t1 = time.perf_counter()
        moments = [v for s in learner.opt.state.values() for k, v in s.items() if k != "step"]
        moments_at_rollout = str(moments[0].device) if moments else "none yet"
        shard = Shard(
            0, samples, list(range(len(samples))), learner.version, SamplingParams(max_new_tokens=64)
        )
        trajs = col.generate(shard).trajectories
        t2 = time.perf_counter()
        rewards = [-abs(len(t.tokens) - 24) / 24 for t in trajs]
        batch = RolloutBatch.from_trajectories(trajs, rewards, args.group, pad_id(tok))
        metrics = col.step(batch)
        t3 = time.perf_counter()
        rec = {
            "step": step + 1,
            "sync_s": t1 - t0,
            "rollout_s": t2 - t1,
            "train_s": t3 - t2,
            "sync_bytes": sync["sync/bytes"],
            "tokens_per_forward": sum(len(t.tokens) for t in trajs)
            / max(1, sum(t.num_forwards for t in trajs)),
            "logprob_mismatch": metrics.get("rollout/logprob_mismatch"),
            "adam_moments_during_rollout": moments_at_rollout,
            "rollout_copy_after_train": str(next(col.worker.policy.parameters()).device),
            **{k: v for k, v in metrics.items() if k.startswith("memory/")},
            "loss": metrics["train/loss"],
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)
    with open(args.out, "w") as f:
        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        json.dump({"device": name, "steps": records}, f, indent=1)


if __name__ == "__main__":
    main()
