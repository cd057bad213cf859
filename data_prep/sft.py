"""Supervised instruction tuning data: JSONL conversations -> token ids plus a loss mask, as indexed datasets.

Input: JSONL (plain, ``.gz``, ``.zst``), one conversation per line, streamed. A record holds either
``messages`` (a list of ``{"role", "content"}``), ``conversations`` (ShareGPT's ``{"from", "value"}``; its
``human`` / ``gpt`` roles are read as ``user`` / ``assistant``) or a ``question`` / ``response`` pair (optionally a ``system`` string); the field names are
configurable (:class:`SFTFields`, the experiment's ``sft.fields``).

Rendering (``template``):
- ``chat``: the tokenizer's chat template (transformers' ``apply_chat_template``). The assistant span of turn i is
  the text that ``messages[:i+1]`` adds to ``messages[:i]`` rendered with ``add_generation_prompt=True``: the
  reply and the template's end-of-turn marker (so the model learns to stop), never the generation prompt. A
  template whose renders are not prefixes of each other (one that rewrites earlier turns) is an error naming
  the line.
- ``plain`` (base models, no template): the Instruction Pre-Training paper's ``{question} {response}``: each
  non-assistant turn's content, one space, the assistant's content; turns separated by a blank line; BOS first
  when the tokenizer has one; the end-of-text token ends the conversation and is a target (the stop signal).

Each rendered piece is tokenized on its own (no special tokens added) and the ids are concatenated, so the
prompt's ids are exactly what a generation call would feed the model; ``chat`` conversations end with the EOD
token (not a target) as pre-training documents do.

Output, for ``PREFIX`` (the format ``megatron_ipt.training.sft_data`` reads):
- ``PREFIX.bin`` / ``PREFIX.idx``: a Megatron indexed dataset, one document (one sequence) per conversation, the
  token ids (uint16 below 65,500 tokens of vocabulary, else int32), as the tokenize stage writes.
- ``PREFIX_mask.bin`` / ``PREFIX_mask.idx``: a second indexed dataset (uint8) with the same sequence lengths
  and document boundaries; ``mask[j] = 1`` where token ``j`` is a target (assistant) token. A training sample's
  ``loss_mask`` for the label at position ``j`` (the token ``j + 1``) is ``mask[j + 1]``.
- ``PREFIX.manifest.json``: counts, skipped records (with reasons and examples), the tokenizer and settings, the
  four files' records (:func:`megatron_ipt.manifest.file_record`, what training checks); it is written last, after
  both datasets were renamed into place, so a folder with a manifest is complete.
- ``PREFIX.shards/``: one token and one mask dataset per input file (``NAME`` and ``NAME_mask``, same document
  boundaries), each finished with ``NAME.done.json`` (the input's size and mtime, the tokenizer and settings, the
  counts and the files' records); both are merged, in input order, into ``PREFIX`` and ``PREFIX_mask``.

Streaming, deterministic, resumable like the tokenize stage (``data_prep.input_shards``): the same input,
tokenizer and settings give the same bytes, whether in one run or resumed. Every file is written under a
temporary name and renamed; a rerun with the same inputs, tokenizer and settings is skipped; a rerun after a crash
or kill reads only the input files whose shard is not finished (``sft data: resuming: N of M input files already
tokenized``). ``PREFIX.lock`` and ``PREFIX.shards/NAME.lock`` (``data_prep.locks``) stop a second run on the same
output at once.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import atomic
from data_prep.dataset_check import IndexedDatasetError, check_dataset, check_with_manifest
from data_prep.encoders import Encoder, load_encoder
from data_prep.errors import DataPrepError
from data_prep.indexed import IndexedDatasetWriter, merge_datasets, token_dtype
from data_prep.input_shards import claim_shard, source_stamp
from data_prep.locks import exclusive_lock
from data_prep.readers import expand_inputs, read_batches
from megatron_ipt.manifest import file_record, record_mismatch

MASK_SUFFIX = "_mask"
MASK_DTYPE = np.uint8
TEMPLATES = ("chat", "plain")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
REASONS = {
    "malformed_json": "not a JSON object",
    "no_conversation": "neither a messages list nor question/response strings",
    "bad_message": "a message without a string role and content",
    "no_assistant": "no assistant turn with content",
    "not_utf8": "not valid UTF-8",
}


@dataclass(frozen=True)
class SFTFields:
    """Where a record keeps its conversation: ``messages`` of ``{role, content}``, or ``question`` / ``response``
    (and an optional ``system`` string)."""

    messages: str = "messages"
    conversations: str = "conversations"  # ShareGPT style: [{"from", "value"}]
    role: str = "role"
    content: str = "content"
    question: str = "question"
    response: str = "response"
    system: str = "system"


@dataclass(frozen=True)
class SFTOptions:
    """How conversations become tokens: ``template`` (``chat`` or ``plain``), bad records skipped or fatal."""

    template: str = "chat"
    fields: SFTFields = field(default_factory=SFTFields)
    bad_input: str = "skip"  # or "fail"
    max_examples: int = 5
    batch_docs: int = 256

    def key(self) -> dict:
        return {"template": self.template, "fields": asdict(self.fields)}


def conversation(record: Any, fields: SFTFields = SFTFields()) -> list[dict[str, str]] | str:
    """The record's messages as ``[{"role", "content"}]`` (roles lower-cased, ShareGPT aliases mapped), or the
    :data:`REASONS` key of why it has none."""
    if not isinstance(record, dict):
        return "malformed_json"
    raw = record.get(fields.messages)
    keys = (fields.role, fields.content)
    if not isinstance(raw, list) and isinstance(record.get(fields.conversations), list):
        raw, keys = record[fields.conversations], ("from", "value")
    if isinstance(raw, list):
        messages = []
        for m in raw:
            if isinstance(m, dict) and keys[0] not in m:
                role, content = m.get(fields.role), m.get(fields.content)  # a conversations list in role/content
            else:
                role, content = (m.get(keys[0]), m.get(keys[1])) if isinstance(m, dict) else (None, None)
            if not isinstance(role, str) or not isinstance(content, str):
                return "bad_message"
            role = role.strip().lower()
            messages.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    else:
        q, r = record.get(fields.question), record.get(fields.response)
        if not isinstance(q, str) or not isinstance(r, str) or not q.strip():
            return "no_conversation"
        system = record.get(fields.system)
        messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else [])
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "no_assistant"
    return messages


def render_plain(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """``[(text, is_target)]`` of the plain template (module docstring); concatenated they give the whole text."""
    pieces: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            pieces.append((m["content"], True))
            continue
        text = ("\n\n" if i else "") + m["content"]
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            text += " "
        pieces.append((text, False))
    return pieces


def render_chat(tokenizer, messages: list[dict[str, str]], where: str = "") -> list[tuple[str, bool]]:
    """``[(text, is_target)]`` of a transformers tokenizer's chat template: assistant spans are what each
    assistant turn adds to the render of the turns before it with the generation prompt (module docstring).
    Raises DataPrepError (naming ``where``) when a render is not a prefix of the next one."""

    def render(msgs, prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataPrepError(f"{where}: the chat template does not render turn {i + 1} as a continuation of the "
                                "turns before it, so its assistant span cannot be found; use sft.template plain "
                                "or a template that appends turns")
        if len(prompt) > len(done):
            pieces.append((prompt[len(done):], False))
        pieces.append((full[len(prompt):], True))
        done = full
    whole = render(messages, False)
    if not whole.startswith(done):
        raise DataPrepError(f"{where}: the chat template rewrites earlier turns of this conversation")
    if len(whole) > len(done):
        pieces.append((whole[len(done):], False))
    return pieces


def encode_pieces(encoder: Encoder, pieces: list[tuple[str, bool]], *, bos: bool, eod_target: bool
                  ) -> tuple[list[int], list[int]]:
    """Token ids and the 0/1 target mask of rendered pieces (each tokenized on its own), optionally after BOS
    (not a target) and followed by EOD (a target when ``eod_target``)."""
    ids_per_piece = encoder.encode_batch([text for text, _ in pieces]) if pieces else []
    ids: list[int] = [encoder.bos_id] if bos else []
    mask: list[int] = [0] * len(ids)
    for (_text, target), piece in zip(pieces, ids_per_piece):
        ids += piece
        mask += [int(target)] * len(piece)
    ids.append(encoder.eod_id)
    mask.append(int(eod_target))
    return ids, mask


def _chat_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tok, "chat_template", None):
        raise DataPrepError(f"tokenizer {path} has no chat template (sft.template chat); use sft.template plain for a "
                            "base model")
    return tok


def _intact(prefix: Path) -> bool:
    """Both datasets pass :func:`data_prep.dataset_check.check_with_manifest` (else a rerun writes them again)."""
    try:
        check_with_manifest(prefix)
        check_dataset(f"{prefix}{MASK_SUFFIX}")
    except (OSError, IndexedDatasetError):
        return False
    return True


def _shard_intact(shard: Path, stats: dict) -> bool:
    """A finished shard's two datasets pass :func:`data_prep.dataset_check.check_dataset`, hold the conversations
    and tokens its ``.done.json`` records, and their files match the records in it (a one-input merge hard-links
    the shard's ``.bin``, so a change to the merged file in place shows here too)."""
    try:
        tokens, mask = check_dataset(shard), check_dataset(f"{shard}{MASK_SUFFIX}")
    except (OSError, IndexedDatasetError):
        return False
    if not (tokens.sequences == mask.sequences == stats["conversations"] and tokens.tokens == mask.tokens
            == stats["tokens"]):
        return False
    done = shard.with_name(shard.name + ".done.json")
    return not any(record_mismatch(shard.parent / name, record, done) for name, record in stats["files"].items())


def _dataset_files(prefix: Path) -> dict:
    """``{NAME: file_record}`` of the token and mask datasets' four files (what a later reader compares)."""
    return {f"{prefix.name}{sfx}.{ext}": file_record(f"{prefix}{sfx}.{ext}") for sfx in ("", MASK_SUFFIX)
            for ext in ("bin", "idx")}


def _tokenize_file(path: Path, shard: Path, encoder: Encoder, chat, opts: SFTOptions, dtype) -> dict:
    """Tokenize one JSONL file of conversations into the shard ``shard`` (tokens) and ``shard_mask`` (mask);
    returns its stats (conversations, tokens, target tokens, the input's SHA-256, skipped records, the files'
    records). Raises DataPrepError for a non-JSONL input or (``bad_input: fail``) the first bad record."""
    tokens_out = IndexedDatasetWriter(shard, dtype)
    mask_out = IndexedDatasetWriter(f"{shard}{MASK_SUFFIX}", MASK_DTYPE)
    skipped: Counter = Counter()
    examples: list[str] = []
    targets = 0
    checksum: dict = {}
    try:
        for batch in read_batches(path, "text", opts.batch_docs, 1 << 22, checksum):
            if batch.format != "jsonl":
                raise DataPrepError(f"{path}: SFT data must be JSONL (one conversation per line)")
            for k, line in enumerate(batch.items):
                where = f"{path}:{batch.first + k}"
                reason, rendered = _render_line(line, opts, chat, where)
                if reason:
                    if opts.bad_input == "fail":
                        raise DataPrepError(f"{where}: {REASONS[reason]} (sft bad_input=fail)")
                    skipped[reason] += 1
                    if len(examples) < opts.max_examples:
                        examples.append(f"{where}: {REASONS[reason]}")
                    continue
                if rendered is None:
                    continue  # a blank line
                ids, mask = encode_pieces(encoder, rendered, bos=chat is None and encoder.bos_id is not None,
                                          eod_target=chat is None)
                tokens_out.add_documents(np.asarray(ids, dtype=dtype), np.array([len(ids)], dtype=np.int32))
                mask_out.add_documents(np.asarray(mask, dtype=MASK_DTYPE), np.array([len(mask)], dtype=np.int32))
                targets += sum(mask)
        mask_out.finalize()
        tokens_out.finalize()
    except BaseException:
        tokens_out.abort()
        mask_out.abort()
        raise
    return {"conversations": tokens_out.documents, "tokens": tokens_out.tokens, "target_tokens": targets,
            "sha256": checksum.get("sha256"), "skipped": dict(skipped), "skipped_examples": examples,
            "files": _dataset_files(shard)}


def tokenize_conversations(inputs: list[str | Path], output_prefix: str | Path, tokenizer: str | Path,
                           opts: SFTOptions | None = None, log=print) -> dict:
    """Tokenize JSONL conversations into ``PREFIX`` and ``PREFIX_mask`` (format: module docstring); returns the
    manifest (also written to ``PREFIX.manifest.json``). Skipped when that manifest shows the same inputs,
    tokenizer and settings; else an input whose shard an earlier run finished is not read again. Holds
    ``PREFIX.lock`` (:class:`data_prep.locks.LockHeld` when another run writes the same prefix). Raises
    DataPrepError for a missing input, a tokenizer without EOD (or without a chat template for ``chat``), a
    non-JSONL input, or (``bad_input: fail``) the first bad record, naming file:line."""
    opts = opts or SFTOptions()
    if opts.template not in TEMPLATES:
        raise DataPrepError(f"sft template must be one of {TEMPLATES}, not {opts.template!r}")
    if opts.bad_input not in ("skip", "fail"):
        raise DataPrepError(f"bad_input must be 'skip' or 'fail', not {opts.bad_input!r}")
    started = time.time()
    files = expand_inputs([str(p) for p in inputs])
    encoder = load_encoder(tokenizer, "tokenizers")
    if encoder.eod_id is None:
        raise DataPrepError(f"tokenizer {tokenizer} has neither an end-of-text nor an EOS token to end conversations")
    chat = _chat_tokenizer(tokenizer) if opts.template == "chat" else None
    prefix = Path(output_prefix)
    with contextlib.ExitStack() as held:  # the prefix, and each input's shard once claimed
        held.enter_context(exclusive_lock(prefix.with_name(prefix.name + ".lock"), f"sft data prefix {prefix}"))
        return _tokenize_locked(files, prefix, encoder, chat, opts, started, log, held)


def _tokenize_locked(files: list[Path], prefix: Path, encoder: Encoder, chat, opts: SFTOptions, started: float,
                     log, held: contextlib.ExitStack) -> dict:
    manifest_path = prefix.with_name(prefix.name + ".manifest.json")
    settings = {"tokenizer": encoder.fingerprint, **opts.key(), "sources": [source_stamp(p) for p in files]}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") == settings and _intact(prefix):
            log(f"sft data: {prefix} is up to date ({old['conversations']:,} conversations)")
            return old
    shard_dir = prefix.with_name(prefix.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    shard_settings = {"tokenizer": encoder.fingerprint, **opts.key()}
    shards = [claim_shard(p, shard_dir, shard_settings, held, "sft data shard", _shard_intact) for p in files]
    resumed = sum(s.stats is not None for s in shards)
    if resumed:
        log(f"sft data: resuming: {resumed} of {len(shards)} input files already tokenized (under {shard_dir})")
    dtype = token_dtype(encoder.vocab_size)
    for s in shards:
        if s.stats is None:
            s.finish(_tokenize_file(s.source, s.prefix, encoder, chat, opts, dtype))
    merged = merge_datasets([s.prefix for s in shards], prefix)
    merge_datasets([f"{s.prefix}{MASK_SUFFIX}" for s in shards], f"{prefix}{MASK_SUFFIX}")
    stats = [s.stats for s in shards]
    skipped = sum((Counter(st["skipped"]) for st in stats), Counter())
    manifest = {
        "output_prefix": str(prefix), "mask_prefix": f"{prefix}{MASK_SUFFIX}",
        "conversations": merged["documents"], "tokens": merged["tokens"],
        "target_tokens": sum(st["target_tokens"] for st in stats),
        "tokenizer": {**encoder.info(), "dtype": np.dtype(dtype).name},
        "template": opts.template, "settings": settings,
        "sources": [{"path": str(s.source), "sha256": s.stats["sha256"]} for s in shards],
        "shards_resumed": resumed, "skipped": dict(skipped),
        "skipped_examples": [e for st in stats for e in st["skipped_examples"]][: opts.max_examples],
        "seconds": round(time.time() - started, 3),
        "files": _dataset_files(prefix),  # what training compares (data_prep.dataset_check.check_with_manifest)
    }
    atomic.write_json(manifest_path, manifest, indent=2)
    log(f"sft data: {manifest['conversations']:,} conversations, {manifest['tokens']:,} tokens "
        f"({manifest['target_tokens']:,} targets) -> {prefix}" + (f"; skipped {dict(skipped)}" if skipped else ""))
    return manifest


def _render_line(line: bytes, opts: SFTOptions, chat, where: str) -> tuple[str | None, list | None]:
    """``(reason, None)`` for a bad record, ``(None, None)`` for a blank line, else ``(None, pieces)``."""
    if not line.strip():
        return None, None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", None
    try:
        record = json.loads(text)
    except ValueError:
        return "malformed_json", None
    messages = conversation(record, opts.fields)
    if isinstance(messages, str):
        return messages, None
    return None, (render_chat(chat, messages, where) if chat is not None else render_plain(messages))


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.sft``: the data side alone (e.g. in the synthesis environment), no experiment file."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m data_prep.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True, metavar="GLOB", help="JSONL conversations; repeatable")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder (with a chat template for chat)")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin/.idx, PREFIX_mask.bin/.idx, PREFIX.shards/, PREFIX.manifest.json")
    p.add_argument("--template", choices=TEMPLATES, default="chat", help="chat (default) or plain")
    p.add_argument("--bad-input", choices=["skip", "fail"], default="skip")
    a = p.parse_args(argv)
    try:
        tokenize_conversations(a.input, a.output_prefix, a.tokenizer,
                               SFTOptions(template=a.template, bad_input=a.bad_input))
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
