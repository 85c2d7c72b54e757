"""Stream records out of JSONL, JSON, CSV/TSV, TXT and Parquet files.

Readers know about bytes, encodings and file structure; they know nothing about tasks,
labels or splits (that is `prepare.py`). Each yields `Record`s that carry their file and
1-based line (the physical line a CSV record starts on, the row number for Parquet), so
every later reject or error can point at the exact place to fix.

A bad line (not UTF-8, not JSON) becomes a `Record` with a `problem`, not an exception:
one broken line must not sink a million good ones. Problems with a whole file (missing,
empty, no such column) raise `DataError` at once, before anything expensive runs.
"""

from __future__ import annotations

import csv
import difflib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from loraflow.errors import DataError

FORMAT_BY_EXTENSION: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
    ".parquet": "parquet",
}
_BOM = b"\xef\xbb\xbf"
CONTENT_CHARS = 200  # how much of a rejected line rejects.jsonl keeps
_PARQUET_BATCH = 65536
_CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB) would abort a file on one long field


class Record(NamedTuple):
    """One input row: `values` holds one entry per requested column (None when absent).

    `problem` is `(kind, reason)` when the row could not be read at all; `values` is then None.
    """

    file: str
    line: int
    values: tuple[Any, ...] | None
    problem: tuple[str, str] | None
    content: str


def source_files(path: str | Path, fmt: str = "auto") -> list[tuple[Path, str]]:
    """The files to read and the format of each, in a stable (sorted, recursive) order.

    A directory contributes every supported, non-hidden file below it; `fmt` other than
    `auto` forces the format of a single file, or keeps only matching files of a directory.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(
            f"{path}: dataset path does not exist; check dataset.path (relative paths start at {Path.cwd()})"
        )
    if root.is_file():
        return [(root, fmt if fmt != "auto" else _format_of(root))]
    found: list[tuple[Path, str]] = []
    others: list[str] = []
    for file in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        relative = file.relative_to(root)
        if not file.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        file_format = FORMAT_BY_EXTENSION.get(file.suffix.lower())
        if file_format is None or (fmt != "auto" and _family(file_format) != _family(fmt)):
            others.append(relative.as_posix())
            continue
        found.append((file, file_format))
    if not found:
        seen = f"found only: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}" if others else "it is empty"
        wanted = ", ".join(sorted(FORMAT_BY_EXTENSION)) if fmt == "auto" else fmt
        raise DataError(f"{path}: no supported data files in this directory ({seen}); add {wanted} files")
    return found


def _family(fmt: str) -> str:
    return "csv" if fmt == "tsv" else fmt


def _format_of(file: Path) -> str:
    fmt = FORMAT_BY_EXTENSION.get(file.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{file}: cannot tell the format from the extension {file.suffix or '(none)'!r}; "
            f"set dataset.format to one of jsonl, csv, txt, parquet"
        )
    return fmt


def read_records(file: Path, fmt: str, columns: Mapping[str, str]) -> Iterator[Record]:
    """Yield the records of one file; `columns` maps each wanted column to the setting that names it."""
    if fmt == "parquet":
        return _read_parquet(file, columns)
    if file.stat().st_size == 0:
        raise DataError(f"{file}: file is empty; remove it or add rows")
    if fmt == "txt":
        return _read_txt(file, columns)
    if fmt in ("csv", "tsv"):
        return _read_csv(file, columns, "\t" if fmt == "tsv" else ",")
    if fmt == "jsonl":
        return _read_json(file, columns)
    raise DataError(f"{file}: unsupported format {fmt!r}; set dataset.format to one of jsonl, csv, txt, parquet")


def column_names(file: Path, fmt: str) -> list[str]:
    """The columns of a file (CSV header, Parquet schema, keys of the first JSON object): what a
    conversation file's row form is found from. Unreadable files give none; reading them says why."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(file).schema_arrow.names)
        except Exception:  # pyarrow raises several types for a non-parquet file
            return []
    if fmt in ("csv", "tsv"):
        with open(file, encoding="utf-8-sig", errors="replace", newline="") as handle:
            header = next((row for row in csv.reader(handle, delimiter="\t" if fmt == "tsv" else ",") if row), [])
        return [column.strip() for column in header]
    if fmt == "jsonl":
        return next((list(value) for _, value, _, _ in _json_items(file) if isinstance(value, dict)), [])
    return []


