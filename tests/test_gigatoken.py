"""gigatoken as the BPE inside the streaming tokenizer: picked by ``auto`` only where it gives the reference
library's ids, byte-identical datasets, a fallback that says why, and a bounded in-run cross-check."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_prep.encoders import LLAMA3_PATTERN, PROBES, load_encoder
from data_prep.errors import DataPrepError
from data_prep.tokenize import TokenizeOptions, check_sample, frame_documents, tokenize_corpus


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


@pytest.fixture(scope="module")
def llama3_style_tokenizer(tmp_path_factory):
    """A byte-level BPE with Llama-3's pre-tokenizer shape (regex Split + ByteLevel without regex), trained on
    Python's topic docs, with Llama-3's BOS/EOD names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_topics(), trainer)
    path = tmp_path_factory.mktemp("llama3_style") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def sentencepiece_models(tmp_path_factory):
    """A sentencepiece BPE model with byte fallback (the Llama 2 / Mistral kind) and a unigram model."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(_topics()[:40]))
    for kind in ("bpe", "unigram"):
        spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / kind), vocab_size=600,
                                       model_type=kind, byte_fallback=True, minloglevel=2)
    return d / "bpe.model", d / "unigram.model"


@pytest.mark.parametrize("which", ["gpt2_style", "llama3_style"])
def test_auto_picks_gigatoken_with_the_reference_ids_on_real_text(which, tiny_tokenizer_dir, llama3_style_tokenizer):
    path = tiny_tokenizer_dir if which == "gpt2_style" else llama3_style_tokenizer
    enc = load_encoder(path)
    assert enc.info()["bpe_backend"] == "gigatoken" and "bpe_backend_why_not" not in enc.info()
    texts = _topics() + PROBES + ["a<|end_of_text|>b <|endoftext|>", "\ud800 not here"[1:]]
    assert enc.encode_batch(texts) == enc.reference_encode_batch(texts)
    ids, lengths = enc.encode_flat(texts)
    assert ids.dtype == np.uint32 and lengths.tolist() == [len(r) for r in enc.reference_encode_batch(texts)]
    assert ids.tolist() == [i for r in enc.reference_encode_batch(texts) for i in r]


def test_sentencepiece_bpe_goes_through_gigatoken_id_for_id(sentencepiece_models, tmp_path):
    import sentencepiece as spm

    bpe, unigram = sentencepiece_models
    enc = load_encoder(bpe)
    assert enc.info()["bpe_backend"] == "gigatoken"
    texts = _topics() + PROBES + ["  leading spaces", "trailing  ", "東京 👩‍💻\t\n x"]
    assert enc.encode_batch(texts) == spm.SentencePieceProcessor(model_file=str(bpe)).encode(texts)
    # unigram models are not gigatoken's: the sentencepiece library encodes them, and the manifest says why
    uni = load_encoder(unigram)
    assert uni.info()["bpe_backend"] == "sentencepiece" and "BPE" in uni.info()["bpe_backend_why_not"]["gigatoken"]
    with pytest.raises(DataPrepError, match=r"unigram.model: bpe_backend gigatoken cannot be used"):
        load_encoder(unigram, "gigatoken")
    with pytest.raises(DataPrepError, match=r"bpe_backend tiktoken does not apply"):
        load_encoder(bpe, "tiktoken")
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _topics()[:60]))
    outs = []
    for backend in ("auto", "tokenizers"):
        m = tokenize_corpus([src], tmp_path / backend, bpe, TokenizeOptions(bpe_backend=backend), log=lambda _: None)
        assert m["tokenizer"]["bpe_backend"] == ("gigatoken" if backend == "auto" else "sentencepiece")
        outs.append([(tmp_path / f"{backend}.{e}").read_bytes() for e in ("bin", "idx")])
    assert outs[0] == outs[1]


def test_parallel_run_is_byte_identical_to_the_reference_backend_and_megatron_builder(llama3_style_tokenizer,
                                                                                      tmp_path):
    """Worker processes (forked, reusing the probed encoder), small batches, BOS and EOD, a bad record."""
    texts = _topics()
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:40]) + "{broken\n"
                   + "".join(json.dumps({"text": t}) + "\n" for t in texts[40:]))
    opts = dict(workers=2, min_parallel_bytes=0, batch_docs=16, append_bos=True)
    manifests = {}
    for backend in ("auto", "tokenizers"):
        manifests[backend] = tokenize_corpus([src], tmp_path / backend, llama3_style_tokenizer,
                                             TokenizeOptions(bpe_backend=backend, **opts), log=lambda _: None)
    assert manifests["auto"]["tokenizer"]["bpe_backend"] == "gigatoken"
    assert manifests["auto"]["skipped"] == {"malformed_json": 1} and manifests["auto"]["documents"] == len(texts)
    ref = load_encoder(llama3_style_tokenizer, "tokenizers")
    assert (ref.bos_id, ref.eod_id) == (0, 1)
    builder = IndexedDatasetBuilder(str(tmp_path / "mcore.bin"), dtype=np.uint16)
    for ids in ref.reference_encode_batch(texts):
        doc = [ref.bos_id] + ids + [ref.eod_id]
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(str(tmp_path / "mcore.idx"))
    for ext in ("bin", "idx"):
        data = {name: (tmp_path / f"{name}.{ext}").read_bytes() for name in ("auto", "tokenizers", "mcore")}
        assert data["auto"] == data["tokenizers"] == data["mcore"], ext
    assert len(IndexedDataset(str(tmp_path / "auto"))) == len(texts) > 50


def test_frame_documents_adds_bos_and_eod_around_each_document():
    ids, lengths = np.array([5, 6, 7, 8], dtype=np.uint32), np.array([2, 0, 2])
    out, n = frame_documents(ids, lengths, 1, 2, np.uint16)
    assert out.dtype == np.uint16 and out.tolist() == [1, 5, 6, 2, 1, 2, 1, 7, 8, 2] and n.tolist() == [4, 2, 4]
    assert frame_documents(ids, lengths, None, 2, np.int32)[0].tolist() == [5, 6, 2, 2, 7, 8, 2]
    assert frame_documents(ids, lengths, None, None, np.uint16)[0].tolist() == [5, 6, 7, 8]
    empty = frame_documents(np.zeros(0, np.uint32), np.zeros(0, np.int64), 1, 2, np.uint16)
    assert empty[0].size == 0 and empty[1].size == 0


def test_cross_check_is_bounded_by_characters_not_documents():
    huge = "word " * 400_000  # 2 M characters: checked as its first characters only
    sample = check_sample(["short", huge, "never reached"], 8192)
    assert sample[0] == "short" and len(sample[1]) == 8192 - 5 and len(sample) == 2
    assert sum(map(len, check_sample(["x" * 10] * 10_000, 8192))) == 8192


_PEAK_RSS = """
import json, resource, sys
limit = 3 << 30  # address space: a regression fails here instead of taking the machine's memory
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from data_prep.tokenize import TokenizeOptions, tokenize_corpus
src, out, tokenizer, backend = sys.argv[1:]
m = tokenize_corpus([src], out, tokenizer, TokenizeOptions(workers=2, min_parallel_bytes=0, bpe_backend=backend),
                    log=lambda *_: None)
