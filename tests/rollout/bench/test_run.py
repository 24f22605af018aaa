"""`blockrl bench` smoke test on a tiny converted model: every sampler runs and the JSON has the contract's keys."""

import json

import pytest

from policy import HybridPolicy
from policy.factory import build_model, tiny_moe_config
from rollout.auto import AutoSampler, engine_factory
from trainers.cli import main


def converted(path, tokenizer):
    policy = HybridPolicy(build_model(tiny_moe_config(len(tokenizer))))
    policy.convert(tokenizer, block_size=4)
    policy.save_pretrained(path, tokenizer)


def test_bench_cli_writes_json_with_all_samplers(tmp_path, tokenizer, bpe_tokenizer):
    """...and runs a second checkpoint (another tokenizer) side by side on the same prompts."""
    ckpt, other = tmp_path / "ckpt", tmp_path / "other"
    converted(ckpt, tokenizer)
    converted(other, bpe_tokenizer)
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--config",
            "bench_full",
            "--set",
            f"checkpoint={ckpt}",
            "--set",
            f"run_dir={tmp_path / 'run'}",
            "--set",
            "repeats=1",
            "--set",
            "batch_sizes=[1,2]",
            "--set",
            "max_new_tokens=12",
            "--set",
            "min_prompts=2",
            "--set",
            "prompts_per_row=1",
            "--set",
            "levels=[[0],[0,2]]",
            "--set",
            "mix_levels=[0,2]",
            "--set",
            "threads=1",
            "--set",
            "sweep.block_sizes=[2]",
            "--set",
            "sweep.draft_temperatures=[0.5]",
            "--set",
            f"compare=[{other}]",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    body = json.loads(out.read_text())
    runs = body["runs"]
    side = [r for r in runs if r["sweep"] == "checkpoint=other"]
    assert {(r["sampler"], r["batch_size"]) for r in side} == {
        (s, b) for s in ("hf", "ar", "lossless") for b in (1, 2)
    }
    assert {r["checkpoint"] for r in side} == {str(other)} and side[0]["vocab_size"] == len(bpe_tokenizer)
    summary = body["checkpoints"]  # ar and the best lossless row per checkpoint and batch size
    assert [(s["checkpoint"], s["batch_size"]) for s in summary] == [
        (c, b) for c in (str(ckpt), str(other)) for b in (1, 2)
    ]
    assert all(s["tokens_per_forward"] >= 1.0 and s["ar_tokens_per_s"] > 0 for s in summary)
    assert {r["sampler"] for r in runs} == {"hf", "ar", "lossless", "logit_mix", "auto"}
    sampled = [r for r in runs if r["sweep"] == "draft_temperature"]
    assert [(r["sampler"], r["draft_temperature"]) for r in sampled] == [("logit_mix", 0.5)]
    keys = {
        "batch_size",
        "sampler",
        "tokens_per_s",
        "speedup_vs_hf",
        "speedup_vs_ar",
        "tokens_per_forward",
        "solve_rate",
        "projected_tokens_per_s",
    }
    assert all(keys <= set(r) for r in runs)
    for r in runs:
        if r["sampler"] == "ar":
            assert r["tokens_per_forward"] == 1.0 and r["speedup_vs_ar"] == 1.0
        if r["sampler"] in ("ar", "lossless") and not r["sweep"]:
            assert r["projected_tokens_per_s"] > 0
    assert (tmp_path / "run" / "bench.png").is_file()


def test_auto_sampler_runs_and_reports_its_choice(tokenizer):
    policy = HybridPolicy(build_model(tiny_moe_config(len(tokenizer))))
    policy.convert(tokenizer, block_size=4)
    eng = AutoSampler(engine_factory(policy, tokenizer=tokenizer), policy.block_size, max_batch=2)
    trajs = eng.generate([[2, 10, 11], [2, 12], [2, 13, 14]], max_new_tokens=8, temperature=1.0)
    assert len(trajs) == 3 and all(1 <= t.num_tokens <= 8 for t in trajs)
    assert eng.last_choice is not None and {t.sampler for t in trajs} <= {o.name for o in eng.options}
    assert eng.cost.acceptance.steps > 0
    assert (
        eng.policy is policy and policy.block_size == eng.K
    )  # what the TRL adapter and regress read  # the pilot fed the live acceptance curve


SMALL = {
    "repeats": 1,
    "batch_sizes": "[2]",
    "min_prompts": 2,
    "prompts_per_row": 1,
    "threads": 1,
    "sweep.prompt_formats": "[]",
    "compare": "[]",
    "logit_mix": "true",
}


