"""Char tokenizer: a real PreTrainedTokenizerFast that round-trips text and survives save/load."""

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from policy.tokenizer import ALPHABET, build_char_tokenizer


def test_roundtrip_and_one_token_per_char(tmp_path):
    tok = build_char_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "count e: the green sheep\nthe 1=1\n<answer>5</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert len(loaded) == len(ALPHABET) + 4


def test_unknown_chars_map_to_unk():
    tok = build_char_tokenizer()
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