print(json.dumps({"tokens": m["tokens"], "backend": m["tokenizer"]["bpe_backend"],
                  "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10}))
"""


@pytest.fixture(scope="module")
def fifty_mb_document(tmp_path_factory):
    """One JSONL record whose text is 50 MB of random words (no repeated paragraphs for the BPE to cache)."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(n))) for n in rng.integers(2, 10, size=5000)]
    text = " ".join(words[i] for i in rng.integers(0, len(words), size=8_400_000))
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    assert len(text) > 50_000_000
    return path


@pytest.mark.parametrize("backend", ["gigatoken", "tiktoken"])
def test_a_50_mb_document_keeps_a_tokenizer_worker_under_1_5_gb(fifty_mb_document, tiny_tokenizer_dir, tmp_path,
                                                                  backend):
    """Issue 16, item 10: the cross-check used to encode the first documents of each batch whole with the
    reference library (a 50 MB document: 7.5 GB in one worker). Measured: the worker's peak RSS (the pool's
    process, ``RUSAGE_CHILDREN`` of the process that runs the pool), with the check on."""
    import subprocess
    from pathlib import Path

    pytest.importorskip(backend)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(fifty_mb_document), str(tmp_path / "out"),
                        str(tiny_tokenizer_dir), backend], capture_output=True, text=True, timeout=120,
                       cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["backend"] == backend and got["tokens"] > 40_000_000
    assert got["worker_peak_rss"] < 1.5e9, f"{got['worker_peak_rss'] / 1e9:.2f} GB"


def test_a_missing_gigatoken_falls_back_or_is_named(tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "gigatoken", None)  # as if not installed: import gigatoken raises
    enc = load_encoder(tiny_tokenizer_dir)
    assert enc.info()["bpe_backend"] == "tiktoken"
    assert "not installed" in enc.info()["bpe_backend_why_not"]["gigatoken"]
    with pytest.raises(DataPrepError, match="bpe_backend gigatoken cannot be used .* not installed"):
        load_encoder(tiny_tokenizer_dir, "gigatoken")
