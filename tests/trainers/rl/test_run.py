"""`blockrl train` smoke test with Ray workers, and resume without a duplicated or missing step."""

import contextlib
import json

import pytest
import ray

from trainers.cli import main

SMALL = [
    "--set",
    "prompts_per_step=3",
    "--set",
    "group_size=2",
    "--set",
    "wandb=disabled",
    "--set",
    "checkpoint_every=1",
    "--set",
    "rollout.workers=2",
    "--set",
    "rollout.cpus_per_worker=0.5",
    "--set",
    "rollout.max_new_tokens=48",
]


def test_train_smoke_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    try:
        assert main(["train", "--set", f"run_dir={run}", "--set", "steps=2", *SMALL]) == 0
        out = capsys.readouterr().out
        assert "step 1/2 | reward" in out and "step 2/2 | reward" in out  # one dense line per step
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


def test_train_resumes_after_sigkill_without_duplicated_or_missing_steps(tmp_path):
    """SIGKILL the whole `blockrl train` process tree mid-run, then `--resume`: metrics.jsonl has 1..N exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "trainers.cli",
        "train",
        "--set",
        f"run_dir={run}",
        "--set",
        "steps=4",
        *SMALL,
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"train exited early: {proc.stderr.read().decode()[-2000:]}"
        # end exactly what we started: the driver and its descendants (Ray's raylet/GCS/workers), by pid
        tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert 2 <= len(killed_at) < 4
    try:
        assert main(["train", "--set", f"run_dir={run}", "--set", "steps=4", "--resume", *SMALL]) == 0
    finally:
        ray.shutdown()
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_train_with_a_learner_group_colocated_then_resumed_by_one_rank(tmp_path, capsys):
    """2 FSDP ranks hosting the rollout engines (colocated) for 2 steps, then `--resume` under 1 rank with separate
    workers: every step once, on-policy throughout, each colocated step with its memory per phase."""
    run = tmp_path / "run"
    group = [
        "--set",
        "learner.world_size=2",
        "--set",
        "learner.strategy=fsdp",
        "--set",
        "learner.cpus_per_rank=0.5",
    ]
    try:
        argv = [
            "train",
            "--set",
            f"run_dir={run}",
            "--set",
            "steps=2",
            "--set",
            "colocate=true",
            *SMALL,
            *group,
        ]
        assert main(argv) == 0
        resume = ["train", "--set", f"run_dir={run}", "--set", "steps=3", "--resume", *SMALL]
        assert main([*resume, "--set", "sync.transport=collective"]) == 0
    finally:
        ray.shutdown()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/logprob_mismatch"] <= 1e-3 for r in records)  # exact samples of the policy trained
    assert all(r["memory/rollout_gb"] > 0 and r["memory/train_gb"] > 0 for r in records[:2])
    assert (
        records[1]["sync/collective"] == 0 and records[2]["sync/collective"] == 1
    )  # in process, then buckets


def test_a_killed_learner_rank_stops_the_job_naming_it_and_resume_loses_no_step(tmp_path):
    """SIGKILL one learner rank's process mid-run: `blockrl train` exits (no hang) naming the rank and the resume
    command; `--resume` then runs the remaining steps, each exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    run = tmp_path / "run"
    group = [
        "--set",
        "learner.world_size=2",
        "--set",
        "learner.cpus_per_rank=0.5",
        "--set",
        "learner.timeout_s=20",
    ]
    args = [
        sys.executable,
        "-m",
        "trainers.cli",
        "train",
        "--set",
        f"run_dir={run}",
        "--set",
        "steps=5",
        *SMALL,
    ]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([*args, *group], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"train exited early: {proc.stderr.read().decode()[-2000:]}"
        # a rank is a descendant of the driver we started (under its local Ray): end it by its pid
        ranks = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "LearnerRank" in " ".join(p.cmdline())
        ]
        assert ranks, "no learner rank process found"
        t0 = time.time()
        os.kill(ranks[-1].pid, signal.SIGKILL)
        code = proc.wait(timeout=180)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert code == 1, err[-3000:]
    assert "learner rank" in err and "died" in err and "--resume" in err, err[-3000:]
    assert elapsed < 120  # within the collective deadline and shutdown, never a hang
    done = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert done == list(range(1, len(done) + 1)) and len(done) < 5
    try:
        assert main(["train", "--set", f"run_dir={run}", "--set", "steps=5", "--resume", *SMALL, *group]) == 0
    finally:
        ray.shutdown()
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_train_ppo_on_the_multi_turn_env_with_async_rollouts(tmp_path):
    """PPO (value head + GAE) on the calculator env, rollouts one step off-policy: the run completes, steps after
    the first train on rollouts one version old, and env turns never count as model tokens."""
    run = tmp_path / "run"
    try:
        assert (
            main(
                [
                    "train",
                    "--set",
                    f"run_dir={run}",
                    "--set",
                    "steps=3",
                    "--set",
                    "env=blockrl/calc-chain_sum-v0",
                    "--set",
                    "learner.algo=ppo",
                    "--set",
                    "async_rollouts=true",
                    *SMALL,
                ]
            )
            == 0
        )
    finally:
        ray.shutdown()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["rollout/staleness"] for r in records] == [0.0, 1.0, 1.0]
    assert all("train/value_loss" in r and "reward/chain_sum/mean" in r for r in records)
    assert records[0]["rollout/logprob_mismatch"] <= 1e-3  # the first step is on-policy


