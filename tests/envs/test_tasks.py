"""Built-in tasks: gold traces are scored correct by reasoning-gym's verifier, wrong answers are not."""

import pytest

from envs.tasks import CORPUS_TASKS, TASKS, extract_answer, get_task, iter_samples, score


@pytest.mark.parametrize("task", CORPUS_TASKS)
def test_gold_completions_score_one_and_are_long_enough(task):
    samples = list(iter_samples(task, 50, seed=3))
    assert all(score(s, s.completion) == 1.0 for s in samples)
    assert sum(len(s.completion) for s in samples) / len(samples) >= 48  # char tokens per completion
    assert all(s.prompt.endswith("\n") for s in samples)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_wrong_or_missing_answer_scores_below_one(task):
    s = next(iter_samples(task, 1, seed=4))
    assert score(s, "no answer here") == 0.0
    assert score(s, "<answer>qqq</answer>") < 1.0


def test_traces_are_structured():
    s = next(iter_samples("spell_backward", 1, seed=0))
    word = s.entry["metadata"]["word"]
    fwd, bwd, ans = s.completion.split("\n")
    assert fwd.split() == [f"{i + 1}{c}" for i, c in enumerate(word)]
    assert bwd.split() == fwd.split()[::-1]
    assert extract_answer(ans) == word[::-1]
    s = next(iter_samples("chain_sum", 1, seed=0))
    assert extract_answer(s.completion) == s.entry["answer"]


def test_countdown_is_scored_by_its_verifier():
    s = next(iter_samples("countdown", 1, seed=2))
    assert s.prompt.startswith("countdown: ") and score(s, s.completion) == 1.0


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