def small_bench(out, *flags, **sets) -> None:
    """`blockrl bench` at a tiny budget (B=2, one repeat, no sweeps or comparisons), JSON to `out`."""
    argv = ["bench", "--json", str(out), *flags]
    for k, v in (SMALL | sets).items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0


def test_bench_runs_in_bf16_on_cpu(tmp_path, tokenizer):
    """dtype=bfloat16: every sampler (HF generate too) runs on bf16 weights; the config is recorded in the JSON."""
    ckpt = tmp_path / "ckpt"
    converted(ckpt, tokenizer)
    out = tmp_path / "bench.json"
    small_bench(
        out,
        checkpoint=ckpt,
        run_dir=tmp_path / "run",
        dtype="bfloat16",
        device="cpu",
        max_new_tokens=8,
        levels="[[0,2]]",
        mix_levels="[0,2]",
    )
    body = json.loads(out.read_text())
    assert body["meta"]["config"]["dtype"] == "bfloat16"
    assert body["partial"] is False and body["batch_sizes_done"] == [2]  # the final write
    assert {r["sampler"] for r in body["runs"]} == {"hf", "ar", "lossless", "logit_mix", "auto"}
    assert all(r["tokens_per_s"] > 0 and r["tokens_per_forward"] >= 1.0 for r in body["runs"])


def test_a_bench_stopped_part_way_leaves_the_batch_sizes_it_finished(tmp_path, tokenizer, monkeypatch):
    """The JSON is written after each batch size (marked partial), so a run killed at a time box (the GPU check's)
    still leaves numbers: here the second batch size's cells raise, and B=1's rows are on disk."""
    import rollout.bench.run as bench_run

    ckpt = tmp_path / "ckpt"
    converted(ckpt, tokenizer)
    real, calls = bench_run.run_cells, []

    def second_batch_size_fails(cells, repeats):
        calls.append(cells[0].B)
        if len(calls) == 2:
            raise RuntimeError("stopped at the second batch size")
        return real(cells, repeats)

    monkeypatch.setattr(bench_run, "run_cells", second_batch_size_fails)
    out = tmp_path / "bench.json"
    argv = ["bench", "--json", str(out)]
    sets = SMALL | {
        "checkpoint": ckpt,
        "run_dir": tmp_path / "run",
        "batch_sizes": "[1,2]",
        "max_new_tokens": 6,
        "levels": "[[0]]",
        "logit_mix": "false",
    }
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    with pytest.raises(RuntimeError, match="second batch size"):
        main(argv)
    assert calls == [1, 2]
    body = json.loads(out.read_text())
    assert body["partial"] is True and body["batch_sizes_done"] == [1]
    runs = body["runs"]
    assert [r["sampler"] for r in runs] == ["hf", "ar", "lossless", "auto"]
    assert {r["batch_size"] for r in runs} == {1}
    assert all(r["tokens_per_s"] > 0 and r["checkpoint"] == str(ckpt) for r in runs)
    assert [s["batch_size"] for s in body["checkpoints"]] == [1]
    assert not (tmp_path / "run" / "bench.png").exists()  # no plot of a run that did not finish


def test_bench_on_a_random_model_of_a_given_shape_and_vocabulary(tmp_path):
    """`model` + `model_vocab`: speed and memory of a random-init model (here V = 32,768), no checkpoint needed."""
    out = tmp_path / "bench.json"
    small_bench(
        out,
        "--profile",
        profile_steps=3,
        model="{arch: qwen3_moe, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
        "moe_intermediate_size: 16, num_experts: 4, experts_per_token: 2}",
        model_vocab=32768,
        run_dir=tmp_path / "run",
        max_new_tokens=6,
        levels="[[0]]",
        mix_levels="[0]",
    )
    runs = json.loads(out.read_text())["runs"]
    assert {r["vocab_size"] for r in runs} == {32768} and all(r["peak_mem_mb"] >= 0 for r in runs)
    assert runs[0]["checkpoint"].startswith("random qwen3_moe h32 V32768")
    # --profile: every engine row (not HF, not auto) has its decode step split into phases that add up
    from rollout.engine import PHASES

    for r in runs:
        if r["sampler"] in ("hf", "auto"):
            assert r["step_ms"] == {}
            continue
        ms = r["step_ms"]
        assert set(ms) == {*PHASES, "total", "other"} and all(v >= 0 for v in ms.values())
        assert sum(ms[ph] for ph in (*PHASES, "other")) == pytest.approx(ms["total"], rel=1e-6)
        assert ms["body"] > 0 and ms["heads"] > 0 and ms["bookkeeping"] > 0
        assert (ms["drafts"] > 0) == (r["sampler"] != "ar")  # ar drafts nothing


