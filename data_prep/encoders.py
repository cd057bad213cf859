"""Tokenizers for indexed datasets behind one small interface: batch encode, vocabulary size, EOD and BOS ids.

Three kinds, chosen from the path:
- Hugging Face: a ``tokenizer.json`` file or a folder holding one (the fast ``tokenizers`` library, batch
  encoding, no special tokens added); a folder without ``tokenizer.json`` loads through transformers'
  ``AutoTokenizer``.
- sentencepiece: a ``.model`` protobuf file (or a folder holding ``tokenizer.model``).

The BPE that encodes (``bpe_backend``, see :func:`load_encoder`): ``tokenizer.json`` and sentencepiece BPE
models go through ``gigatoken`` (a Rust BPE, about 10x the ``tokenizers`` library's speed on one core) when it
loads the file and gives the reference library's ids on :data:`PROBES`; else byte-level BPE ``tokenizer.json``
files go through the tiktoken view of ``data_prep.fast_bpe``; else through the reference library
(``tokenizers`` / ``sentencepiece``).
- tiktoken-style BPE rank file (base64 token, rank per line), such as Llama-3's ``tokenizer.model``: the
  Llama-3 split pattern and its 256 special tokens (``<|begin_of_text|>`` = BOS, ``<|end_of_text|>`` = EOD).

The EOD id is an end-of-text token (``<|end_of_text|>``, ``<|endoftext|>``, ``</s>``, first found), else the
tokenizer's EOS token. ``fingerprint`` is the SHA-256 of the tokenizer's files and kind.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError

EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<|startoftext|>", "<s>")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = 256


BPE_BACKENDS = ("auto", "gigatoken", "tiktoken", "tokenizers")
# Texts a fast backend must encode exactly as the reference library does before it is used (code, numbers, runs
# of whitespace, contractions, non-Latin scripts, emoji, special-token strings, leading and trailing spaces).
PROBES = [
    "def f(x):\n    return x ** 2  # it's fine, isn't it?\n\n\n\tdone",
    "Numbers: 3.14159, 1,000,000 and 2026-11-29; CAPS'LL CAN'T we'd  double  spaces   end ",
    "Ünïcödé — “quotes” naïve café 東京 Москва مرحبا 👩‍💻🚀 \u00a0nbsp",
    "<|endoftext|>text<|im_start|>user\nhi<|im_end|> <s></s> trailing\r\n",
    "", " ", "\n\n", "a", "ab" * 40, "x" * 300,
]


def flat_from_lists(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, lengths)``: the documents' ids back to back (int64) and each document's token count (int64)."""
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    return ids, lengths


