"""Held-out perplexity per corpus component, over the tokenize stage's Megatron indexed datasets.

Components: ``raw`` (``heldout_raw``: held-out domain documents as plain text), ``pairs`` (``heldout_pairs``:
the held-out documents' instruction-response pairs) and, for each ``blend.extra`` entry with a
``valid_prefix`` (e.g. general instructions), that entry's ``name`` -- the same keys as the trainer's
``heldout_<key>`` losses; with ``blend.per_split``, each dataset of its valid and test blends (``valid.NAME``,
``test.NAME``, NAME the prefix's file name; scored one by one), the keys of the trainer's per-dataset
``valid.STEM`` / ``test.STEM`` losses, which it reports besides the weighted blend's ``valid`` / ``test`` loss
(the blend itself is not scored here).

Windows: a component's documents (EOD tokens included, as tokenized) are concatenated in file order and cut
into consecutive windows of ``seq_length`` input tokens; window ``k`` reads tokens ``[k*L, (k+1)*L)`` and
predicts tokens ``[k*L+1, (k+1)*L]``, so every token but the first is predicted exactly once, with the
context of its own window only (no overlap; the last window may be shorter). The mean NLL is the sum of
negative log-likelihoods over all predicted tokens divided by their number (nats/token); perplexity is
``exp(mean NLL)``. The trainer's ``heldout_*`` losses use megatron's shuffled ``GPTDataset`` samples instead,
so the numbers are close but not identical.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from megatron_ipt.training import mcore
from megatron_ipt.evaluate.rc import EvalDataError

HELDOUT_COMPONENTS = {"raw": "heldout_raw", "pairs": "heldout_pairs"}


def components(tokenized_dir: str | Path, extra=(), per_split=None) -> dict[str, Path]:
    """``{key: prefix}`` of the held-out components that exist: ``raw`` and ``pairs`` from ``tokenized_dir``,
    one per ``extra`` entry (``BlendComponent``) with a ``valid_prefix`` (key: its name), and one per dataset of
    ``per_split`` (``PerSplitBlend``) valid/test blends (key ``valid.NAME`` / ``test.NAME``; a tokenize-stage
    name such as ``heldout_raw`` is read from ``tokenized_dir``), each dataset once. Raises EvalDataError naming
    the folder when there is none, or naming a configured prefix that is missing."""
    tokenized_dir = Path(tokenized_dir)
    found = {key: tokenized_dir / name for key, name in HELDOUT_COMPONENTS.items()
             if (tokenized_dir / f"{name}.idx").is_file() and (tokenized_dir / f"{name}.bin").is_file()}
    wanted = [(c.name, Path(c.valid_prefix), f"blend.extra {c.name!r}") for c in extra if c.valid_prefix]
    for split in ("valid", "test"):
        for c in getattr(per_split, split, None) or []:
            prefix = tokenized_dir / c.prefix if "/" not in c.prefix and (tokenized_dir / f"{c.prefix}.bin").is_file() \
                else Path(c.prefix)
            wanted.append((f"{split}.{prefix.name}", prefix, f"blend.per_split.{split}"))
    for key, prefix, where in wanted:
        if not Path(f"{prefix}.idx").is_file() or not Path(f"{prefix}.bin").is_file():
            raise EvalDataError(f"{prefix}.bin/.idx: held-out dataset of {where} not found")
        if prefix not in found.values():
            found[key] = prefix
    if not found:
        raise EvalDataError(f"{tokenized_dir}: no held-out indexed dataset (heldout_raw / heldout_pairs)")
    return found


def load_tokens(prefix: str | Path) -> np.ndarray:
    """All documents of the indexed dataset ``prefix``, concatenated in file order (int64 ``[tokens]``)."""
    if Path(f"{prefix}.bin").stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=np.int64)
    dataset = mcore.indexed_dataset(str(prefix))
    if len(dataset) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(dataset[i], dtype=np.int64) for i in range(len(dataset))])


def windows(n_tokens: int, seq_length: int) -> list[tuple[int, int]]:
    """``(start, end)`` token ranges: inputs ``[start, end - 1)``, targets ``[start + 1, end)``; consecutive,
    ``seq_length`` inputs each (the last may be shorter); none when ``n_tokens`` < 2."""
    return [(s, min(s + seq_length + 1, n_tokens)) for s in range(0, max(n_tokens - 1, 0), seq_length)]


def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL (nats) of ``targets`` ``[T]`` under ``logits`` ``[T, vocab]`` (row t predicts target t)."""
    return float(-torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).sum())


