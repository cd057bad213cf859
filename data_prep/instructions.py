"""General instruction data for continual pre-training (Instruction Pre-Training, arXiv 2406.14491).

Reads any JSONL of instruction data with a configurable field mapping: question/response records as in
OpenOrca-style sets, or multi-turn ``conversations`` lists (``[{"from": "human", "value": ...}, ...]``).
Each example is rendered as ``{question} {response}`` joined by one space, as the paper does for OpenOrca;
a conversation's turns (system turns left out) are joined the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError


@dataclass(frozen=True)
class InstructionFields:
    """Where the question, response or conversation sits in one JSONL record."""

    question: str = "question"
    response: str = "response"
    conversations: str = "conversations"
    role: str = "from"
    content: str = "value"
    system_roles: tuple[str, ...] = ("system",)


def render_instruction(record: dict, fields: InstructionFields = InstructionFields()) -> str | None:
    """``{question} {response}`` for one record, or its conversation's turns joined by a space; None if empty."""
    turns = record.get(fields.conversations)
    if isinstance(turns, list):
        parts = [str(t.get(fields.content, "")).strip() for t in turns
                 if isinstance(t, dict) and t.get(fields.role) not in fields.system_roles]
    else:
        parts = [str(record.get(fields.question) or "").strip(), str(record.get(fields.response) or "").strip()]
        if not all(parts):
            return None
    parts = [p for p in parts if p]
    return " ".join(parts) if parts else None


def read_instructions(path: str | Path, fields: InstructionFields = InstructionFields()) -> list[dict]:
    """Read and render a JSONL of instruction data: ``[{"id", "text"}]``; records with nothing to render are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"{path}: general-instruction file not found (format.general_instructions)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataPrepError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            text = render_instruction(rec, fields)
            if text:
                out.append({"id": f"general:{rec.get('id', n)}", "text": text})
    if not out:
        raise DataPrepError(f"{path}: no instruction found with fields {fields.question!r}/{fields.response!r} "
                            f"or {fields.conversations!r}")
    return out
