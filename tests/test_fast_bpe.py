"""The tiktoken view of byte-level BPE tokenizers gives exactly the tokenizers library's ids, or is not used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.encoders import PROBES, load_encoder
from data_prep.errors import DataPrepError
from data_prep.fast_bpe import from_tokenizer_json
from data_prep.tokenize import TokenizeOptions, tokenize_corpus


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


def test_view_equals_tokenizers_on_real_text(tiny_tokenizer_dir):
    enc = load_encoder(tiny_tokenizer_dir, "tiktoken")
    assert enc.info()["bpe_backend"] == "tiktoken"
    texts = _topics() + PROBES + ["<|endoftext|>" * 3 + "a<|endoftext|>b", "mixed <|endoftext|>\n\n<|endoftext|>"]
    assert enc.encode_batch(texts) == enc.reference_encode_batch(texts)
    # the special token inside text is recognised as one id, as tokenizers does
    assert enc.encode_batch(["a<|endoftext|>b"])[0].count(enc.eod_id) == 1


def test_forced_reference_backend(tiny_tokenizer_dir):
    enc = load_encoder(tiny_tokenizer_dir, "tokenizers")
    assert enc.fast is None and enc.info()["bpe_backend"] == "tokenizers"
    with pytest.raises(DataPrepError, match="bpe_backend 'fast'"):
        load_encoder(tiny_tokenizer_dir, "fast")


def test_unsupported_shapes_say_why(tiny_tokenizer_dir, tmp_path):
    spec = json.loads((Path(tiny_tokenizer_dir) / "tokenizer.json").read_text())
    assert from_tokenizer_json(spec)[0] is not None
    cases = {
        "normalizer": ({**spec, "normalizer": {"type": "NFC"}}, "normalizer"),
        "prefix space": ({**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}},
                         "add_prefix_space"),
        "not BPE": ({**spec, "model": {**spec["model"], "type": "WordPiece"}}, "not BPE"),
        "merge order": ({**spec, "model": {**spec["model"], "merges": list(reversed(spec["model"]["merges"]))}},
                        "do not increase"),
    }
    for name, (variant, reason) in cases.items():
        fast, why = from_tokenizer_json(variant)
        assert fast is None and reason in why, name
    # asking for the view where it cannot represent the tokenizer is an error naming the file and the reason
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(cases["normalizer"][0]))
    assert load_encoder(bad).info()["bpe_backend"] == "gigatoken"  # auto: gigatoken applies the normalizer
    with pytest.raises(DataPrepError, match="tokenizer.json: bpe_backend tiktoken cannot be used .*a normalizer"):
        load_encoder(bad, "tiktoken")


def test_tokenize_outputs_identical_across_backends(tiny_tokenizer_dir, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _topics()[:120] + PROBES[:4]))
    outs = {}
    for backend in ("auto", "tiktoken", "gigatoken", "tokenizers"):
        m = tokenize_corpus([src], tmp_path / backend / "docs", tiny_tokenizer_dir,
                            TokenizeOptions(workers=1, bpe_backend=backend), log=lambda _: None)
        assert m["tokenizer"]["bpe_backend"] == ("gigatoken" if backend == "auto" else backend)
        outs[backend] = [(tmp_path / backend / f"docs.{ext}").read_bytes() for ext in ("bin", "idx")]
    assert outs["auto"] == outs["tiktoken"] == outs["gigatoken"] == outs["tokenizers"]


@pytest.mark.parametrize("backend", ["tiktoken", "gigatoken"])
def test_disagreement_stops_with_file_and_line(tiny_tokenizer_dir, tmp_path, monkeypatch, backend):
    """The per-batch check is what protects a run if a fast backend ever disagreed: make it disagree (in the
    ids about to be written, which is what the check reads for whole documents)."""
    import data_prep.encoders as encoders
    import data_prep.fast_bpe as fb

    cls = fb.FastBPE if backend == "tiktoken" else encoders.GigatokenBPE
    real = cls.encode_batch
    monkeypatch.setattr(cls, "encode_batch", lambda self, texts: [
        ids[:-1] if "Boolean" in t else ids for t, ids in zip(texts, real(self, texts))])
    monkeypatch.setattr(cls, "encode_flat", lambda self, texts: encoders.flat_from_lists(self.encode_batch(texts)),
                        raising=False)
    src = tmp_path / "docs.jsonl"
    texts = ["plain text here", "Boolean operations and more", "more text"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with pytest.raises(DataPrepError, match=rf"docs.jsonl:2: the {backend} backend .* bpe_backend tokenizers"):
        tokenize_corpus([src], tmp_path / "out" / "docs", tiny_tokenizer_dir,
                        TokenizeOptions(workers=1, bpe_backend=backend), log=lambda _: None)
    assert not (tmp_path / "out" / "docs.bin").exists()


@pytest.mark.e2e
def test_view_equals_tokenizers_on_smollm2():
    """SmolLM2's real 49,152-token vocabulary (the quickstart's tokenizer), on Python's topic docs."""
    from data_prep.models import resolve_model

    enc = load_encoder(resolve_model("smollm2-135m-instruct"))
    # gigatoken 0.10.0 cannot load this vocabulary (no single-byte token for byte 0x04): auto takes the view
    assert enc.info()["bpe_backend"] == "tiktoken"
    assert "gigatoken" in enc.info()["bpe_backend_why_not"]
    texts = _topics()
    fast, ref = enc.encode_batch(texts), enc.reference_encode_batch(texts)
    assert fast == ref and sum(map(len, ref)) > 100_000
    assert np.array_equal(np.concatenate([np.asarray(x) for x in fast]), np.concatenate([np.asarray(x) for x in ref]))
