"""Per-input-file shards that a rerun resumes: the tokenize stage's (``data_prep.tokenize``) and the SFT data's
(``data_prep.sft``).

A writer that turns input files into indexed datasets writes one shard per input under ``PREFIX.shards/``, named
by :func:`shard_name` (the input's name up to its first dot, a dash and 8 hex digits of the SHA-1 of its absolute
path, so two inputs of one name in different folders never share a shard). While a run checks or writes a shard
it holds ``NAME.lock`` beside it (:func:`data_prep.locks.exclusive_lock`: a second run on the same shard fails at
once, naming the holder). A finished shard has ``NAME.done.json``, written last and atomically: the input's
:func:`source_stamp` (absolute path, size in bytes, mtime in ns), the settings that change the shard's content,
and the writer's stats. A rerun reuses a shard whose record matches the input's stamp and the settings and whose
files pass the writer's own check (:func:`claim_shard`'s ``intact``); any other is written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data_prep import atomic
from data_prep.locks import exclusive_lock


def shard_name(path: Path) -> str:
    """The shard name of the input ``path``: ``STEM-HHHHHHHH`` (STEM: the name up to its first dot; H: the first 8
    hex digits of the SHA-1 of the absolute path)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{path.name.split('.')[0]}-{digest}"


def source_stamp(path: Path) -> dict:
    """``{"path": absolute path, "bytes": size, "mtime_ns": modification time}`` of an input file."""
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class InputShard:
    """One input's shard: ``prefix`` (``PREFIX.shards/NAME``), the input's stamp, its ``.done.json`` and
    ``stats``: the finished shard's stats, or None while it is still to be written."""

    source: Path
    prefix: Path
    stamp: dict
    settings: dict
    done_file: Path
    stats: dict | None

    def finish(self, stats: dict) -> None:
        """Record the shard as finished (``.done.json``, atomically): call after its files are in place."""
        atomic.write_json(self.done_file, {"source": self.stamp, "settings": self.settings, "stats": stats}, indent=2)
        self.stats = stats


def claim_shard(path: Path, shard_dir: Path, settings: dict, held: contextlib.ExitStack, what: str,
                intact: Callable[[Path, dict], bool]) -> InputShard:
    """Lock the shard of input ``path`` under ``shard_dir`` for the life of ``held`` (``what`` names it in the
    error: :class:`data_prep.locks.LockHeld` when another run holds it) and return it, finished (``stats`` from
    its ``.done.json``) when that record matches the input's stamp and ``settings`` and ``intact(prefix, stats)``
    holds, else with ``stats`` None."""
    shard = shard_dir / shard_name(path)
    held.enter_context(exclusive_lock(shard.with_name(shard.name + ".lock"), f"{what} {shard}"))
    done_file = shard.with_name(shard.name + ".done.json")
    stamp = source_stamp(path)
    done = json.loads(done_file.read_text()) if done_file.is_file() else None
    reusable = bool(done) and done["source"] == stamp and done["settings"] == settings and intact(shard, done["stats"])
    return InputShard(path, shard, stamp, settings, done_file, done["stats"] if reusable else None)
