"""The lock that keeps two ``freecure batch`` runs out of one ``--out``: each would take the other's fresh
records for stale ones and delete them. Standard library only (taken before anything heavy loads).

The lock is a file, ``--out/.freecure-batch.lock``, created with ``O_CREAT | O_EXCL`` (atomic, NFS included)
and holding its holder's pid, host, start time and (Linux) the process's start tick, as JSON. Not
``fcntl.flock``: the kernel would drop a flock with its process (no stale locks), but batch runs write to the
shared folders of clusters, where flock is unreliable (NFS emulates it with byte-range locks, or with
``local_lock`` keeps it per client, so two hosts both get it; Lustre refuses it unless mounted with ``flock``),
and Windows has none; a second run must also say who holds the lock, which a flock cannot tell.

The price is judging a lock a killed run left. On this host the holder is checked: a pid that no longer exists
(``os.kill(pid, 0)``), or one that now names a process started at another tick (a reused pid), is stale; the
lock is replaced, with a note. A holder on another host cannot be checked from here: the run refuses and says
which file to remove if that run is gone.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import CLIError

__all__ = ["LOCK", "OutLock"]

LOCK = ".freecure-batch.lock"
#: tries to take the lock (a lock being written, released or replaced by another run meanwhile), PAUSE apart
TRIES, PAUSE = 20, 0.05


def _proc_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; Linux), so that a reused pid is told from the
    holder. None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:  # a folder, no permission: not a lock that can be judged
        return b""


def _holder(data: bytes) -> dict | None:
    """The lock's holder, or None when it is not a lock this module wrote (or is still being written)."""
    try:
        h = json.loads(data)
    except ValueError:
        return None
    ok = isinstance(h, dict) and type(h.get("pid")) is int and 0 < h["pid"] < 2 ** 31 and isinstance(h.get("host"), str)
    return h if ok else None


def _who(h: dict) -> str:
    return f"pid {h['pid']} on host {h['host']}, started {h.get('started', '?')}"


def _stale(h: dict) -> str | None:
    """Why the holder ``h`` (on this host) is gone, or None when it may still run."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: never judged stale
        return None
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return "no such process"
    except PermissionError:  # another user's process: it exists
        return None
    started, now = h.get("proc_start"), _proc_start(h["pid"])
    if isinstance(started, int) and now is not None and now != started:
        return "that pid is now another process"
    return None


class OutLock:
    """The lock of one ``--out``, held by this process: :meth:`acquire`, then :meth:`release` (in a finally)."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data = path, data

    @classmethod
    def acquire(cls, out) -> "OutLock":
        """Take the lock of ``out`` (created if need be), replacing a stale one. Raises CLIError (one line naming
        --out and the holder) when another run holds it."""
        out = Path(out)
        path = out / LOCK
        me = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  proc_start=_proc_start(os.getpid()))
        data = (json.dumps(me) + "\n").encode()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"--out {out}: cannot create it: {e.strerror or e}") from None
        for _ in range(TRIES):
            try:
                _create(path, data)
                return cls(path, data)
            except FileExistsError:
                pass
            except OSError as e:
                raise CLIError(f"--out {out}: cannot create its lock {path}: {e.strerror or e}") from None
            seen = _read(path)
            h = None if seen is None else _holder(seen)
            if h is not None and h["host"] != socket.gethostname():
                raise CLIError(f"--out {out} is locked by a freecure batch on another host ({_who(h)}), which "
                               f"cannot be checked from here: wait for it to end, or if it is no longer running, "
                               f"remove {path}")
            why = None if h is None else _stale(h)
            if h is not None and why is None:
                raise CLIError(f"--out {out} is in use by another freecure batch ({_who(h)}): wait for it to end "
                               "or use another --out")
            if h is not None and _break(path, seen):
                print(f"freecure batch: --out {out}: replaced a stale lock ({_who(h)}: {why})", file=sys.stderr)
            elif seen is not None:  # being written (a run between creating and filling it) or being replaced
                time.sleep(PAUSE)
        breaker = path.with_name(LOCK + ".break")
        if breaker.exists():
            raise CLIError(f"--out {out}: another run is replacing its stale lock; try again (if none is, remove "
                           f"{breaker})")
        raise CLIError(f"--out {out}: its lock {path} is not a freecure batch lock or cannot be read; if no "
                       "freecure batch is using --out, remove it")

    def release(self) -> None:
        """Remove the lock if it is still this run's (never another run's that replaced it meanwhile)."""
        try:
            if _read(self.path) == self.data:
                self.path.unlink()
        except OSError:
            pass


def _create(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, data)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)  # an empty lock would block every later run
        raise
    os.close(fd)


def _break(path: Path, seen: bytes) -> bool:
    """Remove the stale lock whose content is ``seen``, unless it changed meanwhile; True when this call removed
    it. A second lock file serialises the runs that replace one: without it, a run that judged the lock stale
    could remove the lock another run has just taken in its place."""
    breaker = path.with_name(LOCK + ".break")
    try:
        os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    try:
        if _read(path) != seen:
            return False
        path.unlink()
        return True
    finally:
        breaker.unlink(missing_ok=True)
