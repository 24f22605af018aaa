"""`blockrl regress` end to end on the shipped checkpoint with a small suite (2 samplers x 12 prompts x 2 samples): a baseline made by
--update-baseline round-trips with its per-sample bits, the unchanged checkpoint passes against it, an old
baseline without bits falls back to the unpaired tests, a checkpoint with Gaussian noise on its weights is flagged
with the failing metrics named, and a missing, malformed or mismatched baseline is a clear error naming the file.

The end-to-end unchanged run reuses the baseline's seeds on the same machine and thread count, so it reproduces
every sample exactly (no discordant pair: all paired p-values 1) and cannot fail the quality gates; false alarms
are what the Monte Carlo tests check. The throughput gate, which timing noise could trip, is off in the end-to-end
tests (tolerance.speedup_rel=null, tolerance.min_speedup=null).
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.cli import main
from trainers.regress.config import RegressConfig
from trainers.regress.job import load_baseline, speedup_floor
from trainers.regress.stats import (
    ToleranceConfig,
    compare,
)

CKPT = "checkpoints/tiny-moe"
SMALL = [
    "--set",
    "prompts_per_task=4",
    "--set",
    "samples_per_prompt=2",
    "--set",
    "pass_k=[2]",
    "--set",
    "max_new_tokens=96",
    "--set",
    "repeats=1",
    "--set",
    "tolerance.per_task=false",
    "--set",
    "tolerance.speedup_rel=null",
    "--set",
    "tolerance.min_speedup=null",
    "--set",
    "samplers=[{name: ar, sampler: ar}, {name: lossless, sampler: lossless}]",
]


# ------------------------------------------------------------------------------------------------ statistics
def test_config_errors_name_the_field(capsys):
    assert main(["regress", "--set", "samplers=[{name: x, sampler: lossless}]"]) == 2
    assert "samplers" in capsys.readouterr().err
    assert main(["regress", "--set", "pass_k=[9]"]) == 2
    assert "pass_k" in capsys.readouterr().err
    RegressConfig()  # the defaults validate


def test_a_block_sampler_slower_than_ar_fails_the_floor_unless_it_is_a_diagnostic_row():
    """Never slower than AR: a gated row below `tolerance.min_speedup` fails with or without a baseline; ar
    itself and rows with gate_speedup off (raw prompts) are not held to it; null turns the floor off."""
    from tests.trainers.regress.test_stats import fake

    samplers = [
        {"name": "ar", "sampler": "ar"},
        {"name": "lossless", "sampler": "lossless"},
        {"name": "auto", "sampler": "auto"},
        {"name": "raw", "sampler": "lossless", "prompt_format": "raw", "gate_speedup": False},
    ]
    cfg = RegressConfig(samplers=samplers)
    metrics = {
        "ar": fake(300, K=0, speedup=1.0),
        "lossless": fake(300, speedup=0.92),
        "auto": fake(300, speedup=0.97),
        "raw": fake(300, speedup=0.3),
    }
    checks = speedup_floor(cfg, metrics)
    assert [c.sampler for c in checks] == ["lossless", "auto"]
    assert [c.name for c in checks if c.failed] == ["lossless/speedup_vs_ar>=floor"]
    assert "below 0.95" in checks[0].describe()
    off = RegressConfig(samplers=samplers, tolerance={"min_speedup": None})
    assert speedup_floor(off, metrics) == []


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A baseline of the small suite on the shipped checkpoint, made by --update-baseline."""
    root = tmp_path_factory.mktemp("regress")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPLCONFIGDIR", str(root / ".mpl"))
        args = [
            "regress",
            *SMALL,
            "--set",
            f"baseline={root / 'base.json'}",
            "--set",
            f"run_dir={root / 'base'}",
        ]
        assert main([*args, "--update-baseline"]) == 0
    return root / "base.json", root / "base"


def run(path, run_dir, *extra) -> int:
    return main(["regress", *SMALL, "--set", f"baseline={path}", "--set", f"run_dir={run_dir}", *extra])


