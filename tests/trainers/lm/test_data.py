"""Conversion corpora from the user's files: three row shapes, targets where they belong, a seeded held-out split,
bad rows named or skipped and counted, and length-bucketed batches."""

import json

import pytest
import torch

from common.config import load_config
from common.records import RecordError
from policy.tokenizer import encode_chat_prompt, encode_prompt
from trainers.lm.data import DataConfig, Sampler, collate, load_corpus


def cfg(**kw) -> DataConfig:
    return load_config(DataConfig, None, [f"{k}={json.dumps(v)}" for k, v in kw.items()])


def rows(n: int):
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"text": f"sum: {i} + 1 = {i + 1}"})
        elif i % 3 == 1:
            out.append({"prompt": f"sum: {i} + 2\n", "completion": f"= {i + 2}"})
        else:
            msgs = [
                {"role": "user", "content": f"sum: {i} + 3"},
                {"role": "assistant", "content": f"{i + 3}"},
            ]
            out.append({"messages": msgs, "id": i})
    return out


def write_jsonl(path, rs):
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return str(path)


def targets(tok, e):
    return tok.decode([t for t, y in zip(e.ids, e.target, strict=True) if y])


def test_three_row_shapes_train_on_the_right_tokens(tmp_path, bpe_tokenizer):
    tok = bpe_tokenizer
    f = write_jsonl(tmp_path / "mix.jsonl", rows(30))
    data = load_corpus(cfg(files=[f], heldout_rows=3), tok)
    assert data.stats["rows_by_format"] == {"text": 10, "prompt_completion": 10, "messages": 10}
    assert data.has_chat and len(data.heldout) == 3 and len(data.train) == 27
    by_kind = {}
    for e in data.train + data.heldout:
        text = tok.decode(e.ids)
        kind = "messages" if "<|im_start|>" in text else ("pc" if "\n=" in text else "text")
        by_kind.setdefault(kind, e)
    e = by_kind["pc"]
    assert targets(tok, e).startswith("= ") and targets(tok, e).endswith("<|endoftext|>")
    assert e.ids[: sum(1 for y in e.target if not y)] == encode_prompt(tok, tok.decode(e.ids).split("=")[0])
    e = by_kind["messages"]
    assert targets(tok, e).endswith("<|im_end|>\n") and "sum" not in targets(tok, e)
    prompt = encode_chat_prompt(
        tok, [{"role": "user", "content": tok.decode(e.ids).split("\n")[1].split("<")[0]}]
    )
    assert e.ids[: len(prompt)] == prompt  # inference prompts are the prefix training saw
    assert all(by_kind["text"].target[1:]) and not by_kind["text"].target[0]


def test_the_default_heldout_split_is_capped_by_the_file_and_said(tmp_path, bpe_tokenizer, caplog):
    """Left at its default (200), the held-out split of a 30-row file is a fifth of it, and one log line says so; a
    value the user sets is taken as given."""
    f = write_jsonl(tmp_path / "d.jsonl", rows(30))
    with caplog.at_level("INFO", logger="trainers.lm.data"):
        data = load_corpus(cfg(files=[f]), bpe_tokenizer)
    assert len(data.heldout) == 6 and len(data.train) == 24
    assert "data: 6 of 30 rows held out for evaluation (a fifth of the file" in caplog.text
    assert len(load_corpus(cfg(files=[f], heldout_rows=10), bpe_tokenizer).heldout) == 10