class GigatokenBPE:
    """A tokenizer encoded by ``gigatoken`` on the calling thread (``parallel=False``: the caller's worker
    processes are the parallelism): ``encode_flat(texts) -> (ids uint32, lengths int64)`` without copying the
    ids out of Rust's buffer, ``encode_batch(texts) -> list[list[int]]``. No special tokens are added;
    special-token strings inside the text are recognised as ``tokenizers`` does."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok.encode_batch_list(texts, parallel=False)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import awkward as ak

        if not texts:
            return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64)
        docs = self.tok.encode_batch(texts, parallel=False)
        return np.asarray(ak.flatten(docs, axis=1)), np.asarray(ak.num(docs, axis=1), dtype=np.int64)


def _gigatoken(load) -> tuple[GigatokenBPE | None, str]:
    """``(GigatokenBPE, "")`` from ``load(gigatoken_module)``, or ``(None, why not)``."""
    try:
        import gigatoken
    except ImportError:
        return None, "the gigatoken package is not installed (pip install gigatoken; the data extra has it)"
    try:
        return GigatokenBPE(load(gigatoken)), ""
    except Exception as e:  # gigatoken raises RuntimeError/ValueError with a Rust location on later lines
        return None, f"gigatoken cannot load it: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def _pick_backend(requested: str, builders: dict, reference, file: Path, reference_name: str):
    """Try the fast backends in order; return ``(backend object or None, name that runs, {name: why not})``.

    A backend is used only if it builds and gives ``reference``'s ids on :data:`PROBES`. ``requested``
    other than ``auto`` and the reference name must succeed, else DataPrepError naming the file and reason."""
    if requested not in ("auto", "tokenizers", *builders):
        raise DataPrepError(f"{file}: bpe_backend {requested} does not apply to this tokenizer "
                            f"(choose one of auto, tokenizers{''.join(', ' + b for b in builders)})")
    order = list(builders) if requested == "auto" else [requested] if requested in builders else []
    why_not: dict[str, str] = {}
    expected = None
    for name in order:
        fast, why = builders[name]()
        if fast is not None:
            expected = reference(PROBES) if expected is None else expected
            if fast.encode_batch(PROBES) != expected:
                fast, why = None, f"differs from {reference_name} on the built-in probe texts"
        if fast is not None:
            return fast, name, why_not
        why_not[name] = why
    if requested in builders:
        raise DataPrepError(f"{file}: bpe_backend {requested} cannot be used for this tokenizer: {why_not[requested]}")
    return None, reference_name, why_not


def _gigatoken_sentencepiece(gt, path: Path):
    """gigatoken's own conversion of a sentencepiece ``.model`` to ``tokenizer.json`` form, less one difference
    from the sentencepiece library: control pieces (``<s>``, ``</s>``, ``[INST]``, ...) stay plain text when they
    occur in a document, as sentencepiece encodes them (gigatoken 0.10.0 would map them to their ids); user-defined
    pieces keep matching in text, as in sentencepiece. Source: ``gigatoken._load.sentencepiece`` (0.10.0)."""
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    spec = json.loads(sentencepiece_to_tokenizer_json(path.read_bytes()))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t.get("special")]
    return gt.Tokenizer.from_json(json.dumps(spec, ensure_ascii=False))


def _sha256(paths: list[Path], kind: str) -> str:
    h = hashlib.sha256(kind.encode())
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _token_name(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Encoder(abc.ABC):
    """A loaded tokenizer: ``encode_batch(texts) -> list[list[int]]`` without special tokens.

    ``fast`` is the backend that encodes when it is not the reference library (None otherwise);
    ``reference_encode_batch`` always gives the reference library's ids (the in-run cross-check)."""

    kind = "?"
    fast = None
    bpe_backend: str | None = None
    bpe_backend_why_not: dict | None = None

    def __init__(self, path: Path, vocab: dict[str, int] | None, vocab_size: int, files: list[Path],
                 eos: str | None = None, bos: str | None = None) -> None:
        self.path = path
        self.vocab_size = vocab_size
        self.fingerprint = _sha256(files, self.kind)
        vocab = vocab or {}
        self.eod_id = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), vocab.get(eos) if eos else None)
        self.bos_id = next((vocab[t] for t in BOS_CANDIDATES if t in vocab), vocab.get(bos) if bos else None)

    @abc.abstractmethod
    def reference_encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text through the reference library, no special tokens added."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (through ``fast`` where one was picked)."""
        return self.fast.encode_batch(texts) if self.fast is not None else self.reference_encode_batch(texts)

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: the texts' ids back to back (an integer array) and each one's count (int64)."""
        if self.fast is not None and hasattr(self.fast, "encode_flat"):
            return self.fast.encode_flat(texts)
        return flat_from_lists(self.encode_batch(texts))

    def info(self) -> dict:
        out = {"path": str(self.path), "kind": self.kind, "vocab_size": self.vocab_size, "eod_id": self.eod_id,
               "bos_id": self.bos_id, "fingerprint": self.fingerprint}
        if self.bpe_backend is not None:
            out["bpe_backend"] = self.bpe_backend
        if self.bpe_backend_why_not:
            out["bpe_backend_why_not"] = self.bpe_backend_why_not
        return out


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
        data = file.read_bytes()

        def tiktoken_view():
            from data_prep.fast_bpe import from_tokenizer_json

            return from_tokenizer_json(json.loads(data.decode("utf-8")))

        builders = {"gigatoken": lambda: _gigatoken(lambda gt: gt.Tokenizer.from_json(data)),
                    "tiktoken": tiktoken_view}
        self.fast, self.bpe_backend, self.bpe_backend_why_not = _pick_backend(
            bpe_backend, builders, self.reference_encode_batch, file, "tokenizers")

    def reference_encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ``tokenizers`` library's ids (the reference the fast backends are checked against)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


# Files a Hugging Face tokenizer folder holds (one at least): fast, sentencepiece, BPE and WordPiece vocabularies.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def folder_hint(path: Path) -> str:
    """For a folder holding none of :data:`TOKENIZER_FILES`: `` (the folder holds no tokenizer file ...; it holds:
    NAMES)``, else ``""``: what to say when a library cannot make a tokenizer of it."""
    if not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES):
        return ""
    names = sorted(p.name for p in path.iterdir())
    found = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"
    return (f" ({path} holds no tokenizer file: expected tokenizer.json, tokenizer.model, vocab.json + merges.txt or "
            f"vocab.txt; it holds {found})")


class AutoEncoder(Encoder):
    """A Hugging Face folder without ``tokenizer.json`` (slow tokenizers), through ``AutoTokenizer``. A tokenizer that
    loads but encodes text to nothing (transformers builds an empty-vocabulary GPT-2 tokenizer from a folder that
    holds only a model's ``config.json``) is a DataPrepError naming the folder."""

    kind = "huggingface-auto"
    bpe_backend = "transformers"

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))
        if len(self.tok) < 2 or not self.reference_encode_batch(["Hello world"])[0]:
            raise DataPrepError(f"cannot load a tokenizer from {path}: transformers makes a {type(self.tok).__name__} "
                                f"of {len(self.tok)} token(s) that encodes text to nothing{folder_hint(path)}")
        files = sorted(p for p in path.iterdir() if p.is_file())
        super().__init__(path, self.tok.get_vocab(), len(self.tok), files, self.tok.eos_token, self.tok.bos_token)

    def reference_encode_batch(self, texts):
        return self.tok(texts, add_special_tokens=False)["input_ids"]


