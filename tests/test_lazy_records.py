"""raw_records.lazy_records: the same records, sources, order and errors as source.iter_records,
read back lazily (JSON Lines by byte offset, Parquet by row group), with a small index."""

import json

import numpy as np
import pytest

from sft_jax.data import raw_records
from sft_jax.data.raw_records import JsonLines, count_records, lazy_records
from sft_jax.data.source import DataError, decode_record, iter_records

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _expected(path):
    return [(source, _plain(record)) for source, record in iter_records(str(path))]


def _plain(record):
    return str(record) if isinstance(record, DataError) else record


def _decoded(records, positions=None):
    items = records if positions is None else records.take(positions)
    return [(source, _plain(decode_record(source, item))) for source, item in items]


AWKWARD = (
    b'\xef\xbb\xbf{"text": "bom first"}\n'
    b"\n"
    b"   \t \n"
    b'{"text": "crlf"}\r\n'
    b"\r\n"
    b'{"text": "caf\xc3\xa9 \xe2\x98\x95 \xf0\x9f\x99\x82"}\n'
    b'{"text": broken\n'
    b'{"text": "bad \xff byte"}\n'
    b"[1, 2]\n"
    b'{"a": 1, "a": 2}\n'
    b"\x0b\x0c\n"
    b'{"text": "no newline at the end"}'
)


def test_jsonl_matches_iter_records(tmp_path):
    path = tmp_path / "awkward.jsonl"
    path.write_bytes(AWKWARD)
    expected = _expected(path)
    assert [s.rsplit(":", 1)[1] for s, _ in expected] == ["1", "4", "6", "7", "8", "9", "10", "12"]
    assert sum(isinstance(r, str) for _, r in expected) == 4  # the four bad lines are errors
    records = lazy_records(str(path))
    assert len(records) == len(expected) == count_records(str(path))
    assert _decoded(records) == expected
    assert [_decoded([records[i]])[0] for i in range(len(records))] == expected
    assert _decoded([records[-1]]) == expected[-1:]
    order = [7, 0, 3, 3, 5, 1]
    assert _decoded(records, order) == [expected[i] for i in order]
    assert _decoded(records, np.array([2, 4, 6])) == [expected[i] for i in (2, 4, 6)]
    raw = dict(_jsonl_lines(path))
    assert {s: item for s, item in records} == raw  # the same bytes as iterating the file


def _jsonl_lines(path):
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if line.strip():
                yield f"{path}:{number}", line


def test_several_files_and_chunk_boundaries(tmp_path, monkeypatch):
    """Lines that straddle the index's read chunks, blank runs across them, a file list."""
    monkeypatch.setattr(raw_records, "_CHUNK", 7)
    monkeypatch.setattr(raw_records, "_SPAN", 16)
    monkeypatch.setattr(raw_records, "_GAP", 3)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines = [json.dumps({"text": "x" * (i % 13)}) if i % 4 else "  " for i in range(60)]
    first.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    second.write_bytes(b"\n\n" + AWKWARD)
    records = lazy_records(f"{first},{second}")
    expected = _expected(first) + _expected(second)
    assert len(records) == len(expected) == count_records(f"{first},{second}")
    assert _decoded(records) == expected
    picks = [50, 2, 44, 45, 9, 0, len(expected) - 1]
    assert _decoded(records, picks) == [expected[i] for i in picks]


def test_parquet_row_groups_read_lazily_out_of_order(tmp_path, monkeypatch):
    rows = [
        {"prompt": f"p{i}", "completion": f"c{i}", "extra": None if i % 2 else i} for i in range(50)
    ]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    assert pq.ParquetFile(path).metadata.num_row_groups == 7
    monkeypatch.setattr(raw_records, "_BATCH", 3)
    loaded = []
    read_row_group = raw_records._read_row_group
    monkeypatch.setattr(
        raw_records, "_read_row_group", lambda p, g: loaded.append(g) or read_row_group(p, g)
    )
    records = lazy_records(str(path))
    expected = _expected(path)
    assert len(records) == 50 == count_records(str(path)) and not loaded  # metadata only
    order = [49, 0, 17, 16, 8, 3, 41, 40, 0]
    assert _decoded(records, order) == [expected[i] for i in order]
    assert expected[3] == (f"{path}:row 4", {"prompt": "p3", "completion": "c3"})
    assert _decoded(records) == expected
    assert len(records._segments[0]._tables) <= 2  # decoded row groups kept


def test_other_formats_pass_through(tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,completion\na,b\n\nc,d,e\nf,g\n", encoding="utf-8")
    listing = tmp_path / "rows.json"
    listing.write_text('[{"text": "a"},\n {"text": "b"}]', encoding="utf-8")
    files = f"{csv},{listing}"
    expected = _expected(csv) + _expected(listing)
    records = lazy_records(files)
    assert len(records) == 5 == count_records(files)
    assert _decoded(records) == expected
    assert _decoded(records, [4, 1]) == [expected[4], expected[1]]


def test_out_of_range(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    records = lazy_records(str(path))
    with pytest.raises(IndexError):
        records[2]
    with pytest.raises(IndexError):
        records[-3]
    with pytest.raises(IndexError):
        list(records.take([0, 2]))
    with pytest.raises(IndexError):
        list(records.take([-1]))
    assert list(records.take([])) == []


def test_index_is_small(tmp_path):
    """200k tiny lines: the index holds a few numbers a line, no Python object per record."""
    path = tmp_path / "many.jsonl"
    n = 200_000
    path.write_bytes(b'{"t":1}\n' * n)
    index = JsonLines(str(path))
    assert index.count == n
    per_record = (index.offsets.nbytes + index.lengths.nbytes + index.lines.nbytes) / n
    assert per_record < 40, per_record
    records = lazy_records(str(path))
    assert records[n - 1] == (f"{path}:{n}", b'{"t":1}\n')
