"""Block digests of the tokenisation cache's large array files, so a streamed start need not read
the whole cache before step 0.

A part's per-piece and per-token arrays (`BLOCKED`: the tokens, loss mask, piece starts and
piece sources, nearly all of its bytes) are recorded in its marker as one blake2b digest per
`BLOCK` bytes instead of one per file. The in-memory path still verifies every block when it
opens a part (it reads every byte anyway). A streamed start checks only sizes and array headers
at open; a `BlockGuard` per file then verifies a block the first time any of its bytes is read in
this process (one bitmap lookup per read after that), so every byte is still verified once before
it reaches a batch, and a restart costs no full read of a cache larger than memory. A mismatch
raises `CacheCorrupt` and removes the part's completion marker, so the next start encodes the
part's records again, as for a part found damaged at open.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

import numpy as np
from etils import epath

from sft_jax.data.source import DataError

logger = logging.getLogger(__name__)

BLOCK = 64 << 20  # bytes per digest of a blocked file (a multiple of 64: no element straddles)
# The per-piece and per-token arrays and their dtypes: a lazily opened file's header (in its
# first block, not verified at open) must give exactly these, or the file is not trusted.
DTYPES = {
    "piece_starts.npy": np.dtype(np.int64),
    "tokens.npy": np.dtype(np.int32),
    "loss_mask.npy": np.dtype(bool),
    "source_files.npy": np.dtype(np.int32),
    "source_lines.npy": np.dtype(np.int64),
}
BLOCKED = frozenset(DTYPES)
_READ = 1 << 20


class CacheCorrupt(DataError):
    """A block of a cache part does not match its recorded digest, found while training."""


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def block_digests(data: bytes, block: int) -> list[str]:
    """One digest per `block` bytes of `data` (none for empty data)."""
    view = memoryview(data)
    return [digest(view[lo : lo + block]) for lo in range(0, len(data), block)]


def file_block_digests(path: str | os.PathLike, block: int) -> list[str]:
    """`block_digests` of a file, read 1 MiB at a time."""
    size, out = os.path.getsize(path), []
    with open(path, "rb") as f:
        for lo in range(0, size, block):
            out.append(_hash_range(f, lo, min(lo + block, size)))
    return out


def _hash_range(f, lo: int, hi: int) -> str:
    h = hashlib.blake2b(digest_size=20)
    f.seek(lo)
    while lo < hi:
        chunk = f.read(min(_READ, hi - lo))
        if not chunk:
            break  # a file shorter than recorded: the digest will not match
        h.update(chunk)
        lo += len(chunk)
    return h.hexdigest()


class BlockGuard:
    """Verifies the blocks of one memory-mapped array file on first read (thread-safe).

    `check(lo, hi)` is called with element indices before `array[lo:hi]` is read; once every
    block has been verified, `complete` is set and a check costs one attribute test. `marker`
    names the part's completion marker, removed on a mismatch."""

    def __init__(
        self,
        directory: epath.Path,
        file: str,
        digests: list[str],
        block: int,
        array: np.ndarray,
        marker: str,
    ):
        self.directory, self.file, self._digests, self._block = directory, file, digests, block
        self._marker = marker
        self._path = os.fspath(directory / file)
        self._size = os.path.getsize(self._path)
        self._offset = int(getattr(array, "offset", 0))
        self._itemsize = array.dtype.itemsize
        self._done = bytearray(len(digests))
        self._left = len(digests)
        self._lock = threading.Lock()
        self.verified = 0  # blocks verified in this process
        self.complete = not digests

    @property
    def blocks(self) -> int:
        return len(self._digests)

    def check(self, lo: int, hi: int) -> None:
        """Verifies (once) the blocks holding elements [lo, hi)."""
        if self.complete or hi <= lo:
            return
        first = (self._offset + lo * self._itemsize) // self._block
        last = (self._offset + hi * self._itemsize - 1) // self._block
        for b in range(first, last + 1):
            if not self._done[b]:
                self._verify(b)

    def check_at(self, indices: np.ndarray) -> None:
        """Verifies (once) the blocks holding the elements at `indices`."""
        if self.complete or not len(indices):
            return
        at = self._offset + np.asarray(indices, np.int64) * self._itemsize
        for b in np.unique(at // self._block).tolist():
            if not self._done[b]:
                self._verify(b)

    def _verify(self, b: int) -> None:
        with self._lock:
            if self._done[b]:
                return  # another thread verified it meanwhile
            lo, hi = b * self._block, min((b + 1) * self._block, self._size)
            with open(self._path, "rb") as f:
                found = _hash_range(f, lo, hi)
            if found != self._digests[b]:
                self._fail(lo, hi)
            self._done[b] = 1
            self._left -= 1
            self.verified += 1
            self.complete = not self._left

    def _fail(self, lo: int, hi: int) -> None:
        try:
            (self.directory / self._marker).unlink(missing_ok=True)
            marked = "Its completion marker has been removed, so the next start encodes the"
            marked += " part's records again: restart the run."
        except OSError as error:
            marked = f"Its marker could not be removed ({error}): delete {self.directory}"
            marked += " and restart the run."
        message = (
            f"the tokenisation cache is corrupt: {self.directory / self.file} (bytes {lo}-{hi}) "
            "does not match the digest recorded when its part was written (a disk or copy "
            f"error, or the file was changed since), so the part cannot be trusted. {marked}"
        )
        logger.error("%s", message)
        raise CacheCorrupt(message)
