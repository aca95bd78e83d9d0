"""Read local data files into rows: JSON (a list or one object per line), JSONL, CSV, TSV, Parquet.

Each row comes back with its 1-based row number, so that schema errors can point at it: the line
number for JSON lines (blank lines count, as in an editor), the record number otherwise (for CSV/TSV
the header is not counted).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lrft.errors import UserError

SUPPORTED = (".json", ".jsonl", ".csv", ".tsv", ".parquet")

Row = tuple[int, Any]  # (row number, the record as read; validated by the caller)


def read_rows(path: str | Path) -> list[Row]:
    """Every record of a local data file, chosen by extension. Raises :class:`UserError` on a
    missing, unreadable, empty or malformed file."""
    return list(iter_rows(path))


def iter_rows(path: str | Path) -> Iterator[Row]:
    """The records of a local data file one at a time, so a large file never sits in memory whole
    (the cached pipeline writes them to Arrow as they come). Same errors as :func:`read_rows`; a
    malformed row raises when the iteration reaches it."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED:
        raise UserError(f"{p}: unsupported data file type '{suffix}'. Supported: {', '.join(SUPPORTED)}.")
    if not p.is_file():
        hint = " (it is a folder)" if p.is_dir() else ""
        raise UserError(f"{p}: data file not found{hint}.")
    readers = {
        ".json": _read_json,
        ".jsonl": _read_jsonl,
        ".csv": _read_csv,
        ".tsv": _read_tsv,
        ".parquet": _read_parquet,
    }
    count = 0
    try:
        for row in readers[suffix](p):
            count += 1
            yield row
    except UnicodeDecodeError as err:
        raise UserError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except OSError as err:
        raise UserError(f"{p}: cannot read the file: {err}") from None
    if not count:
        raise UserError(f"{p}: the file is empty (no rows).")


def _read_json(p: Path) -> Iterator[Row]:
    if _first_char(p) != "[":
        yield from _parse_lines(p, ".json files hold a list of objects or one object per line")
        return
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"{p}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from None
    yield from enumerate(data, start=1)


def _first_char(p: Path) -> str:
    """The first non-blank character: a JSON list file or JSON lines, without reading it all."""
    with p.open(encoding="utf-8-sig") as fh:
        while chunk := fh.read(4096):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def _read_jsonl(p: Path) -> Iterator[Row]:
    if _first_char(p) == "[":  # one JSON list saved as .jsonl: its rows are just as clear
        return _read_json(p)
    return _parse_lines(p, "each line must be one JSON object")


def _parse_lines(p: Path, expected: str) -> Iterator[Row]:
    with p.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{p}, row {number}: malformed JSON line (column {err.colno}: {err.msg}); {expected}."
                ) from None
            yield number, record


def _read_csv(p: Path) -> Iterator[Row]:
    return _read_delimited(p, csv.excel)


def _read_tsv(p: Path) -> Iterator[Row]:
    # GLUE's own TSVs hold unbalanced quotes inside sentences: quotes are plain text there
    class Tab(csv.excel_tab):
        quoting = csv.QUOTE_NONE

    return _read_delimited(p, Tab)


def _read_delimited(p: Path, dialect: type[csv.Dialect]) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with p.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, dialect=dialect)
        try:
            # a short line leaves missing cells as None, which the schema check reports as missing
            for i, rec in enumerate(reader, 1):
                yield i, {k: v for k, v in rec.items() if k is not None}
        except csv.Error as err:
            kind = p.suffix[1:].upper()
            raise UserError(f"{p}, line {reader.line_num}: malformed {kind}: {err}.") from None


def _read_parquet(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=1000)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield number, record
    except UserError:
        raise
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise UserError(f"{p}: cannot read the Parquet file: {err}") from None
