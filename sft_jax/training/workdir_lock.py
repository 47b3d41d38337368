"""One workdir, one writer: `WORKDIR/train.lock` refuses a second training start on a busy workdir.

Without it two starts on one workdir raced: one deleted the other's in-flight checkpoint, their
checkpoints replaced each other and metrics.jsonl mixed both. `train.train_and_evaluate` holds
the lock for the whole run, and a start that finds it held by a live run stops with exit 2
before anything is read or written, naming the holder.

The file is JSON: host, pid, the pid's start time (Linux /proc; it tells a reused pid from the
holder), a random token and when it was taken. It is created atomically: written under a unique
name and hard-linked to `train.lock` (atomic on local file systems and on NFS, where O_EXCL was
not always), or, where the file system has no hard links (Cloud Storage FUSE), created with
O_CREAT|O_EXCL; gcsfuse does not make that atomic between hosts, so there two starts within
moments of each other can still both pass.

Multi-process runs: only process 0 takes the lock, and it broadcasts the outcome, so every
process of a refused run stops with exit 2 together (per-process locks would let a second run
with another process count through, and a refused process 0 would leave the others waiting).

Released in a `finally`: on finishing, on exit 2 after it was taken, on preemption (42), on a
non-finite abort (43), on a crash. After a SIGKILL or a lost host the file stays, and the next
start recovers it when the holder is provably gone:

- same host: its pid is not alive, or is alive with another start time (a reused pid, e.g. a
  restarted container), or is this very process;
- another host, whose processes cannot be seen: the holder touches the file every `HEARTBEAT_S`
  seconds. The new start watches it (a fresh open and fstat per poll, which NFS revalidates) and
  takes it over when its mtime, size and content stay unchanged for `STALE_S` seconds; a change
  means the holder is alive and the start is refused. Only changes are compared, never the
  clocks of two hosts.

Taking over renames the stale file aside first, so of two starts recovering at once only one
succeeds; a file that turns out to be another start's fresh lock is linked back.

A workdir in an object store (gs://bucket/run) has no links, renames or mtimes to touch; there
the lock is an object created with the precondition "does not exist yet" (Cloud Storage's
ifGenerationMatch=0, `paths.create_exclusive`), so of two starts one creates it; the holder's
heartbeat rewrites it with a growing "beat", which is what a start on another host watches; the
same-host checks are as above. Taking over a stale lock deletes it and creates a new one: two
requests, so two starts recovering the same stale lock at the same moment can both pass (the
same limitation as gcsfuse above), and a store that ignores the precondition (some emulators)
only has the look before the create.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from sft_jax import console, paths
from sft_jax.config import ConfigError

LOCK_NAME = "train.lock"
HEARTBEAT_S = 20.0  # how often the holder touches the lock file
STALE_S = 90.0  # an unchanged lock of another host is taken over after this long
_NO_HARD_LINKS = {"EPERM", "ENOTSUP", "EOPNOTSUPP", "ENOSYS", "EXDEV"}


class WorkdirBusyError(ConfigError):
    """Another live run holds the workdir (exit 2: nothing was trained or written)."""


def _pid_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class WorkdirLock:
    """The lock of one workdir, taken by `acquire` and given back by `release`."""

    def __init__(
        self,
        workdir: str,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
        poll_s: float = 1.0,
    ):
        self.path = paths.join(workdir, LOCK_NAME)
        self.remote = paths.is_url(workdir)
        self.beat = 0  # how often an object-store lock was rewritten by its heartbeat
        self._info: dict[str, Any] = {}
        self.heartbeat_s, self.stale_s, self.poll_s = heartbeat_s, stale_s, poll_s
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ----------------------------------------------------------------- taking and giving back

    def acquire(self) -> None:
        """Takes the lock, recovering a stale one; WorkdirBusyError when a live run holds it."""
        for _ in range(5):  # each round ends in success, refusal, or a stale lock moved aside
            if self._create():
                self.held = True
                self._beat = threading.Thread(target=self._heartbeat, daemon=True)
                self._beat.start()
                return
            holder = self._read(self.path)
            if holder is None:
                continue  # released between our attempt and the read
            state, why = self._holder_state(holder)
            if state == "alive":
                raise WorkdirBusyError(self._refusal(holder, why))
            if state == "gone":
                self._take_over(holder, why)
        raise WorkdirBusyError(f"could not take the workdir lock {self.path} (contended)")

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        with contextlib.suppress(OSError):
            if (self._read(self.path) or {}).get("token") == self.token:
                paths.remove(self.path)

    def _create(self) -> bool:
        """One atomic attempt to create the lock file with our identity -> whether it worked."""
        pid = os.getpid()
        info = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_start": _pid_start(pid),
            "token": self.token,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        text = json.dumps(info)
        if self.remote:
            self._info = info
            return paths.create_exclusive(self.path, text)
        tmp = f"{self.path}.{self.token}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            # NFS may answer a retransmitted link with EEXIST although the first one worked.
            return os.stat(tmp).st_nlink == 2
        except OSError as e:
            if errno.errorcode.get(e.errno or 0) not in _NO_HARD_LINKS:
                raise
            return self._create_exclusive(text)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    def _create_exclusive(self, text: str) -> bool:
        """O_CREAT|O_EXCL, for file systems without hard links."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True

    def _heartbeat(self) -> None:
        """Touches the lock file every `heartbeat_s` while it is still ours."""
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                if (self._read(self.path) or {}).get("token") != self.token:
                    console.warn(f"the workdir lock {self.path} was taken over by another start")
                    return
                if self.remote:  # an object has no mtime to touch: its content changes instead
                    self.beat += 1
                    paths.write_text(self.path, json.dumps({**self._info, "beat": self.beat}))
                else:
                    os.utime(self.path)

    # ----------------------------------------------------------------- judging a holder

    @staticmethod
    def _read(path: str) -> dict[str, Any] | None:
        """The lock's JSON; {} when unreadable (being written, or garbage); None when absent."""
        try:
            text = paths.read_text(path, errors="replace")
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return value if isinstance(value, dict) else {}

    def _holder_state(self, holder: dict[str, Any]) -> tuple[str, str]:
        """("alive" | "gone" | "released", why) for the run described by `holder`."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return self._watch()
        pid = holder["pid"]
        if pid == os.getpid():
            return "gone", f"its pid {pid} is this process"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone", f"process {pid} is not running"
        except PermissionError:
            pass  # alive, owned by another user
        start = _pid_start(pid)
        if holder.get("pid_start") and start and start != holder["pid_start"]:
            return "gone", f"pid {pid} now belongs to another process"
        return "alive", f"process {pid} is running on this host"

    def _snapshot(self) -> tuple | None:
        if self.remote:
            try:
                return (paths.read_text(self.path, errors="replace"),)
            except FileNotFoundError:
                return None
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                return (st.st_ino, st.st_size, st.st_mtime_ns, f.read())
        except FileNotFoundError:
            return None

    def _watch(self) -> tuple[str, str]:
        """A lock of another host: alive if it changes within `stale_s`, else gone."""
        first = self._snapshot()
        if first is None:
            return "released", ""
        console.log(
            f"workdir lock {self.path} is held by another host; watching its heartbeat for up to "
            f"{self.stale_s:.0f} s"
        )
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:
            time.sleep(self.poll_s)
            now = self._snapshot()
            if now is None:
                return "released", ""
            if now != first:
                return "alive", "its heartbeat is live"
        return "gone", f"no heartbeat for {self.stale_s:.0f} s"

    def _take_over(self, holder: dict[str, Any], why: str) -> None:
        """Moves a stale lock aside (one racing start wins); puts back a lock that turns out to
        be another start's fresh one."""
        if self.remote:  # no rename: delete it if it is still the stale one (module docstring)
            if (self._read(self.path) or {}).get("token") == holder.get("token"):
                with contextlib.suppress(FileNotFoundError):
                    paths.remove(self.path)
                console.warn(f"recovered the stale workdir lock of {_describe(holder)} ({why})")
            return
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        else:
            console.warn(f"recovered the stale workdir lock of {_describe(holder)} ({why})")
        with contextlib.suppress(OSError):
            os.remove(aside)

    def _refusal(self, holder: dict[str, Any], why: str) -> str:
        return (
            f"workdir '{os.path.dirname(self.path)}' is in use by another training run "
            f"({_describe(holder)}; {why}). Wait for it to end or stop it; if that process is "
            f"gone, delete {self.path} and start again"
        )


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock file"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[WorkdirLock]:
    """Holds the workdir lock for the block: taken by process 0, the outcome shared with every
    process (a refused run raises WorkdirBusyError on all of them), released on any exit."""
    lock = WorkdirLock(workdir)
    refusal: WorkdirBusyError | None = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusyError as e:
            refusal = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not ok and refusal is None:
            refusal = WorkdirBusyError(
                f"workdir '{workdir}' is in use by another training run (see process 0's error)"
            )
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        lock.release()
