"""Scoring functions on model outputs: answer log-likelihood, multiple-choice by lowest mean NLL, EM and F1.

Shapes: ``logits`` is ``[sequence, vocabulary]`` for one example (the model's output at every position),
``tokens`` the ``[sequence]`` input ids; the answer occupies positions ``start .. start + n - 1`` of ``tokens``,
predicted by the logits one position earlier. Log-likelihoods are natural logs (nats).
Exact match and token F1 follow SQuAD's normalisation (Rajpurkar et al. 2016: lower case, strip punctuation,
articles and extra whitespace).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch


def answer_logprob(logits: torch.Tensor, tokens: torch.Tensor, start: int) -> tuple[float, int]:
    """Sum of log-probabilities of ``tokens[start:]`` given everything before, and the number of answer
    tokens. Raises ValueError when there is no answer token or no context token (``start`` < 1)."""
    n = tokens.shape[0] - start
    if n < 1 or start < 1:
        raise ValueError(f"answer span must be non-empty and follow at least one context token (start {start}, "
                         f"length {tokens.shape[0]})")
    logp = torch.log_softmax(logits[start - 1 : -1].float(), dim=-1)
    picked = logp.gather(-1, tokens[start:].unsqueeze(-1)).squeeze(-1)
    return float(picked.sum()), n


def mean_nll(logprob_sum: float, n_tokens: int) -> float:
    """Mean negative log-likelihood per answer token (nats)."""
    return -logprob_sum / n_tokens


def choose_option(option_nlls: list[float]) -> int:
    """Index of the option with the lowest mean NLL (the first one on ties)."""
    return min(range(len(option_nlls)), key=lambda i: (option_nlls[i], i))


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (0 when either side is empty)."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = Counter(p) & Counter(r)
    same = sum(common.values())
    if not p or not r or same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)
