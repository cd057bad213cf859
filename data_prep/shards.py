"""Sharded synthesis outputs: deterministic document-to-shard assignment, per-shard files and manifests, merge.

A document goes to shard ``int(sha256(id)[:16], 16) % num_shards``: the same shard on every rerun, on every
machine and for any number of worker processes (Python's ``hash`` is salted per process, so it is not used).
Shard ``i`` of ``n`` lives in ``DIR/shard-{i:05d}-of-{n:05d}.jsonl`` with a manifest beside it
(``.manifest.json``: records, SHA-256 and size of the JSONL, document ids' digest, generated tokens,
seconds, throughput). Both are written under a temporary name and renamed, the manifest last, so a shard
with a manifest is complete. :func:`merge_shards` checks every shard against its manifest and writes the
stage output in input order; a missing, unfinished or corrupt shard is named in a one-line
:class:`~data_prep.errors.DataPrepError`.

A shard in progress keeps a journal beside it (:class:`ShardJournal`, ``.shard-i-of-n.partial.jsonl``): every
finished generation batch is appended, flushed and fsynced, then a small progress record (``.progress.json``:
bytes, batches, prompts) is replaced atomically. A rerun after a crash (even ``kill -9``) reloads the batches up
to the last progress record and generates only the rest; the finished shard is still written whole and renamed.
The progress record holds a key (the stage fingerprint and the input's SHA-256): a journal of another config or
input is discarded, never reused. The stage drivers are ``megatron_ipt.pipeline.run_synthesize_sharded`` and
``ipt synthesize --num-shards``; an unsharded run (``run_synthesize``) journals the same way, as shard 0 of 1.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from data_prep import atomic
from data_prep.errors import DataPrepError

MANIFEST_SUFFIX = ".manifest.json"


def shard_of(doc_id: str, num_shards: int) -> int:
    """The shard (0-based) of the document ``doc_id`` among ``num_shards``; stable across processes and runs.

    Raises DataPrepError when ``num_shards`` < 1.
    """
    if num_shards < 1:
        raise DataPrepError(f"--num-shards must be >= 1, got {num_shards}")
    digest = hashlib.sha256(str(doc_id).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) % num_shards


def select_shard(documents: Iterable[dict], shard_index: int, num_shards: int) -> list[dict]:
    """The documents (in input order) that belong to shard ``shard_index`` of ``num_shards``.

    Raises DataPrepError for an index outside ``[0, num_shards)`` or a duplicate document id (a duplicate
    would make the merged output ambiguous).
    """
    if not 0 <= shard_index < num_shards:
        raise DataPrepError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    seen: set[str] = set()
    out = []
    for doc in documents:
        doc_id = str(doc["id"])
        if doc_id in seen:
            raise DataPrepError(f"duplicate document id {doc_id!r}: ids must be unique to shard a corpus")
        seen.add(doc_id)
        if shard_of(doc_id, num_shards) == shard_index:
            out.append(doc)
    return out


def shard_paths(shard_dir: Path, shard_index: int, num_shards: int) -> tuple[Path, Path]:
    """(records JSONL, manifest) paths of shard ``shard_index`` of ``num_shards`` under ``shard_dir``."""
    name = f"shard-{shard_index:05d}-of-{num_shards:05d}.jsonl"
    return Path(shard_dir) / name, Path(shard_dir) / (name + MANIFEST_SUFFIX)


def journal_path(shard_dir: Path, shard_index: int, num_shards: int) -> Path:
    """The journal (:class:`ShardJournal`) of shard ``shard_index`` of ``num_shards`` while it is in progress."""
    return Path(shard_dir) / f".shard-{shard_index:05d}-of-{num_shards:05d}.partial.jsonl"


def _ids_digest(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode("utf-8") + b"\n")
    return h.hexdigest()


def write_shard(shard_dir: Path, shard_index: int, num_shards: int, records: list[dict], counts: dict | None = None) -> dict:
    """Write one finished shard's ``records`` (dicts with an ``id``) and its manifest atomically; returns the manifest.

    ``counts``: the synthesis counts of this shard (generated_tokens, generation_seconds, ...), stored as is;
    ``documents_per_second`` and ``generated_tokens_per_second`` are derived from them when present.
    """
    path, mpath = shard_paths(shard_dir, shard_index, num_shards)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    counts = dict(counts or {})
    seconds = float(counts.get("generation_seconds") or 0.0)
    manifest = {
        "shard_index": shard_index,
        "num_shards": num_shards,
        "records": len(records),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "ids_sha256": _ids_digest(r["id"] for r in records),
        "counts": counts,
        "documents_per_second": round(len(records) / seconds, 3) if seconds > 0 else None,
        "generated_tokens_per_second": round(counts.get("generated_tokens", 0) / seconds, 2) if seconds > 0 else None,
    }
    atomic.write_bytes(path, data)
    atomic.write_json(mpath, manifest, indent=2, sort_keys=True)
    return manifest


def shard_finished(shard_dir: Path, shard_index: int, num_shards: int) -> bool:
    """True when the shard's records and manifest both exist and the records match the manifest's checksum."""
    try:
        _validate(shard_dir, shard_index, num_shards)
    except DataPrepError:
        return False
    return True


def _validate(shard_dir: Path, shard_index: int, num_shards: int) -> tuple[list[dict], dict]:
    path, mpath = shard_paths(shard_dir, shard_index, num_shards)
    if not mpath.is_file():
        raise DataPrepError(f"shard {shard_index} of {num_shards} is missing or unfinished: no {mpath}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataPrepError(f"shard {shard_index} of {num_shards}: corrupt manifest {mpath}: {e}") from None
    if not path.is_file():
        raise DataPrepError(f"shard {shard_index} of {num_shards} is missing: no {path}")
    data = path.read_bytes()
    if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise DataPrepError(
            f"shard {shard_index} of {num_shards} is corrupt: {path} does not match the SHA-256/size in {mpath.name}"
        )
    records = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataPrepError(f"shard {shard_index} of {num_shards} is corrupt: {path}:{lineno}: {e}") from None
    if len(records) != manifest.get("records"):
        raise DataPrepError(f"shard {shard_index} of {num_shards} is corrupt: {path} has {len(records)} records, manifest says {manifest.get('records')}")
    return records, manifest


def merge_shards(shard_dir: Path, num_shards: int, documents: list[dict], out_path: Path) -> dict:
    """Validate shards ``0..num_shards-1`` and write their records to ``out_path`` in the order of ``documents``.

    Every document id must appear in exactly one shard, the shard its id hashes to. Returns merged counts:
    documents, generated_tokens, generation_seconds, pair_structure (pair families and structure issues, see
    ``data_prep.parse.structure_counts``), each summed over shards, and shards. Raises DataPrepError naming the
    first missing/corrupt shard, a document no shard holds, or a record in the wrong shard.
    """
    by_id: dict[str, dict] = {}
    generated = 0
    seconds = 0.0
    structure: Counter[str] = Counter()
    for i in range(num_shards):
        records, manifest = _validate(shard_dir, i, num_shards)
        counts = manifest.get("counts") or {}
        generated += int(counts.get("generated_tokens", 0))
        seconds += float(counts.get("generation_seconds", 0.0))
        structure.update(counts.get("pair_structure") or {})
        for r in records:
            rid = str(r["id"])
            if shard_of(rid, num_shards) != i or rid in by_id:
                raise DataPrepError(f"shard {i} of {num_shards} is corrupt: record {rid!r} does not belong there")
            by_id[rid] = r
    ordered = []
    for doc in documents:
        rid = str(doc["id"])
        if rid not in by_id:
            raise DataPrepError(f"shard {shard_of(rid, num_shards)} of {num_shards} lacks document {rid!r}")
        ordered.append(by_id.pop(rid))
    if by_id:
        raise DataPrepError(f"shards hold {len(by_id)} record(s) not in the input, e.g. {next(iter(by_id))!r}")
    atomic.write_jsonl(out_path, ordered)
    return {
        "documents": len(ordered),
        "shards": num_shards,
        "generated_tokens": generated,
        "generation_seconds": round(seconds, 3),
        "generated_tokens_per_second": round(generated / seconds, 2) if seconds > 0 else 0.0,
        "pair_structure": dict(sorted(structure.items())),
    }


class ShardJournal:
    """Finished generation batches of a shard in progress, appended to ``path`` so that a rerun resumes after them.

    One JSON line per batch: ``{"batch": k, "seconds": s, "results": [{"id", "chunk", "text", "tokens"}, ...]}``.
    After each batch the file is flushed and fsynced, then ``path.progress.json`` (``bytes`` of complete batches,
    ``batches``, ``prompts``, ``key``) is written atomically. :meth:`load` trusts only the bytes the progress record
    counts (a line cut by a crash is truncated away); a journal without a progress record starts over, and so
    does one whose progress record holds another ``key`` (the caller's digest of the config and input documents:
    a journal of other inputs is never reused; ``discarded`` then says why).
    """

    def __init__(self, path: Path, key: str | None = None):
        self.path = Path(path)
        self.progress_path = self.path.with_name(self.path.name + ".progress.json")
        self.key = key
        self.batches = 0
        self.prompts = 0
        self.seconds = 0.0  # generation seconds of the batches loaded
        self.discarded: str | None = None  # why load() threw an earlier journal away, if it did

    def load(self) -> dict[tuple[str, int], dict]:
        """Results of the batches finished by earlier runs, keyed by ``(document id, chunk)``; sets ``batches``,
        ``prompts`` and ``seconds`` (their generation time). Raises DataPrepError for a journal shorter than its
        progress record or a corrupt line."""
        self.batches = self.prompts = 0
        self.seconds = 0.0
        self.discarded = None
        try:
            progress = json.loads(self.progress_path.read_text(encoding="utf-8"))
            size = int(progress["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            self.path.unlink(missing_ok=True)
            return {}
        if progress.get("key") != self.key:
            self.discarded = f"{self.path} was written for another config or input (key {progress.get('key')!r})"
            self.remove()
            return {}
        if not self.path.is_file() or self.path.stat().st_size < size:
            raise DataPrepError(f"{self.path} is shorter than its progress record {self.progress_path.name}: "
                                "delete both to redo the shard")
        with open(self.path, "r+b") as f:
            f.truncate(size)
            data = f.read()
        done: dict[tuple[str, int], dict] = {}
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            try:
                batch = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataPrepError(f"{self.path}:{lineno}: corrupt journal line ({e}): "
                                    "delete it to redo the shard") from None
            for r in batch["results"]:
                done[(str(r["id"]), int(r["chunk"]))] = r
            self.batches += 1
            self.seconds += float(batch.get("seconds", 0.0))
        self.prompts = len(done)
        return done

    def append(self, results: list[dict], seconds: float) -> None:
        """Append one finished batch (``results``: dicts id, chunk, text, tokens) durably, then the progress record."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"batch": self.batches, "seconds": round(seconds, 6), "results": results}, ensure_ascii=False)
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        self.batches += 1
        self.prompts += len(results)
        progress = {"bytes": size, "batches": self.batches, "prompts": self.prompts, "key": self.key}
        atomic.write_json(self.progress_path, progress)

    def remove(self) -> None:
        """Delete the journal and its progress record (the shard is finished, or redone from scratch)."""
        self.progress_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
