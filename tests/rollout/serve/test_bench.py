"""`blockrl serve-bench` end to end on a tiny budget: both servers, every arm at every concurrency, JSON whose
summary is the medians of its runs and whose ratios are to the HF arm of the same concurrency."""

import json
import statistics

import pytest

from rollout.serve.bench import (
    LoadRun,
    ServeBenchConfig,
    _sampler,
    format_summary,
    plot,
    run_serve_bench,
    server_of,
    summarize,
)


def test_serve_bench_runs_every_arm_side_by_side(tmp_path):
    cfg = ServeBenchConfig(
        run_dir=str(tmp_path),
        arms=["hf", "lossless"],
        concurrency=[1, 2],
        requests=3,
        repeats=1,
        max_tokens=8,
        max_batch=2,
        device="cpu",
    )
    out = run_serve_bench(cfg, log=lambda _: None)
    runs = out["runs"]
    assert {(r["arm"], r["concurrency"]) for r in runs} == {(a, c) for a in cfg.arms for c in cfg.concurrency}
    assert all(0 < r["tokens"] <= 3 * 8 and r["failed"] == 0 for r in runs)
    for row in out["summary"]:
        hf = next(r for r in runs if r["arm"] == "hf" and r["concurrency"] == row["concurrency"])
        mine = next(r for r in runs if r["arm"] == row["arm"] and r["concurrency"] == row["concurrency"])
        assert row["vs_hf"] == pytest.approx(mine["tokens_per_s"] / hf["tokens_per_s"])
    lossless = [r for r in runs if r["arm"] == "lossless"]
    assert all(r["tokens_per_forward"] > 1 for r in lossless)  # block decoding through the API
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == out["summary"]
    plot(out, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0 and "vs hf" in format_summary(out)


def test_summary_takes_medians_over_repeats():
    runs = [
        LoadRun("hf", 8, k, 1.0, 100, tps, 0.1, 0.2, 1.0, 0) for k, tps in enumerate([100.0, 300.0, 200.0])
    ] + [LoadRun("ar", 8, k, 1.0, 100, tps, 0.1, 0.2, 1.0, 0) for k, tps in enumerate([400.0, 500.0, 600.0])]
    rows = {r["arm"]: r for r in summarize(runs)}
    assert rows["hf"]["tokens_per_s"] == statistics.median([100, 300, 200])
    assert rows["ar"]["vs_hf"] == pytest.approx(500 / 200)


def test_history_arm_serves_conversations_whose_turns_repeat_earlier_text(tmp_path):
    """`lossless+history` runs on its own server with both draft sources; with turns = 2 every conversation asks
    its question twice, and each turn is one completion."""
    import yaml

    cfg = ServeBenchConfig(
        run_dir=str(tmp_path),
        arms=["lossless", "lossless+history"],
        concurrency=[2],
        requests=2,
        turns=2,
        repeats=1,
        max_tokens=8,
        max_batch=2,
        device="cpu",
    )
    out = run_serve_bench(cfg, log=lambda _: None)
    assert {r["arm"] for r in out["runs"]} == set(cfg.arms)
    assert all(r["completions"] == 2 * 2 and r["failed"] == 0 for r in out["runs"])
    served = yaml.safe_load((tmp_path / "lossless_history.yaml").read_text())
    assert served["drafts"] == "both" and served["sampler"] == "lossless"


def test_each_arm_goes_to_its_server_with_its_sampler():
    """Compiled arms go to the engine server that compiles (`compile: on`), asking for their plain sampler; the
    history arm to its own server; the rest to the eager engine server."""
    want = {
        "hf": ("hf", None),
        "ar": ("engine", "ar"),
        "lossless": ("engine", "lossless"),
        "lossless+history": ("lossless+history", "lossless"),
        "ar+compiled": ("compiled", "ar"),
        "lossless+compiled": ("compiled", "lossless"),
    }
    assert {a: (server_of(a), _sampler(a)) for a in want} == want