def test_quick_bench_of_a_plain_model_on_the_users_prompt_file(tmp_path, tokenizer, capsys):
    """The default bench on a model nobody converted and a prompt file (text and chat rows): HF, ar and auto (with
    its choice) on those prompts, encoded as train encodes them, no solve rate, the table within 100 columns."""
    ckpt = tmp_path / "mine" / "final"
    build_model(tiny_moe_config(len(tokenizer))).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"count to {i}: ", "answer": i}) + "\n" for i in range(3))
    )
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--json",
        str(out),
        "--set",
        f"checkpoint={ckpt}",
        "--set",
        f"run_dir={tmp_path / 'run'}",
    ]
    for k, v in {
        "prompts.files": f"[{prompts}]",
        "repeats": 1,
        "batch_sizes": "[2]",
        "max_new_tokens": 8,
        "min_prompts": 4,
        "prompts_per_row": 1,
        "group_size": 2,
        "threads": 1,
    }.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["sampler"] for r in runs] == ["hf", "ar", "auto"]
    assert all(r["samples"] == 0 and r["label"] == "mine/final" for r in runs)  # file rows: not scored
    assert runs[2]["drafts"] == "history" and runs[2]["choice"] in ("ar", "lossless[history]")
    printed = capsys.readouterr().out
    table = [ln for ln in printed.splitlines() if any(c in ln for c in "┃│┏┗━")]
    assert "mine/final" in printed and table and max(map(len, table)) <= 100


def test_a_losing_row_says_why_and_what_would_help():
    from rollout.bench.config import RunResult
    from rollout.bench.run import explain_losses
    from rollout.cost_model import CostModel
    from rollout.types import Option

    cost = CostModel(16)
    opt = Option("lossless", ("end",))
    cost.step_seconds |= {("ar", 16): 0.010, (opt.name, 16): 0.030}
    ar = RunResult(16, "ar", speedup_vs_ar=1.0, _option=Option("ar"))
    slow = RunResult(16, "lossless", ["end"], speedup_vs_ar=0.45, tokens_per_forward=1.3, _option=opt)
    fast = RunResult(
        16, "lossless", [0], speedup_vs_ar=1.2, tokens_per_forward=4.0, _option=Option("lossless", (0,))
    )
    explain_losses([ar, slow, fast], cost)
    assert "0.45x ar at 1.30 tokens per forward" in slow.note and "3.0x an ar step" in slow.note
    assert "train the drafter longer" in slow.note and "history drafts" in slow.note
    assert ar.note == fast.note == ""


def test_compiled_rows_and_the_fastest_ar_baseline(tmp_path, tokenizer):
    """compiled=true adds the engine's compiled ar and lossless rows (greedy: the eager rows' tokens per forward);
    `vs ar` stays against the eager engine ar, and `speedup_vs_best_ar` is against the fastest AR row of the run,
    compiled ar included."""
    ckpt = tmp_path / "ckpt"
    converted(ckpt, tokenizer)
    out = tmp_path / "bench.json"
    small_bench(
        out,
        checkpoint=ckpt,
        run_dir=tmp_path / "run",
        max_new_tokens=12,
        temperature=0.0,
        levels="[[0,2]]",
        logit_mix="false",
        compiled="true",
    )
    runs = json.loads(out.read_text())["runs"]
    rows = {(r["sampler"], r["compiled"]): r for r in runs}
    assert set(rows) == {("hf", False), ("ar", False), ("lossless", False), ("auto", False)} | {
        ("ar", True),
        ("lossless", True),
    }
    assert rows[("lossless", True)]["tokens_per_forward"] == rows[("lossless", False)]["tokens_per_forward"]
    best = max(rows[k]["tokens_per_s"] for k in [("hf", False), ("ar", False), ("ar", True)])
    for r in runs:
        assert r["speedup_vs_best_ar"] == pytest.approx(r["tokens_per_s"] / best)
        assert r["speedup_vs_ar"] == pytest.approx(r["tokens_per_s"] / rows[("ar", False)]["tokens_per_s"])
    assert all(r["compile_s"] >= 0 for r in runs) and rows[("ar", False)]["compile_s"] == 0
