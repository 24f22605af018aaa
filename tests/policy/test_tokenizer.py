"""Char tokenizer: a real PreTrainedTokenizerFast that round-trips text and survives save/load."""

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from policy.tokenizer import (
    ALPHABET,
    ChatFormatError,
    build_char_tokenizer,
    chat_stop_ids,
    encode_chat,
    encode_chat_prompt,
    encode_prompt,
    eos_ids,
)


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


# ------------------------------------------------------------------------------ encodings in the training format
def test_natural_encoding_is_the_training_format(tokenizer):
    """`tokenizer(text)` adds the BOS that training puts first, so the natural encoding is in distribution."""
    ids = tokenizer("count e: tee")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids == encode_prompt(tokenizer, "count e: tee")


def test_shipped_checkpoint_tokenizer_encodes_like_its_training_data():
    from common.paths import SHIPPED_CHECKPOINT
    from envs.splits import corpus_heldout
    from trainers.lm.data import encode

    tok = AutoTokenizer.from_pretrained(SHIPPED_CHECKPOINT)
    for s in corpus_heldout(["chain_sum", "spell_backward"], 3):
        natural = tok(s.prompt)["input_ids"]
        assert natural[0] == tok.bos_token_id
        assert encode(tok, s).ids[: len(natural)] == natural  # the trained sequence starts with it


def test_an_appended_eos_is_not_part_of_a_prompt():
    tok = build_char_tokenizer()
    tok.add_eos_token = True
    assert tok("abc")["input_ids"][-1] == tok.eos_token_id
    assert encode_prompt(tok, "abc") == [tok.bos_token_id, *tok("abc", add_special_tokens=False)["input_ids"]]


CHAT = [
    {"role": "user", "content": "sum: 1 + 2"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "and + 4"},
    {"role": "assistant", "content": "7 it is"},
]


def test_chat_targets_are_exactly_the_assistant_turns(bpe_tokenizer):
    tok = bpe_tokenizer
    ids, target = encode_chat(tok, CHAT)
    assert ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    on = tok.decode([t for t, y in zip(ids, target, strict=True) if y])
    off = tok.decode([t for t, y in zip(ids, target, strict=True) if not y])
    assert on == "3<|im_end|>\n7 it is<|im_end|>\n"  # content and the end-of-turn, nothing else
    assert "sum: 1 + 2" in off and "and + 4" in off and "3" not in off.replace("<|im_start|>", "")
    # a prompt encoded for inference is exactly the prefix the training sequence continues
    prompt = encode_chat_prompt(tok, CHAT[:1])
    assert ids[: len(prompt)] == prompt and not any(target[: len(prompt)])


def test_chat_stop_ids_and_several_eos(bpe_tokenizer):
    from transformers import GenerationConfig

    tok = bpe_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat_stop_ids(tok) == (end,)
    assert eos_ids(tok) == (tok.eos_token_id,)
    assert eos_ids(tok, GenerationConfig(eos_token_id=[end, tok.eos_token_id])) == (tok.eos_token_id, end)


def test_chat_templates_that_cannot_be_split_into_turns_are_refused(bpe_tokenizer):
    import copy

    import pytest

    tok = copy.deepcopy(bpe_tokenizer)
    with pytest.raises(ChatFormatError, match="no assistant message"):
        encode_chat(tok, CHAT[:1])
    with pytest.raises(ChatFormatError, match="'role' and 'content'"):
        encode_chat(tok, [{"role": "user"}])
    tok.chat_template = "{{ messages | length }}:" + tok.chat_template  # rewrites the start on every turn
    with pytest.raises(ChatFormatError, match="continuation"):
        encode_chat(tok, CHAT)
    tok.chat_template = None
    with pytest.raises(ChatFormatError, match="no chat template"):
        encode_chat(tok, CHAT)


def test_only_the_specials_that_close_a_turn_stop_it(bpe_tokenizer):
    """A template whose assistant turn opens with a special token (`<|im_start|>` as a channel marker here) keeps
    it out of the EOS ids: generation would otherwise stop at its first token."""
    import copy

    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = tok.chat_template.replace(
        "{{ m['content'] }}", "{% if m['role'] == 'assistant' %}<|im_start|>{% endif %}{{ m['content'] }}"
    )
    assert chat_stop_ids(tok) == (tok.convert_tokens_to_ids("<|im_end|>"),)


def test_a_legacy_checkpoint_tokenizer_keeps_its_training_bos(tmp_path):
    """Checkpoints written before prompt formats were recorded were trained BOS-first (the old encoder prepended
    it); loading one makes `tokenizer(text)` add it."""
    from policy import HybridPolicy
    from policy.factory import build_model, tiny_dense_config
    from policy.metadata import METADATA_KEY, load_tokenizer

    tok = build_char_tokenizer()
    tok.add_bos_token = False  # the old tokenizer config
    policy = HybridPolicy(build_model(tiny_dense_config(len(tok))))
    policy.convert(tok, block_size=4)
    policy.save_pretrained(tmp_path, tok)
    cfg = tmp_path / "config.json"
    import json

    data = json.loads(cfg.read_text())
    data[METADATA_KEY].pop("prompt_format")  # as written by the old code
    cfg.write_text(json.dumps(data))
    assert load_tokenizer(tmp_path)("ab")["input_ids"][0] == tok.bos_token_id
