"""Data-parallel conversion under torchrun (gloo, 2 CPU processes), DDP and FSDP2: 2 x batch b follows the loss curve
of 1 x batch 2b, gradient accumulation does too, and a run stopped by one world size (and strategy) resumes exactly
under another."""

import json
import os
import subprocess
import sys

import pytest
import torch

from common.checkpoint import STATE_FILE
from policy import HybridPolicy
from policy.factory import build_model, tiny_dense_config, tiny_moe_config
from trainers.cli import main

# relative tolerances. Dense: exact up to float reduction order. MoE: the load-balancing loss is a product of a
# batch's routing means, so (as in every data-parallel MoE trainer) it is computed per micro-batch and is not the
# 2b-batch value; measured drift over 4 steps 5e-4.
TOL = {"llama": 2e-4, "moe": 2e-3}


def ar_checkpoint(path, tokenizer, kind):
    cfg = tiny_moe_config(len(tokenizer)) if kind == "moe" else tiny_dense_config(len(tokenizer))
    HybridPolicy(build_model(cfg, seed=0)).save_pretrained(path, tokenizer)


def args(init, run, *extra):
    common = {
        "init": init,
        "run_dir": run,
        "data.train_per_task": 40,
        "data.heldout_per_task": 2,
        "eval.samples_per_task": 1,
        "eval.max_new_tokens": 4,
        "eval.max_sequences": 2,
        "optim.steps": 4,
        "optim.batch_size": 8,
        "optim.warmup_steps": 1,
        "tidar.block_size": 4,
        "log_every": 1,
        "checkpoint_every": 100,
        "threads": 1,
    }
    out = ["convert", "--config", "tiny_convert"]
    for k, v in common.items():
        out += ["--set", f"{k}={v}"]
    for e in extra:
        out += ["--set", e]
    return out


def torchrun(argv, tmp_path, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    out = subprocess.run(
        [*cmd, "-m", "trainers.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs], [r["loss"] for r in recs], recs


def close(a, b, kind="llama"):
    return all(abs(x - y) <= TOL[kind] * abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", ["llama", "moe"])
def test_two_processes_follow_one_process_with_twice_the_batch(tmp_path, tokenizer, kind):
    """DDP and FSDP2 (parameters, gradients and optimizer state sharded) both follow the 1 x 2b curve."""
    init = tmp_path / "ar"
    ar_checkpoint(init, tokenizer, kind)
    one, ddp, fsdp, accum = (tmp_path / n for n in ("one", "ddp", "fsdp", "accum"))
    assert main(args(init, one)) == 0
    torchrun(args(init, ddp), tmp_path)
    torchrun(args(init, fsdp, "parallel=fsdp"), tmp_path)
    steps, ref, _ = losses(one)
    assert steps == [1, 2, 3, 4] and ref[-1] < ref[0]  # it trained
    for run in (ddp, fsdp):
        _, got, recs = losses(run)
        assert recs[0]["world_size"] == 2
        assert close(got, ref, kind), (run.name, got, ref)
    if kind == "llama":
        # FSDP's final checkpoint holds the trained weights gathered from the shards: its distance to the 1-process
        # run is a small part of the distance travelled from init (measured 3%: Adam turns reduction-order noise on
        # near-zero gradients into lr-sized steps)
        a, b, w0 = (
            HybridPolicy.from_pretrained(d).state_dict() for d in (one / "final", fsdp / "final", init)
        )
        keys = [k for k in a if a[k].shape == w0[k].shape]  # all but the embeddings grown by the mask token
        assert a.keys() == b.keys() and len(keys) >= len(a) - 2

        def dist(x, y):
            return sum(float((x[k] - y[k]).pow(2).sum()) for k in keys) ** 0.5

        assert dist(a, b) < 0.1 * dist(a, w0)
        # 1 process x 2 micro-batches of b
        assert main(args(init, accum, "optim.grad_accum=2", "activation_checkpointing=true")) == 0
        assert close(losses(accum)[1], ref)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_run_stopped_under_two_processes_resumes_exactly_under_one(tmp_path, tokenizer, parallel):
    init = tmp_path / "ar"
    ar_checkpoint(init, tokenizer, "llama")
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(args(init, full)) == 0
    torchrun(args(init, split, "stop_after=2", f"parallel={parallel}"), tmp_path)
    assert losses(split)[0] == [1, 2]
    assert main([*args(init, split), "--resume"]) == 0
    steps, got, _ = losses(split)
    assert steps == [1, 2, 3, 4] and close(got, losses(full)[1])


def test_an_index_keyed_optimizer_state_resumes(tmp_path, tokenizer):
    """Checkpoints written before the name-keyed form (optimizer.state_dict()) still resume, renamed on load."""
    init = tmp_path / "ar"
    ar_checkpoint(init, tokenizer, "llama")
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(args(init, full)) == 0
    assert main(args(init, split, "stop_after=2")) == 0
    path = split / "checkpoint" / STATE_FILE
    state = torch.load(path, weights_only=False)
    policy = HybridPolicy.from_pretrained(split / "checkpoint")
    opt = torch.optim.AdamW(policy.parameters())
    names = ["policy." + n for n, _ in policy.named_parameters()]
    index = {n: i for i, n in enumerate(names)}
    saved = state["optimizer"]
    state["optimizer"] = {  # what opt.state_dict() wrote
        "state": {index[n]: v for n, v in saved["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]],
    }
    assert isinstance(next(iter(state["optimizer"]["state"])), int) and len(opt.param_groups) == 1
    torch.save(state, path)
    assert main([*args(init, split), "--resume"]) == 0
    assert close(losses(split)[1], losses(full)[1])


def test_bf16_autocast_trains_and_matches_fp32_loosely(tmp_path, tokenizer):
    init = tmp_path / "ar"
    ar_checkpoint(init, tokenizer, "llama")
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert main(args(init, fp32, "optim.steps=2")) == 0
    assert main(args(init, bf16, "optim.steps=2", "autocast=bfloat16")) == 0
    a, b = losses(fp32)[1], losses(bf16)[1]
    assert all(abs(x - y) < 0.02 * x for x, y in zip(a, b, strict=True)) and a != b  # bf16 ran, close to fp32
