"""Rows of a user's local data files: JSONL, JSON, Parquet, or a `datasets` directory written by `save_to_disk`.

The one reader of user data, for conversion corpora (`trainers.lm.data`) and RL prompt files alike. Every row keeps
where it came from (`Record.where`: `<file>: line N` of a JSONL file, `record N` of a JSON array, `row N` of a table), so
any later failure can name the file and the row. A row that cannot be read at all (bad JSON, not an object) raises
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

from common.config import ConfigError

FORMATS = ("jsonl", "json", "parquet", "datasets")
UNIT = {"jsonl": "line", "json": "record", "parquet": "row", "datasets": "row"}  # how a location is named


class RecordError(ConfigError):
    """A data file or one of its rows is unusable; the message names the file and the row, `kind` the reason."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Record:
    source: str  # the file (or datasets directory) it came from
    row: int  # 1-based: the line of a JSONL file, the position in a JSON array, the row of a table
    fields: dict[str, Any]
    unit: str = "row"  # line | record | row

    @property
    def where(self) -> str:
        return f"{self.source}: {self.unit} {self.row}"

    def error(self, reason: str, kind: str = "bad_row") -> RecordError:
        return RecordError(f"{self.where}: {reason}", kind)


def file_format(path: Path) -> str:
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
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
    """Every row of one file, in file order. An unreadable row (bad JSON or UTF-8, not an object) raises
    `RecordError`, or, under a `skip` policy, is counted in `bad` and passed over. An unreadable file raises."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"{path}: no such data file")
    fmt = file_format(path)
    unit = UNIT[fmt]
    for n, obj in _rows(path, fmt):
        if isinstance(obj, dict):
            yield Record(str(path), n, obj, unit)
            continue
        err = obj if isinstance(obj, RecordError) else None
        if err is None:
            err = RecordError(
                f"{path}: {unit} {n}: expected an object with named fields, got {type(obj).__name__}",
                "not_object",
            )
        if bad is None or bad.policy == "error":
            raise err
        bad.count(str(err), err.kind)


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """(1-based position, the row's object, or the RecordError that says why it could not be read)."""
    if fmt == "jsonl":
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield n, RecordError(f"{path}: line {n}: not UTF-8 ({e})", "bad_json")
                    continue
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield (
                        n,
                        RecordError(
                            f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})", "bad_json"
                        ),
                    )
    elif fmt == "json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RecordError(f"{path}: not UTF-8 ({e})") from None
        except json.JSONDecodeError as e:
            hint = "; for one JSON object a line, name the file .jsonl" if e.msg == "Extra data" else ""
            raise RecordError(
                f"{path}: line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}){hint}"
            ) from None
        if not isinstance(data, list):
            raise RecordError(
                f"{path}: a .json file must hold a JSON array of records, got a {type(data).__name__} "
                "(for one JSON object a line, name the file .jsonl)"
            )
        yield from enumerate(data, 1)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise RecordError(f"{path}: not a readable Parquet file ({e})") from None
        yield from enumerate(table.to_pylist(), 1)
    else:
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise RecordError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)})")
            ds = ds["train"]
        yield from enumerate(ds, 1)


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
