"""Stop rules: EOS is kept and ends the completion, a stop string cuts after the token that completes it, the token
budget cuts the rest; only tokens added since the last check are searched."""

from policy.tokenizer import build_char_tokenizer
from rollout.stops import find_stop
from rollout.types import SamplingParams


def test_eos_is_kept_and_only_new_tokens_are_searched():
    p = SamplingParams(max_new_tokens=100, eos_token_id=[1, 7])
    assert find_stop([5, 6, 7, 8, 1], 0, p) == (3, "eos")
    assert find_stop([5, 6, 7, 8, 9], 3, p) == (None, "")  # the 7 was checked by an earlier step


def test_the_budget_cuts_a_chunk_that_overruns_it_and_an_eos_past_it():
    p = SamplingParams(max_new_tokens=4, eos_token_id=1)
    assert find_stop([5, 6, 7, 8, 9, 9], 2, p) == (4, "length")
    assert find_stop([5, 6, 7, 8, 9, 1], 2, p) == (4, "length")
    assert find_stop([5, 1, 7, 8, 9, 9], 0, p) == (2, "eos")


def test_a_stop_string_spanning_two_steps_cuts_after_its_last_token():
    tok = build_char_tokenizer()
    ids = tok.encode("ab=12", add_special_tokens=False)
    p = SamplingParams(max_new_tokens=100, eos_token_id=None, stop_strings=["=1"])
    start = 3  # "ab=" came in an earlier step; "12" now
    assert find_stop(ids, start, p, tok) == (4, "stop_string")
