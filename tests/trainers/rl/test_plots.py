"""RL run comparison: the markdown table's windows and changes, and the PNG, from metrics.jsonl files."""

import json

from trainers.rl.plots import compare_table, plot_compare, plot_run, run_figure


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


def test_run_curves_name_every_line_and_use_whole_steps(tmp_path, monkeypatch):
    """A prompt-file run: each reward function by its name (not "fn"), the accept rate in the legend beside tokens
    per forward, the held-out mean reward from step 0 on, and integer step ticks."""
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / ".mpl"))
    recs = [{"step": 0, "eval/reward_mean": 0.2}]
    for i in (1, 2, 3):
        recs.append(
            {
                "step": i,
                "reward/mean": 0.1 * i,
                "reward/fn/correct/mean": 0.1 * i,
                "reward/fn/my_rewards.py:brevity/mean": 0.5,
                "rollout/tokens_per_forward": 3.0 + i,
                "rollout/accept_rate": 0.5,
            }
        )
    recs.append({"step": 3, "eval/reward_mean": 0.4})
    fig = run_figure(recs)
    reward, accept, heldout = fig.axes[:3]
    assert [t.get_text() for t in reward.get_legend().get_texts()] == [
        "all",
        "correct",
        "my_rewards.py:brevity",
    ]
    assert [t.get_text() for t in accept.get_legend().get_texts()] == ["tokens per forward", "accept rate"]
    assert heldout.get_ylabel() == "held-out mean reward"
    assert list(heldout.lines[0].get_xdata()) == [0, 3]
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in reward.get_xticks())
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert plot_run(run).stat().st_size > 1000
