"""Stage manifests and atomic outputs: the contract between stages.

Every stage writes its outputs into a temporary sibling folder and renames it to the final name only
when everything, ``manifest.json`` last, is written. So a crash never leaves a half-written stage folder
under the final name, and a stage folder with a manifest is complete by construction.

A manifest records: the stage name, the resolved config of the whole experiment, the stage's own
``fingerprint`` (a hash of its config section and of its inputs' fingerprints), input files with their
SHA-256, counts, timings and package versions. A rerun skips a stage whose folder has a manifest with the
same fingerprint, and redoes it (replacing the folder) when the fingerprint differs.

This module imports only the standard library and ``data_prep.atomic`` (itself standard library only); both
``data_prep`` and the trainer use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from data_prep import atomic
from megatron_ipt.errors import IptError

MANIFEST = "manifest.json"
_PACKAGES = ("megatron-ipt", "torch", "megatron-core", "transformers", "tokenizers", "pydantic", "numpy", "vllm")


class ManifestError(IptError, RuntimeError):
    """A stage input is missing, incomplete or inconsistent; the message names the file."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


WHOLE_DIGEST_BYTES = 8 << 20  # files up to this size are hashed whole by file_record
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 1 << 16  # larger ones: 64 blocks of 64 KiB, first and last included


