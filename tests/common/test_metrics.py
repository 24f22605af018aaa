"""Metric sinks: dense stdout line, resume-safe JSONL, offline wandb kept inside the run directory."""

from common.metrics import JSONLSink, MultiSink, StdoutSink, WandbSink, format_line


def test_format_line_is_dense_and_flags_alarms():
    line = format_line(
        42,
        200,
        {
            "reward/mean": 0.61,
            "reward/std": 0.2,
            "rollout/tokens_per_forward": 5.8,
            "perf/tok_per_s": 18400,
            "time/rollout_s": 4.1,
            "time/train_s": 2.3,
            "time/weight_sync_s": 0.14,
            "memory/train_gb": 1.04,
            "memory/rollout_gb": 0.93,
            "drift/reward_mean_alarm": 1.0,
        },
    )
    assert line.startswith("step 42/200 | reward 0.61±0.20 | tpf 5.8")
    assert "tok/s 18.4k" in line and "rollout 4.1s train 2.3s sync 0.1s | mem 1.0GB" in line
    assert "ALARM reward_mean" in line


def test_the_step_0_evaluation_prints_its_values():
    assert format_line(0, 3, {"eval/reward_mean": 0.25}) == "step 0/3 | held-out reward 0.250"
    assert format_line(0, 3, {"eval/solve_rate": 0.5}) == "step 0/3 | held-out solve 50.0%"


def test_jsonl_truncates_records_past_the_resumed_step(tmp_path):
    sink = JSONLSink(tmp_path / "metrics.jsonl")
    for s in range(1, 6):
        sink.log(s, {"reward/mean": s / 10})
    sink.truncate_after(3)
    sink.log(4, {"reward/mean": 0.9})
    assert [r["step"] for r in sink.read()] == [1, 2, 3, 4]


def test_wandb_offline_writes_inside_the_run_dir(tmp_path, capsys):
    w = WandbSink(tmp_path, project="blockrl-test", config={"a": 1}, mode="offline")
    MultiSink([w, StdoutSink(2)]).log(1, {"reward/mean": 0.5})
    w.close()
    assert "step 1/2 | reward 0.50" in capsys.readouterr().out
    assert any((tmp_path / "wandb").iterdir())
