"""A tiktoken view of a Hugging Face byte-level BPE ``tokenizer.json``: the same token ids, about 4x faster.

GPT-2-style byte-level BPE tokenizers (GPT-2, SmolLM, Llama-3, Qwen2, ...) are a regex pre-split, a
byte-to-unicode mapping and a ranked merge list. tiktoken implements the same algorithm in Rust with less
per-token overhead than the ``tokenizers`` library (measured here: 4.1-4.5x less CPU time per token on
SmolLM2's tokenizer, identical ids; ``benchmarks/tokenize_throughput.py``). This module builds a
``tiktoken.Encoding`` from a ``tokenizer.json`` when that file is of the supported shape, else says why not:

- ``model``: ``BPE`` without dropout, ``byte_fallback``, ``continuing_subword_prefix`` or
  ``end_of_word_suffix``, and merge results whose ids increase in merge order (so that a token's id is
  its merge rank, which is how tiktoken picks the next merge; true of tokenizers trained by the BPE
  trainers, checked here);
- ``pre_tokenizer``: ``ByteLevel`` with its built-in GPT-2 regex and no prefix space, or a ``Sequence`` of a
  regex ``Split`` (behaviour ``Isolated``) and a regex-free ``ByteLevel`` (Llama-3 / Qwen2 style);
- no ``normalizer``; added tokens without ``lstrip``/``rstrip``/``single_word``: they are cut out of the text
  first (longest match at the leftmost position, as ``tokenizers`` does) and mapped to their ids.

Where the two could still differ (tiktoken takes a pre-split piece that is itself a token in one step; the
merge list may, in principle, build it differently), the caller checks a sample against the reference
(``data_prep.tokenize`` checks the first documents of every batch and stops with an error naming the file
and line on a difference). Source of the byte-to-unicode table: GPT-2's ``encoder.py`` (Radford et al.,
2019), the table every byte-level BPE ``tokenizer.json`` uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# GPT-2's pre-tokenization pattern (the one tokenizers' ByteLevel(use_regex=True) applies).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@dataclass
class FastBPE:
    """``encode_batch(texts) -> list[list[int]]``: the ids ``tokenizers`` would give, without special tokens
    added (added tokens present in the text are recognised, as ``tokenizers`` does)."""

    encoding: object  # tiktoken.Encoding
    added: dict[str, int]
    added_re: re.Pattern | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        for t in texts:  # lone surrogates: raise like tokenizers does (tiktoken would replace them)
            if not t.isascii():  # O(1) in CPython; only non-ASCII text can hold a surrogate
                t.encode("utf-8")
        if self.added_re is None:
            return self.encoding.encode_ordinary_batch(texts, num_threads=1)
        return [self._encode_with_added(t) for t in texts]

    def _encode_with_added(self, text: str) -> list[int]:
        if not self.added_re.search(text):
            return self.encoding.encode_ordinary(text)
        ids: list[int] = []
        pos = 0
        for m in self.added_re.finditer(text):
            if m.start() > pos:
                ids += self.encoding.encode_ordinary(text[pos:m.start()])
            ids.append(self.added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.encoding.encode_ordinary(text[pos:])
        return ids


def _pattern(pre: dict | None) -> tuple[str | None, str]:
    if not pre:
        return None, "no pre_tokenizer"
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None, "ByteLevel pre_tokenizer with add_prefix_space or without its regex"
        return GPT2_PATTERN, ""
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in (steps[0].get("pattern") or {})
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space")):
            return steps[0]["pattern"]["Regex"], ""
    return None, f"pre_tokenizer {pre.get('type')} of an unsupported shape"


def from_tokenizer_json(spec: dict) -> tuple[FastBPE | None, str]:
    """A FastBPE for a parsed ``tokenizer.json``, or ``(None, reason)`` when its shape is not supported
    (module docstring). Needs the ``tiktoken`` package (the ``data``/``cpu`` extras)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None, f"model {model.get('type')} is not BPE"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return None, "BPE with dropout, byte_fallback or subword affixes"
    if spec.get("normalizer"):
        return None, "a normalizer"
    pattern, why = _pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None, why
    added_tokens = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added_tokens):
        return None, "added tokens with lstrip/rstrip/single_word"
    vocab: dict[str, int] = model.get("vocab") or {}
    to_unicode = byte_to_unicode()
    from_unicode = {c: b for b, c in to_unicode.items()}

    def as_bytes(token: str) -> bytes:
        return bytes(from_unicode[c] for c in token)

    # Ranks: the single bytes and the merge results only (a vocabulary entry no merge builds, e.g. a special
    # token kept in the model's vocabulary, is not something BPE can produce).
    ranks: dict[bytes, int] = {}
    try:
        for b, c in to_unicode.items():
            if c in vocab:
                ranks[bytes([b])] = vocab[c]
        last = -1
        for merge in model.get("merges") or []:
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            i = vocab[a + b]
            if i <= last:
                return None, f"merge {a!r} + {b!r}: ids do not increase in merge order"
            last = i
            ranks.setdefault(as_bytes(a + b), i)
    except KeyError as e:
        return None, f"a merge outside the byte-level alphabet or vocabulary ({e})"
    free = max(vocab.values(), default=-1) + 1
    for b in range(256):  # bytes no valid UTF-8 text contains (0xC0, 0xF5, ...) may be missing: park them
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = free
            free += 1
    import tiktoken

    encoding = tiktoken.Encoding(name="hf-byte-level-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={})
    added = {t["content"]: t["id"] for t in added_tokens}
    added_re = re.compile("|".join(re.escape(s) for s in sorted(added, key=len, reverse=True))) if added else None
    return FastBPE(encoding, added, added_re), ""
