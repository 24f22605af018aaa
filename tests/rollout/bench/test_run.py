"""`blockrl bench` smoke test on a tiny converted model: every sampler runs and the JSON has the contract's keys."""

import json

from policy import HybridPolicy
from policy.factory import build_model, tiny_moe_config
from rollout.auto import AutoSampler, engine_factory
from trainers.cli import main


def test_bench_cli_writes_json_with_all_samplers(tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    policy = HybridPolicy(build_model(tiny_moe_config(len(tokenizer))))
    policy.convert(tokenizer, block_size=4)
    policy.save_pretrained(ckpt, tokenizer)
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
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
            "--json",
            str(out),
        ]
    )
    assert code == 0
    runs = json.loads(out.read_text())["runs"]
    assert {r["sampler"] for r in runs} == {"hf", "ar", "lossless", "logit_mix", "auto"}
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
