"""User data files: every format reads the same rows, and an unreadable row is named by file and row."""

import json

import pytest

from common.records import BadRows, RecordError, read_records

ROWS = [{"text": "a b"}, {"prompt": "p", "completion": "c"}, {"messages": [{"role": "user", "content": "x"}]}]


def write_all(tmp_path, rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    flat = [{"text": str(r)} for r in rows]  # columnar formats want one schema
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "d.parquet")
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "ds"))
    return flat


def test_every_format_reads_its_rows_in_order(tmp_path):
    flat = write_all(tmp_path, ROWS)
    for name in ("d.jsonl", "d.json"):
        assert [r.fields for r in read_records(tmp_path / name)] == ROWS
    for name in ("d.parquet", "ds"):
        assert [r.fields for r in read_records(tmp_path / name)] == flat
    recs = list(read_records(tmp_path / "d.jsonl"))
    assert [r.row for r in recs] == [1, 2, 3] and recs[1].where.endswith("d.jsonl: line 2")
    assert list(read_records(tmp_path / "ds"))[2].where.endswith("ds: row 3")


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n[1, 2]\n{"text": "fine"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl: line 3: not valid JSON"):
        list(read_records(path))
    bad = BadRows("skip")
    assert [r.fields["text"] for r in read_records(path, bad)] == ["ok", "fine"]
    assert bad.summary()["by_reason"] == {"bad_json": 1, "not_object": 1}
    assert "line 4" in bad.examples[1]


def test_unknown_files_are_refused_by_name(tmp_path):
    with pytest.raises(RecordError, match="no such data file"):
        list(read_records(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(RecordError, match=r"x.csv: unknown data format '.csv'"):
        list(read_records(tmp_path / "x.csv"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(RecordError, match="save_to_disk"):
        list(read_records(tmp_path / "dir"))
