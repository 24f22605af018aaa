"""The family sweep with the decode step compiled: for every family the sweep builds (tests/policy/test_families.py),
does `compile: on` compile, or fall back to eager with its one logged reason, and is its greedy output still HF's?

    .venv/bin/python scripts/compile_sweep.py --out docs/compile_families.md [--families llama qwen3_moe ...]

Too slow for `make test` (each family compiles its own graphs: about 10-40 s each on 2 CPU cores); the test suite
covers the compiled step on the shipped shapes (tests/rollout/test_compile.py). Writes a markdown table as it goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / "runs" / "compile_sweep" / ".inductor"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from policy.compiled import MAX_GRAPHS  # noqa: E402
from policy.hybrid import UnsupportedModelError  # noqa: E402
from rollout import BlockEngine  # noqa: E402
from tests.policy.test_families import (  # noqa: E402
    FAMILIES,
    NEW_TOKENS,
    NO_TINY_CONFIG,
    PROMPTS,
    REFUSED,
    build_policy,
    hf_greedy,
)


def sweep_one(family: str) -> tuple[str, str, float]:
    """(status, detail, compile seconds) of one family."""
    if family in NO_TINY_CONFIG:
        return "no tiny config", NO_TINY_CONFIG[family], 0.0
    if family in REFUSED:
        return "refused", REFUSED[family], 0.0
    try:
        policy = build_policy(family)
    except UnsupportedModelError as e:
        return "refused", str(e), 0.0
    torch._dynamo.reset()
    eng = BlockEngine(policy, sampler="lossless", levels=[0, 2], max_batch=3, drafts="both", compile="on")
    got = eng.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=None)
    same = [t.tokens for t in got] == [hf_greedy(policy, p, NEW_TOKENS) for p in PROMPTS]
    body = eng.body
    if body.fallback is not None:
        return "eager (fallback)", body.fallback + ("" if same else "; greedy DIFFERS from HF"), 0.0
    status = "compiled" if same else "compiled, greedy DIFFERS from HF"
    if body.graphs > MAX_GRAPHS:  # more than a settled step has: it recompiles per shape
        status += ", recompiles"
    return status, f"{body.graphs} graphs", body.compile_seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/compile_families.md")
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    families = args.families or FAMILIES
    out = Path(args.out)
    lines = [
        "# The compiled decode step across families",
        "",
        f"`scripts/compile_sweep.py` ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, CPU inductor, "
        f"{args.threads} threads): each family's tiny model (tests/policy/test_families.py) decodes a ragged "
        "batch at T = 0 with `compile: on`; its tokens are checked against HF greedy generate.",
        "",
        "| family | status | detail | compile s |",
        "|---|---|---|---:|",
    ]
    counts: dict[str, int] = {}
    for i, family in enumerate(families, 1):
        t0 = time.perf_counter()
        try:
            status, detail, seconds = sweep_one(family)
        except Exception as e:  # a failure outside the compiled body: report it, go on
            status, detail, seconds = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", 0.0
        counts[status] = counts.get(status, 0) + 1
        detail = detail.replace("|", "/")
        lines.append(f"| {family} | {status} | {detail} | {seconds:.1f} |")
        print(
            f"[{i}/{len(families)}] {family}: {status} ({time.perf_counter() - t0:.0f}s) {detail}", flush=True
        )
        out.write_text(
            "\n".join([*lines, "", "Totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()), ""])
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
