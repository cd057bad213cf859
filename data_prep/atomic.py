"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written file.

Every function writes to a temporary sibling (``.NAME.<random>.tmp``, same folder, hence same file system),
flushes and ``fsync``\\ s it, renames it over ``path`` with ``os.replace`` (atomic on POSIX), then ``fsync``\\ s the
folder so the rename itself survives a power loss. On any error, ``KeyboardInterrupt`` included, the temporary
file is removed and ``path`` keeps its old content (or stays absent). A ``kill -9`` or power loss in the middle
can leave a stray ``.NAME.*.tmp`` beside it, never a partial ``path``. The new file gets the usual permissions
(``0o666`` less the umask), not ``tempfile.mkstemp``'s ``0o600``. The parent folder is created when missing.

Standard library only: ``data_prep`` and ``megatron_ipt`` (through :func:`megatron_ipt.manifest.atomic_write_text`)
both write through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


def fsync_dir(folder: str | Path) -> None:
    """``fsync`` a folder so that renames and removals in it survive a power loss (a no-op where folders cannot be
    opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a file system or platform that cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's counts): stale temporary files are those of a
    process of this host that no longer runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Yield a file open for writing (``mode`` "wb" or "w"); on a clean exit it replaces ``path`` durably.

    Text mode uses ``encoding`` (default UTF-8) and writes ``\\n`` as is. Raises ValueError for another mode.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"open_atomic: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, **({"encoding": encoding or "utf-8", "newline": ""} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with open_atomic(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` (encoded with ``encoding``, newlines untranslated) to ``path`` atomically and durably."""
    write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, obj: Any, *, indent: int | None = None, sort_keys: bool = False,
               ensure_ascii: bool = True, default=None) -> None:
    """Write ``json.dumps(obj, ...)`` plus a trailing newline to ``path`` atomically and durably (UTF-8)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=default)
    write_text(path, text + "\n")


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write one ``json.dumps(record, ensure_ascii=False)`` line per record (UTF-8) to ``path`` atomically and
    durably, streaming (``records`` may be a generator). Returns the number of records."""
    n = 0
    with open_atomic(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2():
    """glibc's ``renameat2`` (2.28 and newer), or None off Linux / with an older or other C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` (files or folders, same file system) in one atomic step:
    Linux ``renameat2(..., RENAME_EXCHANGE)`` (kernel 3.15+, glibc 2.28+; see ``man 2 rename``). A reader sees
    either the old or the new entry under each name, never neither. Returns False, changing nothing, where the
    platform or the file system cannot (no ``renameat2``; ``ENOSYS``/``EINVAL``/``ENOTSUP``, e.g. some network
    file systems); raises OSError for other failures (a missing path: ``ENOENT``)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        fsync_dir(Path(b).parent)
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(new: str | Path, final: str | Path, aside: str | Path | None = None) -> None:
    """Put the finished folder ``new`` at ``final`` (same file system) and remove what ``final`` held. An
    existing ``final`` is swapped out in one step (:func:`exchange`), so it never goes missing; where the file
    system cannot swap, it is first renamed to ``aside`` (default ``.NAME.old-PID`` beside it), then ``new`` is
    renamed in (``final`` is absent between the two renames), then ``aside`` is removed."""
    new, final = Path(new), Path(final)
    if not final.exists():
        os.replace(new, final)
        return
    if exchange(new, final):  # ``new`` now holds the previous content
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = Path(aside) if aside is not None else final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, aside)
    os.replace(new, final)
    shutil.rmtree(aside, ignore_errors=True)
