"""Reads an exported file into records: one dict of column -> text per data row,
with the line it starts on. CSV (any delimiter, quoted fields), whitespace-
separated columns, or JSON lines (nested objects flattened to "a.b" keys).

A row that cannot be split into the header's columns is still yielded, with
`error` set, so the importer can reject it with a reason instead of stopping.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from converge.connectors.mapping import FileSpec


class FileError(Exception):
    """The file cannot be read at all (missing, undecodable, no usable header)."""


@dataclass(frozen=True)
class Record:
    """One data row: `line` is the file line it starts on, `row` its number
    among the data rows (both from 1). A value is None when absent."""

    line: int
    row: int
    values: dict[str, str | None]
    error: str | None = None


def count_lines(path: Path) -> int:
    """Lines in the file (for a progress bar's total); cheap even for large files."""
    count = 0
    last = b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        out[name] = _text(value)
    return out


class RecordFile:
    """An open export file: `columns` (None for JSON lines) and `records()`."""

    def __init__(self, path: Path, spec: FileSpec) -> None:
        self.path = path
        self.spec = spec
        self.columns: list[str] | None = None
        self._file: IO[str] | None = None
        self._header_lines = 0

    def __enter__(self) -> RecordFile:
        try:
            self._file = self.path.open(encoding=self.spec.encoding, newline="")
        except OSError as e:
            raise FileError(f"cannot open {self.path}: {e.strerror or e}") from None
        try:
            self._read_header()
        except BaseException:
            self._file.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()

    def _read_header(self) -> None:
        assert self._file is not None
        spec = self.spec
        if spec.format == "jsonl":
            return
        if not spec.header:
            self.columns = list(spec.columns or ())
            return
        try:
            if spec.format == "csv":
                reader = csv.reader(self._file, delimiter=spec.delimiter, quotechar=spec.quotechar)
                header = next((r for r in reader if r), None)
                self._header_lines = reader.line_num
            else:
                header = None
                for line in self._file:
                    self._header_lines += 1
                    if line.strip():
                        header = line.split()
                        break
        except UnicodeDecodeError as e:
            raise FileError(
                f"{self.path}: the header is not {spec.encoding} text ({e.reason})"
            ) from None
        except csv.Error as e:
            raise FileError(f"{self.path}: cannot read the header: {e}") from None
        if not header:
            raise FileError(f"{self.path}: empty file, no header line")
        columns = [name.strip() for name in header]
        if any(not name for name in columns):
            raise FileError(f"{self.path}: the header has an empty column name")
        repeated = sorted({name for name in columns if columns.count(name) > 1})
        if repeated:
            raise FileError(f"{self.path}: the header repeats {', '.join(repeated)}")
        self.columns = columns

    def records(self) -> Iterator[Record]:
        """The data rows in file order."""
        assert self._file is not None, "use RecordFile as a context manager"
        try:
            if self.spec.format == "csv":
                yield from self._csv_records()
            elif self.spec.format == "whitespace":
                yield from self._whitespace_records()
            else:
                yield from self._jsonl_records()
        except UnicodeDecodeError as e:
            raise FileError(f"{self.path}: not {self.spec.encoding} text ({e.reason})") from None

    def _split(self, line: int, row: int, fields: list[str]) -> Record:
        columns = self.columns or []
        if len(fields) != len(columns):
            return Record(
                line, row, {}, f"{len(fields)} fields where the header has {len(columns)}"
            )
        return Record(line, row, dict(zip(columns, fields, strict=True)))

    def _csv_records(self) -> Iterator[Record]:
        assert self._file is not None
        reader = csv.reader(
            self._file, delimiter=self.spec.delimiter, quotechar=self.spec.quotechar
        )
        previous_end = self._header_lines
        row = 0
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                row += 1
                yield Record(previous_end + 1, row, {}, f"unreadable CSV ({e})")
                previous_end = self._header_lines + reader.line_num
                continue
            start = previous_end + 1
            previous_end = self._header_lines + reader.line_num
            if not fields:
                continue
            row += 1
            yield self._split(start, row, fields)

    def _whitespace_records(self) -> Iterator[Record]:
        assert self._file is not None
        row = 0
        for number, line in enumerate(self._file, start=self._header_lines + 1):
            fields = line.split()
            if not fields:
                continue
            row += 1
            yield self._split(number, row, fields)

    def _jsonl_records(self) -> Iterator[Record]:
        assert self._file is not None
        row = 0
        for number, line in enumerate(self._file, start=1):
            if not line.strip():
                continue
            row += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(number, row, {}, f"not a JSON object ({e.msg})")
                continue
            if not isinstance(obj, dict):
                yield Record(number, row, {}, "not a JSON object")
                continue
            yield Record(number, row, _flatten(obj))
