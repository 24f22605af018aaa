"""Rows of a user's local data files: JSONL, JSON, Parquet, or a `datasets` directory written by `save_to_disk`.

The one reader of user data, for conversion corpora (`trainers.lm.data`) and RL prompt files alike. Every row keeps
where it came from (`Record.source`, `Record.row`: the 1-based line of a JSONL file, else the 0-based index), so any
later failure can name the file and the row. A row that cannot be read at all (bad JSON, not an object) raises
`RecordError` at once; whether a readable but unusable row is an error or is skipped is the caller's policy
(`BadRows`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMATS = ("jsonl", "json", "parquet", "datasets")


class RecordError(ValueError):
    """A data file or one of its rows is unusable; the message names the file and the row, `kind` the reason."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Record:
    source: str  # the file (or datasets directory) it came from
    row: int  # JSONL: 1-based line number; otherwise 0-based row index
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        unit = "line" if self.source.endswith(".jsonl") else "row"
        return f"{self.source} {unit} {self.row}"

    def error(self, reason: str, kind: str = "bad_row") -> RecordError:
        return RecordError(f"{self.where}: {reason}", kind)


def file_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return "datasets"
        raise RecordError(f"{path}: a directory, but not one written by datasets' save_to_disk")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise RecordError(
        f"{path}: unknown data format {suffix!r} (expected .jsonl, .json, .parquet or a datasets dir)"
    )


def read_records(path: str | Path, bad: BadRows | None = None) -> Iterator[Record]:
    """Every row of one file, in file order. An unreadable row (bad JSON, not an object) raises `RecordError`, or,
    under a `skip` policy, is counted in `bad` and passed over."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such data file")
    fmt = file_format(path)
    src = str(path)
    if fmt == "jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    obj = RecordError(
                        f"{src} line {line_no}: not valid JSON ({e.msg} at column {e.colno})", "bad_json"
                    )
                rec = _record(src, line_no, obj, bad)
                if rec is not None:
                    yield rec
        return
    if fmt == "json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(f"{src}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]}
        if not isinstance(obj, list):
            raise RecordError(f"{src}: expected a JSON list of row objects (or {{'<split>': [...]}})")
        rows = enumerate(obj)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        rows = enumerate(pq.read_table(path).to_pylist())
    else:
        rows = enumerate(_load_from_disk(path))
    for i, row in rows:
        rec = _record(src, i, row, bad)
        if rec is not None:
            yield rec


def _load_from_disk(path: Path):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise RecordError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)})")
        ds = ds["train"]
    return ds


def _record(src: str, row: int, obj: Any, bad: BadRows | None) -> Record | None:
    unit = "line" if src.endswith(".jsonl") else "row"
    if not isinstance(obj, dict):
        err = obj if isinstance(obj, RecordError) else None
        if err is None:
            err = RecordError(
                f"{src} {unit} {row}: expected an object with named fields, got {type(obj).__name__}",
                "not_object",
            )
        if bad is None or bad.policy == "error":
            raise err
        bad.count(f"{err}", err.kind)
        return None
    return Record(src, row, obj)


@dataclass
class BadRows:
    """The bad-row policy: `error` raises the first bad row's error (file and row named); `skip` counts the
    reasons and keeps the first few messages, so nothing is lost silently."""

    policy: Literal["error", "skip"] = "error"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def reject(self, rec: Record, reason: str, kind: str) -> None:
        if self.policy == "error":
            raise rec.error(reason, kind)
        self.count(f"{rec.where}: {reason}", kind)

    def count(self, message: str, kind: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "by_reason": dict(self.counts), "first": list(self.examples)}
