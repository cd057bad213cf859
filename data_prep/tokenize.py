"""Streaming, parallel tokenization of text corpora into Megatron indexed datasets (``PREFIX.bin`` / ``.idx``).

The replacement for Megatron-LM's ``tools/preprocess_data.py``, with the same output format:

- inputs: globs of JSONL (plain, ``.gz``, ``.zst``), Parquet and text files (``data_prep.readers``); the text
  field is configurable;
- tokenizers: Hugging Face, sentencepiece, tiktoken-style BPE files (``data_prep.encoders``; the BPE runs in
  gigatoken where it gives the reference library's ids, see ``bpe_backend``; a sample of up to
  ``check_chars`` characters per batch is also encoded by the reference library and compared); optional BOS,
  EOD appended per document; token dtype from the vocabulary size (``uint16`` below 65,500, else ``int32``);
- parallel: the main process reads raw lines in batches; worker processes decode, parse JSON and batch-encode,
  and return numpy arrays; at most ``2 × workers`` batches are in flight, so memory stays bounded whatever
  the input size; results are written in input order;
- output: one indexed dataset per input file under ``PREFIX.shards/``, merged into ``PREFIX.bin/.idx``
  (``data_prep.indexed``: exactly megatron-core's format); ``PREFIX.manifest.json`` with documents, tokens,
  the tokenizer fingerprint, source checksums and skipped records by reason;
- resumable and atomic (``data_prep.input_shards``): a finished shard (``.done.json`` next to it, written last,
  matching the source's size and mtime and the settings) is skipped on rerun; every file is written under a
  ``.tmp`` name first;
- bad input (malformed JSON, a missing or non-string field, non-UTF-8 bytes, empty text): ``bad_input``
  ``skip`` (counted by reason, the first few reported as file:line) or ``fail`` (DataPrepError at file:line).
  A token id beyond the dtype is always an error.

Command line (for your own corpora; the pipeline's ``tokenize`` stage calls :func:`tokenize_corpus`)::

    python -m data_prep.tokenize --input 'data/*.jsonl.zst' --tokenizer path/to/tokenizer.json \\
        --output-prefix out/corpus --workers 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep import atomic
from data_prep.dataset_check import IndexedDatasetError, check_dataset
from data_prep.encoders import Encoder, load_encoder
from data_prep.errors import DataPrepError
from data_prep.input_shards import claim_shard, shard_name as _shard_name  # noqa: F401 (tests import it here)
from data_prep.locks import exclusive_lock
from data_prep.indexed import IndexedDatasetWriter, merge_datasets, token_dtype
from data_prep.progress import StageProgress
from data_prep.readers import Batch, expand_inputs, read_batches
from megatron_ipt.manifest import file_record

REASONS = {"malformed_json": "not valid JSON", "missing_field": "no string field", "not_utf8": "not UTF-8",
           "empty_text": "empty text"}


@dataclass
class TokenizeOptions:
    text_field: str = "text"
    append_eod: bool = True
    append_bos: bool = False
    bad_input: str = "skip"  # or "fail"
    workers: int = 0  # 0: one per CPU core
    batch_docs: int = 1024
    batch_bytes: int = 1 << 21
    min_parallel_bytes: int = 8 << 20  # smaller inputs are tokenized in-process
    merge: bool = True
    merge_only: bool = False  # tokenize nothing: merge shards that earlier runs (e.g. array tasks) finished
    max_examples: int = 5
    bpe_backend: str = "auto"  # data_prep.encoders.BPE_BACKENDS
    check_chars: int = 8192  # per batch, characters also encoded by the reference library when a fast backend runs
    require_documents: bool = False  # merging no document at all: DataPrepError "no documents", nothing written

    def key(self) -> dict:
        """The settings that change a shard's content."""
        return {"text_field": self.text_field, "append_eod": self.append_eod, "append_bos": self.append_bos}


@dataclass
class Encoded:
    ids: np.ndarray
    lengths: np.ndarray
    skipped: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)


# ---- worker side ---------------------------------------------------------------------------------------------

_W: dict = {}


