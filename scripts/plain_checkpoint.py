"""Write a converted blockrl checkpoint's AR model as a plain Hugging Face checkpoint: the same weights and
tokenizer, without blockrl's metadata, so blockrl loads it unconverted (no mask token, no drafter). What the history
draft benchmarks run as "a model nobody converted" (docs/benchmarks.md, "Drafts from history").

    python scripts/plain_checkpoint.py checkpoints/tiny-moe runs/plain-tiny-moe
"""

from __future__ import annotations

import sys

from policy.hybrid import HybridPolicy
from policy.metadata import METADATA_KEY, load_tokenizer


def main(src: str, dst: str) -> None:
    policy = HybridPolicy.from_pretrained(src)
    if hasattr(policy.model.config, METADATA_KEY):
        delattr(policy.model.config, METADATA_KEY)
    policy.model.save_pretrained(dst)
    load_tokenizer(src).save_pretrained(dst)
    print(f"{dst}: plain HF checkpoint of {src} (loads unconverted)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/plain_checkpoint.py SRC DST")
    main(*sys.argv[1:])
