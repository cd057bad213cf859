"""Tokenize JSONL texts into Megatron indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``).

The output is exactly the format of megatron-core's ``IndexedDatasetBuilder`` (the writer behind
Megatron-LM's ``tools/preprocess_data.py``), so megatron-core's ``IndexedDataset`` and Megatron-LM read it:
one sequence per document, one EOD token appended to each document, token dtype ``uint16`` for
vocabularies under 65,500 ids and ``int32`` above (``DType.optimal_dtype``).

The EOD token is the tokenizer's end-of-text token (``<|end_of_text|>``, ``<|endoftext|>`` or ``</s>``,
first found), else its EOS token. Both files are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data_prep.errors import DataPrepError

EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>")
BATCH = 256


def load_tokenizer(path: str | Path):
    """Load a Hugging Face tokenizer from a local folder; DataPrepError with the path if it cannot be loaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
        raise DataPrepError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def eod_id(tokenizer) -> int:
    """The id appended after every document: an end-of-text token if the vocabulary has one, else EOS."""
    vocab = tokenizer.get_vocab()
    for tok in EOD_CANDIDATES:
        if tok in vocab:
            return vocab[tok]
    if tokenizer.eos_token_id is None:
        raise DataPrepError("tokenizer has neither an end-of-text nor an EOS token to use as EOD")
    return tokenizer.eos_token_id


def token_dtype(vocab_size: int) -> type[np.number]:
    """Token dtype for a vocabulary size, as megatron-core's ``DType.optimal_dtype``."""
    return np.uint16 if vocab_size < 65500 else np.int32


def read_texts(path: Path) -> Iterator[str]:
    """Texts of a JSONL file with a ``text`` field; DataPrepError naming file:line for a malformed line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataPrepError(f"{path}:{lineno}: not a JSON object with a 'text' field") from None


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_indexed_dataset(texts: Iterable[str], tokenizer, prefix: str | Path, append_eod: bool = True) -> dict:
    """Tokenize ``texts`` (no special tokens added) and write ``prefix.bin`` / ``prefix.idx``.

    Returns ``{"documents": int, "tokens": int}`` (tokens include the EOD tokens).
    Raises DataPrepError if a token id does not fit the dtype chosen from ``len(tokenizer)``.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eod = eod_id(tokenizer)
    tmp_bin, tmp_idx = f"{prefix}.bin.tmp", f"{prefix}.idx.tmp"
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    documents = tokens = 0
    try:
        for batch in _batches(texts, BATCH):
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                if append_eod:
                    ids = ids + [eod]
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.max() > np.iinfo(dtype).max or arr.min() < 0):
                    raise DataPrepError(f"token id {arr.max()} does not fit {np.dtype(dtype).name} (vocabulary {vocab_size})")
                builder.add_document(arr, [arr.size])
                documents += 1
                tokens += arr.size
        builder.finalize(tmp_idx)
    except BaseException:
        builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        raise
    os.replace(tmp_bin, f"{prefix}.bin")
    os.replace(tmp_idx, f"{prefix}.idx")
    return {"documents": documents, "tokens": tokens}
