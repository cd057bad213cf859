"""Exclusive locks on stage folders and output prefixes: a second run on the same output fails at once.

:func:`exclusive_lock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a lock file beside the output (``RUN/.corpus.lock``
for a stage folder, ``PREFIX.lock`` for a tokenizer output prefix) and writes the holder (host, pid, start time,
command line) into it. Another process asking for the same lock gets :class:`LockHeld` at once, one line naming
the holder and how to wait. The kernel drops the lock when the holder exits, ``kill -9`` included, so a crashed
run never leaves a stale lock. The file is removed on release; a process that opened it just before is caught
by comparing the locked inode with the path's (the usual ``flock`` + ``unlink`` pattern).

A launcher that holds a lock and starts the processes that do the work (``torchrun``) lists the lock in the
environment variable ``IPT_HELD_LOCKS`` (``os.pathsep``-separated absolute paths); its children take that lock
as theirs. On NFS, ``flock`` is emulated with POSIX byte-range locks (Linux 2.6.12 and newer), which needs a
working lock manager (``lockd``); Lustre needs the ``flock`` mount option.

Standard library only (``data_prep`` and ``megatron_ipt`` both use it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

from data_prep.errors import DataPrepError

HELD_ENV = "IPT_HELD_LOCKS"


class LockHeld(DataPrepError):
    """The output is locked by another run; the message names the holder (host, pid) and the lock file."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not written its name yet)"
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {info.get('started', '?')}"
            + (f": {info['command']}" if info.get("command") else ""))


def _held_by_parent(path: Path) -> bool:
    return str(path) in os.environ.get(HELD_ENV, "").split(os.pathsep)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created, with its folder, when missing) for the ``with`` block.

    ``what`` names the locked output in the error (e.g. ``"stage folder runs/x/corpus"``). Yields the absolute
    lock path. Raises :class:`LockHeld` at once when another process holds it, naming its host and pid; a lock
    listed in ``IPT_HELD_LOCKS`` (held by the launching process) is taken as held and not locked again.
    """
    path = Path(os.path.abspath(path))
    if _held_by_parent(path):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockHeld(f"{what} is in use by another run ({holder}); it holds {path}: wait for that run to end "
                           f"(`flock {path} true` waits for it) or stop it, then rerun") from None
        except OSError as e:
            os.close(fd)
            raise DataPrepError(f"{path}: cannot lock it ({e.strerror}); the file system does not support flock "
                                "(NFS needs lockd, Lustre the 'flock' mount option)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    try:
        info = {"host": platform.node(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a waiter re-checks the inode and retries
        os.close(fd)


@contextlib.contextmanager
def lend_to_children(path: Path) -> Iterator[None]:
    """List the held lock ``path`` in ``IPT_HELD_LOCKS`` for processes started inside the block (a launcher's
    workers), restoring the variable afterwards."""
    old = os.environ.get(HELD_ENV)
    os.environ[HELD_ENV] = os.pathsep.join([p for p in (old or "").split(os.pathsep) if p] + [str(path)])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = old
