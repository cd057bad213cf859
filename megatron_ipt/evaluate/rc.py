"""Reading-comprehension examples from held-out documents and their synthesized pairs (the paper's domain
evaluation style: can the model answer questions about a text it has not been trained on?).

Each example is a held-out document followed by one of its synthesized questions; the model is scored on
the reference answer (mean token log-likelihood) and, for multiple-choice pairs (``options``), by which
option it finds most likely. ``shots`` demonstrations (question-answer pairs of *other* held-out documents,
in a fixed order) come first. The prompt construction is deterministic and recorded with the results.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_ipt.errors import IptError

TEMPLATE = {"demo": "Question: {question}\nAnswer: {answer}\n\n", "document": "{text}\n\n",
            "question": "Question: {question}\nAnswer:", "answer": " {answer}"}


class EvalDataError(IptError, ValueError):
    """An evaluation input is missing, empty or malformed; the message names the file (and line)."""


@dataclass
class RCExample:
    doc_id: str
    prompt: str
    answer: str
    options: list[str] | None = None
    meta: dict = field(default_factory=dict)


def load_heldout_pairs(path: str | Path) -> list[dict]:
    """Held-out records with pairs from a synthesis ``pairs.jsonl`` (``id``, ``split``, ``text``, ``pairs``) or
    a task JSONL with ``text``, ``question``, ``answer`` (and optional ``options``, ``id``) per line.
    Raises EvalDataError naming file:line for malformed lines and the file when nothing is usable."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: evaluation file not found")
    docs: list[dict] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if "pairs" in rec:  # synthesis output
            if rec.get("split") == "heldout" and rec["pairs"]:
                docs.append({"id": rec["id"], "text": rec["text"], "pairs": rec["pairs"]})
            continue
        missing = [k for k in ("text", "question", "answer") if not isinstance(rec.get(k), str)]
        if missing:
            raise EvalDataError(f"{path}:{lineno}: missing field(s) {missing} (need text, question, answer)")
        pair = {"question": rec["question"], "answer": rec["answer"]}
        if rec.get("options"):
            pair["options"] = list(rec["options"])
        docs.append({"id": str(rec.get("id", f"line{lineno}")), "text": rec["text"], "pairs": [pair]})
    if not docs:
        raise EvalDataError(f"{path}: no held-out document with question-answer pairs to evaluate")
    return docs


def build_examples(docs: list[dict], shots: int = 0) -> list[RCExample]:
    """One example per (held-out document, pair), in file order; demonstrations are the first ``shots`` pairs
    of the other documents in file order."""
    flat = [(d["id"], p) for d in docs for p in d["pairs"]]
    out = []
    for d in docs:
        demos = [p for doc_id, p in flat if doc_id != d["id"]][:shots]
        prefix = "".join(TEMPLATE["demo"].format(question=p["question"], answer=p["answer"]) for p in demos)
        for p in d["pairs"]:
            prompt = prefix + TEMPLATE["document"].format(text=d["text"]) + TEMPLATE["question"].format(question=p["question"])
            out.append(RCExample(d["id"], prompt, p["answer"], p.get("options"), {"shots": len(demos)}))
    return out


def settings(shots: int, max_length: int) -> dict:
    return {"shots": shots, "max_length": max_length, "template": dict(TEMPLATE),
            "demonstrations": "first pairs of the other held-out documents, in file order",
            "truncation": "document text cut from the end so prompt + answer fit max_length tokens"}


__all__ = ["RCExample", "load_heldout_pairs", "build_examples", "settings", "EvalDataError", "asdict"]
