"""Tokenizers for indexed datasets behind one small interface: batch encode, vocabulary size, EOD and BOS ids.

Three kinds, chosen from the path:
- Hugging Face: a ``tokenizer.json`` file or a folder holding one (the fast ``tokenizers`` library, batch
  encoding, no special tokens added); a folder without ``tokenizer.json`` loads through transformers'
  ``AutoTokenizer``.
- sentencepiece: a ``.model`` protobuf file (or a folder holding ``tokenizer.model``).
- tiktoken-style BPE rank file (base64 token, rank per line), such as Llama-3's ``tokenizer.model``: the
  Llama-3 split pattern and its 256 special tokens (``<|begin_of_text|>`` = BOS, ``<|end_of_text|>`` = EOD).

The EOD id is an end-of-text token (``<|end_of_text|>``, ``<|endoftext|>``, ``</s>``, first found), else the
tokenizer's EOS token. ``fingerprint`` is the SHA-256 of the tokenizer's files and kind.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from pathlib import Path

from data_prep.errors import DataPrepError

EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<|startoftext|>", "<s>")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = 256


BPE_BACKENDS = ("auto", "tokenizers", "tiktoken")
# Texts the tiktoken view must encode exactly as tokenizers does before it is used (code, numbers, runs of
# whitespace, contractions, non-Latin scripts, emoji, special-token strings).
PROBES = [
    "def f(x):\n    return x ** 2  # it's fine, isn't it?\n\n\n\tdone",
    "Numbers: 3.14159, 1,000,000 and 2026-11-29; CAPS'LL CAN'T we'd  double  spaces   end ",
    "Ünïcödé — “quotes” naïve café 東京 Москва مرحبا 👩‍💻🚀 \u00a0nbsp",
    "<|endoftext|>text<|im_start|>user\nhi<|im_end|> <s></s> trailing\r\n",
    "", " ", "\n\n", "a", "ab" * 40, "x" * 300,
]


def _sha256(paths: list[Path], kind: str) -> str:
    h = hashlib.sha256(kind.encode())
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _token_name(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Encoder(abc.ABC):
    """A loaded tokenizer: ``encode_batch(texts) -> list[list[int]]`` without special tokens."""

    kind = "?"

    def __init__(self, path: Path, vocab: dict[str, int] | None, vocab_size: int, files: list[Path],
                 eos: str | None = None, bos: str | None = None) -> None:
        self.path = path
        self.vocab_size = vocab_size
        self.fingerprint = _sha256(files, self.kind)
        vocab = vocab or {}
        self.eod_id = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), vocab.get(eos) if eos else None)
        self.bos_id = next((vocab[t] for t in BOS_CANDIDATES if t in vocab), vocab.get(bos) if bos else None)

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (each subclass wraps its library's batch call)."""

    def info(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
                "bos_id": self.bos_id, "fingerprint": self.fingerprint}


class HFEncoder(Encoder):
    kind = "huggingface"

    def __init__(self, path: Path, bpe_backend: str = "auto") -> None:
        from tokenizers import Tokenizer

        file = path / "tokenizer.json" if path.is_dir() else path
        self.tok = Tokenizer.from_file(str(file))
        cfg_file = file.parent / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        super().__init__(path, self.tok.get_vocab(with_added_tokens=True),
                         self.tok.get_vocab_size(with_added_tokens=True), [file],
                         _token_name(cfg.get("eos_token")), _token_name(cfg.get("bos_token")))
        self.fast, self.bpe_backend, self.bpe_backend_reason = None, "tokenizers", "requested"
        if bpe_backend not in BPE_BACKENDS:
            raise DataPrepError(f"bpe_backend {bpe_backend!r}: choose one of {', '.join(BPE_BACKENDS)}")
        if bpe_backend != "tokenizers":
            from data_prep.fast_bpe import from_tokenizer_json

            self.fast, why = from_tokenizer_json(json.loads(file.read_text(encoding="utf-8")))
            if self.fast is not None and self.fast.encode_batch(PROBES) != self.reference_encode_batch(PROBES):
                self.fast, why = None, "differs from tokenizers on the built-in probe texts"
            if self.fast is None and bpe_backend == "tiktoken":
                raise DataPrepError(f"{file}: bpe_backend tiktoken cannot represent this tokenizer: {why}")
            self.bpe_backend, self.bpe_backend_reason = ("tiktoken", "") if self.fast else ("tokenizers", why)

    def encode_batch(self, texts):
        if self.fast is not None:
            return self.fast.encode_batch(texts)
        return self.reference_encode_batch(texts)

    def reference_encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ``tokenizers`` library's ids (the reference the tiktoken view is checked against)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def info(self) -> dict:
        return {**super().info(), "bpe_backend": self.bpe_backend,
                **({"bpe_backend_reason": self.bpe_backend_reason} if self.bpe_backend_reason else {})}


class AutoEncoder(Encoder):
    """A Hugging Face folder without ``tokenizer.json`` (slow tokenizers), through ``AutoTokenizer``."""

    kind = "huggingface-auto"

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))
        files = sorted(p for p in path.iterdir() if p.is_file())
        super().__init__(path, self.tok.get_vocab(), len(self.tok), files, self.tok.eos_token, self.tok.bos_token)

    def encode_batch(self, texts):
        return self.tok(texts, add_special_tokens=False)["input_ids"]


class SentencePieceEncoder(Encoder):
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        n = self.sp.get_piece_size()
        super().__init__(path, {}, n, [path])
        self.eod_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode_batch(self, texts):
        return self.sp.encode(texts)


class TiktokenEncoder(Encoder):
    kind = "tiktoken"

    def __init__(self, path: Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path))
        n = len(ranks)
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + LLAMA3_SPECIAL - len(names))]
        special = {name: n + i for i, name in enumerate(names)}
        self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special)
        super().__init__(path, special, n + len(special), [path])

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=1)


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) is not None


def load_encoder(path: str | Path, bpe_backend: str = "auto") -> Encoder:
    """Load a tokenizer from a file or folder (kinds in the module docstring); DataPrepError if it cannot.

    ``bpe_backend`` (Hugging Face ``tokenizer.json`` only): ``auto`` encodes byte-level BPE tokenizers through
    the tiktoken view of ``data_prep.fast_bpe`` when it represents the tokenizer (same ids, ~4x faster), else
    through ``tokenizers``; ``tokenizers`` always uses the reference library; ``tiktoken`` requires the view."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path)
    try:
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return HFEncoder(path, bpe_backend)
            if (path / "tokenizer.model").is_file() and not (path / "tokenizer_config.json").is_file():
                return load_encoder(path / "tokenizer.model")
            return AutoEncoder(path)
        if path.suffix == ".json":
            return HFEncoder(path, bpe_backend)
        if path.is_file() and _is_tiktoken_file(path):
            return TiktokenEncoder(path)
        return SentencePieceEncoder(path)
    except DataPrepError:
        raise
    except Exception as e:  # the libraries raise many types (OSError, ValueError, RuntimeError, ...)
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataPrepError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {msg}") from None
