"""One path layer for data files and the tokenisation cache: local paths or object-store URLs.

A path with a scheme (`gs://bucket/data.jsonl`, `s3://...`) goes through `etils.epath`, whose
backend for object stores is fsspec (`gcsfs` for gs://, installed separately:
`pip install gcsfs`); any other path is a local path, handled by `os` exactly as before, so local
behaviour does not depend on this layer. Only what the data stage needs is here: file and
directory tests, opening for reading, and globs.
"""

from __future__ import annotations

import io
import os
from typing import IO, Any

from etils import epath

_GLOB_CHARS = "*?["


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object in a store (has a scheme such as gs://) rather than a
    local file."""
    return "://" in os.fspath(path)


def isfile(path: str) -> bool:
    return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def open_binary(path: str) -> IO[bytes]:
    """The file for reading bytes (local: `open(path, "rb")`)."""
    return epath.Path(path).open("rb") if is_url(path) else open(path, "rb")


def open_text(path: str, **kwargs: Any) -> IO[str]:
    """The file for reading text with `io.open`'s encoding / errors / newline arguments."""
    if not is_url(path):
        return open(path, encoding=kwargs.pop("encoding", None), **kwargs)
    return io.TextIOWrapper(open_binary(path), **kwargs)


def glob_files(pattern: str) -> list[str]:
    """The files a glob matches, sorted (`**` matches any depth). Locally `glob.glob`; in an
    object store the part before the first component with a wildcard is the directory searched."""
    if not is_url(pattern):
        import glob

        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = epath.Path(f"{scheme}://{'/'.join(parts[:first])}")
    return sorted(str(p) for p in root.glob("/".join(parts[first:])) if p.is_file())
