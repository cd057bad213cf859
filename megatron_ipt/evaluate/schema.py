"""The results record: one JSON file per evaluation, validated on write and on read (``ipt eval compare``).

A record is ``{"model": {...}, "task": str, "metrics": {name: number}, "n": int >= 1, "settings": {...},
"created": str}`` plus task-specific extras (``n_multiple_choice``, ``truncated``, ``components``,
``harness``...). ``model`` holds ``name`` and, where known, ``kind`` (megatron / megatron-init / hf),
``path``, ``iteration`` (checkpoint) and ``fingerprint`` (preset, hf_config, tokenizer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from megatron_ipt.errors import IptError


class ResultsFileError(IptError, ValueError):
    """A results file is missing, not JSON or does not match the results schema; the message names the file."""


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str = Field(min_length=1)
    kind: str | None = None
    path: str | None = None
    iteration: int | None = None
    fingerprint: dict | None = None


class ResultsRecord(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: ModelInfo
    task: str = Field(min_length=1)
    metrics: dict[str, float] = Field(min_length=1)
    n: int = Field(ge=1, description="Number of examples (RC pairs, harness documents, perplexity windows).")
    settings: dict = Field(default_factory=dict)
    created: str | None = None

    @field_validator("metrics")
    @classmethod
    def _finite(cls, metrics: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metric(s) {bad} are not finite numbers")
        return metrics


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "record"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {e['msg']}{more}"


def validate_record(record: dict, source: str | Path = "results") -> dict:
    """Check ``record`` against :class:`ResultsRecord`; returns it unchanged. Raises ResultsFileError naming
    ``source`` and the first offending key."""
    try:
        ResultsRecord.model_validate(record)
    except ValidationError as e:
        raise ResultsFileError(f"{source}: not a results file ({_first_error(e)})") from None
    return record


def read_results(path: str | Path) -> dict:
    """Load and validate one results JSON file; ResultsFileError (naming the file) when it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsFileError(f"{path}: not a results file ({e})") from None
    if not isinstance(record, dict):
        raise ResultsFileError(f"{path}: not a results file (a JSON object is expected)")
    return validate_record(record, path)
