"""Held-out evaluation of a (hybrid) policy: AR solve rate by sampling, and diffusion top-1 accuracy per mask slot.

- Solve rate: HF `generate` in AR mode at the given temperature (no top-k/top-p), scored by reasoning-gym's verifier.
  A sample counts as solved when its score is 1.0. Reported overall and per task with a Wilson 95% interval.
- Held-out AR loss: next-token cross-entropy on the target tokens of held-out sequences (any corpus).
- Slot accuracy: teacher-forced TiDAR forward over held-out gold sequences with K+1-sized blocks at every shift.
  For each mask block that starts on a target token (inside a completion or assistant turn), slot j's argmax is
  compared with the true token j places after the clean prefix, for targets up to and including EOS. Slot 0 is the next-token slot (the AR verifier owns
  that position at inference); slots 1..K are the drafts the engine can accept.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from pydantic import Field

from common.config import Section
from envs.tasks import TaskSample, score
from policy.generate import hf_generate
from policy.losses import ar_ce
from policy.tokenizer import pad_id
from trainers.lm.data import Example, collate, encode


class EvalConfig(Section):
    """Held-out evaluation settings."""

    temperature: float = Field(1.0, ge=0.0)
    """sampling temperature of the AR solve rate (0 = greedy)."""
    max_new_tokens: int = Field(200, ge=1)
    """generation budget per prompt."""
    batch_size: int = Field(64, ge=1)
    """prompts per generate call."""
    seed: int = 0
    """sampling seed."""
    every: int = Field(0, ge=0)
    """evaluate every N training steps (0 = only at the end)."""
    samples_per_task: int = Field(200, ge=1)
    """held-out prompts per task (at most data.heldout_per_task)."""
    max_sequences: int = Field(200, ge=1)
    """user data: held-out sequences scored (AR loss and slot accuracy)."""


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def generate_completions(
    model, tokenizer, prompts: list[str], cfg: EvalConfig, prompt_format: str = "text"
) -> list[str]:
    """AR completions via HF generate (training-format prompts, pure temperature sampling)."""
    outs = hf_generate(
        model,
        tokenizer,
        prompts,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.batch_size,
        cfg.seed,
        prompt_format,
    )
    return tokenizer.batch_decode(outs, skip_special_tokens=True)


def solve_rate(
    model, tokenizer, samples: list[TaskSample], cfg: EvalConfig, prompt_format: str = "text"
) -> dict:
    """{"overall": {...}, "per_task": {task: {"solved", "n", "rate", "ci95"}}}; prompts in `prompt_format`."""
    completions = generate_completions(model, tokenizer, [s.prompt for s in samples], cfg, prompt_format)
    by_task: dict[str, list[int]] = defaultdict(list)
    for s, c in zip(samples, completions, strict=True):
        by_task[s.task].append(int(score(s, c) == 1.0))

    def summary(xs: list[int]) -> dict:
        k, n = sum(xs), len(xs)
        return {"solved": k, "n": n, "rate": k / n, "ci95": wilson(k, n)}

    return {
        "overall": summary([x for xs in by_task.values() for x in xs]),
        "per_task": {t: summary(xs) for t, xs in sorted(by_task.items())},
        "temperature": cfg.temperature,
        "example": completions[0] if completions else "",
    }


LOGIT_BUDGET = (
    2**28
)  # logits per evaluation forward (1 GiB in fp32): batches shrink for long sequences and big vocabs


def eval_batches(examples: list[Example], vocab_size: int, batch_size: int, halves: int = 1):
    """Consecutive chunks of at most `batch_size` examples whose padded logits ([B, halves * S, V]) fit LOGIT_BUDGET
    (at least one example each)."""
    i = 0
    while i < len(examples):
        j, longest = i, 0
        while j < len(examples) and j - i < batch_size:
            longest = max(longest, len(examples[j].ids))
            if j > i and (j + 1 - i) * halves * longest * vocab_size > LOGIT_BUDGET:
                break
            j += 1
        yield examples[i:j]
        i = j


@torch.no_grad()
def heldout_loss(
    policy, tokenizer, examples: list[Example], exclude_prompt: bool = True, batch_size: int = 32
):
    """Token-weighted mean next-token CE over the target tokens of `examples` (AR mode)."""
    policy.eval()
    total, count = 0.0, 0
    V = policy.model.get_input_embeddings().weight.shape[0]
    for chunk in eval_batches(examples, V, batch_size):
        batch = collate(chunk, pad_id(tokenizer), exclude_prompt)
        dev = next(policy.parameters()).device
        logits = policy.model(
            input_ids=batch.input_ids.to(dev), attention_mask=batch.valid.to(dev)
        ).logits.cpu()
        n = int(batch.loss_mask[:, 1:].sum())
        total += float(ar_ce(logits, batch.input_ids, batch.loss_mask)) * n
        count += n
    return total / max(1, count)


@torch.no_grad()
def diffusion_slot_accuracy(
    policy, tokenizer, examples: list[Example] | list[TaskSample], batch_size: int = 32
) -> list[float]:
    """Top-1 accuracy of diffusion slots 0..K on held-out gold sequences (K+1-sized blocks, all shifts), over
    blocks that start on a target token."""
    policy.eval()
    K = policy.block_size
    n = K + 1
    hits = torch.zeros(n)
    counts = torch.zeros(n)
    examples = [e if isinstance(e, Example) else encode(tokenizer, e) for e in examples]
    V = policy.model.get_input_embeddings().weight.shape[0]
    for chunk in eval_batches(examples, V, batch_size, halves=2):
        batch = collate(chunk, pad_id(tokenizer), exclude_prompt=True)
        S = batch.input_ids.shape[1]
        pos = torch.arange(S)[None]
        for shift in range(n):
            dev = next(policy.parameters()).device
            out = policy.tidar_forward(
                batch.input_ids.to(dev), batch.valid.to(dev), block_size=n, shift=shift
            )
            correct = out.diff_logits.argmax(-1).cpu() == batch.input_ids  # [B, S]
            blk = (torch.arange(S) + shift) // n
            start = (blk * n - shift).clamp(min=0)
            slot = pos - start[None]  # [1, S]
            starts_on_target = batch.loss_mask.gather(1, start[None].expand(len(chunk), -1)) == 1
            ok = starts_on_target & (batch.valid == 1) & (slot < n)
            for j in range(n):
                sel = ok & (slot == j)
                hits[j] += (correct & sel).sum()
                counts[j] += sel.sum()
    return (hits / counts.clamp(min=1)).tolist()


def main(argv: list[str] | None = None) -> int:
    """`python -m trainers.lm.evaluate CHECKPOINT [--samples-per-task N] [--json FILE]`: held-out solve rate (and the
    diffusion slot accuracy for converted checkpoints) on the data config of a preset."""
    import argparse
    import json
    from pathlib import Path

    from pydantic import ConfigDict

    from common.config import load_config
    from policy.hybrid import HybridPolicy
    from policy.metadata import load_tokenizer
    from trainers.lm.data import DataConfig, heldout_samples

    class PresetSections(Section):
        """The data and eval sections of a pretrain / convert preset (its other sections are not read here)."""

        model_config = ConfigDict(extra="ignore")
        data: DataConfig = DataConfig()
        eval: EvalConfig = EvalConfig()

    ap = argparse.ArgumentParser(prog="python -m trainers.lm.evaluate", description=main.__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--config", default="convert_tiny_moe", help="preset whose data/eval sections are used")
    ap.add_argument("--samples-per-task", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--prompt-format",
        default="auto",
        choices=["auto", "text", "raw", "chat"],
        help="auto = the checkpoint's training format (e.g. chat for a checkpoint written before formats were recorded)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(PresetSections, args.config, [f"data.heldout_per_task={args.samples_per_task}"])
    policy = HybridPolicy.from_pretrained(args.checkpoint)
    tok = load_tokenizer(args.checkpoint)
    samples = heldout_samples(cfg.data)
    fmt = policy.resolve_prompt_format(args.prompt_format)
    solve = solve_rate(policy.model, tok, samples, cfg.eval, fmt)
    out = {"checkpoint": args.checkpoint, "prompt_format": fmt, "solve": solve}
    if policy.is_converted:
        encoded = [encode(tok, s, fmt) for s in samples]
        acc = diffusion_slot_accuracy(policy, tok, encoded)
        out |= {
            "slot_accuracy": acc,
            "slot0_accuracy": acc[0],
            "mean_draft_slot_accuracy": sum(acc[1:]) / (len(acc) - 1),
        }
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
