"""Reading training records from disk: file patterns -> JSON records -> `Row`s.

Three separate steps, so that later formats slot in without touching the others:

* `expand_files` turns the comma-separated `data.*_files` string into a sorted list of paths;
* `_jsonl_records` knows the *file* format (JSONL now; JSON, Parquet and CSV later) and yields one
  raw record per non-blank line, tagged with its "path:line" source;
* `_prompt_completion_row` knows the *record* format (prompt/completion now; text, Alpaca, ShareGPT
  and messages later) and turns a record into a `Row`.

Bad input never passes silently: every problem is a `DataError` whose message starts with
"path:line:" and names the field, so a user can open the file at the right place. With
`on_bad_row="skip"` the row is dropped and counted instead. Files are only ever opened for reading.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import glob
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

PROMPT_COMPLETION_FIELDS = ("prompt", "completion")
_MAX_LOGGED_SKIPS = 10


class DataError(ValueError):
    """Bad input data or data settings; the message names the file, line (1-based) and field."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One prompt/completion record as read from disk; `source` ("path:line") is for messages."""

    prompt: str
    completion: str
    source: str


def read_rows(files: str, *, on_bad_row: str) -> tuple[list[Row], int]:
    """Reads every record of `files` (comma-separated paths or globs) as prompt/completion rows.

    Returns (rows, skipped): with on_bad_row == "error" the first bad row raises DataError; with
    "skip" bad rows are dropped, counted in `skipped` and the first few reasons are logged.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row is {on_bad_row!r}; choose 'error' or 'skip'")
    rows: list[Row] = []
    skipped = 0
    for path in expand_files(files):
        for source, raw in _jsonl_records(path):
            try:
                rows.append(_prompt_completion_row(_parse_json_object(raw, source), source))
            except DataError as error:
                if on_bad_row == "error":
                    raise
                skipped += 1
                if skipped <= _MAX_LOGGED_SKIPS:
                    logger.warning("skipping bad row: %s", error)
    if skipped > _MAX_LOGGED_SKIPS:
        logger.warning("skipped %d bad rows in total (first %d shown)", skipped, _MAX_LOGGED_SKIPS)
    return rows, skipped


def expand_files(files: str) -> list[str]:
    """Comma-separated paths or globs -> paths: each glob sorted, first occurrence kept.

    A pattern that matches no file is an error rather than an empty dataset: a typo in a path
    should stop the run before step 0, not train on less data than intended.
    """
    patterns = [p.strip() for p in files.split(",") if p.strip()]
    if not patterns:
        raise DataError("no data files given (the file list is empty)")
    paths: list[str] = []
    for pattern in patterns:
        if os.path.isfile(pattern):  # Literal first: a file name may contain "[" or "*".
            matches = [pattern]
        elif any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data file pattern {pattern!r} matches no file")
        elif os.path.isdir(pattern):
            raise DataError(f"data file {pattern!r} is a directory; name files or a glob")
        else:
            raise DataError(f"data file {pattern!r} does not exist")
        paths.extend(p for p in matches if p not in paths)
    return paths


def _error(source: str, field: str | None, message: str) -> DataError:
    where = f"{source}: field '{field}'" if field is not None else source
    return DataError(f"{where}: {message}")


def _jsonl_records(path: str) -> Iterator[tuple[str, bytes]]:
    """Yields ("path:line", raw bytes) for every non-blank line; decoding happens per line so that a
    broken byte is reported at its own line instead of failing the whole file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if raw.strip():
                yield f"{path}:{number}", raw


class _DuplicateKeyError(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key would silently keep only its last value."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _parse_json_object(raw: bytes, source: str) -> dict[str, Any]:
    """One line -> a JSON object, or DataError saying which byte, column or field is wrong."""
    try:
        text = raw.decode("utf-8")
        bad_bytes = None
    except UnicodeDecodeError as e:
        bad_bytes = f"invalid UTF-8 byte(s) {raw[e.start : e.end]!r} at byte {e.start}"
        # Parse anyway (broken bytes become lone surrogates) just to name the field they sit in.
        text = raw.decode("utf-8", "surrogateescape")
    try:
        record = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        if bad_bytes:
            raise _error(source, None, f"{bad_bytes}, and the line is not valid JSON") from None
        raise _error(source, None, f"malformed JSON: {e.msg} at column {e.colno}") from None
    except _DuplicateKeyError as e:
        raise _error(source, e.key, "appears twice in one object") from None
    field = _field_with_invalid_unicode(record)
    if bad_bytes:
        raise _error(source, field, bad_bytes)
    if field is not None:
        raise _error(source, field, "contains a lone surrogate escape (not valid Unicode)")
    if not isinstance(record, dict):
        raise _error(
            source,
            None,
            f"expected a JSON object with fields {list(PROMPT_COMPLETION_FIELDS)}, "
            f"got {type(record).__name__}",
        )
    return record


def _field_with_invalid_unicode(record: Any) -> str | None:
    """Top-level field (or the key itself) holding text that cannot be encoded as UTF-8."""

    def bad(value: Any) -> bool:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return True
            return False
        if isinstance(value, dict):
            return any(bad(k) or bad(v) for k, v in value.items())
        if isinstance(value, list):
            return any(bad(v) for v in value)
        return False

    if isinstance(record, dict):
        for key, value in record.items():
            if bad(key) or bad(value):
                return key.encode("utf-8", "backslashreplace").decode("ascii")
        return None
    return "(value)" if bad(record) else None


def _prompt_completion_row(record: dict[str, Any], source: str) -> Row:
    """{"prompt": str, "completion": str} -> Row. Extra fields are refused, not ignored, so that a
    typo such as "completon" cannot silently drop the text it was meant to carry."""
    unknown = [k for k in record if k not in PROMPT_COMPLETION_FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, PROMPT_COMPLETION_FIELDS, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        others = f" (unknown fields: {unknown})" if len(unknown) > 1 else ""
        raise _error(
            source,
            key,
            f"unknown field{others}; prompt/completion records have exactly the fields "
            f"{list(PROMPT_COMPLETION_FIELDS)}{hint}",
        )
    for field in PROMPT_COMPLETION_FIELDS:
        if field not in record:
            raise _error(source, field, "missing")
        if not isinstance(record[field], str):
            raise _error(source, field, f"must be a string, got {type(record[field]).__name__}")
    if not record["completion"].strip():
        raise _error(source, "completion", "is empty (nothing to train on)")
    return Row(prompt=record["prompt"], completion=record["completion"], source=source)