REWARD_MODULE = """
import json, os

LOG = os.path.join(os.path.dirname(__file__), "calls.jsonl")


def correct(prompts, completions, completion_ids, answer, difficulty, **kwargs):
    with open(LOG, "a") as f:
        for p, c, a, d in zip(prompts, completions, answer, difficulty):
            f.write(json.dumps({"prompt": p, "completion": c, "answer": a, "difficulty": d}) + "\\n")
    return [float(c.strip().endswith(str(a))) for c, a in zip(completions, answer)]


def brevity(prompts, completions, completion_ids, **kwargs):
    return [None if len(ids) < 3 else -len(ids) / 100 for ids in completion_ids]
"""


def test_train_on_the_researchers_prompt_file_and_reward_functions(tmp_path):
    """The user's own task: a JSONL prompt file with extra columns and a reward module written here; 2 steps train,
    the columns reach the reward functions, and the logged rewards are the functions' weighted sums."""
    from envs import splits

    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    pool = splits.rl_prompt_pool(["letter_counting"], 5)["letter_counting"][:12]
    rows = [
        {"prompt": s.prompt, "answer": s.entry["answer"], "difficulty": i % 3} for i, s in enumerate(pool)
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    try:
        argv = ["train", "--set", f"run_dir={run}", "--set", "steps=2", "--set", "eval_every=2", *SMALL]
        argv += ["--set", f"prompts.files=[{tmp_path / 'prompts.jsonl'}]", "--set", "prompts.heldout_rows=3"]
        # under a placement group: the learner's bundle (1 CPU) and one of half a CPU per worker, on 2 cores
        argv += ["--set", "rollout.placement=pack", "--set", "rollout.cpus_per_worker=0.5"]
        argv += [
            "--set",
            f"rewards=[{{function: {tmp_path / 'my_rewards.py'}:correct}}, "
            f"{{function: {tmp_path / 'my_rewards.py'}:brevity, weight: 0.5}}]",
        ]
        assert main(argv) == 0
    finally:
        ray.shutdown()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]  # held-out reward before step 1 and after the last
    calls = [json.loads(ln) for ln in (tmp_path / "calls.jsonl").read_text().splitlines()]
    by_prompt = {r["prompt"]: r for r in rows}
    assert all(
        by_prompt[c["prompt"]]["answer"] == c["answer"] for c in calls
    )  # columns travel with their row
    assert all(by_prompt[c["prompt"]]["difficulty"] == c["difficulty"] for c in calls)
    # held-out (3 rows x 1), step 1 and step 2 (3 prompts x group 2 each), held-out again
    assert len(calls) == 3 + 6 + 6 + 3
    heldout, step1, trained = calls[:3], calls[3:9], calls[3:15]
    assert [c["prompt"] for c in calls[-3:]] == [c["prompt"] for c in heldout]
    assert not {c["prompt"] for c in heldout} & {c["prompt"] for c in trained}
    mean_correct = sum(float(c["completion"].strip().endswith(str(c["answer"]))) for c in step1) / 6
    assert records[1]["reward/fn/correct/mean"] == pytest.approx(mean_correct)
    assert "reward/prompts/mean" in records[1] and records[1]["reward/failures"] == 0
    assert "eval/reward_mean" in records[0] and "eval/reward_mean" in records[2]
    # weight sync is measured where it happens: step 2 publishes version 1 (step 1 ran on the checkpoint's weights)
    assert "time/weight_sync_s" not in records[1] and records[2]["time/weight_sync_s"] > 0
    # on CPU workers `auto` picks the object store: every byte of the policy arrived, tied weights once
    assert records[2]["sync/bytes"] > 2**20 and records[2]["sync/collective"] == 0
    assert records[2]["sync/fallback"] == 0


def test_two_rl_steps_in_bf16_on_cpu(tmp_path):
    """bf16 rollout workers (weights in bf16, sampling and log-probs in fp32) and a bf16-autocast learner: 2 steps run
    and the learner's fp32 log-probs stay close to the bf16 workers' (they differ by bf16 rounding only)."""
    run = tmp_path / "run"
    try:
        argv = ["train", "--set", f"run_dir={run}", "--set", "steps=2", *SMALL]
        argv += [
            "--set",
            "rollout.dtype=bfloat16",
            "--set",
            "learner.autocast=bfloat16",
            "--set",
            "rollout.device=cpu",
        ]
        assert main(argv) == 0
    finally:
        ray.shutdown()
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 < r["rollout/logprob_mismatch"] < 0.2 for r in records)  # bf16 workers: close, not exact
    assert all(r["rollout/tokens_per_forward"] > 1.0 for r in records)
