"""Split a document that does not fit the synthesizer's prompt into chunks at paragraph, then sentence boundaries.

The reference synthesizer does not chunk (long texts overflow ``max_model_len``); here a text longer than
``max_tokens`` (measured with the real tokenizer) is cut into consecutive chunks of at most ``max_tokens``
tokens: whole paragraphs (blank-line separated) are packed greedily; a paragraph that alone is too long is
packed sentence by sentence; a sentence that alone is too long is cut at token boundaries. Joining the
chunks with the separators they were split at gives back the text (whitespace at the cuts normalised).

``data_prep.synthesize`` uses it when ``synthesis.chunking`` is on: every chunk is a prompt of its own and the
pairs of all chunks belong to the document.
"""

from __future__ import annotations

import re
from typing import Callable

from data_prep.errors import DataPrepError

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def split_text(text: str, max_tokens: int, count_tokens: Callable[[str], int], max_chunks: int | None = None) -> list[str]:
    """Chunks of ``text`` of at most ``max_tokens`` tokens each (``count_tokens(str) -> int``), in order.

    A text that fits is returned as one chunk. ``max_chunks``: keep at most this many (the first ones).
    Raises DataPrepError when ``max_tokens`` < 1.
    """
    if max_tokens < 1:
        raise DataPrepError(f"chunk budget must be >= 1 token, got {max_tokens}")
    if count_tokens(text) <= max_tokens:
        return [text]
    chunks: list[str] = []
    for para in (p.strip() for p in _PARAGRAPH.split(text)):
        if not para:
            continue
        pieces = [para] if count_tokens(para) <= max_tokens else _split_long(para, max_tokens, count_tokens)
        for piece in pieces:
            joined = chunks[-1] + "\n\n" + piece if chunks else None
            if joined is not None and count_tokens(joined) <= max_tokens:
                chunks[-1] = joined
            else:
                chunks.append(piece)
    return chunks[:max_chunks] if max_chunks else chunks


def _split_long(para: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    out: list[str] = []
    for sent in _SENTENCE.split(para):
        if count_tokens(sent) > max_tokens:
            out.extend(_split_words(sent, max_tokens, count_tokens))
            continue
        if out and count_tokens(out[-1] + " " + sent) <= max_tokens:
            out[-1] = out[-1] + " " + sent
        else:
            out.append(sent)
    return out


def _split_words(sent: str, max_tokens: int, count_tokens: Callable[[str], int]) -> list[str]:
    out: list[str] = []
    for word in sent.split(" "):
        if out and count_tokens(out[-1] + " " + word) <= max_tokens:
            out[-1] = out[-1] + " " + word
        else:
            out.append(word)
    return out
