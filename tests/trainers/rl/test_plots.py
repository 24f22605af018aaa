"""RL run comparison: the markdown table's windows and changes, and the PNG, from metrics.jsonl files."""

import json

from trainers.rl.plots import compare_table, plot_compare


def write_run(path, tpf: list[float], train_s: float):
    path.mkdir()
    with (path / "metrics.jsonl").open("w") as f:
        for i, t in enumerate(tpf, start=1):
            rec = {"step": i, "rollout/tokens_per_forward": t, "rollout/accept_rate": t / 10}
            rec |= {"reward/mean": 0.5, "time/train_s": train_s}
            f.write(json.dumps(rec) + "\n")
    return path


def test_compare_table_reports_first_and_last_windows(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / ".mpl"))
    a = write_run(tmp_path / "a", [2.0] * 5 + [3.0] * 10 + [4.0] * 5, 1.5)
    b = write_run(tmp_path / "b", [8.0] * 20, 3.0)
    table = compare_table({"cheap": a, "none": b}).splitlines()
    assert len(table) == 4
    assert table[2] == "| cheap | 2.00 -> 4.00 | +100.0% | 0.20 -> 0.40 | +100.0% | 0.500 | 1.50 |"
    assert "| none | 8.00 -> 8.00 | +0.0% |" in table[3]
    out = plot_compare({"cheap": a, "none": b}, tmp_path / "cmp.png")
    assert out.stat().st_size > 1000
