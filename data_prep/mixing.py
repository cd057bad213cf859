"""Mixing general instructions into the instruction-augmented domain texts at a target token ratio.

The paper's domain-adaptive set-up (arXiv 2406.14491) mixes the augmented domain corpus with general
instructions (OpenOrca, each example rendered ``{question} {response}``) at 1:1 by tokens of the training
tokenizer. :func:`select_general` takes general texts in a seeded order until their tokens reach ``ratio``
times the domain tokens, going through the pool at most ``max_passes`` times, and keeps the last text only
if that lands closer to the target.
"""

from __future__ import annotations

import random
from typing import Callable


def select_general(pool: list[dict], tokens: list[int], domain_tokens: int, ratio: float, seed: int,
                   max_passes: int = 1) -> tuple[list[dict], dict]:
    """Pick general texts for ``ratio * domain_tokens`` tokens. Returns ``(texts, stats)``.

    ``pool`` holds ``{"id", "text"}`` records and ``tokens`` their token counts. The order is a shuffle seeded by
    ``seed`` and the pass number, so the choice does not depend on workers or on the domain texts' order.
    """
    target = ratio * domain_tokens
    chosen: list[dict] = []
    total = 0
    passes = 0
    done = target <= 0 or not pool
    while not done and passes < max_passes:
        order = list(range(len(pool)))
        random.Random(f"{seed}:general:{passes}").shuffle(order)
        passes += 1
        for i in order:
            if total + tokens[i] >= target:
                if (total + tokens[i] - target) <= (target - total):
                    chosen.append(_tag(pool[i], passes))
                    total += tokens[i]
                done = True
                break
            chosen.append(_tag(pool[i], passes))
            total += tokens[i]
    stats = {"target_ratio": ratio, "target_tokens": round(target), "general_tokens": total,
             "general_texts": len(chosen), "general_pool": len(pool), "general_passes": passes,
             "achieved_ratio": round(total / domain_tokens, 4) if domain_tokens else 0.0,
             "target_reached": done or target <= 0}
    return chosen, stats


def _tag(rec: dict, pass_no: int) -> dict:
    return rec if pass_no == 1 else {"id": f"{rec['id']}#{pass_no}", "text": rec["text"]}


def token_counter(tokenizer_path) -> Callable[[list[str]], list[int]]:
    """Token counts per text in the training tokenizer (no special tokens: the tokenize stage adds EOD)."""
    try:  # the tokenize stage's encoder interface, where this version has it
        from data_prep.encoders import load_encoder
    except ImportError:
        from data_prep.tokenize import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        return lambda texts: [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []
    enc = load_encoder(tokenizer_path)
    return lambda texts: [len(ids) for ids in enc.encode_batch(list(texts))] if texts else []
