"""The history draft source's own cost, apart from any model: bytes held per indexed token, and microseconds per
token extended and per draft proposed, on GRPO-shaped traffic (groups of 8 rows of `--tokens` tokens each, a vocabulary
of `--vocab`, text drawn so that siblings share spans as real groups do). JSON on stdout.

    python scripts/history_cost.py --groups 64 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import random
import time
import tracemalloc

from rollout.history import HistorySettings, HistoryStore


def sibling_text(rng: random.Random, base: list[int], vocab: int, copy: float) -> list[int]:
    """A sibling: copies spans of the group's base text with probability `copy` per token, else random tokens."""
    out, i = [], 0
    while len(out) < len(base):
        if rng.random() < copy:
            n = rng.randint(4, 16)
            out += base[i : i + n]
            i += n
        else:
            out.append(rng.randrange(vocab))
            i += 1
    return out[: len(base)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--copy", type=float, default=0.5)
    ap.add_argument("--step", type=int, default=4, help="tokens a row commits per step")
    args = ap.parse_args()

    def workload():
        rng = random.Random(0)
        store = HistoryStore(HistorySettings())
        times = [0.0, 0.0, 0, 0]  # extend s, propose s, tokens extended, proposals
        for g in range(args.groups):
            prompt = [rng.randrange(args.vocab) for _ in range(32)]
            base = [rng.randrange(args.vocab) for _ in range(args.tokens)]
            rows = [store.begin(g, prompt) for _ in range(args.group_size)]
            texts = [sibling_text(rng, base, args.vocab, args.copy) for _ in rows]
            for pos in range(0, args.tokens, args.step):
                for row, text in zip(rows, texts, strict=True):
                    new = text[pos : pos + args.step]
                    t0 = time.perf_counter()
                    row.extend(new)
                    t1 = time.perf_counter()
                    row.propose(16)
                    times[0] += t1 - t0
                    times[1] += time.perf_counter() - t1
                    times[2] += len(new)
                    times[3] += 1
            for row in rows:
                row.finish()
        return store, times

    store, (extend_s, propose_s, extended, proposals) = workload()  # timed without tracing
    tracemalloc.start()
    traced = workload()  # kept alive: what it holds is what is measured
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "config": vars(args),
                "tokens_indexed": traced[0].tokens,
                "bytes_per_token": held / max(1, store.tokens),
                "extend_us_per_token": 1e6 * extend_s / extended,
                "propose_us": 1e6 * propose_s / proposals,
                "note": "bytes from a second, traced run of the same workload; a real run's per-step cost is bench "
                "--profile's `history` phase",
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
