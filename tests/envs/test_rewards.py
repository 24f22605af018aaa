"""Reward functions by import path with TRL's signature: weights, None = not scored, and the failure policy."""

import math

import pytest

from common.config import ConfigError
from envs.rewards import RewardFunctions, RewardSpec, load_function
from envs.text_env import RewardError

MODULE = """
def exact(prompts, completions, completion_ids, answer, **kw):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def length(prompts, completions, completion_ids, **kw):
    return [None if len(ids) == 0 else len(ids) / 10 for ids in completion_ids]

def broken(prompts, completions, completion_ids, **kw):
    raise KeyError("no such column")

def nan_on_b(prompts, completions, completion_ids, **kw):
    return [math.nan if c == "b" else 1.0 for c in completions]

def short(prompts, completions, completion_ids, **kw):
    return [1.0]

import math
"""


@pytest.fixture
def mod(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(MODULE)
    return path


def call(fns, completions, ids, answers):
    n = len(completions)
    return fns(
        ["p"] * n,
        completions,
        ids,
        [{"answer": a} for a in answers],
        [f"f.jsonl: line {i + 1}" for i in range(n)],
    )


def test_weighted_sum_with_none_meaning_not_scored(mod):
    fns = RewardFunctions(
        [RewardSpec(function=f"{mod}:exact"), RewardSpec(function=f"{mod}:length", weight=0.5)]
    )
    out = call(fns, ["7", "8", "7"], [[1, 2], [3], []], ["7", "7", "7"])
    assert out.rewards == pytest.approx(
        [1 + 0.5 * 0.2, 0 + 0.5 * 0.1, 1.0]
    )  # the third: length did not score
    assert math.isnan(out.per_function["length"][2]) and out.failures == 0 and out.unscored == 0


def test_failures_raise_naming_function_and_row_or_are_recorded(mod):
    with pytest.raises(
        RewardError, match=r"broken: failed on a batch from f.jsonl: line 1: 'no such column'"
    ):
        call(RewardFunctions([RewardSpec(function=f"{mod}:broken")]), ["a"], [[1]], ["a"])
    with pytest.raises(RewardError, match=r"nan_on_b: returned nan for f.jsonl: line 2"):
        call(RewardFunctions([RewardSpec(function=f"{mod}:nan_on_b")]), ["a", "b"], [[1], [2]], ["a", "b"])
    with pytest.raises(RewardError, match="returned 1 rewards for 2 completions"):
        call(RewardFunctions([RewardSpec(function=f"{mod}:short")]), ["a", "b"], [[1], [2]], ["a", "b"])
    rec = RewardFunctions(
        [RewardSpec(function=f"{mod}:exact"), RewardSpec(function=f"{mod}:nan_on_b")], on_error="record"
    )
    out = call(rec, ["a", "b"], [[1], [2]], ["a", "b"])
    assert out.rewards == [2.0, 1.0] and out.failures == 1  # b's failed term counts 0; the failure is counted
    out = call(
        RewardFunctions([RewardSpec(function=f"{mod}:broken")], on_error="record"), ["a"], [[1]], ["a"]
    )
    assert out.rewards == [0.0] and out.failures == 1


def test_bad_references_name_the_field(mod):
    with pytest.raises(ConfigError, match="rewards: 'nocolon' is not 'module:function'"):
        load_function("nocolon")
    with pytest.raises(ConfigError, match="no function 'missing'"):
        load_function(f"{mod}:missing")
    with pytest.raises(ConfigError, match="cannot import 'not_a_module_xyz'"):
        load_function("not_a_module_xyz:f")
    with pytest.raises(ConfigError, match=r"rewards\[0\].function: .*no such file"):
        RewardFunctions([RewardSpec(function="/nonexistent/r.py:f")])
    assert load_function("math:sqrt")(4) == 2.0  # an importable module works too


def test_reserved_columns_are_not_passed_and_metric_names_stay_distinct(mod, tmp_path):
    other = tmp_path / "other.py"
    other.write_text(
        "def exact(prompts, completions, completion_ids, **kw):\n    return [0.5] * len(completions)\n"
    )
    fns = RewardFunctions([RewardSpec(function=f"{mod}:exact"), RewardSpec(function=f"{other}:exact")])
    assert fns.names == [f"{mod}:exact", f"{other}:exact"]  # two functions named `exact`: whole references
    out = fns(
        ["p"], ["7"], [[1]], [{"answer": "7", "completion": "gold", "prompts": "x"}], ["f.jsonl: line 1"]
    )
    assert out.rewards == [
        1.5
    ]  # `completion` / `prompts` columns did not clash with the call's own arguments


def test_a_column_a_function_needs_is_checked_before_any_work(mod, tmp_path, capsys):
    """The required parameters of each function against the file's columns: a missing one names the function, the
    parameter and the columns there are; `blockrl train` stops on it before Ray starts (exit 2, no run files)."""
    fns = RewardFunctions([RewardSpec(function=f"{mod}:length"), RewardSpec(function=f"{mod}:exact")])
    fns.check_columns({"answer", "level"}, "p.jsonl")  # `exact` needs `answer`: there
    with pytest.raises(
        ConfigError,
        match=r"rewards\[1\]\.function: .*:exact needs the column 'answer', which "
        r"p\.jsonl lacks \(its columns: level, task\)",
    ):
        fns.check_columns({"task", "level"}, "p.jsonl")
    from trainers.cli import main

    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "2 + 2 =", "solution": "4"}\n' * 4)
    run = tmp_path / "run"
    argv = ["train", "--set", f"run_dir={run}", "--set", f"prompts.files=[{data}]"]
    assert main([*argv, "--set", f"rewards=[{{function: '{mod}:exact'}}]"]) == 2
    err = capsys.readouterr().err
    assert "needs the column 'answer'" in err and "its columns: solution" in err
    assert not (run / "ray").exists() and not (run / "metrics.jsonl").exists()
