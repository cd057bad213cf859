"""Long-document chunking at paragraph, then sentence boundaries, measured with SmolLM2's real tokenizer."""

from __future__ import annotations

import pytest

from data_prep.chunking import split_text
from data_prep.errors import DataPrepError
from fixtures_synth import smollm2_tokenizer  # noqa: F401 (fixture)


def _counter(tok):
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def test_short_text_is_one_chunk(smollm2_tokenizer):
    assert split_text("A short text.", 50, _counter(smollm2_tokenizer)) == ["A short text."]


def test_paragraphs_are_packed_and_never_cut_when_they_fit(smollm2_tokenizer):
    count = _counter(smollm2_tokenizer)
    paras = [f"Paragraph {i} talks about the topic number {i} in some detail here." for i in range(12)]
    chunks = split_text("\n\n".join(paras), 40, count)
    assert len(chunks) > 1 and all(count(c) <= 40 for c in chunks)
    assert "\n\n".join(chunks) == "\n\n".join(paras)  # cuts only between paragraphs


def test_long_paragraph_splits_at_sentences(smollm2_tokenizer):
    count = _counter(smollm2_tokenizer)
    sentences = [f"Sentence {i} explains one more small fact about Python lists." for i in range(10)]
    chunks = split_text(" ".join(sentences), 30, count)
    assert len(chunks) > 1 and all(count(c) <= 30 for c in chunks)
    assert all(c.endswith(".") for c in chunks)
    assert " ".join(chunks) == " ".join(sentences)


def test_max_chunks_and_bad_budget(smollm2_tokenizer):
    count = _counter(smollm2_tokenizer)
    text = "\n\n".join(f"Paragraph {i} is here with words." for i in range(20))
    assert len(split_text(text, 12, count, max_chunks=3)) == 3
    with pytest.raises(DataPrepError, match="chunk budget"):
        split_text(text, 0, count)
