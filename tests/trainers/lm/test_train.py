"""CLI smoke tests of `blockrl pretrain` / `blockrl convert` on the tiny preset, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import ConfigError
from policy import HybridPolicy
from tests.conftest import make_policy
from trainers.cli import main
from trainers.lm.train import choose_training_attention

FAST = [
    "--set",
    "eval.samples_per_task=4",
    "--set",
    "eval.max_new_tokens=40",
    "--set",
    "data.heldout_per_task=4",
]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_then_convert_cli(tmp_path):
    """pretrain writes config, metrics, checkpoint and final; convert turns that into a loadable hybrid."""
    pre, conv = tmp_path / "pre", tmp_path / "conv"
    assert (
        main(
            [
                "pretrain",
                "--set",
                f"run_dir={pre}",
                "--set",
                "optim.steps=10",
                "--set",
                "snapshot_steps=[5]",
                *FAST,
            ]
        )
        == 0
    )
    assert (pre / "config.yaml").is_file() and (pre / "final" / "config.json").is_file()
    assert steps_logged(pre) == [5, 10]
    assert (pre / "step-5" / "config.json").is_file()
    assert "solve" in json.loads((pre / "eval.json").read_text())
    code = main(
        [
            "convert",
            "--set",
            f"run_dir={conv}",
            "--set",
            f"init={pre / 'final'}",
            "--set",
            "optim.steps=10",
            *FAST,
        ]
    )
    assert code == 0
    result = json.loads((conv / "eval.json").read_text())
    assert len(result["slot_accuracy"]) == 17  # slots 0..K for K=16
    policy = HybridPolicy.from_pretrained(conv / "final")
    assert policy.is_converted and policy.block_size == 16
    losses = [json.loads(ln) for ln in (conv / "metrics.jsonl").read_text().splitlines()]
    assert {"ar_loss", "diff_loss", "aux_loss"} <= set(losses[0])


def _run(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainers.cli", *args], env=env, **kw)


def test_pretrain_resume_after_sigkill_is_exact(tmp_path):
    """SIGKILL mid-run, then --resume: same final weights as an uninterrupted run, no duplicated or missing step."""
    common = [
        "pretrain",
        "--set",
        "optim.steps=30",
        "--set",
        "log_every=1",
        "--set",
        "checkpoint_every=10",
        *FAST,
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*common, "--set", f"run_dir={straight}"]) == 0

    proc = _run([*common, "--set", f"run_dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoint" / "trainer_state.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # let it run past the checkpoint, so the log holds steps the resume must drop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "run finished before it could be killed"

    assert main([*common, "--set", f"run_dir={killed}", "--resume"]) == 0
    assert steps_logged(killed) == list(range(1, 31))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_training_attention_choice_on_cpu():
    """attention: flex cannot train on CPU (no FlexAttention backward there): refused by field; auto means dense."""
    policy = make_policy("llama", "sdpa")
    with pytest.raises(ConfigError, match="attention: flex needs CUDA"):
        choose_training_attention(policy, "flex", torch.device("cpu"))
    choose_training_attention(policy, "auto", torch.device("cpu"))
    assert policy.training_attention == "dense"
