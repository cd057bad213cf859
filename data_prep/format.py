"""Instruction-augmented texts: each document followed by its synthesized pairs under a template.

This is the quickstart's small template set (paper section 2.2, "classic" layout only): a document, a
blank line, an optional lead-in line for the questions (none half of the time), then the pairs, all of one
document rendered with one drawn QA pattern. The draw is seeded per document (``seed`` and document id),
so the same input gives byte-identical output. No BOS/EOS inside the text: the tokenizer stage appends EOD.
The full template bank (modes, few-shot chains, options and chain-of-thought families) is a later stage.

Outputs of :func:`format_documents` (lists of ``{"id", "text"}``):
- ``train_raw``: training documents as plain text (continual pre-training's raw domain data);
- ``train_ipt``: training documents, instruction-augmented (documents without pairs stay plain text);
- ``heldout_raw``: held-out documents as plain text;
- ``heldout_pairs``: held-out documents' pairs alone, rendered with the same templates (no document),
  to measure how well the model answers questions it saw no text for.
"""

from __future__ import annotations

import random
from collections import Counter

# QA patterns: (name, question prefix, delimiter, answer prefix). Rendered as f"{q_prefix}{q}{delim}{a_prefix}{a}".
QA_PATTERNS: list[tuple[str, str, str, str]] = [
    ("q_a", "Q: ", "\n", "A: "),
    ("question_answer", "Question: ", "\n", "Answer: "),
    ("bare", "", "\n", ""),
    ("instruction_response", "Instruction: ", "\n", "Response: "),
    ("input_output", "Input: ", "\n", "Output: "),
    ("user_assistant", "User: ", "\n\n", "Assistant: "),
]

LEAD_INS: list[str] = [
    "Answer questions based on the text above.",
    "Now answer the following questions about the text.",
    "Questions about the passage:",
    "Test your understanding of the text above.",
    "Use the document to answer these questions.",
]

PAIR_SEPARATOR = "\n\n"


def _rng(seed: int, doc_id: str) -> random.Random:
    return random.Random(f"{seed}:{doc_id}")


def render_pairs(pairs: list[dict], rng: random.Random) -> tuple[str, str]:
    """Render pairs with one pattern drawn from ``rng``. Returns ``(text, pattern name)``."""
    name, qp, delim, ap = rng.choice(QA_PATTERNS)
    body = PAIR_SEPARATOR.join(f"{qp}{p['question'].strip()}{delim}{ap}{p['answer'].strip()}" for p in pairs)
    return body, name


def augment(text: str, pairs: list[dict], rng: random.Random) -> tuple[str, str]:
    """One instruction-augmented text: document, optional lead-in, pairs. Returns ``(text, pattern name)``."""
    lead_in = rng.choice(LEAD_INS) if rng.random() < 0.5 else None
    body, name = render_pairs(pairs, rng)
    parts = [text.strip()] + ([lead_in] if lead_in else []) + [body]
    return "\n\n".join(parts), name


def format_documents(records: list[dict], seed: int = 0) -> tuple[dict[str, list[dict]], dict]:
    """Format synthesis records (``{"id", "split", "text", "pairs": [{"question", "answer"}]}``).

    Returns ``(outputs, counts)``: ``outputs`` maps the four dataset names above to records
    ``{"id", "text"}``; ``counts`` gives documents per output, augmented documents and pattern usage.
    """
    outputs: dict[str, list[dict]] = {"train_raw": [], "train_ipt": [], "heldout_raw": [], "heldout_pairs": []}
    patterns: Counter = Counter()
    augmented = 0
    for rec in records:
        doc_id, text, pairs = rec["id"], rec["text"], rec.get("pairs") or []
        rng = _rng(seed, doc_id)
        if rec["split"] == "heldout":
            outputs["heldout_raw"].append({"id": doc_id, "text": text})
            if pairs:
                body, name = render_pairs(pairs, rng)
                outputs["heldout_pairs"].append({"id": doc_id, "text": body})
                patterns[name] += 1
            continue
        outputs["train_raw"].append({"id": doc_id, "text": text})
        if pairs:
            aug, name = augment(text, pairs, rng)
            patterns[name] += 1
            augmented += 1
        else:
            aug = text
        outputs["train_ipt"].append({"id": doc_id, "text": aug})
    counts = {
        **{f"{k}_documents": len(v) for k, v in outputs.items()},
        "augmented_documents": augmented,
        "plain_documents_without_pairs": len(outputs["train_ipt"]) - augmented,
        "patterns": dict(sorted(patterns.items())),
    }
    return outputs, counts
