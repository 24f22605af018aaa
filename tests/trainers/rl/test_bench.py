"""`blockrl learner-bench` end to end on the shipped checkpoint, at a toy size: every arm is timed on the same
rollouts, the reference arm's ratio is 1, and the JSON names the batch it measured."""

import json

from trainers.cli import main


def test_learner_bench_times_every_arm_against_the_reference(tmp_path, capsys):
    out = tmp_path / "lb.json"
    args = ["learner-bench", "--json", str(out), "--set", f"run_dir={tmp_path}"]
    for s in ("prompts=2", "group_size=2", "max_new_tokens=8", "rounds=2", "minibatches=1", "threads=1"):
        args += ["--set", s]
    arms = (
        "arms=[{name: none, lambda_diff: 0}, {name: full, diffusion: full}, {name: blocks, diff_blocks: 2,"
        " diff_width: null, diff_target: ar}, {name: packed, diff_blocks: 3, diff_width: 1}]"
    )
    assert main([*args, "--set", arms]) == 0
    result = json.loads(out.read_text())
    assert [a["name"] for a in result["arms"]] == ["none", "full", "blocks", "packed"]
    per_row = {a["name"]: a["blocks_per_row"] for a in result["arms"]}
    assert per_row["none"] is None and per_row["full"] is None and per_row["blocks"] == 2.0
    assert 1.0 <= per_row["packed"] <= 3.0
    assert result["reference"] == "none" and result["arms"][0]["ratio"] == 1.0
    assert all(len(a["step_s"]) == 1 and a["median_s"] > 0 for a in result["arms"])
    assert result["batch"]["rows"] == 4 and result["batch"]["padded_len"] > 0
    assert "overhead" in capsys.readouterr().out
