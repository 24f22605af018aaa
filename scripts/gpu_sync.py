"""GPU check stage: weight sync by collective over NCCL, one process per GPU (NCCL cannot join two processes on one
GPU: on a one-GPU machine this stage reports itself skipped). Rank 0 sends the policy's weights as byte buckets from
cuda:0, rank 1 loads them in place on cuda:1; prints bytes, seconds, GB/s and whether the weights match bit for bit.

    python scripts/gpu_sync.py --checkpoint checkpoints/tiny-moe --out sync.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from policy.hybrid import HybridPolicy
from rollout.weight_sync import SyncAddress, SyncGroup, receive, send, sync_targets
from rollout.worker import weights_digest


def member(rank: int, port: int, checkpoint: str, rounds: int, queue) -> None:
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    policy = HybridPolicy.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device)
    if rank == 1:  # start from other weights, so a match proves the sync
        with torch.no_grad():
            for p in policy.parameters():
                p.zero_()
    group = SyncGroup(SyncAddress("127.0.0.1", port, "gpu/", 2, 120.0, backend="nccl"), rank, device)
    targets = sync_targets(policy.model)
    stats = []
    for v in range(rounds):
        torch.cuda.synchronize()
        s = (
            send(group, {n: t.detach() for n, t in targets.items()}, v, 256.0)[0]
            if rank == 0
            else receive(group, targets, v)
        )
        torch.cuda.synchronize()
        stats.append(s)
    queue.put((rank, weights_digest(policy), [(s.nbytes, s.seconds) for s in stats]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="checkpoints/tiny-moe")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="sync.json")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        print(f"skipped: NCCL needs a GPU per process; this machine has {torch.cuda.device_count()}")
        Path(args.out).write_text(json.dumps({"skipped": "one GPU"}))
        return
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=member, args=(r, store.port, args.checkpoint, args.rounds, queue)) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    got = dict((r, (d, s)) for r, d, s in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(60)
    nbytes, secs = got[1][1][-1][0], sorted(s for _, s in got[1][1][1:])
    med = secs[len(secs) // 2]
    out = {
        "bytes": nbytes,
        "median_s": med,
        "gb_per_s": nbytes / med / 1e9,
        "bit_equal": got[0][0] == got[1][0],
    }
    print(json.dumps(out))
    Path(args.out).write_text(json.dumps(out))
    sys.exit(0 if out["bit_equal"] else 1)


if __name__ == "__main__":
    main()
