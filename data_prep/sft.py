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
- ``PREFIX.manifest.json``: counts, skipped records (with reasons and examples), the tokenizer and settings; it
  is written last, after both datasets were renamed into place, so a folder with a manifest is complete.

Deterministic: the same input, tokenizer and settings give the same bytes. Every file is written under a
temporary name and renamed; a rerun with the same inputs, tokenizer and settings is skipped (resume).
"""

from __future__ import annotations

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
from data_prep.indexed import IndexedDatasetWriter, token_dtype
from data_prep.readers import expand_inputs, read_batches
from megatron_ipt.manifest import file_record

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


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _intact(prefix: Path) -> bool:
    """Both datasets pass :func:`data_prep.dataset_check.check_with_manifest` (else a rerun writes them again)."""
    try:
        check_with_manifest(prefix)
        check_dataset(f"{prefix}{MASK_SUFFIX}")
    except (OSError, IndexedDatasetError):
        return False
    return True


def tokenize_conversations(inputs: list[str | Path], output_prefix: str | Path, tokenizer: str | Path,
                           opts: SFTOptions | None = None, log=print) -> dict:
    """Tokenize JSONL conversations into ``PREFIX`` and ``PREFIX_mask`` (format: module docstring); returns the
    manifest (also written to ``PREFIX.manifest.json``). Skipped when that manifest shows the same inputs,
    tokenizer and settings. Raises DataPrepError for a missing input, a tokenizer without EOD (or without a chat
    template for ``chat``), a non-JSONL input, or (``bad_input: fail``) the first bad record, naming file:line."""
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
    manifest_path = prefix.with_name(prefix.name + ".manifest.json")
    settings = {"tokenizer": encoder.fingerprint, **opts.key(), "sources": [_stamp(p) for p in files]}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") == settings and _intact(prefix):
            log(f"sft data: {prefix} is up to date ({old['conversations']:,} conversations)")
            return old
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(encoder.vocab_size)
    tokens_out = IndexedDatasetWriter(prefix, dtype)
    mask_out = IndexedDatasetWriter(f"{prefix}{MASK_SUFFIX}", MASK_DTYPE)
    skipped: Counter = Counter()
    examples: list[str] = []
    targets = 0
    sources = []
    try:
        for path in files:
            checksum: dict = {}
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
            sources.append({"path": str(path), "sha256": checksum.get("sha256")})
        mask_out.finalize()
        tokens_out.finalize()
    except BaseException:
        tokens_out.abort()
        mask_out.abort()
        raise
    seconds = time.time() - started
    manifest = {
        "output_prefix": str(prefix), "mask_prefix": f"{prefix}{MASK_SUFFIX}",
        "conversations": tokens_out.documents, "tokens": tokens_out.tokens, "target_tokens": targets,
        "tokenizer": {**encoder.info(), "dtype": np.dtype(dtype).name},
        "template": opts.template, "settings": settings, "sources": sources,
        "skipped": dict(skipped), "skipped_examples": examples, "seconds": round(seconds, 3),
        "files": {f"{prefix.name}{sfx}.{ext}": file_record(f"{prefix}{sfx}.{ext}") for sfx in ("", MASK_SUFFIX)
                  for ext in ("bin", "idx")},  # what training compares (data_prep.dataset_check.check_with_manifest)
    }
    atomic.write_json(manifest_path, manifest, indent=2)
    log(f"sft data: {tokens_out.documents:,} conversations, {tokens_out.tokens:,} tokens ({targets:,} targets) "
        f"-> {prefix}" + (f"; skipped {dict(skipped)}" if skipped else ""))
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
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx, PREFIX_mask.bin/.idx, PREFIX.manifest.json")
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
