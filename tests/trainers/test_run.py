"""`blockrl train` smoke test with Ray workers, and resume without a duplicated or missing step."""

import json

import ray

from trainers.cli import main

SMALL = ["--set", "prompts_per_step=3", "--set", "group_size=2", "--set", "wandb=disabled",
         "--set", "checkpoint_every=1", "--set", "rollout.workers=2", "--set", "rollout.cpus_per_worker=0.5",
         "--set", "rollout.max_new_tokens=48"]  # fmt: skip


def test_train_smoke_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    try:
        assert main(["train", "--set", f"run_dir={run}", "--set", "steps=2", *SMALL]) == 0
        assert "reward" in capsys.readouterr().out
        assert main(["train", "--set", f"run_dir={run}", "--set", "steps=3", "--resume", *SMALL]) == 0
    finally:
        ray.shutdown()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/logprob_mismatch"] <= 1e-3 for r in records)  # lossless rollouts are on-policy
    assert all(r["rollout/tokens_per_forward"] > 1.0 for r in records)
    assert (run / "checkpoint" / "trainer_state.pt").is_file() and (run / "config.yaml").is_file()
    assert (run / "curves.png").stat().st_size > 0


def test_train_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert main(["train", "--set", f"checkpoint={tmp_path / 'nope'}", "--set", f"run_dir={tmp_path}"]) == 2
    assert "checkpoint:" in capsys.readouterr().err