def test_update_baseline_round_trip(baseline):
    path, run_dir = baseline
    assert json.loads(path.read_text()) == json.loads((run_dir / "results.json").read_text())
    b = load_baseline(path)
    assert set(b.samplers) == {"ar", "lossless"}
    assert b.samplers["lossless"].tokens_per_forward > 1.0 and b.samplers["ar"].tokens_per_forward == 1.0
    assert b.samplers["ar"].n_samples == 3 * 4 * 2
    lo, hi = b.samplers["ar"].solve_ci95
    assert lo <= b.samplers["ar"].solve_rate <= hi
    for m in b.samplers.values():  # per-sample bits: one per sample, in suite order, counting the solved ones
        assert m.rewards_binary and list(m.solved_bits) == list(m.per_task)
        assert all(
            len(m.solved_bits[t]) == r.n and m.solved_bits[t].count("1") == r.solved
            for t, r in m.per_task.items()
        )
    assert "BASELINE UPDATED" in (run_dir / "report.md").read_text()
    assert all(
        (run_dir / p).stat().st_size > 0 for p in ("solve_rate.png", "acceptance.png", "throughput.png")
    )


def test_unchanged_checkpoint_passes(baseline, tmp_path, capsys):
    path, _ = baseline
    assert run(path, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "REGRESSION" not in out
    now = json.loads((tmp_path / "run" / "results.json").read_text())["samplers"]
    base = json.loads(path.read_text())["samplers"]
    for s in base:  # same seeds, same machine: every sample reproduces
        assert (
            now[s]["solved"] == base[s]["solved"]
            and now[s]["tokens_per_forward"] == base[s]["tokens_per_forward"]
        )
    report = (tmp_path / "run" / "report.md").read_text()
    assert "# blockrl regress: PASS" in report and "| ar/solve_rate | " in report
    assert "reward_mean |" not in report  # 0/1 rewards: no duplicate gate
    b, c = load_baseline(path), load_baseline(tmp_path / "run" / "results.json")
    checks = [
        x for x in compare(b.samplers, c.samplers, ToleranceConfig(per_task=False)) if x.p_value is not None
    ]
    assert {x.test for x in checks} == {"McNemar exact", "sign exact"} and all(
        x.p_value == 1.0 for x in checks
    )


def test_baseline_without_bits_falls_back(baseline, tmp_path):
    """A baseline written before per-sample bits still loads; its comparison uses the unpaired tests and keeps
    the reward gate."""
    path, run_dir = baseline
    data = json.loads(path.read_text())
    for m in data["samplers"].values():
        del m["solved_bits"], m["rewards_binary"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    now = load_baseline(run_dir / "results.json").samplers
    checks = [
        c for c in compare(load_baseline(old).samplers, now, ToleranceConfig()) if c.p_value is not None
    ]
    assert {c.test for c in checks} == {"z unpaired", "Welch unpaired"}
    assert "ar/reward_mean" in {c.name for c in checks} and not any(c.failed for c in checks)


def test_degraded_checkpoint_is_flagged(baseline, tmp_path, capsys):
    """Gaussian noise (0.5 x each tensor's std) on every weight: solve rate collapses, the run exits 1."""
    path, _ = baseline
    ckpt = tmp_path / "noisy"
    shutil.copytree(CKPT, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    noisy = {
        k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v
        for k, v in weights.items()
    }
    save_file(noisy, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert run(path, tmp_path / "run", "--set", f"checkpoint={ckpt}") == 1
    out = capsys.readouterr().out
    assert "REGRESSION ar/solve_rate: baseline" in out and "p=" in out
    assert "REGRESSION lossless/solve_rate" in out
    report = (tmp_path / "run" / "report.md").read_text()
    assert "# blockrl regress: FAIL" in report and "## Regressions" in report


def test_bad_baseline_is_a_clear_error(baseline, tmp_path, capsys):
    """Missing, non-JSON, schema-violating or other-suite baselines exit 2 naming the file, before any decoding;
    --update-baseline replaces a broken file."""
    path, _ = baseline
    missing = tmp_path / "nope.json"
    assert run(missing, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--update-baseline" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert run(broken, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "not valid JSON" in err
    data = json.loads(path.read_text())
    del data["samplers"]["lossless"]["solve_rate"]
    broken.write_text(json.dumps(data))
    assert run(broken, tmp_path / "r") == 2
    assert "samplers.lossless.solve_rate" in capsys.readouterr().err
    data = json.loads(path.read_text())
    data["samplers"]["ar"]["solved_bits"]["chain_sum"] = "0120"
    broken.write_text(json.dumps(data))
    assert run(broken, tmp_path / "r") == 2
    assert "samplers.ar.solved_bits.chain_sum" in capsys.readouterr().err
    assert run(path, tmp_path / "r", "--set", "prompts_per_task=5") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "prompts_per_task" in err
    assert not (tmp_path / "r" / "results.json").exists()
    # --update-baseline never reads the old file: that is how a broken one is fixed
    broken.write_text("{not json")
    assert run(broken, tmp_path / "r", "--update-baseline") == 0
    assert load_baseline(broken).samplers["ar"].solved == load_baseline(path).samplers["ar"].solved


REWARDS = """
import re

def correct(prompts, completions, completion_ids, answer, **kwargs):
    got = [re.search(r"<answer>(.*?)</answer>", c) for c in completions]
    return [float(m is not None and m.group(1).strip() == str(a)) for m, a in zip(got, answer)]

def brevity(prompts, completions, completion_ids, **kwargs):
    return [1.0 - len(ids) / 96 for ids in completion_ids]
"""


def test_the_researchers_prompt_file_and_reward_functions(tmp_path, capsys):
    """regress on a prompt file with its own labels and a reward module: the labels are the per-task rates, the
    reward is the weighted sum, solved = reward >= solve_threshold; the unchanged checkpoint passes its own
    baseline, an edited file is another suite (named by its hash), and a row no function scores is an error."""
    from envs.splits import heldout

    samples = heldout(["chain_sum", "spell_backward"], 3)
    rows = [{"prompt": s.prompt, "answer": s.entry["answer"], "task": f"my_{s.task}"} for s in samples]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.py").write_text(REWARDS)
    user = [
        "--set",
        f"prompts_file={tmp_path / 'p.jsonl'}",
        "--set",
        f"rewards=[{{function: {tmp_path / 'r.py'}:correct}}, {{function: {tmp_path / 'r.py'}:brevity, weight: 0.1}}]",
        "--set",
        "solve_threshold=1.0",
    ]
    base = tmp_path / "base.json"
    assert run(base, tmp_path / "b", *user, "--update-baseline") == 0
    b = load_baseline(base)
    assert b.suite["prompts_sha256"] and "tasks" not in b.suite and b.suite["rewards"][1]["weight"] == 0.1
    for m in b.samplers.values():
        assert list(m.per_task) == ["my_chain_sum", "my_spell_backward"] and m.n_samples == 6 * 2
        assert not m.rewards_binary  # the brevity term makes rewards continuous
    done = [json.loads(x) for x in (tmp_path / "b" / "completions.jsonl").read_text().splitlines()]
    for d in done:
        ok = re.search(r"<answer>(.*?)</answer>", d["completion"])
        gold = next(r["answer"] for r in rows if r["prompt"] == d["prompt"])
        assert d["reward"] == pytest.approx(
            float(bool(ok) and ok.group(1).strip() == str(gold)) + 0.1 * (1 - d["tokens"] / 96)
        )
    assert b.samplers["ar"].solved == sum(d["reward"] >= 1.0 for d in done if d["sampler"] == "ar")
    assert run(base, tmp_path / "same", *user) == 0
    rows[0]["prompt"] = "sum: 1 + 1\n"
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert run(base, tmp_path / "edited", *user) == 2
    assert "prompts_sha256" in capsys.readouterr().err
    assert run(base, tmp_path / "unscored", user[0], user[1], "--update-baseline") == 2
    err = capsys.readouterr().err
    assert "no reward function scored" in err and "p.jsonl: line 1 (task 'my_chain_sum')" in err


def test_suite_fields_left_at_their_defaults_still_compare():
    """suite() omits rewards / solve_threshold at their defaults; a baseline made with them set is still another
    suite for a default config (and the shipped baseline matches the shipped config)."""
    from common.config import ConfigError, load_config
    from trainers.regress.job import check_suite

    cfg = load_config(RegressConfig, "regress", [])
    base = load_baseline("configs/regress_baseline.json")
    assert check_suite(base, cfg.suite(), "configs/regress_baseline.json") == []
    for extra in ({"rewards": [{"function": "m:f", "weight": 1.0}]}, {"solve_threshold": 0.5}):
        other = base.model_copy(update={"suite": base.suite | extra})
        with pytest.raises(ConfigError, match=next(iter(extra))):
            check_suite(other, cfg.suite(), "b.json")