def _init_worker(tokenizer: str, opts: TokenizeOptions) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no Rust thread pool on top
    os.environ["RAYON_NUM_THREADS"] = "1"
    if _W.get("opts") == opts and _W.get("tokenizer") == str(tokenizer):
        return  # forked from the main process, which loaded and probed the same encoder
    enc = load_encoder(tokenizer, opts.bpe_backend)
    _setup(enc, opts)
    _W["tokenizer"] = str(tokenizer)


def _setup(enc: Encoder, opts: TokenizeOptions) -> None:
    if opts.append_eod and enc.eod_id is None:
        raise DataPrepError(f"tokenizer {enc.path} has neither an end-of-text nor an EOS token to use as EOD")
    if opts.append_bos and enc.bos_id is None:
        raise DataPrepError(f"tokenizer {enc.path} has no BOS token (append_bos is set)")
    _W.update(enc=enc, opts=opts, dtype=token_dtype(enc.vocab_size))


def _texts(batch: Batch, opts: TokenizeOptions, skip) -> tuple[list[str], list[int]]:
    texts, lines = [], []
    for i, item in enumerate(batch.items):
        lineno = batch.first + i
        if batch.format == "values":
            text = item
            if not isinstance(text, str):
                skip("missing_field", lineno)
                continue
        else:
            if not item.strip():
                continue  # a blank line is no record
            try:
                line = item.decode("utf-8")
            except UnicodeDecodeError:
                skip("not_utf8", lineno)
                continue
            if batch.format == "text":
                text = line.rstrip("\r\n")
            else:
                try:
                    obj = json.loads(line)
                except ValueError:
                    skip("malformed_json", lineno)
                    continue
                text = obj.get(opts.text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    skip("missing_field", lineno)
                    continue
        if not text.strip():
            skip("empty_text", lineno)
            continue
        texts.append(text)
        lines.append(lineno)
    return texts, lines


def encode_batch(batch: Batch) -> Encoded:
    """Decode, parse, filter and tokenize one batch (in a worker): token ids back to back plus lengths."""
    enc, opts, dtype = _W["enc"], _W["opts"], _W["dtype"]
    skipped: Counter = Counter()
    examples: list[str] = []

    def skip(reason: str, lineno: int) -> None:
        where = f"{batch.source}:{lineno}"
        if opts.bad_input == "fail":
            raise DataPrepError(f"{where}: {REASONS[reason]} (tokenize bad_input=fail)")
        skipped[reason] += 1
        if len(examples) < opts.max_examples:
            examples.append(f"{where}: {REASONS[reason]}")

    texts, lines = _texts(batch, opts, skip)
    try:
        ids, lengths = enc.encode_flat(texts)
    except Exception:  # one bad text (e.g. lone surrogates from a JSON escape) fails the whole batch call
        kept = []
        for text, lineno in zip(texts, lines):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                skip("not_utf8", lineno)
                continue
            kept.append((text, lineno))
        texts, lines = [t for t, _ in kept], [n for _, n in kept]
        ids, lengths = enc.encode_flat(texts)
    if enc.fast is not None and opts.check_chars:
        _check_fast(enc, texts, lines, batch.source, opts.check_chars, ids, lengths)
    bos = enc.bos_id if opts.append_bos else None
    eod = enc.eod_id if opts.append_eod else None
    if ids.size and (int(ids.max()) > np.iinfo(dtype).max or int(ids.min()) < 0):
        raise DataPrepError(f"{batch.source}: token id {ids.max()} does not fit {np.dtype(dtype).name} "
                            f"(vocabulary {enc.vocab_size}): tokenizer and dtype do not match")
    out, out_lengths = frame_documents(ids, lengths, bos, eod, dtype)
    return Encoded(out, out_lengths, skipped, examples)


def frame_documents(ids: np.ndarray, lengths: np.ndarray, bos: int | None, eod: int | None,
                    dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents ``ids`` (back to back, ``lengths[i]`` tokens each) with ``bos`` before and ``eod`` after each
    one (None: not added), as ``(tokens of dtype, lengths int32)``; vectorised, no Python loop per token."""
    extra = (bos is not None) + (eod is not None)
    out_lengths = (np.asarray(lengths, dtype=np.int64) + extra).astype(np.int32)
    if not extra:
        return ids.astype(dtype, copy=False), out_lengths
    ends = np.cumsum(out_lengths, dtype=np.int64)
    out = np.empty(int(ends[-1]) if ends.size else 0, dtype=dtype)
    keep = np.ones(out.size, dtype=bool)
    if bos is not None:
        out[ends - out_lengths] = bos
        keep[ends - out_lengths] = False
    if eod is not None:
        out[ends - 1] = eod
        keep[ends - 1] = False
    out[keep] = ids
    return out, out_lengths


def check_sample(texts: list[str], budget: int) -> list[str]:
    """The texts the in-run cross-check encodes twice: from the first text on, each cut to what is left of
    ``budget`` characters, so the check costs at most ``budget`` characters per batch whatever the documents'
    sizes (a cut text is a text like any other: both libraries must agree on it)."""
    sample = []
    for text in texts:
        if budget <= 0:
            break
        sample.append(text[:budget])
        budget -= len(sample[-1])
    return sample


def _check_fast(enc, texts: list[str], lines: list[int], source: str, budget: int, ids: np.ndarray,
                lengths: np.ndarray) -> None:
    """Stop with an error naming file:line if the fast backend's ids differ from the reference library's on the
    batch's sample (:func:`check_sample`): a whole document is checked in the ids about to be written, a cut
    one by encoding the cut text with both."""
    sample = check_sample(texts, budget)
    ends = np.cumsum(lengths[: len(sample)])
    reference = enc.reference_encode_batch(sample)
    for i, (text, ref, lineno) in enumerate(zip(sample, reference, lines)):
        if len(text) == len(texts[i]):
            got = ids[ends[i] - lengths[i]: ends[i]].tolist()
        else:
            got = list(enc.encode_batch([text])[0])
        if got != ref:
            raise DataPrepError(f"{source}:{lineno}: the {enc.bpe_backend} backend of {enc.path} gives other token "
                                "ids than the reference library for this document; rerun with bpe_backend "
                                "tokenizers (ipt tokenize --bpe-backend tokenizers, or tokenize.bpe_backend) and "
                                "report it")


# ---- main side -----------------------------------------------------------------------------------------------


def _shard_intact(shard: Path, stats: dict, log) -> bool:
    """A finished shard's pair passes :func:`data_prep.dataset_check.check_dataset` and holds the tokens its
    ``.done.json`` records (``stats``); else it is tokenized again (logged)."""
    try:
        info = check_dataset(shard)
    except FileNotFoundError:
        return False
    except IndexedDatasetError as e:
        log(f"tokenize: {e}; tokenizing it again")
        return False
    return info.tokens == stats["tokens"] and info.sequences == stats["documents"]


def tokenize_file(path: Path, prefix: Path, pool, opts: TokenizeOptions, dtype, workers: int = 1,
                  progress=None) -> dict:
    """Tokenize one input file into ``prefix.bin/.idx`` through ``pool`` (None: in-process); ``progress`` (a
    :class:`data_prep.progress.StageProgress`) gets the documents and tokens of each batch as rates."""
    writer = IndexedDatasetWriter(prefix, dtype)
    skipped: Counter = Counter()
    examples: list[str] = []
    checksum: dict = {}

    def consume(result: Encoded) -> None:
        writer.add_documents(result.ids, result.lengths)
        if progress is not None:
            progress.advance(0, documents=len(result.lengths), tokens=int(result.lengths.sum()))
        skipped.update(result.skipped)
        examples.extend(result.examples[: opts.max_examples - len(examples)])

    batches = read_batches(path, opts.text_field, opts.batch_docs, opts.batch_bytes, checksum)
    try:
        if pool is None:
            for batch in batches:
                consume(encode_batch(batch))
        else:
            in_flight: deque = deque()
            limit = 2 * workers  # bounded: never more than this many batches read ahead
            for batch in batches:
                in_flight.append(pool.apply_async(encode_batch, (batch,)))
                if len(in_flight) >= limit:
                    consume(in_flight.popleft().get())
            while in_flight:
                consume(in_flight.popleft().get())
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return {"documents": writer.documents, "tokens": writer.tokens, "sha256": checksum.get("sha256"),
            "skipped": dict(skipped), "skipped_examples": examples}


def tokenize_corpus(inputs: list[str | Path], output_prefix: str | Path, tokenizer: str | Path,
                    opts: TokenizeOptions | None = None, log=print) -> dict:
    """Tokenize input files (paths or globs) into ``output_prefix`` and return its manifest (see module doc)."""
    opts = opts or TokenizeOptions()
    if opts.bad_input not in ("skip", "fail"):
        raise DataPrepError(f"bad_input must be 'skip' or 'fail', not {opts.bad_input!r}")
    started = time.time()
    files = expand_inputs([str(p) for p in inputs])
    encoder = load_encoder(tokenizer, opts.bpe_backend)
    _setup(encoder, opts)  # checks EOD/BOS here, before any worker starts (forked workers inherit it)
    _W["tokenizer"] = str(tokenizer)
    dtype = token_dtype(encoder.vocab_size)
    prefix = Path(output_prefix)
    with contextlib.ExitStack() as held:  # the prefix while merging, each shard while it is checked and written
        if opts.merge:
            held.enter_context(exclusive_lock(prefix.with_name(prefix.name + ".lock"), f"output prefix {prefix}"))
        return _tokenize_locked(files, prefix, encoder, dtype, opts, started, log, str(tokenizer), held)


def _tokenize_locked(files: list[Path], prefix: Path, encoder: Encoder, dtype, opts: TokenizeOptions, started: float,
                     log, tokenizer: str, held: contextlib.ExitStack) -> dict:
    shard_dir = prefix.with_name(prefix.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    settings = {"tokenizer": encoder.fingerprint, **opts.key()}
    workers = opts.workers or os.cpu_count() or 1
    if sum(f.stat().st_size for f in files) < opts.min_parallel_bytes:
        workers = 1
    pool = None
    sources, shard_prefixes, resumed = [], [], 0
    progress = StageProgress(f"tokenize {prefix.name}", len(files), "files", rates={"documents": 0, "tokens": 0},
                             stream=sys.stderr, quiet_when_quick=True)
    try:
        for path in files:
            claimed = claim_shard(path, shard_dir, settings, held, "tokenizer shard",
                                  lambda prefix, stats: _shard_intact(prefix, stats, log))
            shard = claimed.prefix
            if claimed.stats is not None:
                stats, resumed = claimed.stats, resumed + 1
            elif opts.merge_only:
                raise DataPrepError(f"{path}: no finished shard for this input and these settings under {shard_dir} "
                                    "(--merge-only merges only what earlier runs finished; tokenize it first)")
            else:
                if pool is None and workers > 1:
                    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
                    pool = ctx.Pool(workers, _init_worker, (tokenizer, opts))
                t0 = time.time()
                stats = tokenize_file(path, shard, pool, opts, dtype, workers, progress)
                stats["seconds"] = round(time.time() - t0, 3)
                claimed.finish(stats)
                log(f"tokenize: {path} -> {stats['documents']:,} documents, {stats['tokens']:,} tokens"
                    + (f", skipped {stats['skipped']}" if stats["skipped"] else ""))
            sources.append({"path": str(path), "shard": str(shard), **stats})
            progress.advance(1)
            shard_prefixes.append(shard)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if opts.require_documents and opts.merge and not sum(s["documents"] for s in sources):
        skipped_all = sum((Counter(s["skipped"]) for s in sources), Counter())
        raise DataPrepError(f"no documents in {', '.join(str(f) for f in files)}"
                            + (f" (every record was skipped: {dict(skipped_all)})" if skipped_all else "")
                            + f"; {prefix}.bin/.idx not written (megatron-core cannot open an empty dataset)")
    merged = None
    if opts.merge:
        merged = merge_datasets(shard_prefixes, prefix)
    skipped: Counter = Counter()
    for s in sources:
        skipped.update(s["skipped"])
    seconds = time.time() - started
    tokens = sum(s["tokens"] for s in sources)
    manifest = {
        "output_prefix": str(prefix) if opts.merge else None,
        "documents": sum(s["documents"] for s in sources),
        "tokens": tokens,
        "tokenizer": {**encoder.info(), "dtype": np.dtype(dtype).name},
        "options": asdict(opts),
        "workers": workers,
        "sources": sources,
        "shards_resumed": resumed,
        "skipped": dict(skipped),
        "skipped_examples": [e for s in sources for e in s["skipped_examples"]][: opts.max_examples],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
    }
    if merged is not None:
        assert merged["documents"] == manifest["documents"] and merged["tokens"] == tokens
        # what a reader compares before training (data_prep.dataset_check.check_with_manifest)
        manifest["files"] = {f"{prefix.name}.{ext}": file_record(f"{prefix}.{ext}") for ext in ("bin", "idx")}
    atomic.write_json(prefix.with_name(prefix.name + ".manifest.json"), manifest, indent=2)
    return manifest


def add_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The standalone tokenizer's options (shared by ``python -m data_prep.tokenize`` and ``ipt tokenize``)."""
    g = p.add_argument_group("standalone tokenizing (no experiment file)")
    g.add_argument("--input", action="append", required=required, metavar="GLOB",
                   help="input files: JSONL (.gz/.zst), Parquet, .txt (one document per line); repeatable")
    g.add_argument("--tokenizer", required=required, help="tokenizer.json, a Hugging Face folder, a sentencepiece "
                   ".model or a tiktoken BPE file (Llama-3 tokenizer.model)")
    g.add_argument("--output-prefix", required=required,
                   help="writes PREFIX.bin/.idx, PREFIX.shards/, PREFIX.manifest.json")
    g.add_argument("--text-field", default="text", help="JSON/Parquet field holding the text (default: text)")
    g.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    g.add_argument("--append-bos", action="store_true", help="prepend the BOS token to each document")
    g.add_argument("--no-eod", action="store_true", help="do not append the EOD token to each document")
    g.add_argument("--bpe-backend", choices=["auto", "gigatoken", "tiktoken", "tokenizers"], default="auto",
                   help="the BPE implementation (tokenizer.json, sentencepiece BPE): auto (default) picks gigatoken "
                   "where it loads the tokenizer and agrees with the reference library on probe texts, else the "
                   "tiktoken view for byte-level BPE, else the reference; tokenizers forces the reference library "
                   "(a sample of every batch is checked against it whenever a faster backend runs)")
    g.add_argument("--bad-input", choices=["skip", "fail"], default="skip",
                   help="malformed/empty/non-UTF-8 records: skip and count them (default) or stop at the first")
    g.add_argument("--no-merge", action="store_true",
                   help="keep only the per-file shards (e.g. one Slurm array task per file; merge later)")
    g.add_argument("--merge-only", action="store_true",
                   help="tokenize nothing: check that every input's shard is finished and merge them into PREFIX")


def run(a: argparse.Namespace) -> int:
    """Run the standalone tokenizer from parsed :func:`add_arguments` options; returns the exit status."""
    if a.no_merge and a.merge_only:
        raise DataPrepError("--no-merge and --merge-only exclude each other")
    opts = TokenizeOptions(text_field=a.text_field, workers=a.workers, append_bos=a.append_bos,
                           append_eod=not a.no_eod, bad_input=a.bad_input, merge=not a.no_merge,
                           merge_only=a.merge_only, bpe_backend=a.bpe_backend, require_documents=True)
    m = tokenize_corpus(a.input, a.output_prefix, a.tokenizer, opts)
    print(f"{m['documents']:,} documents, {m['tokens']:,} tokens in {m['seconds']} s "
          f"({m['tokens_per_s']:,} tokens/s); skipped {m['skipped'] or 'none'}")
    for e in m["skipped_examples"]:
        print(f"  skipped {e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.tokenize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