class SentencePieceEncoder(Encoder):
    kind = "sentencepiece"

    def __init__(self, path: Path, bpe_backend: str = "auto") -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        n = self.sp.get_piece_size()
        super().__init__(path, {}, n, [path])
        self.eod_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        # gigatoken implements sentencepiece BPE models with byte fallback (Llama 2, Mistral); unigram models
        # and others stay on the sentencepiece library.
        builders = {"gigatoken": lambda: _gigatoken(lambda gt: _gigatoken_sentencepiece(gt, path))}
        self.fast, self.bpe_backend, self.bpe_backend_why_not = _pick_backend(
            bpe_backend, builders, self.reference_encode_batch, path, "sentencepiece")

    def reference_encode_batch(self, texts):
        return self.sp.encode(texts)


class TiktokenEncoder(Encoder):
    kind = "tiktoken"
    bpe_backend = "tiktoken"

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

    def reference_encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=1)


def _is_tiktoken_file(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline(4096)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) is not None


def _plain(enc: Encoder, bpe_backend: str) -> Encoder:
    """An encoder with one backend only: a requested other one is an error."""
    if bpe_backend not in ("auto", "tokenizers", enc.bpe_backend):
        raise DataPrepError(f"{enc.path}: bpe_backend {bpe_backend} does not apply to a {enc.kind} tokenizer "
                            f"(it is encoded by {enc.bpe_backend})")
    return enc


def load_encoder(path: str | Path, bpe_backend: str = "auto") -> Encoder:
    """Load a tokenizer from a file or folder (kinds in the module docstring); DataPrepError if it cannot.

    ``bpe_backend`` (``tokenizer.json`` files and sentencepiece ``.model`` files): ``auto`` encodes through
    ``gigatoken`` where it loads the file and gives the reference library's ids on :data:`PROBES`, else
    (``tokenizer.json`` only) through the tiktoken view of ``data_prep.fast_bpe`` where it represents the
    tokenizer and agrees on the probes, else through the reference library (``tokenizers`` or ``sentencepiece``);
    ``tokenizers`` always uses the reference library; ``gigatoken`` and ``tiktoken`` require that backend
    (DataPrepError naming the file and the reason otherwise). ``info()`` records which ran (``bpe_backend``)
    and why the faster ones did not (``bpe_backend_why_not``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if bpe_backend not in BPE_BACKENDS:
        raise DataPrepError(f"bpe_backend {bpe_backend!r}: choose one of {', '.join(BPE_BACKENDS)}")
    path = Path(path)
    try:
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return HFEncoder(path, bpe_backend)
            if (path / "tokenizer.model").is_file() and not (path / "tokenizer_config.json").is_file():
                return load_encoder(path / "tokenizer.model", bpe_backend)
            return _plain(AutoEncoder(path), bpe_backend)
        if path.suffix == ".json":
            return HFEncoder(path, bpe_backend)
        if path.is_file() and _is_tiktoken_file(path):
            return _plain(TiktokenEncoder(path), bpe_backend)
        return SentencePieceEncoder(path, bpe_backend)
    except DataPrepError:
        raise
    except Exception as e:  # the libraries raise many types (OSError, ValueError, RuntimeError, ...)
        raise DataPrepError(f"cannot load a tokenizer from {path}: {library_message(e)}{folder_hint(path)}") from None


def library_message(e: BaseException, limit: int = 400) -> str:
    """``TYPE: message`` of a library's exception on one line: its lines joined (transformers puts the reason after
    a first line ending in a colon), runs of whitespace collapsed, cut at ``limit`` characters."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3].rstrip() + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
