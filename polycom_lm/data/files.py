"""Streaming document readers for local files: plain text, jsonl, json and parquet.

Every reader yields documents (str) one at a time, so memory stays flat whatever the file size (except
one-document-per-file text and `.json`, which are whole by nature). Bad input raises a one-line
DataError naming the file and the byte offset or line.

Text is cleaned the way Python's text mode and `datasets`' text loader read it: a UTF-8 byte order mark at
the start of a file is dropped, and with `newlines="normalize"` (the default everywhere) `\r\n` and a lone
`\r` become `\n` (`normalize_newlines`), also inside JSON and parquet strings; `newlines="keep"` keeps
the decoded text as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from polycom_lm.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
# `document_delimiter` value meaning "one or more blank lines separate documents".
BLANK_LINES = "blank_lines"
NEWLINE_MODES = ("normalize", "keep")
_BOM = "\ufeff"


def normalize_newlines(text: str) -> str:
    """`\r\n` and lone `\r` → `\n` (Python's universal newlines)."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode(data: bytes, path: Path, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 at byte offset {offset + error.start} (pass --decode-errors replace, or "
            f"data.decode_errors: replace, to substitute U+FFFD)"
        ) from None


def _text_lines(path: Path, errors: str, newlines: str) -> Iterator[str]:
    """The decoded lines of a text file, each with its ending; with `normalize`, `\r\n` and lone `\r`
    end lines too and become `\n` (binary reading splits at `\n` only)."""
    offset = 0
    with open(path, "rb") as handle:
        for raw in handle:
            line = _decode(raw, path, offset, errors)
            if offset == 0:
                line = line.removeprefix(_BOM)
            offset += len(raw)
            if newlines == "keep" or "\r" not in line:
                yield line
                continue
            # Not str.splitlines: it also splits at \v, \f, \x1c-\x1e, \x85 and U+2028, which are text here.
            *complete, last = normalize_newlines(line).split("\n")
            yield from (part + "\n" for part in complete)
            if last:
                yield last


def read_text(path: Path, delimiter: Optional[str], errors: str = "strict", newlines: str = "normalize") -> Iterator[str]:
    """Documents of a text file: the whole file, or the runs of lines between `delimiter` lines (a line
    equal to the delimiter after stripping), or between blank lines when `delimiter` is `blank_lines`."""
    if delimiter is None:
        text = _decode(path.read_bytes(), path, 0, errors).removeprefix(_BOM)
        if newlines == "normalize":
            text = normalize_newlines(text)
        if text.strip():
            yield text
        return
    lines: list[str] = []
    for line in _text_lines(path, errors, newlines):
        stripped = line.strip()
        boundary = (not stripped) if delimiter == BLANK_LINES else (stripped == delimiter)
        if boundary:
            document = "".join(lines).strip("\n")
            lines = []
            if document.strip():
                yield document
        else:
            lines.append(line)
    document = "".join(lines).strip("\n")
    if document.strip():
        yield document


def _text_of(record, path: Path, where: str, text_field: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{path}:{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise DataError(f"{path}:{where}: no {text_field!r} field (keys: {keys}); set data.text_field / --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def read_jsonl(path: Path, text_field: str, errors: str = "strict") -> Iterator[str]:
    """One JSON object per line; blank lines are skipped."""
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(raw, path, offset, errors)
            offset += len(raw)
            if number == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.args[0].split(':')[0]})") from None
            text = _text_of(record, path, str(number), text_field)
            if text.strip():
                yield text


def read_json(path: Path, text_field: str, errors: str = "strict") -> Iterator[str]:
    """A JSON array of objects (or of strings), or an object holding such an array under `text_field`."""
    text = _decode(path.read_bytes(), path, 0, errors).removeprefix(_BOM)
    try:
        data = json.loads(text)
    except ValueError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if isinstance(data, dict) and isinstance(data.get(text_field), list):
        data = data[text_field]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects with a {text_field!r} field")
    for index, record in enumerate(data):
        document = record if isinstance(record, str) else _text_of(record, path, f"item {index}", text_field)
        if document.strip():
            yield document


def read_parquet(path: Path, text_field: str, batch_rows: int = 1024) -> Iterator[str]:
    """Row batches of the `text_field` column."""
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(columns)}); set data.text_field")
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for document in batch.column(0).to_pylist():
            if isinstance(document, str) and document.strip():
                yield document


def read_file(path: Path, text_field: str, delimiter: Optional[str], errors: str = "strict",
              newlines: str = "normalize") -> Iterator[str]:
    """Dispatch on the suffix; files with other suffixes are read as plain text. Newlines inside JSON and
    parquet strings are left to the caller (`Source.documents` normalises every document)."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path, text_field, errors)
    if suffix in JSON_SUFFIXES:
        return read_json(path, text_field, errors)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet(path, text_field)
    return read_text(path, delimiter, errors, newlines)
