"""Greedy generation for free-form answers, and decoding token ids back to text.

The answer to a reading-comprehension prompt (``...Question: Q\\nAnswer:``) is what the model generates
greedily (argmax at every step) until the end-of-document token, ``max_new_tokens`` or the end of the first
line, whichever comes first; it is then scored against the reference by exact match and token F1
(:mod:`megatron_ipt.evaluate.scoring`). :func:`greedy_generate_cached` is the same loop over a KV cache (the
megatron scorer's, megatron-core's ``StaticInferenceContext``); :func:`greedy_generate_batch` is that loop over
several prompts at once (one cache, one forward per step for the whole batch); :func:`greedy_generate` reruns
the whole sequence every step (the fallback where no cache is available).
"""

from __future__ import annotations

from typing import Callable

import torch


def greedy_generate(logits: Callable[[list[int]], torch.Tensor], ids: list[int], max_new_tokens: int,
                    stop_id: int | None = None) -> list[int]:
    """Greedy decoding without a KV cache: each step runs ``logits(prompt + generated)`` (``[len, vocab]``)
    and appends the argmax of the last row. Returns the new ids, without ``stop_id`` (which ends the loop)."""
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits(ids + out)[-1].argmax())
        if nxt == stop_id:
            break
        out.append(nxt)
    return out


def greedy_generate_cached(step: Callable[[list[int]], torch.Tensor], ids: list[int], max_new_tokens: int,
                           stop_id: int | None = None) -> list[int]:
    """Greedy decoding with a KV cache: ``step(new_ids)`` feeds the model only the tokens it has not seen yet
    (the prompt first, then each generated token alone) and returns the logits of the last one (``[vocab]``).
    Same ids as :func:`greedy_generate` over the same model; returns the new ids, without ``stop_id``."""
    out: list[int] = []
    new = list(ids)
    for _ in range(max_new_tokens):
        nxt = int(step(new).argmax())
        if nxt == stop_id:
            break
        out.append(nxt)
        new = [nxt]
    return out


def greedy_generate_batch(step: Callable[[list[list[int]]], torch.Tensor], prompts: list[list[int]],
                          max_new_tokens: int, stop_id: int | None = None) -> list[list[int]]:
    """Greedy decoding of several prompts together over a batched KV cache: ``step(rows)`` feeds each row the
    tokens it has not seen yet (the prompts first, of any lengths; then one token per row) and returns the logits
    of each row's last token (``[len(prompts), vocab]``). A row ends at ``stop_id`` (not returned) or after
    ``max_new_tokens``; a row that ended keeps being fed its argmax, its output ignored, until every row ended.
    The same ids as :func:`greedy_generate_cached` on each prompt alone when ``step`` gives each row the logits
    it would have alone. Returns the new ids of each prompt, in order."""
    out: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    new = [list(p) for p in prompts]
    for _ in range(max_new_tokens if prompts else 0):
        nxt = step(new).argmax(-1).tolist()
        for row, token in enumerate(nxt):
            if not ended[row]:
                ended[row] = token == stop_id
                if not ended[row]:
                    out[row].append(token)
        if all(ended):
            break
        new = [[token] for token in nxt]
    return out


def decode(encoder, ids: list[int]) -> str:
    """Text of ``ids`` for any :mod:`data_prep.encoders` kind (Hugging Face, sentencepiece, tiktoken)."""
    if hasattr(encoder, "tok"):  # tokenizers.Tokenizer or a transformers tokenizer
        return encoder.tok.decode(ids, skip_special_tokens=True)
    if hasattr(encoder, "sp"):
        return encoder.sp.decode(ids)
    if hasattr(encoder, "enc"):
        return encoder.enc.decode(ids)
    raise TypeError(f"cannot decode with tokenizer {getattr(encoder, 'path', encoder)!r}")


def answer_text(generated: str) -> str:
    """The generated answer: its first line, stripped (the prompt template puts a blank line after answers)."""
    return generated.strip().split("\n", 1)[0].strip()
