"""`blockrl sync-bench` end to end on the shipped checkpoint: both transports timed, every worker checked bit for bit
against the learner after the last round (the bench raises otherwise), JSON written."""

import json

import ray

from trainers.cli import main


def test_sync_bench_cli_times_both_transports(tmp_path, capsys):
    out = tmp_path / "sync.json"
    argv = ["sync-bench", "--set", f"run_dir={tmp_path / 'run'}", "--set", "random_params_m=0"]
    try:
        assert main([*argv, "--set", "rounds=2", "--set", "workers=1", "--json", str(out)]) == 0
    finally:
        ray.shutdown()
    result = json.loads(out.read_text())
    shipped = result["models"]["shipped"]
    for transport in ("collective", "object_store"):
        assert shipped[transport]["bytes"] > 2**20 and len(shipped[transport]["seconds"]) == 2
        assert shipped[transport]["gb_per_s"] > 0
    assert (
        shipped["collective"]["bytes"] == shipped["object_store"]["bytes"]
    )  # the same weights, tied ones once
    assert "collective" in capsys.readouterr().out
