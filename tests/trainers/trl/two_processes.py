"""Run by tests/trainers/trl/test_adapter.py under torchrun (2 CPU processes, gloo): TRL's GRPOTrainer under
accelerate (MULTI_CPU, DDP) with blockrl's rollout_func in every process.

1. Each process calls the rollout function on its contiguous share of 8 prompts; rank 0 also calls a fresh one on all
   8 as a single process would (process_index 0, the same seed). Written: both, and each process's weight
   fingerprint of the model its engine wraps (the full weights, the same in every process).
2. One real `trainer.train()` step in both processes; written: each process's fingerprint after it (DDP keeps them
   equal) and the step's rollout history.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from envs.tasks import iter_samples
from policy.metadata import load_tokenizer
from trainers.trl.adapter import BlockRolloutFunc, weights_fingerprint

CKPT = "checkpoints/tiny-moe"


def main(out: Path) -> None:
    torch.set_num_threads(1)
    tok = load_tokenizer(CKPT)
    prompts = [tok.bos_token + s.prompt for s in iter_samples("chain_sum", 8, 11)]
    args = GRPOConfig(
        output_dir=str(out / "trl"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        learning_rate=1e-3,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    rollout = BlockRolloutFunc(sampler="lossless", levels=["end"])
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(CKPT),
        processing_class=tok,
        reward_funcs=[lambda completions, **kw: [float(len(c)) / 24 for c in completions]],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        rollout_func=rollout,
    )
    acc = trainer.accelerator
    rank, world = acc.process_index, acc.num_processes
    n = len(prompts) // world
    mine = rollout(prompts[rank * n : (rank + 1) * n], trainer)["completion_ids"]
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    record = {"world": world, "distributed_type": str(acc.distributed_type)}
    record["fingerprint"] = weights_fingerprint(acc.unwrap_model(trainer.model))
    if rank == 0:
        record["per_process"] = [ids for share in shares for ids in share]
        record["one_process"] = BlockRolloutFunc(sampler="lossless", levels=["end"])(prompts, trainer)[
            "completion_ids"
        ]
    trainer.train()
    record["after_step_fingerprint"] = weights_fingerprint(acc.unwrap_model(trainer.model))
    record["history_steps"] = [r.global_step for r in rollout.history]
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