def component_perplexity(scorer, tokens: np.ndarray, seq_length: int, max_windows: int | None = None,
                         source: str | Path = "", batch_size: int = 8) -> dict:
    """Mean NLL and perplexity of ``scorer`` over ``tokens`` in windows (module docstring), ``batch_size``
    windows per forward (``scorer.logits_batch``; only the last window may be shorter, and it pads after its
    tokens, which causal attention keeps out of them); returns ``{"tokens", "windows", "predicted_tokens",
    "nll", "perplexity"}``. Raises EvalDataError naming ``source`` when there is nothing to predict, or when a
    token id does not fit the model's vocabulary (another tokenizer); ValueError when ``batch_size`` < 1."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1 (got {batch_size})")
    spans = windows(len(tokens), seq_length)[:max_windows]
    if not spans:
        raise EvalDataError(f"{source}: held-out dataset has {len(tokens)} token(s), too few to evaluate")
    total, count = 0.0, 0
    for first in range(0, len(spans), batch_size):
        batch = [torch.from_numpy(tokens[start:end]) for start, end in spans[first : first + batch_size]]
        for ids, logits in zip(batch, scorer.logits_batch([ids[:-1].tolist() for ids in batch])):
            if int(ids.max()) >= logits.shape[-1]:
                raise EvalDataError(f"{source}: token id {int(ids.max())} outside the model's vocabulary "
                                    f"({logits.shape[-1]}): the data was tokenized with another tokenizer")
            total += window_nll(logits, ids[1:])
            count += len(ids) - 1
    nll = total / count
    return {"tokens": int(len(tokens)), "windows": len(spans), "predicted_tokens": count, "nll": nll,
            "perplexity": math.exp(min(nll, 700.0))}


def evaluate_perplexity(scorer, prefixes: dict[str, Path], seq_length: int, max_windows: int | None = None,
                        batch_size: int = 8) -> dict:
    """Per-component held-out perplexity; returns ``{"metrics", "n", "components", "skipped"}`` with metrics
    ``KEY_nll`` (nats/token) and ``KEY_perplexity`` per component and ``n`` the number of windows (``batch_size``
    windows per forward). A component with fewer than 2 tokens is skipped (listed); EvalDataError naming the
    files when every one is."""
    per, skipped = {}, {}
    for key, prefix in prefixes.items():
        tokens = load_tokens(prefix)
        if len(tokens) < 2:
            skipped[key] = f"{prefix}.bin: {len(tokens)} token(s)"
            continue
        per[key] = {"prefix": str(prefix),
                    **component_perplexity(scorer, tokens, seq_length, max_windows, f"{prefix}.bin", batch_size)}
    if not per:
        raise EvalDataError("empty held-out datasets, nothing to evaluate: " + "; ".join(skipped.values()))
    metrics = {}
    for key, r in per.items():
        metrics[f"{key}_nll"], metrics[f"{key}_perplexity"] = r["nll"], r["perplexity"]
    return {"metrics": metrics, "n": sum(r["windows"] for r in per.values()), "components": per, "skipped": skipped}


def settings(seq_length: int, max_windows: int | None, batch_size: int = 8) -> dict:
    return {"seq_length": seq_length, "max_windows": max_windows, "batch_size": batch_size,
            "windows": "documents concatenated in file order (EOD included), consecutive non-overlapping windows of "
                       "seq_length inputs, every token but the first predicted once; mean NLL over predicted tokens",
            "perplexity": "exp(mean NLL)"}
