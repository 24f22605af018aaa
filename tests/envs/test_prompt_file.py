"""RL prompt files: `prompt` / `messages` rows with extra columns, bad rows named or counted, a seeded held-out split."""

import json

import pytest

from common.config import ConfigError
from common.records import RecordError
from envs.prompt_file import PromptFileConfig, PromptFileTask
from envs.rewards import RewardFunctions, RewardSpec
from policy.tokenizer import encode_chat_prompt, encode_prompt


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task(files, **kw):
    return PromptFileTask(
        PromptFileConfig(files=[str(f) for f in files], **kw),
        RewardFunctions([RewardSpec(function="math:fsum")]),
    )


def test_rows_columns_and_encodings(tmp_path, bpe_tokenizer):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    f = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "say hi", "answer": "hi", "task": "greet"},
            {"prompt": chat, "answer": "4"},
            {"messages": chat, "answer": "4", "difficulty": 3},
        ],
    )
    rows = task([f]).train
    assert [r.task for r in rows] == ["greet", "prompts", "prompts"]
    assert rows[0].columns == {"answer": "hi", "task": "greet"} and rows[2].columns == {
        "answer": "4",
        "difficulty": 3,
    }
    assert rows[0].encode(bpe_tokenizer, "text") == encode_prompt(bpe_tokenizer, "say hi", "text")
    assert (
        rows[1].encode(bpe_tokenizer, "text")
        == rows[2].encode(bpe_tokenizer, "text")
        == encode_chat_prompt(bpe_tokenizer, chat)
    )
    assert rows[0].completion("x") == "x" and rows[1].completion("x") == [
        {"role": "assistant", "content": "x"}
    ]
    assert rows[0].where == f"{f}: line 1"


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path):
    f = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "ok"},
            {"question": "no prompt"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": ""},
        ],
    )
    with pytest.raises(RecordError, match=r"p.jsonl: line 2: missing required field 'prompt'"):
        task([f])
    t = task([f], on_bad_row="skip")
    assert len(t.train) == 1
    assert t.bad.summary()["by_reason"] == {"missing_prompt": 1, "bad_messages": 1, "bad_prompt": 1}
    assert "line 3: 'messages' ends with an assistant turn" in t.bad.summary()["first"][1]


def test_heldout_split_is_seeded_and_disjoint(tmp_path):
    f = write(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(20)])
    a, b = task([f], heldout_rows=5), task([f], heldout_rows=5)
    assert [r.prompt for r in a.heldout] == [r.prompt for r in b.heldout] and len(a.heldout) == 5
    assert not {r.prompt for r in a.heldout} & {r.prompt for r in a.train} and len(a.train) == 15
    with pytest.raises(ConfigError, match=r"not enough for prompts\.heldout_rows=20"):
        task([f], heldout_rows=20)
