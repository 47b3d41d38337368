"""One path layer for everything the package reads and writes by path: local paths, or
object-store URLs.

A path with a scheme (`gs://bucket/run`, `s3://...`) goes through `etils.epath`, whose backend for
object stores is fsspec (`gcsfs` for gs://, installed separately: `pip install gcsfs`); any other
path is a local path, handled by `os` exactly as before, so local behaviour does not depend on
this layer. The data stage (files, the tokenisation cache) and the workdir (metrics.jsonl,
train.log, summary.json, config.json, the lock, the report) use it; Orbax writes checkpoints to
either itself.

An object store has no append and no rename: an object is replaced whole. `AppendFile` is the one
way to append (metrics.jsonl, train.log): locally it appends as before; on a store it keeps the
object's text and rewrites the whole object, at most every `AppendFile.flush_s` seconds (stores
limit how often one object may be replaced) and when closed or the process exits, so a process
killed outright loses at most the last `flush_s` seconds of lines there.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import sys
import time
from typing import IO, Any

import fsspec.config
from etils import epath

_GLOB_CHARS = "*?["

# fsspec keeps every directory listing of an object store for the life of the process and answers
# `exists`, `is_file` and the size a read stops at from it. Other hosts (and TensorStore, for the
# checkpoints) create, replace and delete objects of the same workdir and cache, which that cache
# never hears of: with it, an object created since a listing is not seen and one replaced since
# reads back cut to its old size. So the stores' clients made after this import keep no listings
# (a user's own setting for a protocol is left as it is).
for _protocol in ("gs", "gcs", "s3", "s3a"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object in a store (has a scheme such as gs://) rather than a
    local file."""
    return "://" in os.fspath(path)


def join(base: str, *parts: str) -> str:
    """`base/part/...`: os.path.join locally, "/" between the parts of a URL."""
    if not is_url(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *parts])


def absolute(path: str) -> str:
    """A local path made absolute (os.path.abspath); a URL as it is."""
    return path if is_url(path) else os.path.abspath(path)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    """Creates the directory and its parents if missing (a store has no directories to make)."""
    if is_url(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Deletes one file or object (FileNotFoundError when absent)."""
    if is_url(path):
        epath.Path(path).unlink()
    else:
        os.remove(path)


def open_binary(path: str) -> IO[bytes]:
    """The file for reading bytes (local: `open(path, "rb")`)."""
    return epath.Path(path).open("rb") if is_url(path) else open(path, "rb")


def open_text(path: str, **kwargs: Any) -> IO[str]:
    """The file for reading text with `io.open`'s encoding / errors / newline arguments."""
    if not is_url(path):
        return open(path, encoding=kwargs.pop("encoding", None), **kwargs)
    return io.TextIOWrapper(open_binary(path), **kwargs)


def read_text(path: str, errors: str = "strict") -> str:
    """The whole file as UTF-8 text (FileNotFoundError when absent)."""
    with open_text(path, encoding="utf-8", errors=errors) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Replaces the file with `text` (UTF-8); on a store one upload, whole or not at all."""
    if is_url(path):
        epath.Path(path).write_text(text, encoding="utf-8")
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str, data: bytes) -> None:
    if is_url(path):
        epath.Path(path).write_bytes(data)
        return
    with open(path, "wb") as f:
        f.write(data)


def create_exclusive(path: str, text: str) -> bool:
    """Creates the file with `text` only if it does not exist -> whether this call created it.

    Locally O_CREAT|O_EXCL. On a store the upload carries the precondition "no object yet"
    (ifGenerationMatch=0 on Cloud Storage, through fsspec's create mode), so of two racing
    creators one fails; the object is looked for first as well, for stores (and emulators) that
    ignore the precondition, where two creators within moments of each other can both pass."""
    if not is_url(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    if exists(path):
        return False
    import fsspec

    fs, location = fsspec.core.url_to_fs(path)
    try:
        fs.pipe_file(location, text.encode("utf-8"), mode="create")
    except FileExistsError:
        return False
    return True


def glob_files(pattern: str) -> list[str]:
    """The files a glob matches, sorted (`**` matches any depth, none included, as locally).
    Locally `glob.glob`; in an object store fsspec's glob under the part before the first
    component with a wildcard (epath's refuses `**` on Cloud Storage)."""
    if not is_url(pattern):
        import glob

        return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    import fsspec

    fs, root = fsspec.core.url_to_fs(f"{scheme}://{'/'.join(parts[:first])}")
    found = fs.glob(f"{root.rstrip('/')}/{'/'.join(parts[first:])}", detail=True)
    return sorted(f"{scheme}://{name}" for name, info in found.items() if info["type"] == "file")


class AppendFile:
    """A text file that lines are appended to (metrics.jsonl, train.log).

    Locally every `append` opens the file in append mode, writes and closes it, as before. On a
    store, which cannot append, the object's text is read once when this opens, kept with what is
    appended, and the whole object rewritten: at the first append, then at most every `flush_s`
    seconds, and on `flush` / `close` / exit of the process (registered with atexit)."""

    flush_s = 5.0

    def __init__(self, path: str):
        self.path = path
        self.remote = is_url(path)
        self._chunks: list[str] = []
        self._dirty = False
        self._flushed_at = -float("inf")
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self._chunks.append(read_text(path))
            atexit.register(self._flush_at_exit)

    def append(self, text: str) -> None:
        if not self.remote:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
            return
        self._chunks.append(text)
        self._dirty = True
        if time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Uploads the text now if anything was appended since the last upload (store only)."""
        if not self._dirty:
            return
        text = "".join(self._chunks)
        self._chunks = [text]
        write_text(self.path, text)
        self._dirty, self._flushed_at = False, time.monotonic()

    def close(self) -> None:
        self.flush()
        if self.remote:
            atexit.unregister(self._flush_at_exit)

    def _flush_at_exit(self) -> None:
        """The last upload of a file nobody closed (a crash): the store's client may already be
        shutting down then, so a failure is one line on stderr, not a traceback."""
        try:
            self.flush()
        except Exception as e:  # anything the store's client raises at exit
            print(f"warning: could not write the last lines of {self.path}: {e}", file=sys.stderr)


def listdir(path: str) -> list[str]:
    """The names in a directory (on a store: under the prefix `path/`), asked for afresh on a
    store even where a user's fsspec configuration keeps listings (see the note at the top)."""
    if not is_url(path):
        return os.listdir(path)
    import fsspec

    fs, location = fsspec.core.url_to_fs(path)
    return [basename(p) for p in fs.ls(location, detail=False, refresh=True)]


def move(source: str, target: str) -> None:
    """Moves a file or directory tree (on a store: copied object by object, then deleted)."""
    if not is_url(source):
        import shutil

        shutil.move(source, target)
        return
    import fsspec

    fs, location = fsspec.core.url_to_fs(source)
    fs.mv(location, fsspec.core.url_to_fs(target)[1], recursive=True)