def test_heldout_split_is_seeded_and_disjoint(tmp_path, bpe_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", rows(40))

    def key(e):
        return tuple(e.ids)

    a = load_corpus(cfg(files=[f], heldout_rows=5, seed=1), bpe_tokenizer)
    b = load_corpus(cfg(files=[f], heldout_rows=5, seed=1), bpe_tokenizer)
    c = load_corpus(cfg(files=[f], heldout_rows=5, seed=2), bpe_tokenizer)
    assert [key(e) for e in a.heldout] == [key(e) for e in b.heldout]
    assert {key(e) for e in a.heldout} != {key(e) for e in c.heldout}
    assert not {key(e) for e in a.heldout} & {key(e) for e in a.train}
    held = write_jsonl(tmp_path / "held.jsonl", rows(4))
    d = load_corpus(cfg(files=[f], heldout_files=[held]), bpe_tokenizer)
    assert len(d.train) == 40 and len(d.heldout) == 4


def test_every_file_format_gives_the_same_corpus(tmp_path, bpe_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rs = [{"prompt": f"sum: {i} + 2\n", "completion": f"= {i + 2}"} for i in range(12)]
    files = [write_jsonl(tmp_path / "d.jsonl", rs), str(tmp_path / "d.json"), str(tmp_path / "d.parquet")]
    (tmp_path / "d.json").write_text(json.dumps(rs))
    pq.write_table(pa.Table.from_pylist(rs), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rs).save_to_disk(str(tmp_path / "ds"))
    files.append(str(tmp_path / "ds"))
    got = [[e.ids for e in load_corpus(cfg(files=[f], heldout_rows=2), bpe_tokenizer).train] for f in files]
    assert all(g == got[0] for g in got)


def test_bad_rows_error_with_file_and_row_or_are_skipped_and_counted(tmp_path, bpe_tokenizer):
    good = rows(12)
    bad = [
        {"question": "no known field"},
        {"prompt": "p", "completion": ""},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"prompt": "x" * 3000, "completion": "y"},
    ]
    f = write_jsonl(tmp_path / "d.jsonl", good[:6] + bad + good[6:])
    with pytest.raises(
        RecordError, match=r"d.jsonl: line 7: no 'text', 'prompt' \+ 'completion' or 'messages'"
    ):
        load_corpus(cfg(files=[f], heldout_rows=2), bpe_tokenizer)
    data = load_corpus(cfg(files=[f], heldout_rows=2, on_bad_row="skip", max_seq_len=512), bpe_tokenizer)
    summary = data.stats["bad_rows"]
    assert summary["skipped"] == 4 and len(data.train) + len(data.heldout) == 12
    assert summary["by_reason"] == {"unknown_shape": 1, "bad_field": 1, "chat_template": 1, "too_long": 1}
    assert "d.jsonl: line 10" in summary["first"][3] and "over data.max_seq_len=512" in summary["first"][3]


def test_long_documents_are_cut_into_windows(tmp_path, bpe_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "sum: 1 + 2 = 3. " * 200}, *rows(3)])
    data = load_corpus(cfg(files=[f], heldout_rows=1, max_seq_len=64, format="auto"), bpe_tokenizer)
    lens = [len(e.ids) for e in data.train + data.heldout]
    assert max(lens) == 64 and sum(n == 64 for n in lens) >= 10


def test_length_buckets_cut_padding_and_are_seeded(tmp_path, bpe_tokenizer):
    rs = [{"prompt": "sum:" + " 1 +" * (i % 50), "completion": " 2"} for i in range(400)]
    data = load_corpus(cfg(files=[write_jsonl(tmp_path / "d.jsonl", rs)], heldout_rows=2), bpe_tokenizer)

    def padding(batching):
        s, total = Sampler(data.train, batching), 0.0
        for step in range(20):
            b = collate(s(8, torch.Generator().manual_seed(step)), 0)
            total += 1 - b.valid.float().mean().item()
        return total / 20

    assert padding("length_bucket") < 0.5 * padding("random")
    s = Sampler(data.train, "length_bucket")
    assert s(8, torch.Generator().manual_seed(3)) == s(8, torch.Generator().manual_seed(3))


def test_the_builtin_corpus_stays_the_default(tokenizer):
    data = load_corpus(cfg(train_per_task=5, heldout_per_task=2), tokenizer)
    assert data.stats["source"] == "builtin" and data.heldout_tasks is not None
    e = data.train[0]
    assert e.ids[0] == tokenizer.bos_token_id and targets(tokenizer, e).endswith("<eos>")


def test_conversational_prompt_completion_rows_make_a_chat_model(tmp_path, bpe_tokenizer):
    """TRL's conversational rows (message-list prompt and completion) go through the chat template and count as
    chat, so conversion records the chat prompt format and the end-of-turn stop id."""
    rs = [
        {
            "prompt": [{"role": "user", "content": f"sum: {i} + 1"}],
            "completion": [{"role": "assistant", "content": "ok"}],
        }
        for i in range(8)
    ]
    data = load_corpus(cfg(files=[write_jsonl(tmp_path / "c.jsonl", rs)], heldout_rows=2), bpe_tokenizer)
    assert data.has_chat and data.stats["chat_rows"] == 8
    assert targets(bpe_tokenizer, data.train[0]) == "ok<|im_end|>\n"


def test_a_datasets_dict_directory_reads_its_train_split(tmp_path, bpe_tokenizer):
    import datasets

    rs = [{"text": f"sum: {i} + 1 = {i + 1}"} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rs)}).save_to_disk(str(tmp_path / "dd"))
    data = load_corpus(cfg(files=[str(tmp_path / "dd")], heldout_rows=1), bpe_tokenizer)
    assert len(data.train) + len(data.heldout) == 6


def test_a_missing_data_file_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """`blockrl convert` with a misspelled data file stops at once, naming the field: the model is never loaded."""
    from policy.hybrid import HybridPolicy
    from trainers.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data files were checked")

    monkeypatch.setattr(HybridPolicy, "from_pretrained", no_load)
    argv = ["convert", "--set", "init=checkpoints/tiny-moe", "--set", f"run_dir={tmp_path / 'run'}"]
    assert main([*argv, "--set", f"data.files=[{tmp_path / 'chats.jsonll'}]"]) == 2
    assert f"data.files[0]: {tmp_path / 'chats.jsonll'} not found" in capsys.readouterr().err
