"""Reading training records from disk: file patterns -> raw records (dicts) tagged with a source.

This module knows *file* formats only; what a record means (prompt/completion, Alpaca, ShareGPT,
messages, text) is `formats.py`'s job:

* `expand_files` turns the comma-separated `data.*_files` string into a sorted list of paths
  (a directory is accepted only when it is a saved Hugging Face dataset);
* `iter_records(path)` yields `(source, record_or_error)` for JSONL, JSON (a list of objects, or
  JSONL under a .json name), Parquet, CSV and `datasets.save_to_disk` directories. `source` is
  "path:line" for text files and "path:row N" (1-based) for Parquet/Arrow, so every later error
  can point at the record. Per-record problems are *yielded* as DataError values, so the caller
  decides between failing and counting a skip; problems with a whole file are raised.

Bad input never passes silently: every problem is a `DataError` whose message starts with
"path:line:" and names the field, so a user can open the file at the right place. With
`on_bad_row="skip"` the row is dropped and counted instead. Files are only ever opened for reading.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from sft_jax.paths import glob_files, is_url, isdir, isfile, open_binary, open_text

logger = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 10


class DataError(ValueError):
    """Bad input data or data settings; the message names the file, line (1-based) and field."""


class EmptyAnswer(DataError):
    """A record whose answer (completion, output, assistant turn) is empty: bad input for
    training, and one of the problems `audit` counts under empty answers."""


Record = dict[str, Any] | DataError


class SkipCounter:
    """Decides, per bad record, between raising and counting (on_bad_row = "error" | "skip")."""

    def __init__(self, on_bad_row: str, errors: list[DataError] | None = None):
        if on_bad_row not in ("error", "skip"):
            raise DataError(f"on_bad_row is {on_bad_row!r}; choose 'error' or 'skip'")
        self.on_bad_row = on_bad_row
        self.skipped = 0
        self.errors = errors  # every skipped row's error is appended here when given (audit)

    def bad(self, error: DataError) -> None:
        if self.on_bad_row == "error":
            raise error
        self.skipped += 1
        if self.errors is not None:
            self.errors.append(error)
        if self.skipped <= _MAX_LOGGED_SKIPS:
            logger.warning("skipping bad row: %s", error)

    def finish(self) -> int:
        if self.skipped > _MAX_LOGGED_SKIPS:
            logger.warning(
                "skipped %d bad rows in total (first %d shown)", self.skipped, _MAX_LOGGED_SKIPS
            )
        return self.skipped


def iter_records(path: str) -> Iterator[tuple[str, Record]]:
    """(source, record dict or DataError) for every record of one file, in file order."""
    lower = path.lower()
    if not isdir(path):
        refuse_compressed(path)
    if isdir(path):
        yield from _arrow_records(path, load_hf_dataset(path))
    elif lower.endswith(".parquet"):
        yield from _arrow_records(path, _load_parquet(path))
    elif lower.endswith(".csv"):
        yield from _csv_records(path)
    elif lower.endswith(".json") and not _looks_like_jsonl(path):
        yield from _json_list_records(path)
    else:  # .jsonl, .jsonl-named-json, and anything else is read as JSON Lines
        for source, raw in _jsonl_records(path):
            try:
                yield source, _parse_json_object(raw, source)
            except DataError as error:
                yield source, error


def is_json_lines(path: str) -> bool:
    """Whether `iter_records` reads `path` as JSON Lines (.jsonl, a .json file of objects one a
    line, and any name it does not know)."""
    lower = path.lower()
    return not (
        isdir(path)
        or lower.endswith((".parquet", ".csv"))
        or (lower.endswith(".json") and not _looks_like_jsonl(path))
    )


def decode_record(source: str, item: bytes | Record) -> Record:
    """A record from `raw_records.lazy_records`: parses raw JSON Lines bytes; other items pass
    through. The one place a listed record is parsed."""
    if not isinstance(item, bytes):
        return item
    try:
        return _parse_json_object(item, source)
    except DataError as error:
        return error


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
        if isfile(pattern):  # Literal first: a file name may contain "[" or "*".
            matches = [pattern]
        elif any(c in pattern for c in "*?["):
            matches = glob_files(pattern)
            if not matches:
                raise DataError(f"data file pattern {pattern!r} matches no file")
        elif isdir(pattern):
            if not is_hf_dataset_dir(pattern):
                raise DataError(
                    f"data file {pattern!r} is a directory but not a saved Hugging Face dataset "
                    "(no dataset_info.json / state.json / dataset_dict.json); name files or a glob"
                )
            matches = [pattern]
        else:
            raise DataError(f"data file {pattern!r} does not exist")
        for path in matches:
            if not isdir(path):
                refuse_compressed(path)
        paths.extend(p for p in matches if p not in paths)
    return paths


# Leading bytes of the compressed formats a data file is most often shipped in.
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    **{b"BZh" + bytes([c]): "bzip2" for c in b"123456789"},  # "BZh" + block size
    b"\xfd7zXZ\x00": "xz",
}


def refuse_compressed(path: str) -> None:
    """DataError when `path` is a compressed file (by its leading bytes, or a .gz/.zst/.bz2/.xz
    name). Read as JSON Lines, its bytes would only fail as "invalid UTF-8" at line 1, which
    does not say what is wrong; naming the compression says what to do."""
    with open_binary(path) as f:
        head = f.read(6)
    kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is None and path.lower().endswith((".gz", ".zst", ".bz2", ".xz")):
        kind = path.rsplit(".", 1)[-1]
    if kind is not None:
        raise DataError(
            f"{path}: a {kind}-compressed file; compressed data files are not read. "
            "Decompress it first (e.g. `gunzip`, `zstd -d`, `bunzip2`, `unxz`) and name the "
            "decompressed file"
        )


def field_error(source: str, field: str | None, message: str, kind: type = DataError) -> DataError:
    """The DataError for `field` of the record at `source` ("path:line: field 'x': message")."""
    where = f"{source}: field '{field}'" if field is not None else source
    return kind(f"{where}: {message}")


def _jsonl_records(path: str) -> Iterator[tuple[str, bytes]]:
    """Yields ("path:line", raw bytes) for every non-blank line; decoding happens per line so that a
    broken byte is reported at its own line instead of failing the whole file."""
    with open_binary(path) as f:
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
            raise field_error(
                source, None, f"{bad_bytes}, and the line is not valid JSON"
            ) from None
        raise field_error(source, None, f"malformed JSON: {e.msg} at column {e.colno}") from None
    except _DuplicateKeyError as e:
        raise field_error(source, e.key, "appears twice in one object") from None
    except (RecursionError, ValueError) as e:
        raise field_error(source, None, _unreadable_json(e)) from None
    field = _field_with_invalid_unicode(record)
    if bad_bytes:
        raise field_error(source, field, bad_bytes)
    if field is not None:
        raise field_error(source, field, "contains a lone surrogate escape (not valid Unicode)")
    if not isinstance(record, dict):
        raise field_error(source, None, f"expected a JSON object, got {type(record).__name__}")
    return record


def _unreadable_json(error: RecursionError | ValueError) -> str:
    """Why valid-looking JSON could not be decoded: Python's json raises these (not
    JSONDecodeError) for nesting deeper than its recursion limit and for integers of more than
    4300 digits; without this they escaped as a traceback instead of a row error."""
    if isinstance(error, RecursionError):
        return "malformed JSON: nested too deeply to read"
    if "integer string conversion" in str(error):  # Python's advice here is not the user's fix
        return "malformed JSON: a number of more than 4300 digits"
    return f"malformed JSON: {error}"


def _field_with_invalid_unicode(record: Any) -> str | None:
    """Top-level field (or the key itself) holding text that cannot be encoded as UTF-8."""

    def bad(value: Any) -> bool:
        # A stack, not recursion: JSON that the decoder accepts (nested a few hundred deep) must
        # not overflow Python's recursion limit here.
        stack = [value]
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return True
            elif isinstance(value, dict):
                stack.extend(value.keys())
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
        return False

    if isinstance(record, dict):
        for key, value in record.items():
            if bad(key) or bad(value):
                return key.encode("utf-8", "backslashreplace").decode("ascii")
        return None
    return "(value)" if bad(record) else None


def is_hf_dataset_dir(path: str) -> bool:
    """A `datasets.Dataset.save_to_disk` (or DatasetDict) directory."""
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    return any(isfile(os.path.join(path, n)) for n in names)


def load_hf_dataset(path: str) -> Any:
    """The saved dataset's (train split's) Arrow table, memory-mapped by `datasets`."""
    import datasets  # Deferred: heavy import, only needed for dataset directories.

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many types; all mean "cannot read"
        raise DataError(f"{path}: cannot load the saved Hugging Face dataset: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    return ds.data.table if hasattr(ds.data, "table") else ds.data


def _load_parquet(path: str) -> Any:
    import pyarrow.parquet as pq

    try:
        if is_url(path):
            with open_binary(path) as f:
                return pq.read_table(f)
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e


def _arrow_records(path: str, table: Any) -> Iterator[tuple[str, Record]]:
    """Rows of an Arrow table as dicts; "path:row N" sources (1-based, like line numbers).

    Arrow has one schema per column, so a key that only some rows, messages or tool schemas have
    comes back as None in all the others (`'tool_calls' in message` then holds for every message,
    and templates break). Rows are read as the JSON objects they were made from: entries holding
    None are dropped at every depth. A null written on purpose (`"default": null` in a tool
    schema) cannot be told apart from a fill-in; that rare loss is documented."""
    number = 0
    for batch in table.to_batches(max_chunksize=4096):
        for record in batch.to_pylist():
            number += 1
            yield f"{path}:row {number}", drop_none(record)


def drop_none(value: Any) -> Any:
    """`value` without the dict entries whose value is None, at every depth (list items stay)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def _csv_records(path: str) -> Iterator[tuple[str, Record]]:
    """CSV with a header row. Broken UTF-8 is decoded with surrogateescape so that the bad bytes
    can be reported in their own field and line instead of failing the whole file.

    csv.reader, not DictReader: DictReader skips blank lines silently, so the line a row starts
    on cannot be told from its `line_num` (the last line read). Here every record, blank ones
    included, starts on the line after the previous record's last one, also when a quoted field
    spans several lines.
    """
    import csv

    with open_text(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for values in reader:
            source = f"{path}:{start}"
            start = reader.line_num + 1
            if not values:  # a blank line, skipped as csv.DictReader does
                continue
            if len(values) > len(header):
                yield source, field_error(source, None, "more values than header columns")
                continue
            if len(values) < len(header):  # else the missing columns read as null
                open_quote = any("\n" in v for v in values)  # it joined the lines after it
                hint = "; a quote left open joins the lines after it" if open_quote else ""
                yield (
                    source,
                    field_error(
                        source,
                        header[len(values)],
                        f"missing: {len(values)} of {len(header)} header columns{hint}",
                    ),
                )
                continue
            row = {**dict.fromkeys(header), **dict(zip(header, values, strict=False))}
            bad = _field_with_invalid_unicode(row)
            if bad is not None:
                yield source, field_error(source, bad, "contains invalid UTF-8 bytes")
                continue
            yield source, row


def _looks_like_jsonl(path: str) -> bool:
    """A .json file whose first non-blank character is "{" holds JSON Lines, not a list; unless
    that "{" is alone on its line: one pretty-printed object, which the list reader refuses by
    name (as JSON Lines its first line would be reported as malformed JSON)."""
    with open_binary(path) as f:
        head = f.read(4096).lstrip(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"{") and head.split(b"\n", 1)[0].strip() != b"{"


def _json_list_records(path: str) -> Iterator[tuple[str, Record]]:
    """A JSON array of objects, decoded element by element so each record gets its line number."""
    with open_binary(path) as f:
        data = f.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 byte(s) {data[e.start : e.end]!r}; "
            "a JSON list file cannot be read around them (use JSONL to skip single bad lines)"
        ) from None
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates)
    line = _LineCounter(text)
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        what = "; this one holds one object over several lines" if text.startswith("{", pos) else ""
        raise DataError(
            f"{path}:{line.at(pos)}: a .json data file must hold a list of objects, or one object "
            f"per line (JSON Lines){what}"
        )
    pos = _skip_ws(text, pos + 1)
    while not text.startswith("]", pos):
        source = f"{path}:{line.at(pos)}"
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}"
            ) from None
        except _DuplicateKeyError as e:
            raise field_error(source, e.key, "appears twice in one object") from None
        except (RecursionError, ValueError) as e:
            raise field_error(source, None, _unreadable_json(e)) from None
        yield source, _check_record(record, source)
        pos = _skip_ws(text, pos)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{line.at(pos)}: malformed JSON: expected ',' or ']'")
    if text[pos + 1 :].strip():
        raise DataError(f"{path}:{line.at(pos + 1)}: malformed JSON: extra data after the list")


class _LineCounter:
    """Line numbers (1-based) of increasing positions in one text. Each newline is counted once:
    counting from the start for every record made reading a list file quadratic in its size."""

    def __init__(self, text: str):
        self._text, self._pos, self._line = text, 0, 1

    def at(self, pos: int) -> int:
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


def _check_record(record: Any, source: str) -> Record:
    if not isinstance(record, dict):
        return field_error(source, None, f"expected a JSON object, got {type(record).__name__}")
    field = _field_with_invalid_unicode(record)
    if field is not None:
        return field_error(source, field, "contains a lone surrogate escape (not valid Unicode)")
    return record


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