def missing_column_error(file: Path | str, column: str, setting: str, present: list[str]) -> DataError:
    """One line that names the column, the file, the columns that are there, and the closest match."""
    close = difflib.get_close_matches(column, present, n=1, cutoff=0.5)
    close = close or [name for name in present if name.lower() == column.lower()]
    hint = f"did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(repr(name) for name in present[:20]) or "none"
    return DataError(
        f"{file}: required column {column!r} not found (columns: {listed}); {hint}"
        f"set dataset.{setting} to the column's name"
    )


def _clip(text: str) -> str:
    return text if len(text) <= CONTENT_CHARS else text[:CONTENT_CHARS] + "..."


def _lines(file: Path) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, decoded line or None when not UTF-8, raw bytes), BOM removed from line 1."""
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield number, raw.decode("utf-8"), raw
            except UnicodeDecodeError:
                yield number, None, raw


_NOT_UTF8 = ("invalid_utf8", "bytes that are not valid UTF-8; re-save the file as UTF-8")


def _not_utf8(name: str, number: int, raw: bytes) -> Record:
    return Record(name, number, None, _NOT_UTF8, _clip(raw.decode("utf-8", "replace").rstrip("\r\n")))


def _read_txt(file: Path, columns: Mapping[str, str]) -> Iterator[Record]:
    name = str(file)
    rows = 0
    for number, text, raw in _lines(file):
        if text is None:
            rows += 1
            yield _not_utf8(name, number, raw)
            continue
        text = text.rstrip("\r\n")
        if text.strip():
            rows += 1
            yield Record(name, number, (text,) * len(columns), None, _clip(text))
    if rows == 0:
        raise DataError(f"{file}: file is empty (only blank lines); remove it or add rows")


def _json_items(file: Path) -> Iterator[tuple[int, Any, tuple[str, str] | None, str]]:
    """JSON lines; a `.json` file whose first character is `[` is read as one JSON array instead."""
    with open(file, "rb") as handle:
        head = handle.read(4096).lstrip(_BOM).lstrip()
    if not head:
        raise DataError(f"{file}: file is empty (only blank lines); remove it or add rows")
    if head.startswith(b"[") and file.suffix.lower() == ".json":
        return _json_array(file)
    return _json_lines(file)


def _read_json(file: Path, columns: Mapping[str, str]) -> Iterator[Record]:
    items = _json_items(file)
    wanted = tuple(columns)
    found = dict.fromkeys(wanted, 0)
    first_keys: list[str] | None = None
    for number, value, problem, content in items:
        if problem is not None:
            yield Record(str(file), number, None, problem, content)
            continue
        if not isinstance(value, dict):
            reason = f"expected a JSON object, got {type(value).__name__}"
            yield Record(str(file), number, None, ("not_an_object", reason), content)
            continue
        if first_keys is None:
            first_keys = list(value)
        for column in wanted:
            if column in value:
                found[column] += 1
        yield Record(str(file), number, tuple(value.get(column) for column in wanted), None, content)
    if first_keys is not None:  # objects were read: a column no row has is a naming problem
        for column, count in found.items():
            if count == 0:
                raise missing_column_error(file, column, columns[column], first_keys)


def _json_lines(file: Path) -> Iterator[tuple[int, Any, tuple[str, str] | None, str]]:
    name = str(file)
    loads = json.loads
    for number, text, raw in _lines(file):
        if text is None:
            bad = _not_utf8(name, number, raw)
            yield number, None, bad.problem, bad.content
            continue
        if not text.strip():
            continue
        try:
            yield number, loads(text), None, _clip(text.rstrip("\r\n"))
        except ValueError as error:
            reason = f"malformed JSON: {getattr(error, 'msg', error)} (column {getattr(error, 'colno', '?')})"
            yield number, None, ("malformed_json", reason), _clip(text.rstrip("\r\n"))


def _json_array(file: Path) -> Iterator[tuple[int, Any, tuple[str, str] | None, str]]:
    """A `[...]` file: all or nothing, since one syntax error leaves no way to find the items."""
    try:
        items = json.loads(file.read_bytes().lstrip(_BOM).decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: byte {error.start} is not valid UTF-8; re-save the file as UTF-8") from None
    except ValueError as error:
        where = f":{error.lineno}" if hasattr(error, "lineno") else ""
        problem = getattr(error, "msg", error)
        raise DataError(f"{file}{where}: not valid JSON ({problem}); fix it or use JSON lines") from None
    if not isinstance(items, list):
        raise DataError(f"{file}: expected a JSON array of objects or JSON lines")
    if not items:
        raise DataError(f"{file}: file is empty (an empty JSON array); remove it or add rows")
    for number, item in enumerate(items, 1):
        yield number, item, None, _clip(json.dumps(item, ensure_ascii=False))


def _read_csv(file: Path, columns: Mapping[str, str], delimiter: str) -> Iterator[Record]:
    """CSV records with the physical line each starts on; quoted fields may span lines."""
    name = str(file)
    bad_lines: set[int] = set()

    def decoded() -> Iterator[str]:
        for number, text, raw in _lines(file):
            if text is None:
                bad_lines.add(number)
                text = raw.decode("utf-8", "replace")
            yield text

    if csv.field_size_limit() < _CSV_FIELD_LIMIT:  # long texts are rejected by length, not by the parser
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(decoded(), delimiter=delimiter)
    try:
        header = next(reader, None)
        while header == []:  # blank lines before the header
            header = next(reader, None)
        if header is None:
            raise DataError(f"{file}: file is empty (only blank lines); remove it or add rows")
        header = [column.strip() for column in header]
        if bad_lines:
            raise DataError(f"{file}:{reader.line_num}: header is not valid UTF-8; re-save the file as UTF-8")
        missing = [column for column in columns if column not in header]
        if missing:
            raise missing_column_error(file, missing[0], columns[missing[0]], header)
        index = [header.index(column) for column in columns]
        width = max(index) + 1
        rows = 0
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue
            rows += 1
            content = _clip(delimiter.join(row))
            if bad_lines and any(n in bad_lines for n in range(line, start)):
                yield Record(name, line, None, _NOT_UTF8, content)
            elif len(row) < width:
                values = tuple(row[i] if i < len(row) else None for i in index)
                yield Record(name, line, values, None, content)
            else:
                yield Record(name, line, tuple(row[i] for i in index), None, content)
    except csv.Error as error:
        raise DataError(f"{file}:{reader.line_num}: cannot parse CSV ({error}); check quoting on that line") from None
    if rows == 0:
        raise DataError(f"{file}: CSV has a header but no data rows; add rows below the header")


def _read_parquet(file: Path, columns: Mapping[str, str]) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:  # pyarrow raises several types for a non-parquet file
        raise DataError(f"{file}: not a readable Parquet file ({str(error).splitlines()[0]})") from None
    present = parquet.schema_arrow.names
    for column in columns:
        if column not in present:
            raise missing_column_error(file, column, columns[column], present)
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{file}: file is empty (0 rows); remove it or add rows")
    return _parquet_rows(parquet, str(file), list(columns))


def _parquet_rows(parquet: Any, name: str, wanted: list[str]) -> Iterator[Record]:
    number = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=wanted):
        for values in zip(*(batch.column(column).to_pylist() for column in wanted)):
            number += 1
            yield Record(name, number, values, None, _clip(json.dumps(values, ensure_ascii=False, default=str)))