def file_record(path: str | Path) -> dict:
    """``{"bytes": size, "sampled_blake2b": hex}`` of a file, at a cost that does not grow with it: BLAKE2b
    (16-byte digest) of the size (8 bytes, little endian) and the whole file up to 8 MiB, else of 64 blocks of
    64 KiB at evenly spread offsets (the first at 0, the last ending at the end). What a later reader compares
    before trusting an output that a full SHA-256 would take minutes to hash (a multi-GB ``.bin``)."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        if size <= WHOLE_DIGEST_BYTES:
            while block := f.read(1 << 20):
                h.update(block)
        else:
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * (size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK_BYTES))
    return {"bytes": size, "sampled_blake2b": h.hexdigest()}


def record_mismatch(path: str | Path, record: dict, recorded_in: str | Path) -> str | None:
    """None when ``path`` matches ``record`` (:func:`file_record`) written to ``recorded_in``, else one line naming
    the file, found vs recorded: a missing file, another size (a ``stat``), or another sampled digest."""
    if not os.path.isfile(path):
        return f"{path}: missing, {recorded_in} records it"
    size = os.path.getsize(path)
    if size != record["bytes"]:
        return (f"{path}: {size} bytes, {recorded_in} records {record['bytes']} (changed or replaced since it was "
                "written)")
    found = file_record(path)["sampled_blake2b"]
    if found != record["sampled_blake2b"]:
        return (f"{path}: sampled BLAKE2b {found}, {recorded_in} records {record['sampled_blake2b']} (same size, "
                "other content: changed or replaced since it was written)")
    return None


def verify_outputs(stage_dir: str | Path, manifest: dict) -> None:
    """Compare each output a stage manifest records in ``output_checks`` with the file now
    (:func:`record_mismatch`); raises ManifestError naming the file. Manifests written before ``output_checks``
    existed are not checked."""
    where = Path(stage_dir) / MANIFEST
    for name, record in (manifest.get("output_checks") or {}).items():
        if message := record_mismatch(Path(stage_dir) / name, record, where):
            raise ManifestError(f"{message}; rerun the '{manifest.get('stage')}' stage with --force")


def fingerprint(*parts: Any) -> str:
    """Stable short hash of JSON-serialisable parts (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary sibling, fsync and an atomic rename (``data_prep.atomic``)."""
    atomic.write_text(path, text)


def _remove_stale_siblings(final: Path, host: str) -> list[Path]:
    """Remove ``.NAME.tmp-HOST-PID`` / ``.NAME.old-HOST-PID`` folders of ``final`` left by a process of this host
    that no longer runs (killed with ``kill -9`` mid-stage); another host's folders are never touched (its pids
    mean nothing here, e.g. on a shared file system). Returns the removed folders."""
    removed = []
    for kind in ("tmp", "old"):
        for sibling in final.parent.glob(f".{final.name}.{kind}-{host}-*"):
            pid = sibling.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not atomic.pid_alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
    return removed


def check_replaceable(final: str | Path, stage: str | None = None) -> None:
    """Refuse to let a stage replace ``final`` unless it is absent or a finished stage folder of its own.

    ``final`` may be replaced only when it is a folder (not a link) holding a readable ``manifest.json`` whose
    ``stage`` is ``stage`` (any stage when None): a stage never deletes a folder it did not write, such as the
    user's own ``corpus/`` beside a config with ``run_dir: "."``. Raises ManifestError naming the folder.
    """
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    what = f"a finished '{stage}' stage folder" if stage else "a finished stage folder"
    hint = "; move it away or point run_dir at another folder"
    if final.is_symlink() or not final.is_dir():
        raise ManifestError(f"{final}: exists and is not {what} (a {'link' if final.is_symlink() else 'file'}); "
                            f"refusing to replace it{hint}")
    try:
        found = json.loads((final / MANIFEST).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        found = None
    if found is None or (stage is not None and found != stage):
        detail = f"its manifest.json is a '{found}' manifest" if found else "it holds no readable manifest.json"
        raise ManifestError(f"{final}: exists and is not {what} ({detail}); refusing to replace it{hint}")


@contextlib.contextmanager
def atomic_dir(final: str | Path, stage: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces ``final`` only if the block finishes without error.

    An existing ``final`` must be a finished stage folder of ``stage`` (:func:`check_replaceable`, checked
    before the block runs and again before the swap); anything else raises ManifestError and is left as is.
    The temporary folder is ``.NAME.tmp-HOST-PID`` beside ``final``. On error it is removed and ``final`` (if
    any) is left untouched; what a killed process (``kill -9``, node failure) of this host left behind is removed
    at the next call for the same ``final``. A previous ``final`` is swapped with the new folder in one atomic
    step and then removed (:func:`data_prep.atomic.replace_dir`, Linux ``renameat2``), so ``final`` never goes
    missing; where the file system cannot swap, it is moved aside to ``.NAME.old-HOST-PID`` first.
    """
    final = Path(final)
    check_replaceable(final, stage)
    final.parent.mkdir(parents=True, exist_ok=True)
    host = platform.node().replace("/", "_") or "host"
    _remove_stale_siblings(final, host)
    tmp = final.with_name(f".{final.name}.tmp-{host}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        check_replaceable(final, stage)  # what the block ran for may have taken hours
    except ManifestError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.replace_dir(tmp, final, aside=final.with_name(f".{final.name}.old-{host}-{os.getpid()}"))


def write_manifest(
    out_dir: str | Path,
    *,
    stage: str,
    fingerprint: str,
    config: dict,
    inputs: dict[str, str | Path] | None = None,
    outputs: list[str] | None = None,
    counts: dict | None = None,
    started: float | None = None,
    **extra: Any,
) -> dict:
    """Write ``out_dir/manifest.json`` (atomically) and return it.

    ``inputs`` maps a name to a file whose SHA-256 is recorded; ``outputs`` lists files (relative to
    ``out_dir``) whose SHA-256 is recorded too, with their :func:`file_record` under ``output_checks`` (what
    :func:`verify_outputs` compares); ``started`` is a ``time.time()`` stamp for the duration.
    """
    out_dir = Path(out_dir)
    now = time.time()
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "seconds": round(now - started, 3) if started is not None else None,
        "inputs": {k: {"path": str(v), "sha256": sha256_file(v)} for k, v in (inputs or {}).items()},
        "outputs": {name: sha256_file(out_dir / name) for name in (outputs or [])},
        "output_checks": {name: file_record(out_dir / name) for name in (outputs or [])},
        "counts": counts or {},
        **extra,
        "config": config,
        "versions": package_versions(),
    }
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return manifest


def read_manifest(stage_dir: str | Path, stage: str | None = None) -> dict:
    """Read a stage folder's manifest, checking it exists, parses, and is of the expected stage.

    Raises ManifestError naming the file.
    """
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing; run the '{stage or 'previous'}' stage first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if stage is not None and manifest.get("stage") != stage:
        raise ManifestError(f"{path}: is a '{manifest.get('stage')}' manifest, expected '{stage}'")
    for name, digest in manifest.get("outputs", {}).items():
        if not (Path(stage_dir) / name).is_file():
            raise ManifestError(f"{path}: lists output '{name}', which is missing")
    return manifest


def is_done(stage_dir: str | Path, fp: str) -> bool:
    """True when ``stage_dir`` holds a finished stage with fingerprint ``fp``."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("fingerprint") == fp
    except (OSError, json.JSONDecodeError):
        return False
